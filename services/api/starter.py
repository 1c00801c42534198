"""Where a run is started: claim its correlationId, start its engine instance, record it.

:meth:`Starter.start` is the use case behind ``POST /api/process/start`` (the endpoint only
parses the body and answers what it returns). It registers the request's wait first
(services/api/waitroom.py), then:

1. **claim** the correlationId in Redis (shared/store/runs.py): exactly one of any number of
   concurrent starts creates the ``pending`` state, the others join it;
2. for a fresh claim, mark the engine start as **sending**, then **start** the engine
   instance with the system variables (shared/contract.py), the correlationId as business
   key;
3. **attach** the instance id together with the ``started`` audit row, reading the state
   back in the same script (the start's wait begins from it: services/api/waitroom.py
   :meth:`~WaitRoom.expect`); or, when the engine refused the start, **abandon** the claim
   so that nothing stays ``pending`` and a retry with the same id starts afresh (requests
   that joined get the same answer).

Three Redis round trips. ``sending`` is one of them on purpose: it is what lets recovery
give up, within seconds, a claim whose start never left (its replica died, or Redis ran
the claim after the client had been answered 503); a claim recorded as sent has to be
looked for in the engine until the start window has passed.

**Never a second engine instance for one correlationId.** A claim is only given up when no
instance can exist: the engine refused the start, or no start was ever sent. A start whose
answer was lost (a timeout, a dropped connection) may still create its instance later, so
its claim stays ``pending`` and recovery (services/background/recovery.py) looks the
instance up by the run's
traceability id until it is found or ``ENGINE_START_WINDOW_MS`` has passed since the start
was sent (the engine's own bound on a start; see deploy/camunda). The same recovery settles
every claim a dying or stalled replica left behind: not sent after a few seconds, it is
given up; sent, it is looked for. No client has to come back for any of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from flowgate.services.api.metrics import ApiMetrics
from flowgate.services.api.waitroom import WaitResult, WaitRoom
from flowgate.shared.aio import Spawner
from flowgate.shared.camunda import (
    CamundaClient,
    CamundaError,
    DefinitionNotFound,
    EngineError,
    EngineUnavailable,
)
from flowgate.shared.contract import PRIORITY, StartFailed, SystemVariables, failed_start
from flowgate.shared.eventlog import EventRecord
from flowgate.shared.state import RunState, Status
from flowgate.shared.store.runs import Abandoned, RunStore
from flowgate.shared.tenancy import ANONYMOUS, DEFAULT_TENANT, Principal
from flowgate.shared.tracing import OFF, TRACEPARENT, Tracing
from flowgate.shared.variables import VariableError

log = logging.getLogger(__name__)

#: A start may take this long for its engine call even when the client asked not to wait.
START_MIN_WAIT_S = 2.0
#: A claim whose engine start has not been sent this long after the claim was left by a
#: starter that died or stalled: nothing can have reached the engine, so it is given up
#: (services/background/recovery.py).
UNSENT_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class StartCommand:
    """What a client asked to start."""

    process_key: str
    correlation_id: str
    variables: dict[str, Any]
    #: The root variables the run's result holds when the engine ends it (None: all).
    fetch_variables: list[str] | None = None
    #: Where the final status body goes once the run ends (services/background/callbacks.py).
    callback_url: str | None = None
    #: Who starts it: the run belongs to ``principal.tenant`` (shared/tenancy.py).
    principal: Principal = ANONYMOUS
    #: The caller's W3C trace context, when it sent one (shared/tracing.py).
    traceparent: str | None = None
    #: Its tasks' place in the workers' fetch order (None: 0; services/api/limits.py).
    priority: int | None = None

    @property
    def request_hash(self) -> str:
        """Identifies the request: a repeated start must ask for the same thing, in the
        same tenant (another tenant's start with the id is refused like a different one)."""
        asked: list[Any] = [self.process_key, self.variables, self.fetch_variables]
        # (hashes of starts without a callback, in the default tenant, stay as they were)
        if self.callback_url is not None:
            asked.append(self.callback_url)
        if self.principal.tenant != DEFAULT_TENANT:
            asked.append({"tenant": self.principal.tenant})
        canonical = orjson.dumps(asked, option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(canonical).hexdigest()


class StartRefused(Exception):
    """The start did not go ahead, and ``failed`` is the answer: the correlationId names a
    run of another request (422), the claim could not be recorded in time (503), or the
    engine refused the start (its 4xx/5xx)."""

    def __init__(self, failed: StartFailed) -> None:
        super().__init__(failed.error)
        self.failed = failed


class Starter:
    def __init__(
        self,
        store: RunStore,
        camunda: CamundaClient,
        waitroom: WaitRoom,
        spawner: Spawner,
        metrics: ApiMetrics,
        *,
        engine_timeout_s: float,
        tracing: Tracing = OFF,
    ) -> None:
        self._tracing = tracing
        self._store = store
        self._camunda = camunda
        self._waitroom = waitroom
        self._spawner = spawner
        self._metrics = metrics
        self._engine_timeout_s = engine_timeout_s

    async def start(
        self, command: StartCommand, *, wait_s: float, until: str | None = None
    ) -> WaitResult:
        """Start the run (or join it) and wait up to ``wait_s`` for its end, or for the step
        ``until``. Raises :class:`StartRefused` with the answer when it did not go ahead.

        A request that joined a start which was then given up before it reached the engine
        (its replica died before sending it, or the engine was unreachable for it) starts
        afresh once, if its wait allows: what its client would do anyway, without seeing it.
        """
        began = asyncio.get_running_loop().time()
        result, joined = await self._start_and_wait(command, wait_s, until)
        failed = result.failed_start
        left_s = wait_s - (asyncio.get_running_loop().time() - began)
        if joined and failed is not None and failed.status_code >= 500 and left_s > 0:
            result, _ = await self._start_and_wait(command, left_s, until)
        return result

    async def _start_and_wait(
        self, command: StartCommand, wait_s: float, until: str | None
    ) -> tuple[WaitResult, bool]:
        """One attempt: the wait's result, and whether this request joined another's start.

        The wait is registered before the claim, so the state the attach reads back is its
        first look (subscribe-then-check without a read of its own). The client's wait
        bounds the start as well; without one (respond-async), a short one still lets the
        engine's refusal (404, 400) come back.
        """
        deadline = asyncio.get_running_loop().time() + max(wait_s, START_MIN_WAIT_S)
        async with self._waitroom.expect(command.correlation_id, wait_s, until=until) as wait:
            try:
                async with asyncio.timeout_at(deadline):
                    with self._tracing.span("flowgate claim"):
                        state, created = await self.claim(command, wait_s=wait_s)
            except TimeoutError as exc:
                failed = StartFailed(
                    command.correlation_id, 503, "the start could not be recorded in time; retry"
                )
                raise StartRefused(failed) from exc
            attached = await self._begin_within(state, command, deadline) if created else None
            with self._tracing.span("flowgate park") as parked:
                result = await wait.result(attached)
                if parked is not None:
                    parked.set_attribute("flowgate.wait.end", result.end.value)
            return result, not created

    async def _begin_within(
        self, state: RunState, command: StartCommand, deadline: float
    ) -> RunState | None:
        """Start the engine instance of a fresh claim; the state as attached, or None when
        the engine call goes on past ``deadline``. It runs in the app's task group: neither
        the end of the wait nor a client that goes away interrupts it, and a late answer
        still attaches (or abandons) the claim."""
        begun = self._spawner.spawn(
            self.begin(state, command.variables, priority=command.priority),
            name=f"start:{command.correlation_id}",
        )
        attached = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                attached = await asyncio.shield(begun)
        if isinstance(attached, StartFailed):
            raise StartRefused(attached)
        return attached

    async def claim(self, command: StartCommand, *, wait_s: float = 0) -> tuple[RunState, bool]:
        """Claim the id (or join its claim); True when this call created it. A client that
        waits leaves its deadline with the claim (a step may give up with it).

        Raises :class:`StartRefused` (422) when the id names a run of another request.
        """
        waits_until = datetime.now(UTC) + timedelta(seconds=wait_s) if wait_s > 0 else None
        state, created = await self._store.claim(
            SystemVariables.new(command.correlation_id),
            command.process_key,
            command.request_hash,
            fetch_variables=command.fetch_variables,
            callback_url=command.callback_url,
            # Left out for the default tenant and no credentials: nothing to store.
            tenant=_unless(command.principal.tenant, DEFAULT_TENANT),
            principal=_unless(command.principal.subject, ANONYMOUS.subject),
            traceparent=self._tracing.traceparent(command.traceparent),
            look_after_s=UNSENT_GRACE_S,
            client_deadline=waits_until,
        )
        if not created and state.request_hash != command.request_hash:
            raise StartRefused(
                StartFailed(
                    command.correlation_id,
                    422,
                    f"correlationId {command.correlation_id!r} is already used by a start"
                    " with another processKey, other variables or another callbackUrl",
                    field="correlationId",
                )
            )
        return state, created

    async def begin(
        self, state: RunState, variables: dict[str, Any], *, priority: int | None = None
    ) -> RunState | StartFailed | None:
        """Start the engine instance of a fresh claim and attach it.

        Returns the state as attached, the answer when the engine refused the start (the
        claim is then abandoned), or None: unconfirmed and left to recovery, or
        changed meanwhile (given up, ended at once, cancelled).
        """
        cid = state.correlation_id
        sent = await self._store.sending(state, look_after_s=self._engine_timeout_s + 1)
        if sent is None:  # recovery gave the claim up while this replica stalled
            return failed_start(await self._store.get(cid))
        ids = SystemVariables.of(sent)
        carried: dict[str, Any] = {TRACEPARENT: sent.traceparent} if sent.traceparent else {}
        if priority is not None:
            carried[PRIORITY] = priority
        try:
            with (
                self._metrics.engine_start_seconds.time(),
                self._tracing.span("camunda start", parent=sent.traceparent, kind="client"),
            ):
                instance = await self._camunda.start_process(
                    sent.process_key,
                    business_key=cid,
                    variables={**variables, **ids.to_variables(), **carried},
                )
        except EngineUnavailable as exc:
            if exc.request_sent:  # the engine may still create the instance
                log.warning(
                    "engine start unconfirmed; looking for its instance",
                    extra={"correlationId": cid, "error": str(exc)},
                )
                await self.look_for_instance(sent)
                return None
            return await self._refused(sent, exc)
        except (CamundaError, VariableError) as exc:
            return await self._refused(sent, exc)
        attached = await self._attach(sent, instance.id, request=variables)
        if instance.ended:  # no wait state: the run is over already, answer at once
            await self._finish_ended(sent, instance.id)
            return None
        return attached

    async def _finish_ended(self, state: RunState, instance_id: str) -> None:
        variables = await self._camunda.root_variables([instance_id])
        result = SystemVariables.result_of(variables.get(instance_id, {}), state.fetch_variables)
        await self._store.finish(state.correlation_id, Status.OK, data=result)

    async def look_for_instance(self, state: RunState) -> bool:
        """Attach the instance of an unconfirmed start if the engine has it; True if so."""
        try:
            found = await self._camunda.historic_process_instances_with(
                business_key=state.correlation_id,
                variables_equal={"traceability_id": state.traceability_id or ""},
            )
        except CamundaError as exc:
            extra = {"correlationId": state.correlation_id, "error": str(exc)}
            log.warning("could not look for an instance", extra=extra)
            return False
        if not found:
            return False
        await self._attach(state, str(found[0]["id"]), request=None)
        extra = {"correlationId": state.correlation_id}
        log.info("found the instance of an unconfirmed start", extra=extra)
        return True

    # --- helpers -------------------------------------------------------------------------------

    async def _attach(
        self, state: RunState, instance_id: str, *, request: dict[str, Any] | None
    ) -> RunState | None:
        event = EventRecord.of_run(
            state,
            status="started",
            step=0,
            step_name="start",
            http_method="POST",
            endpoint="/api/process/start",
            request_data=request,
            identifiers=SystemVariables.of(state).identifiers,
            # Recovered: found by recovery, without the request that started it.
            metadata={
                "instanceId": instance_id,
                "recovered": request is None,
                **({"principal": state.principal} if state.principal else {}),
            },
        )
        try:
            return await self._store.attach_instance(state.correlation_id, instance_id, event)
        except Abandoned:
            # The run was cancelled while its start was in flight, or (beyond the window's
            # promise) given up, when a retry may start another instance: remove this one.
            log.warning(
                "an instance arrived for a cancelled or abandoned run; deleting it",
                extra={"correlationId": state.correlation_id, "instanceId": instance_id},
            )
            await self._camunda.delete_process_instance(instance_id)
            return None

    async def _refused(self, state: RunState, exc: CamundaError | VariableError) -> StartFailed:
        failed = _refusal(exc, state)
        if failed.status_code >= 500:
            extra = {"statusCode": failed.status_code, "engine": str(exc)}
            log.warning(
                "engine start failed", extra={"correlationId": state.correlation_id, **extra}
            )
        await self._store.abandon(state.version, failed)
        return failed


def _unless(value: str, default: str) -> str | None:
    return None if value == default else value


def _refusal(exc: CamundaError | VariableError, state: RunState) -> StartFailed:
    """The caller's mistakes are 4xx naming the field; the engine's are 502/503."""
    cid = state.correlation_id
    if isinstance(exc, VariableError):
        return StartFailed(cid, 400, str(exc), field="variables")
    if isinstance(exc, DefinitionNotFound):
        error = f"no process definition with key {state.process_key!r}"
        return StartFailed(cid, 404, error, field="processKey")
    if isinstance(exc, EngineUnavailable):
        return StartFailed(cid, 503, "the process engine is unreachable; retry later")
    if isinstance(exc, EngineError) and exc.status_code == 400:
        field = "variables" if "variable" in exc.message.lower() else None
        return StartFailed(cid, 400, f"the engine rejected the start: {exc.message}", field=field)
    message = exc.message if isinstance(exc, EngineError) else str(exc)
    return StartFailed(cid, 502, f"the process engine failed to start the process: {message}")
