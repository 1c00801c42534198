"""Where a run's end is delivered to its ``callbackUrl``.

A run started with a ``callbackUrl`` is put on a schedule (``{p}:callbacks``) by the same Lua
step that ends it (shared/store/runs.py ``finish``), so no end is missed, whoever ends the run.
Every API replica runs a :class:`Deliverer`: it takes due deliveries from the schedule (one
replica per delivery at a time; a delivery whose replica dies comes due again by itself),
looking as soon as its wait room hears of a run that ends with a callback, and otherwise
once a second (for retries, and ends whose notice it missed),
POSTs the final status body (what ``GET /api/process/status/{id}`` answers), and drops the
delivery on a 2xx. Anything else is tried again with backoff (1 s, doubling, at most
10 min apart) until ``CALLBACK_MAX_ATTEMPTS``; a target that is refused is given up at once.

Delivery is **at least once**: a receiver may see one run's end twice (same
``webhook-id``) and must treat that as once. The request follows the Standard Webhooks
scheme (https://www.standardwebhooks.com), so a receiver verifies it with that project's
libraries (``standardwebhooks.Webhook(secret).verify(body, headers)``):

``webhook-id``          the run's traceabilityId: the same on every attempt, unique per run
``webhook-timestamp``   unix seconds of this attempt (a receiver refuses old ones: replays)
``webhook-signature``   with ``CALLBACK_SECRET``: ``v1,<base64 HMAC-SHA256 of
                        "<id>.<timestamp>.<body>">``; the secret is ``whsec_<base64>`` as
                        those libraries expect (any other text is used as the key's bytes)
``Flowgate-Delivery``   the run's correlationId, percent-encoded
``Flowgate-Attempt``    1, 2, ...
``traceparent``         the run's trace (shared/tracing.py), when it has one

Targets must be allowed (``CALLBACK_ALLOWED_HOSTS``: host names, CIDRs, or ``*`` for any):
with none allowed, a start naming a ``callbackUrl`` is refused (services/api/parsing.py).

Each attempt is an audit row (step ``callback``: ``delivered``, ``failed`` or ``given_up``,
with the receiver's HTTP status) and a ``flowgate_api_callbacks_total`` sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from urllib.parse import quote

import httpx
import orjson
from standardwebhooks import Webhook

from flowgate.services.api.metrics import ApiMetrics
from flowgate.services.api.parsing import check_target
from flowgate.services.api.runs import Runs
from flowgate.services.api.schemas import ProcessStatus
from flowgate.shared.aio import concurrently, race_stop, sleep_or_stop
from flowgate.shared.eventlog import EventRecord, append_event
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import REDIS_ERRORS, RedisClient
from flowgate.shared.state import RunState
from flowgate.shared.store.runs import RunStore
from flowgate.shared.tracing import OFF, Tracing

log = logging.getLogger(__name__)

#: The least time between two looks for due deliveries, however often ends are heard of.
POLL_INTERVAL_S = 0.1
#: How often a replica looks when it hears of no end: a deferred retry's first chance, and
#: what bounds a first attempt's latency if the end's notice was missed.
IDLE_POLL_S = 1.0
#: Deliveries one replica takes per look, and sends at once.
BATCH = 64
AT_ONCE = 16
FIRST_RETRY_S, MAX_RETRY_S = 1.0, 600.0


def signer(secret: str) -> Webhook:
    """The Standard Webhooks signer of ``CALLBACK_SECRET`` (see the module docstring)."""
    return Webhook(secret if secret.startswith("whsec_") else secret.encode())


def signed_headers(signing: Webhook | None, webhook_id: str, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt to deliver ``body``."""
    now = datetime.now(UTC)
    headers = {"webhook-id": webhook_id, "webhook-timestamp": str(int(now.timestamp()))}
    if signing is not None:
        headers["webhook-signature"] = signing.sign(webhook_id, now, body.decode())
    return headers


