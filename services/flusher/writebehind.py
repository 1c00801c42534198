"""Write-behind: copy the ``{p:n}:wb`` streams into Postgres, at least once, idempotently.
(One module past 400 lines: reading, writing, retrying and dead-lettering share one
consumer's state and one batch's life, read best in one place.)

Every state change (shared/store/runs.py) and audit event (shared/eventlog.py) is an entry in
its run's partition's stream. A :class:`Flusher` per API replica reads every partition
through its consumer group ``flusher`` (one pipelined read for all of them; a Redis Cluster
answers it shard by shard), so the replicas share each partition's entries, and writes each
batch in one transaction:

* ``state``  -> ``process_store`` upsert that only moves forward (a later run, then a later
  ``version``), so a replay or a late, out-of-order entry never overwrites a newer row;
* ``event``  -> ``event_log`` insert keyed by the stream and entry id (``ON CONFLICT DO
  NOTHING``);
* ``step``   -> ``run_step`` insert keyed by the run and the step's entry in the run's
  record (``ON CONFLICT DO NOTHING``).

Between batches (at most every ``compact_every_s``) the flusher also compacts: the steps of
finished runs that are all in Postgres leave Redis (shared/store/steps.py
``StepStore.compact``).

Entries are acknowledged and deleted from the stream only after the commit, all partitions'
in one round trip (:data:`ACK`). While Postgres is down the same batch is retried with a
bounded exponential back-off and everything else waits in the stream. A batch that Postgres
rejects for its data is retried row by row; a row rejected on its own is retried on later
deliveries and, after ``max_deliveries``, moved to its partition's ``{p:n}:wb:dead``
(fields ``id kind body reason consumer``) so it cannot block the rest. An entry that cannot
be decoded goes there at once: no retry can fix its bytes.
Entries a dead replica left unacknowledged, in any partition, are taken over with
XAUTOCLAIM. When it has caught up (a read returned less than a full batch from every
stream) the flusher pauses ``idle_ms`` before it reads again: a blocking read cannot wait on
streams in different hash slots, and a read, a transaction and an acknowledgement cost the
same for two entries as for two hundred, so waiting for more costs Redis, Postgres and the
flusher less per run (``make bench`` section 10) at the price of ``idle_ms`` more lag.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from flowgate.shared.aio import Backoff, sleep_or_stop, stop_and_wait
from flowgate.shared.eventlog import EVENT_COLUMNS, EVENT_JSON_COLUMNS, EventRecord
from flowgate.shared.keys import WRITEBEHIND_GROUP, Keys, Partition
from flowgate.shared.lua import Script
from flowgate.shared.redis_client import RedisClient, stream_entries, text
from flowgate.shared.state import COLUMNS, JSON_COLUMNS, RunState, dump_json
from flowgate.shared.store.runs import writebehind_backlog
from flowgate.shared.store.steps import StepStore

log = logging.getLogger(__name__)


def _upsert_state() -> str:
    """An upsert that only moves forward: a replayed or late entry never overwrites newer.

    Newer is a later run first (a correlationId used again once its record left Redis
    starts a run whose versions count from 1 again, and which must replace the old run's
    row), then a later version of the same run.
    """
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS if c != "correlation_id")
    return (
        f"INSERT INTO process_store ({', '.join(COLUMNS)})"
        f" VALUES ({', '.join(['%s'] * len(COLUMNS))})"
        f" ON CONFLICT (correlation_id) DO UPDATE SET {updates}"
        " WHERE (process_store.started_at, process_store.version)"
        " < (EXCLUDED.started_at, EXCLUDED.version)"
    )


# The seed's column is `execution_time` (milliseconds); `stream_id` makes replays idempotent.
_INSERT_EVENT = (
    f"INSERT INTO event_log (stream_id, {', '.join(EVENT_COLUMNS)})"
    f" VALUES ({', '.join(['%s'] * (len(EVENT_COLUMNS) + 1))})"
    " ON CONFLICT (stream_id) DO NOTHING"
)

_INSERT_STEP = (
    "INSERT INTO run_step (correlation_id, traceability_id, entry_ms, entry_seq, step)"
    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
)

_SQL = {"state": _upsert_state(), "event": _INSERT_EVENT, "step": _INSERT_STEP}


class AckKeys(NamedTuple):
    stream: str


class AckArgs(NamedTuple):
    group: str
    #: The ids of the entries written.
    rest: Sequence[str]


#: Entries written leave the stream acknowledged and deleted at once, never one without the
#: other: an entry acknowledged but kept would stay its stream's oldest for good, and
#: compaction tells how far the copy is from the oldest entry (shared/store/scripts.py
#: COMPACT). A script each partition, all sent in one round trip (shared/lua.py).
ACK = Script(
    "writebehind-ack",
    AckKeys,
    AckArgs,
    """
