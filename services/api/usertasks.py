"""Where a client works a run's user tasks: lists them, and completes one and hears, in the
same answer, what came of it (services/api/pause.py: the run's end, a step it names, or its
next pause with the user tasks then open).

A task is a run's when its engine instance is the run's instance; any other id is 404 (no
look at another run's tasks). Completing is first come, first served across replicas: a
completion claims the task in Redis (``{p:n}:task:{taskId}``, kept for ``RESULT_TTL_S``)
before the engine hears of it, so of two concurrent completions one is 200 and the other
409, and so is a repeat after the first; a completion the engine refused gives its claim
back, so the client can correct it and try again.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from flowgate.services.api.pause import Paused, Waits, next_pause
from flowgate.services.api.runs import Runs
from flowgate.services.api.waitroom import WaitRoom
from flowgate.shared.camunda import CamundaClient, NotFound, UserTask
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import RedisClient
from flowgate.shared.state import RunState
from flowgate.shared.store.runs import RunStore


class Refusal(StrEnum):
    """Why a completion did not go ahead."""

    UNKNOWN_RUN = "unknown_run"
    RUN_ENDED = "run_ended"
    NOT_THIS_RUNS = "not_this_runs"  # no such open task in this run
    TAKEN = "taken"  # completed already (or being completed by another request)


@dataclass(frozen=True, slots=True)
class Completion:
    """A completion's answer: the pause it led to, or why it was refused (with the run as
    it is, for a run that has ended)."""

    paused: Paused | None = None
    refused: Refusal | None = None
    state: RunState | None = None


class UserTasks:
    def __init__(
        self,
        store: RunStore,
        runs: Runs,
        camunda: CamundaClient,
        waitroom: WaitRoom,
        redis: RedisClient,
        keys: Keys,
        *,
        result_ttl_s: int,
    ) -> None:
        self._store = store
        self._runs = runs
        self._camunda = camunda
        self._waitroom = waitroom
        self._redis = redis
        self._keys = keys
        self._result_ttl_s = result_ttl_s

    async def open(self, correlation_id: str) -> list[UserTask] | None:
        """The run's open user tasks (none once it has ended); None for an unknown run."""
        state = await self._runs.get(correlation_id)
        if state is None:
            return None
        if state.finished or state.instance_id is None:
            return []
        return await self._camunda.user_tasks(state.instance_id)

    async def complete(
        self,
        correlation_id: str,
        task_id: str,
        *,
        variables: dict[str, Any],
        wait_s: float,
        until: str | None,
    ) -> Completion:
        """Complete the run's task ``task_id`` and wait for what follows (see the module
        docstring). Engine errors other than "no such task" escape, the claim given back."""
        state = await self._runs.get(correlation_id)
        if state is None:
            return Completion(refused=Refusal.UNKNOWN_RUN)
        if state.finished:
            return Completion(refused=Refusal.RUN_ENDED, state=state)
        claim = self._keys.user_task(correlation_id, task_id)
        # The instance's open tasks: what tells a task of this run, and the pause to compare
        # the next one with (pause.py), in one read.
        before = await Waits.of(self._camunda, state.instance_id)
        if state.instance_id is None or not before.holds(task_id):
            # Read after the engine: a completion claims before the engine hears of it, so a
            # task it has taken from the engine is claimed by then, however the two raced.
            why = Refusal.TAKEN if await self._redis.exists(claim) else Refusal.NOT_THIS_RUNS
            return Completion(refused=why, state=state)
        if not await self._redis.set(claim, "1", nx=True, ex=self._result_ttl_s):
            return Completion(refused=Refusal.TAKEN, state=state)
        try:
            await self._camunda.complete_user_task(task_id, variables=variables)
        except NotFound:
            return Completion(refused=Refusal.TAKEN, state=state)  # done elsewhere meanwhile
        except BaseException:
            await self._redis.delete(claim)
            raise
        paused = await next_pause(
            waitroom=self._waitroom,
            store=self._store,
            camunda=self._camunda,
            correlation_id=correlation_id,
            before=before,
            wait_s=wait_s,
            until=until,
        )
        return Completion(paused=paused)
