"""What an action's answer reads of the engine (services/api/pause.py), without an engine:
the first look reads everything at once, and a read that fails costs the answer its
``waitingOn`` only, not the pause."""

from __future__ import annotations

from typing import Any, cast

from flowgate.services.api.pause import _look, _rest
from flowgate.shared.camunda import (
    CamundaClient,
    EngineUnavailable,
    InstanceWaits,
    MessageWait,
    UserTask,
)

TASK = UserTask("t-1", "Review", "review", None, None, None, "i-1")
MESSAGE = MessageWait("catch", "paid")
ENTRIES: list[dict[str, Any]] = [{"type": "userTask", "activity": "review", "taskId": "t-1"}]


class Engine:
    """Answers the reads a look makes; ``down`` makes the whole read fail."""

    def __init__(self, *, down: bool = False) -> None:
        self.down = down
        self.calls: list[str] = []

    async def waits(
        self, instance_id: str, *, tasks: Any = None, messages: Any = None
    ) -> InstanceWaits:
        self.calls.append("waits" if tasks is None else "rest")
        if self.down:
            raise EngineUnavailable("down", request_sent=True)
        return InstanceWaits((TASK,), (MESSAGE,), ENTRIES)

    async def user_tasks(self, instance_id: str) -> list[UserTask]:
        self.calls.append("tasks")
        return [TASK]

    async def message_waits(self, instance_id: str) -> list[MessageWait]:
        self.calls.append("messages")
        return [MESSAGE]


async def test_the_first_look_reads_the_pause_and_the_waits_in_one_round() -> None:
    engine = Engine()
    waits, waiting_on = await _look(cast(CamundaClient, engine), "i-1", whole=True)
    assert (waits.tasks, waits.messages, waiting_on) == ((TASK,), (MESSAGE,), ENTRIES)
    assert engine.calls == ["waits"]


async def test_a_later_look_reads_the_pause_only() -> None:
    engine = Engine()
    waits, waiting_on = await _look(cast(CamundaClient, engine), "i-1", whole=False)
    assert (waits.tasks, waiting_on) == ((TASK,), None)
    assert sorted(engine.calls) == ["messages", "tasks"]


async def test_a_failed_read_of_the_waits_leaves_the_pause_and_drops_waiting_on() -> None:
    engine = Engine(down=True)
    waits, waiting_on = await _look(cast(CamundaClient, engine), "i-1", whole=True)
    assert (waits.tasks, waiting_on) == ((TASK,), None)
    assert await _rest(cast(CamundaClient, engine), "i-1", waits) is None
