"""``waitingOn``: what a pending run waits for, read from the engine for the runs someone
looks at, and shared by every replica for a moment.

One entry per thing the instance waits for (shared/camunda.py ``waits``)::

    {"type": "externalTask", "activity", "topic", "retries", "lockedUntil"?}
    {"type": "userTask", "activity", "taskId", "assignee"?}
    {"type": "message", "activity", "messageName"}
    {"type": "timer", "activity", "dueAt"}
    {"type": "incident", "activity", "message"}

Cheap by construction: only a status read (or an action's answer) of a *pending* run asks,
the engine reads are of its runtime tables (the instance's open rows, at once), and the
first replica to need a run's answer keeps it in Redis for ``FRESH_MS``
(``{p:n}:waiting:{correlationId}``): a client polling a run, or many looking at one, cost
the engine at most one read a second. An engine that does not answer leaves the field out
rather than failing the status read.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from flowgate.shared.camunda import CamundaClient, CamundaError
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import RedisClient
from flowgate.shared.state import RunState

log = logging.getLogger(__name__)

#: How long one read of a run's waits is shared.
FRESH_MS = 1_000


class WaitingOn:
    def __init__(self, camunda: CamundaClient, redis: RedisClient, keys: Keys) -> None:
        self._camunda = camunda
        self._redis = redis
        self._keys = keys

    async def of(self, state: RunState, *, fresh: bool = False) -> list[dict[str, Any]] | None:
        """What the pending run waits for (None: not known now: ended, no instance yet,
        or the engine did not answer). ``fresh``: read the engine even if a replica read it
        a moment ago (the run has just moved on)."""
        if state.finished or state.instance_id is None:
            return None
        key = self._keys.waiting(state.correlation_id)
        if not fresh and (kept := await self._redis.get(key)) is not None:
            found: list[dict[str, Any]] = orjson.loads(kept)
            return found
        try:
            waits = (await self._camunda.waits(state.instance_id)).entries
        except CamundaError as exc:
            log.info("waitingOn unknown: %s", exc, extra={"correlationId": state.correlation_id})
            return None
        await self.share(state, waits)
        return waits

    async def share(self, state: RunState, waits: list[dict[str, Any]]) -> None:
        """Let every replica answer with ``waits``, read from the engine just now, for a
        moment (an action's answer read them as the run paused)."""
        key = self._keys.waiting(state.correlation_id)
        await self._redis.set(key, orjson.dumps(waits), px=FRESH_MS)
