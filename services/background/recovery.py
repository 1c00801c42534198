"""Where interrupted starts are settled: :class:`Recovery`, on every API replica.

A start's claim waits in its partition's ``{p}:starts`` schedule until its engine instance
is attached (services/api/starter.py). Whatever a starter left behind (it died, it stalled,
its engine call's answer was lost), recovery settles it, one replica per claim at a time
(:meth:`~flowgate.shared.store.schedule.Schedule.take`):

* a claim whose start was **never sent** is given up after a few seconds (``abandoned``,
  the correlationId free again): nothing can have reached the engine;
* a claim whose start **was sent** is looked up in the engine by its traceability id, and
  attached when found; when ``ENGINE_START_WINDOW_MS`` has passed since the start was sent
  without an instance (longer than any engine call can take), it is given up.

No client has to come back for any of this.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from flowgate.services.api.starter import Starter
from flowgate.shared.aio import sleep_or_stop
from flowgate.shared.contract import StartFailed
from flowgate.shared.state import Status
from flowgate.shared.store.runs import RunStore

log = logging.getLogger(__name__)

#: How often recovery looks for due claims, how many it takes per pass, and how soon it
#: looks again for an instance it did not find.
INTERVAL_S = 1.0
BATCH = 100
LOOK_AGAIN_S = 2.0


class Recovery:
    def __init__(self, store: RunStore, starter: Starter, *, start_window_s: float) -> None:
        self._store = store
        self._starter = starter
        self._start_window_s = start_window_s

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: settle the claims whose starter died, stalled or lost its answer.
        Never raises for Redis or engine trouble: it logs and carries on."""
        while not await sleep_or_stop(stop, INTERVAL_S):
            try:
                for cid in await self._store.starts.due(BATCH):
                    if await self._store.starts.take(cid, again_s=LOOK_AGAIN_S):
                        await self.settle(cid)
            except Exception:
                log.exception("start recovery pass failed; trying again")

    async def settle(self, cid: str) -> None:
        """Look after one due claim (see the module docstring)."""
        state = await self._store.get(cid)
        if state is None or state.status is not Status.PENDING or state.instance_id:
            await self._store.starts.drop(cid)
            return
        if state.start_sent_at is None:
            failed = StartFailed(cid, 503, "the start was interrupted before it reached the "
                                 "process engine; retry")  # fmt: skip
            if await self._store.abandon(state.version, failed, unsent=True):
                log.warning(
                    "gave up a claim whose start was never sent", extra={"correlationId": cid}
                )
            return
        if await self._starter.look_for_instance(state):
            return
        waited_s = (datetime.now(UTC) - state.start_sent_at).total_seconds()
        if waited_s > self._start_window_s:
            failed = StartFailed(cid, 503, "the process engine did not confirm the start; retry")
            if await self._store.abandon(state.version, failed):
                log.error(
                    "gave up an unconfirmed start after its window",
                    extra={"correlationId": cid, "waitedS": round(waited_s)},
                )
