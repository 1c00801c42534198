"""WaitRoom: where a request waits for its run to finish, or to reach a step (one per
replica). (One module past 400 lines: the subscriptions and the parked requests keep one
promise together, subscribe-then-check, which is only checkable with both in view.)

The room subscribes to every partition's run channel (shared/keys.py) before it opens:
on a single Redis on one pub/sub connection, on a Redis Cluster with ``SSUBSCRIBE`` on one
connection per shard (the master that owns those partitions' slots). Every parked request
registers in a dict keyed by correlationId, so one message wakes every request of that id
on this replica, whichever replica published it; a message names its run first, so the
room decodes only those of runs waited for here (and compares every body with the
``reopened`` one, whose run its settled cache then forgets: services/api/settled.py, which
is cleared whenever the subscriptions are lost or made again). A run's
end wakes every request for it; a recorded step (shared/contract.py ``StepRecorded``) wakes
only those that wait for a step (a milestone, :meth:`WaitRoom.wait` ``until``) or follow
the run's progress (:meth:`WaitRoom.follow`, the live event stream). Steps are announced
only while such a request has marked its run followed (shared/store/steps.py ``follow``,
after registering, before reading: the same order as below), so that every replica is not
sent every step of every run.

Pub/sub is at-most-once, so the stored state is the truth and a message is only a shortcut:

1. a request registers first, *then* reads the state (subscribe-then-check): a completion
   that lands before the read is seen by the read, one that lands after it is delivered to
   the registration, because every subscription was confirmed before the room opened;
2. every (re)subscription makes every parked request read the state again (messages
   published while a connection was down are lost). A shard that fails, or tells the room
   its slots moved (a failover), makes the room subscribe afresh on the shards the cluster
   names now;
3. a request whose wait runs out reads the state once more before it answers 202.

A lost message therefore costs latency, never a wrong answer.

:meth:`WaitRoom.release_all` (SIGTERM) answers every parked request at once with whatever
the state is, and every later wait returns immediately.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum

from redis.asyncio.client import PubSub

from flowgate.services.api.metrics import ApiMetrics
from flowgate.services.api.pace import Pace
from flowgate.services.api.settled import Settled
from flowgate.shared.aio import Backoff, race_stop, sleep_or_stop
from flowgate.shared.contract import (
    REOPENED,
    Reopened,
    Stalled,
    StartFailed,
    StepRecorded,
    cause_of_message,
    correlation_id_of_message,
    decode_message,
    ends_with_callback,
    failed_start,
)
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import (
    CONFIRMATIONS,
    MESSAGES,
    MOVED,
    REDIS_ERRORS,
    RedisClient,
    SlotsMoved,
    channel_shards,
)
from flowgate.shared.state import RunState
from flowgate.shared.steps import StepEvent
from flowgate.shared.store.runs import RunStore
from flowgate.shared.tracing import OFF, Tracing

log = logging.getLogger(__name__)

#: How long a follower's mark has its run's steps announced; renewed each third of it.
FOLLOW_S = 90.0
#: How much longer than its wait a milestone wait's mark lasts.
_FOLLOW_SLACK_S = 5.0
#: How long one pub/sub read blocks; bounds how late a closed room notices.
_READ_TIMEOUT_S = 1.0
#: Backoff between failed reads while Redis is unreachable.
_BACKOFF_MIN_S, _BACKOFF_MAX_S = 0.05, 2.0


class RoomFull(Exception):
    """``max_parked`` requests are registered already."""


class WaitEnd(StrEnum):
    """Why a wait ended (also the ``how`` label of ``flowgate_api_waits_total``)."""

    SETTLED = "settled"  # the state read was final (or gone) already
    WOKEN = "woken"  # a completion message arrived
    MILESTONE = "milestone"  # the step waited for was recorded
    TIMEOUT = "timeout"  # the deadline passed; the state was read again
    DRAINED = "drained"  # the replica is shutting down
    FULL = "full"  # max_parked requests were already waiting


@dataclass(frozen=True, slots=True)
class WaitResult:
    """The latest known state when the wait ended.

    ``outcome`` is a :class:`RunState` (final, or still pending after a timeout),
    a :class:`StartFailed` (the start this request joined was abandoned), or ``None``
    (Redis holds nothing for the id: never existed, aged out, or abandoned).
    """

    outcome: RunState | StartFailed | None
    end: WaitEnd
    #: The step waited for (``end`` is MILESTONE).
    milestone: StepEvent | None = None
    #: The step the run recorded last, read with a pending ``outcome`` (its progress).
    last_step: StepEvent | None = None

    @property
    def failed_start(self) -> StartFailed | None:
        """The answer of the start waited for, when it was given up."""
        return failed_start(self.outcome)


class _Waiter:
    """One parked request: a flag plus the final message that set it (if any); ``steps``:
    recorded steps wake it too.

    Not an :class:`asyncio.Event`: each of those allocates a deque (~0.7 KB) for waiters it
    will never have more than one of; a bare future, made only while asleep, is all a
    parked request needs.
    """

    __slots__ = ("_future", "_set", "cause", "message", "steps", "woken_ns")

    def __init__(self, *, steps: bool = False) -> None:
        self._set = False
        self._future: asyncio.Future[None] | None = None
        self.message: RunState | StartFailed | None = None
        #: The traceparent of the span that sent ``message`` (tracing), and when it came.
        self.cause: str | None = None
        self.woken_ns = 0
        self.steps = steps

    def set(self) -> None:
        self._set = True
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        self._future = asyncio.get_running_loop().create_future()
        try:
            await self._future
        finally:
            self._future = None

    def take(self) -> RunState | StartFailed | None:
        return self.message


class Follower:
    """A registration that follows one run (see :meth:`WaitRoom.follow`)."""

    def __init__(self, room: WaitRoom, waiter: _Waiter, correlation_id: str) -> None:
        self._room = room
        self._waiter = waiter
        self._correlation_id = correlation_id
        self._marked_at = asyncio.get_running_loop().time()

    async def changed(self, timeout_s: float) -> bool:
        """Sleep until the run may have changed (a step, its end, a resubscription, the
        drain: True) or ``timeout_s`` passes (False). Read the run again either way."""
        loop = asyncio.get_running_loop()
        woke = await self._room._park(self._waiter, loop.time() + timeout_s)
        self._waiter.clear()
        if loop.time() - self._marked_at >= FOLLOW_S / 3:
            await self._room._store.steps.follow(self._correlation_id, for_s=FOLLOW_S)
            self._marked_at = loop.time()
        return woke


class Expected:
    """A wait registered by :meth:`WaitRoom.expect` (or, with ``unregistered``, one that
    only reads: no time to wait, the room full or draining)."""

    def __init__(
        self,
        room: WaitRoom,
        correlation_id: str,
        until: str | None,
        *,
        unregistered: WaitEnd | None = None,
        waiter: _Waiter | None = None,
        deadline: float = 0.0,
    ) -> None:
        self._room = room
        self._correlation_id = correlation_id
        self._until = until
        self._unregistered = unregistered
        self._waiter = waiter
        self._deadline = deadline

    async def result(self, known: RunState | None = None) -> WaitResult:
        """Wait as :meth:`WaitRoom.wait` does; ``known``: the run as read since entering
        (None: read it now)."""
        room, cid, until = self._room, self._correlation_id, self._until
        if self._waiter is None:
            assert self._unregistered is not None
            if known is not None and until is None:
                return room._ended(known, self._unregistered)
            return await room._look(cid, until, self._unregistered)
        state = known if known is not None else await room._store.get(cid)
        return await room._await(cid, until, self._waiter, self._deadline, state)


class WaitRoom:
    """Run :meth:`listen` in a task group and await :meth:`subscribed` before serving."""

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        store: RunStore,
        *,
        metrics: ApiMetrics,
        max_parked: int,
        settled: Settled | None = None,
        pace: Pace | None = None,
        tracing: Tracing = OFF,
    ) -> None:
        self._redis = redis
        self._tracing = tracing
        #: Runs seen to end: a wait for one answers without a round trip (settled.py), and
        #: each, once, tells how long its process takes (pace.py).
        self._settled = settled
        self._pace = pace
        self._keys = keys
        self._store = store
        self._metrics = metrics
        self._ends = {end: metrics.waits.labels(end.value) for end in WaitEnd}
        self._max_parked = max_parked
        self._waiters: dict[str, set[_Waiter]] = {}
        self._registered = 0  # waits in progress (bounded by max_parked)
        self._parked = 0  # of those, asleep until a message, a re-read signal or the deadline
        self._draining = False
        self._callback_due: Callable[[], None] | None = None
        self._subscribed = asyncio.Event()
        self._subscriptions = 0

    # --- lifecycle ------------------------------------------------------------------------

    async def listen(self, stop: asyncio.Event) -> None:
        """Hold the subscriptions and dispatch their messages until ``stop`` (run it in the
        owner's task group; :meth:`subscribed` says when the room may open). Survives Redis
        outages and failovers: it subscribes afresh, with a backoff between attempts."""
        backoff = Backoff(base_s=_BACKOFF_MIN_S, cap_s=_BACKOFF_MAX_S)
        while not stop.is_set():
            try:
                # Raced with stop: a reader blocked in its read timeout does not hold up exit.
                await race_stop(stop, self._listen(stop, backoff))
            except* (*REDIS_ERRORS, OSError, SlotsMoved) as group:
                if self._subscribed.is_set():
                    errors = repr(group.exceptions[0])
                    log.warning("wait room lost a subscription", extra={"error": errors})
            finally:
                self._subscribed.clear()
                if self._settled is not None:
                    self._settled.hearing(False)
            await sleep_or_stop(stop, backoff.next_delay_s())

    async def subscribed(self, timeout_s: float) -> None:
        """Return once every subscription is confirmed (TimeoutError after ``timeout_s``).

        ``subscribe`` returns once the command is written, not when Redis has applied it;
        until the confirmation arrives a publish could still be missed.
        """
        async with asyncio.timeout(timeout_s):
            await self._subscribed.wait()

    @property
    def ready(self) -> bool:
        """The subscription is confirmed (false while reconnecting) and not draining."""
        return self._subscribed.is_set() and not self._draining

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def has_room(self) -> bool:
        """Whether another request may register now (``max_parked``)."""
        return self._registered < self._max_parked

    @property
    def parked(self) -> int:
        """Requests asleep in the room right now (registered, state read, still pending)."""
        return self._parked

    def on_callback_due(self, nudge: Callable[[], None]) -> None:
        """Call ``nudge`` whenever a run that ends with a callback ends, on any replica (its
        deliverer then looks at once: services/background/callbacks.py)."""
        self._callback_due = nudge

    def release_all(self) -> None:
        """Answer every parked request now and every later one at once (shutdown).

        Synchronous and idempotent, so a signal handler can schedule it on the loop.
        """
        self._draining = True
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.set()

    # --- waiting --------------------------------------------------------------------------

    async def wait(
        self, correlation_id: str, timeout_s: float, *, until: str | None = None
    ) -> WaitResult:
        """Wait up to ``timeout_s`` for ``correlation_id`` to finish, or with ``until`` for
        that step to be recorded, whichever comes first; see :class:`WaitResult`.

        ``timeout_s <= 0`` only reads the state (and the steps). Cancellation (client gone,
        shutdown deadline) unregisters cleanly.
        """
        if self._settled is not None and (state := self._settled.get(correlation_id)):
            return self._ended(state, WaitEnd.SETTLED)
        async with self.expect(correlation_id, timeout_s, until=until) as expected:
            return await expected.result()

    @contextlib.asynccontextmanager
    async def expect(
        self, correlation_id: str, timeout_s: float, *, until: str | None = None
    ) -> AsyncIterator[Expected]:
        """:meth:`wait` in two halves, for a caller that reads the run itself: register on
        entering (the deadline counts from here), read the state, then await
        :meth:`Expected.result` with it. A start reads the state back as it attaches its
        engine instance, so its wait needs no read of its own."""
        if self._draining:
            yield Expected(self, correlation_id, until, unregistered=WaitEnd.DRAINED)
        elif timeout_s <= 0:
            yield Expected(self, correlation_id, until, unregistered=WaitEnd.SETTLED)
        elif self._registered >= self._max_parked:
            yield Expected(self, correlation_id, until, unregistered=WaitEnd.FULL)
        else:
            deadline = asyncio.get_running_loop().time() + timeout_s
            waiter = _Waiter(steps=until is not None)
            follow_s = timeout_s + _FOLLOW_SLACK_S if until is not None else None
            async with self._registration(correlation_id, waiter, follow_s=follow_s):
                yield Expected(self, correlation_id, until, waiter=waiter, deadline=deadline)

    async def _await(
        self,
        correlation_id: str,
        until: str | None,
        waiter: _Waiter,
        deadline: float,
        state: RunState | None,
    ) -> WaitResult:
        """Park a registered ``waiter`` from ``state``, the run as read after registering
        (subscribe-then-check: see the module docstring)."""
        while True:
            if state is None or state.finished:
                return self._ended(state, WaitEnd.SETTLED)
            if (message := waiter.take()) is not None:  # arrived while the state was read
                return self._woken(message, waiter)
            if until and (step := await self._store.steps.find(correlation_id, until)):
                return self._ended(state, WaitEnd.MILESTONE, step)
            if self.draining:  # released while the state was read
                return await self._look(correlation_id, None, WaitEnd.DRAINED)
            if not await self._park(waiter, deadline):
                return await self._look(correlation_id, None, WaitEnd.TIMEOUT)
            waiter.clear()
            if (message := waiter.take()) is not None:
                return self._woken(message, waiter)
            # Otherwise a step, a resubscription or the drain: read the state again.
            state = await self._store.get(correlation_id)

    async def _look(self, correlation_id: str, until: str | None, end: WaitEnd) -> WaitResult:
        """The run as it is, without waiting (and its progress, in the same round trip)."""
        state, last_step = await self._store.look(correlation_id)
        pending = state is not None and not state.finished
        if until and pending and (step := await self._store.steps.find(correlation_id, until)):
            return self._ended(state, WaitEnd.MILESTONE, step)
        return self._ended(state, end, last_step=last_step)

    @contextlib.asynccontextmanager
    async def follow(self, correlation_id: str) -> AsyncIterator[Follower]:
        """Register to hear of every change of one run (its steps and its end) for as long
        as the block runs: read the run *after* entering (subscribe-then-check), then await
        :meth:`Follower.changed` between reads. Counts as parked; raises
        :class:`RoomFull` when ``max_parked`` are registered already."""
        if self._registered >= self._max_parked:
            self._ends[WaitEnd.FULL].inc()
            raise RoomFull
        waiter = _Waiter(steps=True)
        async with self._registration(correlation_id, waiter, follow_s=FOLLOW_S):
            yield Follower(self, waiter, correlation_id)

    @contextlib.asynccontextmanager
    async def _registration(
        self, correlation_id: str, waiter: _Waiter, *, follow_s: float | None = None
    ) -> AsyncIterator[None]:
        """Register ``waiter``; with ``follow_s``, then have the run's steps announced."""
        self._waiters.setdefault(correlation_id, set()).add(waiter)
        self._registered += 1
        try:
            if follow_s is not None:
                await self._store.steps.follow(correlation_id, for_s=follow_s)
            yield
        finally:
            waiters = self._waiters[correlation_id]
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[correlation_id]
            self._registered -= 1

    async def _park(self, waiter: _Waiter, deadline: float) -> bool:
        """Sleep until the waiter is signalled (True) or the deadline passes (False)."""
        self._parked += 1
        self._metrics.parked.inc()
        try:
            async with asyncio.timeout_at(deadline):
                await waiter.wait()
        except TimeoutError:
            return False
        finally:
            self._parked -= 1
            self._metrics.parked.dec()
        return True

    def _ended(
        self,
        outcome: RunState | StartFailed | None,
        end: WaitEnd,
        milestone: StepEvent | None = None,
        *,
        last_step: StepEvent | None = None,
    ) -> WaitResult:
        self._ends[end].inc()
        if (
            self._settled is not None
            and isinstance(outcome, RunState)
            and self._settled.keep(outcome)
            and self._pace is not None
        ):
            self._pace.ended(outcome)
        return WaitResult(outcome, end, milestone, last_step)

    def _woken(self, message: RunState | StartFailed, waiter: _Waiter) -> WaitResult:
        if isinstance(message, RunState):
            latency = time.time() - message.updated_at.timestamp()
            self._metrics.wake_latency.observe(max(latency, 0.0))
        if waiter.cause is not None:
            # From the message's arrival to the request going on, linked to the worker's span.
            with self._tracing.span(
                "flowgate wake", links=[waiter.cause], start_ns=waiter.woken_ns
            ):
                pass
        return self._ended(message, WaitEnd.WOKEN)

    # --- the subscriptions ----------------------------------------------------------------

    async def _listen(self, stop: asyncio.Event, backoff: Backoff) -> None:
        """Subscribe on every shard and read them all until ``stop``, or until one fails."""
        shards = await channel_shards(self._redis, [p.channel for p in self._keys.partitions])
        unconfirmed = set(range(len(shards)))

        def confirmed(shard: int) -> None:
            unconfirmed.discard(shard)
            if not unconfirmed:
                backoff.reset()
                self._on_subscribed()

        async with contextlib.AsyncExitStack() as stack, asyncio.TaskGroup() as tasks:
            for number, shard in enumerate(shards):
                pubsub = shard.client.pubsub()
                stack.push_async_callback(shard.close, pubsub)
                await shard.subscribe(pubsub)
                on_confirmed = functools.partial(confirmed, number)
                reading = self._read(pubsub, len(shard.channels), on_confirmed, stop)
                tasks.create_task(reading, name=f"waitroom-shard-{number}")

    async def _read(
        self, pubsub: PubSub, channels: int, on_confirmed: Callable[[], None], stop: asyncio.Event
    ) -> None:
        """Dispatch one connection's messages until ``stop``. Every round of ``channels``
        confirmations (redis-py resubscribes by itself after a brief reconnect) makes every
        waiter read the state again."""
        confirmations = 0
        while not stop.is_set():
            message = await pubsub.get_message(timeout=_READ_TIMEOUT_S)
            if message is None:
                continue
            kind = message["type"]
            if kind in MESSAGES:
                self._dispatch(message["data"])
            elif kind in CONFIRMATIONS:
                confirmations += 1
                if confirmations % channels == 0:
                    on_confirmed()
            elif kind == MOVED:
                raise SlotsMoved(message["channel"])

    def _on_subscribed(self) -> None:
        self._subscriptions += 1
        if self._settled is not None:
            self._settled.hearing(True)
        self._subscribed.set()
        self._metrics.pubsub_subscriptions.inc()
        if self._subscriptions > 1:
            log.info("wait room resubscribed; parked requests re-read their state")
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.set()

    def _dispatch(self, data: bytes) -> None:
        self._metrics.pubsub_messages.inc()
        correlation_id, body = correlation_id_of_message(data)
        if body == REOPENED and self._settled is not None:
            self._settled.forget(correlation_id)  # an end this replica kept is over
        elif self._callback_due is not None and ends_with_callback(body):
            self._callback_due()
        waiters = self._waiters.get(correlation_id)
        if not waiters:
            return  # parked on another replica, or nobody waits: nothing to decode
        body, cause = cause_of_message(body)
        try:
            message = decode_message(body)
        except (ValueError, KeyError, TypeError) as exc:
            # Not ours to judge: wake them anyway, they read the stored state.
            log.warning(
                "undecodable completion message",
                extra={"correlationId": correlation_id, "error": repr(exc)},
            )
            for waiter in waiters:
                waiter.set()
            return
        if isinstance(message, StepRecorded | Reopened | Stalled):
            for waiter in waiters:
                if waiter.steps:
                    waiter.set()
            return
        woken_ns = time.time_ns() if cause is not None else 0
        for waiter in waiters:
            waiter.message, waiter.cause, waiter.woken_ns = message, cause, woken_ns
            waiter.set()