redis.call('XACK', K.stream, A.group, unpack(A.rest))
return redis.call('XDEL', K.stream, unpack(A.rest))
""",
)

# Postgres refused the data itself (bad value, constraint): retrying the batch cannot help,
# retrying row by row isolates the culprit. Everything else is treated as an outage.
_DATA_ERRORS = (psycopg.DataError, psycopg.IntegrityError)


@dataclass(frozen=True, slots=True)
class _Entry:
    """One stream entry as read (raw body kept for the dead-letter stream)."""

    partition: Partition
    id: str
    kind: str
    body: bytes


@dataclass(frozen=True, slots=True)
class _Op:
    """A decoded entry: which statement, with which parameters; ``superseded``: older states
    of the same run in the same batch, which this one's write makes needless."""

    entry: _Entry
    params: tuple[Any, ...]
    #: For a state: its run and its place in the run's life (a later run, then a later version).
    run: str | None = None
    order: tuple[Any, ...] = ()
    superseded: tuple[_Entry, ...] = ()

    @property
    def entries(self) -> tuple[_Entry, ...]:
        """The stream entries this op's write settles."""
        return (self.entry, *self.superseded)


class _Undecodable(ValueError):
    pass


class Flusher:
    """Consumer ``consumer`` of the write-behind group; see the module docstring.

    Lifecycle: ``await run(stop)`` until ``stop`` is set (or the task is cancelled: nothing
    is acknowledged before its commit, so a cancelled batch is simply read again), then
    optionally ``await drain(timeout_s)`` to write what is left before shutting down.
    """

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        pool: AsyncConnectionPool,
        *,
        consumer: str,
        batch: int = 500,
        idle_ms: int = 200,
        claim_idle_ms: int = 30_000,
        max_deliveries: int = 5,
        max_backoff_s: float = 30.0,
        compact_every_s: float = 1.0,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._pool = pool
        self._consumer = consumer
        self._batch = batch
        self._idle_s = idle_ms / 1000
        self._partitions = keys.partitions
        self._claim_idle_ms = claim_idle_ms
        self._max_deliveries = max_deliveries
        self._max_backoff_s = max_backoff_s
        self._compact_every_s = compact_every_s
        self._steps = StepStore(redis, keys)
        self._acknowledge = ACK.bound(redis)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Flush until ``stop`` is set. Never raises for Redis or Postgres trouble: logs,
        backs off and carries on (its own unacknowledged entries are read again first)."""
        stop = stop or asyncio.Event()
        backoff = self._backoff()
        while not stop.is_set():
            try:
                await self._ensure_group()
                await self._claim_idle(stop)
                await self._read_own_pending(stop)
                await self._follow(stop)
            except Exception:
                log.exception("write-behind: flusher loop failed; retrying")
                await sleep_or_stop(stop, backoff.next_delay_s())
            else:
                backoff.reset()

    async def drain(self, timeout_s: float) -> bool:
        """Write everything there is now (own pending, idle entries of others, new ones).

        True when the stream had nothing more to read; False if ``timeout_s`` ran out
        (for example while Postgres is down), in which case the rest stays in the stream.
        """
        stop = asyncio.Event()
        try:
            async with asyncio.timeout(timeout_s):
                await self._ensure_group()
                await self._claim_idle(stop)
                await self._read_own_pending(stop)
                while entries := await self._read(dict.fromkeys(self._partitions, ">")):
                    await self._flush(entries, stop)
        except TimeoutError:
            return False
        return True

    async def backlog(self) -> int:
        """Entries not yet in Postgres (:func:`flowgate.shared.store.runs.writebehind_backlog`)."""
        return await writebehind_backlog(self._redis, self._keys)

    # --- reading ------------------------------------------------------------------------

    async def _ensure_group(self) -> None:
        """Create each partition's group at the start of its stream (entries added before
        any flusher existed are delivered too); an existing group is fine."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for partition in self._partitions:
                pipe.xgroup_create(partition.writebehind, WRITEBEHIND_GROUP, id="0", mkstream=True)
            answers = await pipe.execute(raise_on_error=False)
        for answer in answers:
            if isinstance(answer, Exception) and "BUSYGROUP" not in str(answer):
                raise answer

    async def _follow(self, stop: asyncio.Event) -> None:
        """New entries, pausing while there are none, and compacting now and then, until
        stop or it is time to claim."""
        claim_at = time.monotonic() + self._claim_idle_ms / 2000
        compact_at = time.monotonic()
        while not stop.is_set() and time.monotonic() < claim_at:
            entries = await self._read(dict.fromkeys(self._partitions, ">"))
            if entries:
                await self._flush(entries, stop)
            if not self._full(entries):  # caught up: let more gather
                await sleep_or_stop(stop, self._idle_s)
            if time.monotonic() >= compact_at:
                await self._steps.compact()
                compact_at = time.monotonic() + self._compact_every_s

    def _full(self, entries: Sequence[_Entry]) -> bool:
        """Whether some stream gave a whole batch (and may hold more right now)."""
        read = Counter(entry.partition for entry in entries)
        return any(count >= self._batch for count in read.values())

    async def _read_own_pending(self, stop: asyncio.Event) -> None:
        """Entries delivered to this consumer earlier but never acknowledged (a crash, a
        cancelled batch, a failed ack); each is visited once per call."""
        cursors = dict.fromkeys(self._partitions, "0")
        while not stop.is_set() and (entries := await self._read(cursors)):
            await self._flush(entries, stop)
            # A stream that returned nothing has no more; the others go on past their last.
            cursors = {entry.partition: entry.id for entry in entries}

    async def _claim_idle(self, stop: asyncio.Event) -> None:
        """Take over entries idle longer than ``claim_idle_ms`` (their consumer died or is
        stuck) and write them; one pass over each group's pending list."""
        for partition in self._partitions:
            start = "0-0"
            while not stop.is_set():
                next_start, claimed, *_ = await self._redis.xautoclaim(
                    partition.writebehind,
                    WRITEBEHIND_GROUP,
                    self._consumer,
                    min_idle_time=self._claim_idle_ms,
                    start_id=start,
                    count=self._batch,
                )
                await self._flush([_entry(partition, item) for item in claimed if item], stop)
                start = text(next_start)
                if start == "0-0":
                    break

    async def _read(self, from_ids: dict[Partition, str]) -> list[_Entry]:
        """Up to ``batch`` entries of each partition's stream after its id (``>``: never
        delivered)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for partition, from_id in from_ids.items():
                pipe.xreadgroup(
                    WRITEBEHIND_GROUP,
                    self._consumer,
                    {partition.writebehind: from_id},
                    count=self._batch,
                )
            responses = await pipe.execute()
        return [
            _entry(partition, item)
            for partition, response in zip(from_ids, responses, strict=True)
            for item in stream_entries(response)
        ]

    # --- writing ------------------------------------------------------------------------

    async def _flush(self, entries: Sequence[_Entry], stop: asyncio.Event) -> None:
        """Write ``entries`` and acknowledge them; retries an outage until it is over (or
        until stop, leaving them pending for the next start)."""
        decoded: list[_Op] = []
        for entry in entries:
            try:
                decoded.append(_decode(entry))
            except _Undecodable as exc:
                await self._dead_letter(entry, f"undecodable: {exc}")
        ops = _newest_states(decoded)
        backoff = self._backoff()
        while ops:
            try:
                await self._write(ops)
            except _DATA_ERRORS as exc:
                log.warning(
                    "write-behind: batch rejected (%s); retrying row by row", _without_values(exc)
                )
                await self._write_isolated(ops)
                return
            except psycopg.Error as exc:  # Postgres down or unreachable: an outage
                log.warning(
                    "write-behind: Postgres unavailable (%s); retrying",
                    _without_values(exc),
                    extra={"entries": len(ops), "attempt": backoff.attempt + 1},
                )
                if await sleep_or_stop(stop, backoff.next_delay_s()):
                    return
            except Exception:  # a bug must not stop the copy either; entries stay pending
                log.exception("write-behind: write failed; retrying", extra={"entries": len(ops)})
                if await sleep_or_stop(stop, backoff.next_delay_s()):
                    return
            else:
                await self._ack([entry for op in ops for entry in op.entries])
                return

    async def _write(self, ops: Sequence[_Op]) -> None:
        """All ops in one transaction, pipelined (one round trip), one ``executemany`` per
        kind: half the flusher's CPU per row of an ``execute`` each. The order across kinds
        does not matter (no row refers to another), nor within one: a batch holds one state
        per run, and events and steps are inserts that a replay leaves alone."""
        rows: dict[str, list[tuple[Any, ...]]] = {}
        for op in ops:
            rows.setdefault(op.entry.kind, []).append(op.params)
        async with (
            self._pool.connection() as conn,
            conn.pipeline(),
            conn.transaction(),
            conn.cursor() as cursor,
        ):
            for kind, params in rows.items():
                await cursor.executemany(_SQL[kind], params)

    async def _write_isolated(self, ops: Sequence[_Op]) -> None:
        """Each op under its own savepoint: commit the good ones, keep the bad ones pending
        (or dead-letter them once delivered ``max_deliveries`` times)."""
        good: list[_Op] = []
        bad: list[tuple[_Op, psycopg.Error]] = []
        async with self._pool.connection() as conn, conn.transaction():
            for op in ops:
                try:
                    async with conn.transaction():
                        await conn.execute(_SQL[op.entry.kind], op.params)
                    good.append(op)
                except _DATA_ERRORS as exc:
                    bad.append((op, exc))
        await self._ack([entry for op in good for entry in op.entries])
        for op, error in bad:
            deliveries = await self._deliveries(op.entry)
            if deliveries >= self._max_deliveries:
                reason = f"rejected {deliveries} times: {_without_values(error)}"
                await self._dead_letter(op.entry, reason)
            else:
                log.warning(
                    "write-behind: Postgres rejected an entry; it will be retried",
                    extra={
                        "streamId": op.entry.id,
                        "deliveries": deliveries,
                        "error": _without_values(error),
                    },
                )

    async def _ack(self, entries: Iterable[_Entry]) -> None:
        by_stream: dict[str, list[str]] = {}
        for entry in entries:
            by_stream.setdefault(entry.partition.writebehind, []).append(entry.id)
        await asyncio.gather(
            *(
                self._acknowledge(
                    AckKeys(stream=stream), AckArgs(group=WRITEBEHIND_GROUP, rest=ids)
                )
                for stream, ids in by_stream.items()
            )
        )

    async def _dead_letter(self, entry: _Entry, reason: str) -> None:
        log.error(
            "write-behind: entry moved to the dead-letter stream",
            extra={"streamId": entry.id, "kind": entry.kind, "reason": reason},
        )
        stream = entry.partition.writebehind
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                entry.partition.writebehind_dead,
                {
                    "id": entry.id,
                    "kind": entry.kind,
                    "body": entry.body,
                    "reason": reason,
                    "consumer": self._consumer,
                },
            )
            pipe.xack(stream, WRITEBEHIND_GROUP, entry.id)
            pipe.xdel(stream, entry.id)
            await pipe.execute()

    async def _deliveries(self, entry: _Entry) -> int:
        pending = await self._redis.xpending_range(
            entry.partition.writebehind, WRITEBEHIND_GROUP, min=entry.id, max=entry.id, count=1
        )
        return int(pending[0]["times_delivered"]) if pending else 0

    def _backoff(self) -> Backoff:
        return Backoff(base_s=0.2, cap_s=self._max_backoff_s)


async def stop_flushing(
    task: asyncio.Task[None], stop: asyncio.Event, flusher: Flusher, grace_s: float
) -> None:
    """Stop following the streams, then write what this consumer owes within the grace."""
    await stop_and_wait(stop, [task], timeout_s=grace_s)
    if not await flusher.drain(grace_s):
        log.warning("write-behind not drained; the rest stays in the stream for other consumers")


def _without_values(exc: psycopg.Error) -> str:
    """The error without the row's values: Postgres repeats the offending value in its
    DETAIL, and audit rows carry process variables that must not reach the logs."""
    diag = exc.diag
    return (
        " ".join(part for part in (diag.sqlstate, diag.message_primary) if part)
        or type(exc).__name__
    )


def _entry(partition: Partition, item: Any) -> _Entry:
    """A (id, fields) pair from XREADGROUP/XAUTOCLAIM."""
    entry_id, fields = item
    fields = fields or {}
    return _Entry(
        partition=partition,
        id=text(entry_id),
        kind=text(fields.get(b"kind", b"")),
        body=fields.get(b"body", b""),
    )


def _jsonb(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(value, dumps=dump_json)


def _params(columns: Sequence[str], json_columns: frozenset[str], row: Sequence[Any]) -> list[Any]:
    return [
        _jsonb(value) if name in json_columns else value
        for name, value in zip(columns, row, strict=True)
    ]


def _newest_states(ops: Sequence[_Op]) -> list[_Op]:
    """``ops`` with only the newest state of each run, in the place of its first (a batch
    holds a run's claim, start and end: one upsert of the last says all the three would)."""
    newest: dict[str, _Op] = {}
    for op in ops:
        if op.run is None:
            continue
        if (kept := newest.get(op.run)) is None:
            newest[op.run] = op
            continue
        older, newer = sorted((kept, op), key=lambda candidate: candidate.order)
        newest[op.run] = dataclasses.replace(newer, superseded=(*newer.superseded, *older.entries))
    placed: list[_Op] = []
    for op in ops:
        if op.run is None:
            placed.append(op)
        elif (first := newest.pop(op.run, None)) is not None:
            placed.append(first)
    return placed


def _decode(entry: _Entry) -> _Op:
    """Parameters for the entry's statement; :class:`_Undecodable` if it makes no sense."""
    try:
        if entry.kind == "state":
            state = RunState.from_json(entry.body)
            params: tuple[Any, ...] = tuple(_params(COLUMNS, JSON_COLUMNS, state.to_row()))
            order = (state.started_at, state.version)
            return _Op(entry, params, run=state.correlation_id, order=order)
        elif entry.kind == "step":
            step = orjson.loads(entry.body)
            entry_ms, entry_seq = (int(part) for part in step["id"].split("-"))
            params = (
                step["correlationId"],
                step["traceabilityId"] or None,
                entry_ms,
                entry_seq,
                _jsonb(step["step"]),
            )
        elif entry.kind == "event":
            event = EventRecord.from_json(entry.body).to_row()
            # Entry ids are unique per stream only.
            stream_id = f"{entry.partition.writebehind}/{entry.id}"
            params = (stream_id, *_params(EVENT_COLUMNS, EVENT_JSON_COLUMNS, event))
        else:
            raise _Undecodable(f"unknown kind {entry.kind!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise _Undecodable(str(exc) or type(exc).__name__) from exc
    return _Op(entry=entry, params=params)
