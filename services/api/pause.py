"""Waiting for a run's next pause, after a client acted on it (completed a user task, sent
a message): the answer comes once the run has ended, has finished the step the client
named (``waitUntil``), or waits for the outside world again: a user task or a message
wait that was not there before the action. External tasks are not pauses: workers do them.

How it notices without a poll per run: the request follows the run in the wait room
(services/api/waitroom.py), so every recorded step and the run's end wake it; on each
wake, and every ``RECHECK_S`` without one (the engine may create a user task without
recording a step of it first), it reads the run and asks the engine for the instance's
open user tasks and message waits: two reads of its runtime tables, only while a request
waits like this. The engine runs an instance on from an action to its next wait state in
the action's own transaction, so a pause that follows at once is seen at the first look.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from flowgate.services.api.waitroom import WaitRoom
from flowgate.shared.aio import concurrently
from flowgate.shared.camunda import CamundaClient, MessageWait, UserTask
from flowgate.shared.state import RunState
from flowgate.shared.steps import StepEvent
from flowgate.shared.store.runs import RunStore

#: Looked at again this often when nothing wakes the request.
RECHECK_S = 1.0


@dataclass(frozen=True, slots=True)
class Waits:
    """What an instance waits for from outside, at one moment."""

    tasks: tuple[UserTask, ...] = ()
    messages: tuple[MessageWait, ...] = ()

    @classmethod
    async def of(cls, camunda: CamundaClient, instance_id: str | None) -> Waits:
        if instance_id is None:
            return cls()
        async with concurrently() as reads:
            tasks = reads.create_task(camunda.user_tasks(instance_id))
            messages = reads.create_task(camunda.message_waits(instance_id))
        return cls(tuple(tasks.result()), tuple(messages.result()))

    def new_since(self, before: Waits) -> bool:
        """Whether a user task or a message wait appeared that ``before`` did not have."""
        known_tasks = {task.id for task in before.tasks}
        return any(task.id not in known_tasks for task in self.tasks) or bool(
            set(self.messages) - set(before.messages)
        )


@dataclass(frozen=True, slots=True)
class Paused:
    """How the wait ended: the run as last read (None: gone), and why."""

    state: RunState | None
    milestone: StepEvent | None = None
    #: What the run waits for, when it paused (or as last read).
    waits: Waits = field(default_factory=Waits)
    #: The wait ran out first.
    timed_out: bool = False


async def next_pause(
    *,
    waitroom: WaitRoom,
    store: RunStore,
    camunda: CamundaClient,
    correlation_id: str,
    before: Waits,
    wait_s: float,
    until: str | None = None,
) -> Paused:
    """Wait up to ``wait_s`` for the run's end, the step ``until``, or (without ``until``)
    a pause ``before`` did not show. Raises :class:`~flowgate.services.api.waitroom.RoomFull`
    when every parking place is taken."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    async with waitroom.follow(correlation_id) as follower:
        while True:
            state = await store.get(correlation_id)
            if state is None or state.finished:
                return Paused(state)
            if until is not None and (step := await store.steps.find(correlation_id, until)):
                return Paused(state, milestone=step)
            waits = await Waits.of(camunda, state.instance_id)
            if until is None and waits.new_since(before):
                return Paused(state, waits=waits)
            left = deadline - loop.time()
            if left <= 0:
                return Paused(state, waits=waits, timed_out=True)
            await follower.changed(min(left, RECHECK_S))
