"""Where a run's end is delivered to its ``callbackUrl``.

A run started with a ``callbackUrl`` is put on a schedule (``{p}:callbacks``) by the same Lua
step that ends it (shared/store/runs.py ``finish``), so no end is missed, whoever ends the run.
Every API replica runs a :class:`Deliverer`: it takes due deliveries from the schedule (one
replica per delivery at a time; a delivery whose replica dies comes due again by itself),
POSTs the final status body (what ``GET /api/process/status/{id}`` answers), and drops the
delivery on a 2xx. Anything else is tried again with backoff (1 s, doubling, at most
10 min apart) until ``CALLBACK_MAX_ATTEMPTS``; a target that is refused is given up at once.

Delivery is **at least once**: a receiver may see one run's end twice (same
``Flowgate-Delivery``) and must treat that as once. The request carries:

``Flowgate-Delivery``   the run's correlationId, percent-encoded: the same on every attempt
``Flowgate-Attempt``    1, 2, ...
``Flowgate-Signature``  with ``CALLBACK_SECRET``: ``t=<unix seconds>,v1=<hex HMAC-SHA256 of
                        "<t>.<body>" keyed with the secret>``; a receiver recomputes it and
                        refuses an old ``t`` (replays)

Each attempt is an audit row (step ``callback``: ``delivered``, ``failed`` or ``given_up``,
with the receiver's HTTP status) and a ``flowgate_api_callbacks_total`` sample.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Sequence
from urllib.parse import quote

import httpx
import orjson

from flowgate.services.api.metrics import ApiMetrics
from flowgate.services.api.parsing import check_target
from flowgate.services.api.runs import Runs
from flowgate.services.api.schemas import ProcessStatus
from flowgate.shared.aio import concurrently, sleep_or_stop
from flowgate.shared.eventlog import EventRecord, append_event
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import REDIS_ERRORS, RedisClient
from flowgate.shared.state import RunState
from flowgate.shared.store.runs import RunStore

log = logging.getLogger(__name__)

#: How often each replica looks for due deliveries (the latency of a first attempt).
POLL_INTERVAL_S = 0.1
#: Deliveries one replica takes per look, and sends at once.
BATCH = 64
AT_ONCE = 16
FIRST_RETRY_S, MAX_RETRY_S = 1.0, 600.0


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Flowgate-Signature`` header value for ``body`` sent at ``timestamp``."""
    signed = str(timestamp).encode() + b"." + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


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
    ) -> None:
        self._store = store
        self._runs = runs
        self._redis = redis
        self._keys = keys
        self._metrics = metrics
        self._http = http
        self._secret = secret
        self._allowed = tuple(allowed_hosts)
        self._max_attempts = max_attempts
        self._timeout_s = timeout_s
        self._at_once = asyncio.Semaphore(AT_ONCE)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver what is due until ``stop``; never raises for Redis or receiver trouble."""
        while not await sleep_or_stop(stop, POLL_INTERVAL_S):
            try:
                due = await self._store.callbacks.due(BATCH)
                async with concurrently() as group:
                    for cid in due:
                        group.create_task(self._take_and_deliver(cid))
            except (*REDIS_ERRORS, OSError) as exc:
                log.warning("callback delivery paused", extra={"error": repr(exc)})
            except Exception:
                log.exception("callback delivery pass failed; trying again")

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
        headers = {
            "Content-Type": "application/json",
            "Flowgate-Delivery": quote(state.correlation_id, safe=""),
            "Flowgate-Attempt": str(attempt),
        }
        if self._secret:
            headers["Flowgate-Signature"] = signature(self._secret, int(time.time()), body)
        try:
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
