"""Where a run's state and steps are read: Redis first, Postgres once Redis no longer
holds them (a finished run's steps leave Redis once Postgres has them; its state when its
retention ends).

:class:`Runs` is the read side the endpoints use; transitions go through
shared/store/runs.py, which the write-behind copies to Postgres.
"""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool

from flowgate.services.api.settled import Settled
from flowgate.shared import postgres
from flowgate.shared.eventlog import EventRecord
from flowgate.shared.state import RunState
from flowgate.shared.steps import StepEvent
from flowgate.shared.store.runs import RunStore
from flowgate.shared.tenancy import Principal


class Runs:
    def __init__(
        self, store: RunStore, pool: AsyncConnectionPool, *, settled: Settled | None = None
    ) -> None:
        self._store = store
        self._pool = pool
        self._settled = settled

    async def get(self, correlation_id: str) -> RunState | None:
        """The run's latest state, or None when no store knows it."""
        if self._settled is not None and (ended := self._settled.get(correlation_id)):
            return ended
        return await self._store.get(correlation_id) or await self.stored(correlation_id)

    async def visible(self, correlation_id: str, principal: Principal) -> bool:
        """Whether ``principal`` may see the run: it exists and is its tenant's (a read
        token: its one run). An admin is not asked: nothing is read for it."""
        if principal.run is not None and principal.run != correlation_id:
            return False
        if principal.every_tenant:
            return True
        if self._settled is not None and (ended := self._settled.get(correlation_id)):
            return principal.sees(ended.tenant)  # an end's tenant: no round trip
        status, tenant = await self._store.status_and_tenant(correlation_id)
        if status is None:  # Redis no longer holds it
            state = await self.stored(correlation_id)
            if state is None:
                return False
            tenant = state.tenant
        return principal.sees(tenant)

    async def stored(self, correlation_id: str) -> RunState | None:
        """Postgres's copy of a run Redis no longer holds."""
        return await postgres.get_run(self._pool, correlation_id)

    async def steps(
        self, run: RunState, *, after: str | None = None
    ) -> list[tuple[str, StepEvent]]:
        """Every step of ``run`` after the entry id ``after`` (None: all), with its id."""
        steps = await self._store.steps.after(run.correlation_id, after=after)
        if steps or not run.finished:
            return steps
        return await postgres.steps_after(
            self._pool, run.correlation_id, traceability_id=run.traceability_id, after=after
        )

    async def events(self, key: str, by: str) -> list[EventRecord]:
        """The audit trail by traceabilityId, by correlationId, or (``by="any"``) by
        traceabilityId and else by correlationId.

        By correlationId it is the trail of the id's latest run: an id used again once its
        record left Redis names a new run, whose trail is its own (the earlier run's rows
        stay readable by that run's traceabilityId).
        """
        events: list[EventRecord] = []
        if by in ("any", "traceabilityId"):
            events = await postgres.events_by_traceability(self._pool, key)
        if not events and by in ("any", "correlationId"):
            run = await self.get(key)
            latest = run.traceability_id if run else None
            events = await postgres.events_by_correlation(self._pool, key, traceability_id=latest)
        return events