class Deliverer:
    """Run :meth:`run` in the app's task group; see the module docstring."""

    def __init__(
        self,
        store: RunStore,
        runs: Runs,
        redis: RedisClient,
        keys: Keys,
        metrics: ApiMetrics,
        http: httpx.AsyncClient,
        *,
        secret: str | None,
        allowed_hosts: Sequence[str],
        max_attempts: int,
        timeout_s: float,
        tracing: Tracing = OFF,
    ) -> None:
        self._tracing = tracing
        self._store = store
        self._runs = runs
        self._redis = redis
        self._keys = keys
        self._metrics = metrics
        self._http = http
        self._signer = signer(secret) if secret else None
        self._allowed = tuple(allowed_hosts)
        self._max_attempts = max_attempts
        self._timeout_s = timeout_s
        self._at_once = asyncio.Semaphore(AT_ONCE)
        self._nudged = asyncio.Event()

    def nudge(self) -> None:
        """A run with a callback ended (services/api/waitroom.py): look now, not at the next
        idle pass."""
        self._nudged.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver what is due until ``stop``; never raises for Redis or receiver trouble."""
        while not await self._nudged_or_idle(stop):
            try:
                due = await self._store.callbacks.due(BATCH)
                async with concurrently() as group:
                    for cid in due:
                        group.create_task(self._take_and_deliver(cid))
                if len(due) == BATCH:
                    self.nudge()  # more may be due
            except (*REDIS_ERRORS, OSError) as exc:
                log.warning("callback delivery paused", extra={"error": repr(exc)})
            except Exception:
                log.exception("callback delivery pass failed; trying again")
            if await sleep_or_stop(stop, POLL_INTERVAL_S):
                return

    async def _nudged_or_idle(self, stop: asyncio.Event) -> bool:
        """Wait for a nudge or ``IDLE_POLL_S``; True if ``stop`` came first."""
        if not self._nudged.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(IDLE_POLL_S):
                    await race_stop(stop, self._nudged.wait())
        self._nudged.clear()
        return stop.is_set()

    async def _take_and_deliver(self, cid: str) -> None:
        async with self._at_once:
            # The lease outlasts one attempt, so no other replica sends it meanwhile.
            if await self._store.callbacks.take(cid, again_s=self._timeout_s + 5):
                await self.deliver(cid)

    async def deliver(self, cid: str) -> None:
        """One attempt for a taken delivery, and what follows from its answer."""
        state = await self._runs.get(cid)
        if state is None or state.callback_url is None or not state.finished:
            await self._done(cid)  # aged out of every store, or not ours to send
            return
        attempt = int(await self._redis.hincrby(self._keys.callback_attempts, cid, 1))
        if refused := check_target(state.callback_url, self._allowed):
            await self._given_up(state, attempt, refused, status_code=None)
            return
        status_code, error = await self._post(state, attempt)
        if status_code is not None and 200 <= status_code < 300:
            await self._done(cid)
            self._metrics.callbacks.labels("delivered").inc()
            waited = time.time() - state.updated_at.timestamp()
            self._metrics.callback_latency.observe(max(waited, 0.0))
            await self._audit(state, "delivered", attempt, status_code, None)
        elif attempt >= self._max_attempts:
            await self._given_up(state, attempt, error, status_code=status_code)
        else:
            delay = min(FIRST_RETRY_S * 2 ** (attempt - 1), MAX_RETRY_S)
            await self._store.callbacks.defer(cid, delay_s=delay)
            self._metrics.callbacks.labels("failed").inc()
            await self._audit(state, "failed", attempt, status_code, error)

    async def _post(self, state: RunState, attempt: int) -> tuple[int | None, str]:
        assert state.callback_url is not None
        body = orjson.dumps(ProcessStatus.of(state).model_dump(mode="json"))
        webhook_id = state.traceability_id or quote(state.correlation_id, safe="")
        headers = {
            "Content-Type": "application/json",
            "Flowgate-Delivery": quote(state.correlation_id, safe=""),
            "Flowgate-Attempt": str(attempt),
            **signed_headers(self._signer, webhook_id, body),
        }
        try:
            with self._tracing.span("flowgate callback", parent=state.traceparent, kind="client"):
                if trace := self._tracing.traceparent(state.traceparent):
                    headers["traceparent"] = trace
                response = await self._http.post(
                    state.callback_url, content=body, headers=headers, timeout=self._timeout_s
                )
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"
        return response.status_code, f"the receiver answered {response.status_code}"

    async def _given_up(
        self, state: RunState, attempt: int, error: str, *, status_code: int | None
    ) -> None:
        await self._done(state.correlation_id)
        self._metrics.callbacks.labels("given_up").inc()
        log.warning(
            "callback given up",
            extra={"correlationId": state.correlation_id, "attempts": attempt, "error": error},
        )
        await self._audit(state, "given_up", attempt, status_code, error)

    async def _done(self, cid: str) -> None:
        await self._store.callbacks.drop(cid)
        await self._redis.hdel(self._keys.callback_attempts, cid)

    async def _audit(
        self,
        state: RunState,
        status: str,
        attempt: int,
        status_code: int | None,
        error: str | None,
    ) -> None:
        await append_event(
            self._redis,
            self._keys,
            EventRecord.of_run(
                state,
                status=status,
                step_name="callback",
                http_method="POST",
                endpoint=state.callback_url,
                http_status_code=status_code,
                error_message=error,
                target_system="callback",
                metadata={"attempt": attempt},
            ),
        )
