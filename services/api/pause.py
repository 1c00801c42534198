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
the action's own transaction, so a pause that follows at once is seen at the first look;
that look therefore reads the rest of what the answer shows (``waitingOn``: the external
tasks, timers and incidents) in the same round, and a later look reads it only once it
finds the pause. A wait for a named step (``waitUntil``) reads the engine only if it runs
out: its steps and its end come from the run's record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from flowgate.services.api.waitroom import WaitRoom
from flowgate.shared.aio import concurrently
from flowgate.shared.camunda import CamundaClient, CamundaError, MessageWait, UserTask
from flowgate.shared.state import RunState
from flowgate.shared.steps import StepEvent
from flowgate.shared.store.runs import RunStore

log = logging.getLogger(__name__)

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

    def holds(self, task_id: str) -> bool:
        """Whether ``task_id`` is one of these open user tasks."""
        return any(task.id == task_id for task in self.tasks)

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
    #: ... and all it waits for, as a status read's ``waitingOn`` shows it (None: unknown).
    waiting_on: list[dict[str, Any]] | None = None
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
    first = True
    async with waitroom.follow(correlation_id) as follower:
        while True:
            state = await store.get(correlation_id)
            if state is None or state.finished:
                return Paused(state)
            if until is not None and (step := await store.steps.find(correlation_id, until)):
                return Paused(state, milestone=step)
            left = deadline - loop.time()
            if until is None or left <= 0:  # a wait for a step shows waits only at its end
                waits, waiting_on = await _look(
                    camunda, state.instance_id, whole=first or left <= 0
                )
                first = False
                if left <= 0 or waits.new_since(before):
                    if waiting_on is None and state.instance_id is not None:
                        waiting_on = await _rest(camunda, state.instance_id, waits)
                    return Paused(state, waits=waits, waiting_on=waiting_on, timed_out=left <= 0)
            await follower.changed(min(left, RECHECK_S))


async def _look(
    camunda: CamundaClient, instance_id: str | None, *, whole: bool
) -> tuple[Waits, list[dict[str, Any]] | None]:
    """The instance's user tasks and message waits, and with ``whole`` (in the same round)
    everything it waits for, as ``waitingOn`` shows it."""
    if whole and instance_id is not None:
        # A read of the five that failed: the pause's two are read alone (their failure is
        # the answer's), and the caller asks for the rest again (_rest).
        with contextlib.suppress(CamundaError):
            everything = await camunda.waits(instance_id)
            return Waits(everything.tasks, everything.messages), everything.entries
    return await Waits.of(camunda, instance_id), None


async def _rest(
    camunda: CamundaClient, instance_id: str, waits: Waits
) -> list[dict[str, Any]] | None:
    """``waitingOn``, with the user tasks and message waits of ``waits``; None when the
    engine did not answer (the field is then left out, as a status read leaves it)."""
    try:
        found = await camunda.waits(instance_id, tasks=waits.tasks, messages=waits.messages)
    except CamundaError as exc:
        log.info("waitingOn unknown: %s", exc, extra={"instanceId": instance_id})
        return None
    return found.entries
