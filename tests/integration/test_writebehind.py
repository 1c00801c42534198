"""Write-behind against real Redis and Postgres: rows arrive once, in order, through outages."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

from deploy.local import servers
from flowgate.services.flusher.writebehind import Flusher
from flowgate.shared import postgres
from flowgate.shared.contract import StartFailed, SystemVariables
from flowgate.shared.eventlog import EventRecord, append_event
from flowgate.shared.keys import WRITEBEHIND_GROUP, Keys
from flowgate.shared.redis_client import RedisClient
from flowgate.shared.settings import Settings
from flowgate.shared.state import Status
from flowgate.shared.steps import StepEvent, StepStatus
from flowgate.shared.store.runs import RunStore
from tests.helpers.net import TcpProxy
from tests.helpers.replica import replica
from tests.helpers.streams import Entry, entries
from tests.helpers.waiting import until

pytestmark = pytest.mark.redis_both


@pytest.fixture
def keys(redis_prefix: str) -> Keys:
    return Keys(redis_prefix)


@pytest.fixture
def store(redis_client: RedisClient, keys: Keys) -> RunStore:
    return RunStore(redis_client, keys, result_ttl_s=600, pending_ttl_s=600, steps_in_redis_s=0)


@pytest.fixture
async def pool(schema_url: str) -> AsyncIterator[AsyncConnectionPool]:
    pool = await postgres.open_pool(schema_url, max_size=4)
    await postgres.migrate(pool)
    yield pool
    await pool.close()


@pytest.fixture
def make_flusher(
    redis_client: RedisClient, keys: Keys, pool: AsyncConnectionPool
) -> Callable[..., Flusher]:
    def build(consumer: str = "c1", **options: Any) -> Flusher:
        settings: dict[str, Any] = {"batch": 100, "idle_ms": 50, "claim_idle_ms": 30_000}
        return Flusher(redis_client, keys, pool, consumer=consumer, **(settings | options))

    return build


async def rows(pool: AsyncConnectionPool, query: str) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        cur = await conn.execute(query.encode())
        return await cur.fetchall()


async def dead_letters(redis: RedisClient, keys: Keys) -> list[Entry]:
    """Every partition's dead letters, oldest first."""
    found = [entry for p in keys.partitions for entry in await entries(redis, p.writebehind_dead)]
    return sorted(found, key=lambda entry: tuple(int(n) for n in entry[0].split(b"-")))


async def test_a_flusher_process_writes_what_the_replicas_leave_to_it(
    make_settings: Callable[..., Settings],
    store: RunStore,
    pool: AsyncConnectionPool,
    redis_client: RedisClient,
    keys: Keys,
    tmp_path: Path,
) -> None:
    """``flowgate-flusher`` (WRITEBEHIND_IN_API=false in the replicas): the rows arrive
    through its consumer, and SIGTERM ends it cleanly once it has written what it owes."""
    flushing = replica(
        make_settings(),
        tmp_path,
        "flusher",
        module="flowgate.services.flusher",
        port_setting="FLUSHER_HEALTH_PORT",
        ready_path="/healthz",
        WRITEBEHIND_IDLE_MS="50",
    )
    async with flushing as flusher, httpx.AsyncClient(timeout=5) as client:
        await until(lambda: _migrated(client, flusher.url), timeout_s=30)
        cids = [f"fp-{i}" for i in range(20)]
        for i, cid in enumerate(cids):
            await claim(store, cid)
            await store.finish(cid, Status.OK, data={"n": i})

        async def written() -> bool:
            found = await rows(pool, "SELECT count(*) FROM process_store WHERE status = 'ok'")
            return found == [(len(cids),)]

        await until(written, timeout_s=20)
        consumers = {
            _text(c["name"])
            for p in keys.partitions
            for c in await redis_client.xinfo_consumers(p.writebehind, WRITEBEHIND_GROUP)
        }
        assert consumers
        assert all(name.startswith("flusher-") for name in consumers), consumers
        flusher.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await flusher.process.wait() == 0, flusher.log.read_text()
    assert "flusher stopped" in flusher.log.read_text()


async def _migrated(client: httpx.AsyncClient, url: str) -> bool:
    health = (await client.get(f"{url}/healthz")).json()
    return bool(health["migrated"])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def claim(store: RunStore, cid: str) -> None:
    await store.claim(SystemVariables(cid, "b", f"t-{cid}", "a"), "onboard-user", "hash")


async def run_one_process(store: RunStore, redis: RedisClient, keys: Keys, cid: str) -> None:
    await claim(store, cid)
    await store.attach_instance(cid, f"instance-{cid}")
    await append_event(redis, keys, EventRecord(correlation_id=cid, status="ok", step=1))
    await store.finish(cid, Status.OK, data={"cid": cid})


async def test_a_batch_writes_only_the_newest_state_of_each_run(
    store: RunStore,
    redis_client: RedisClient,
    keys: Keys,
    pool: AsyncConnectionPool,
    make_flusher: Callable[..., Flusher],
) -> None:
    """A run's claim, start and end in one batch are one upsert of the end (what the three
    would leave), and every entry is acknowledged all the same."""
    await postgres.migrate(pool)
    async with pool.connection() as conn:  # counts the upserts Postgres is sent
        await conn.execute(
            "CREATE TABLE upserts (n integer); INSERT INTO upserts VALUES (0);"
            " CREATE FUNCTION count_upserts() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN UPDATE upserts SET n = n + 1; RETURN NULL; END $$;"
            " CREATE TRIGGER counting AFTER INSERT ON process_store"
            " FOR EACH STATEMENT EXECUTE FUNCTION count_upserts();"
        )
    for cid in ("n-1", "n-2"):
        await run_one_process(store, redis_client, keys, cid)
    assert await make_flusher().drain(timeout_s=10)

    for cid in ("n-1", "n-2"):
        assert await postgres.get_run(pool, cid) == await store.get(cid)
    assert await rows(pool, "SELECT n FROM upserts") == [(2,)]  # of 2 x 3 states
    assert await make_flusher().backlog() == 0


def step(name: str, n: int) -> StepEvent:
    at = datetime(2026, 1, 1, 0, 0, n, tzinfo=UTC)
    return StepEvent(name, StepStatus.OK, name, f"{name}:{n}", "serviceTask", at, data={"n": n})


async def test_a_finished_runs_steps_leave_redis_once_postgres_has_them(
    store: RunStore,
    redis_client: RedisClient,
    keys: Keys,
    pool: AsyncConnectionPool,
    make_flusher: Callable[..., Flusher],
) -> None:
    """Redis keeps a finished run's final state only, once Postgres has its steps: they are
    read back from there, with the ids the progress stream gave them; a step reported after
    that is not recorded twice."""
    run = "s-1"
    await claim(store, run)
    await store.attach_instance(run, "instance-s-1")
    for n in (1, 2):
        assert await store.steps.record(run, step("validate", n))
    await store.finish(run, Status.OK, data={"done": True}, step=step("respond", 3))
    recorded = await store.steps.after(run)
    pending = "s-2"  # a pending run is never compacted
    await claim(store, pending)
    await store.steps.record(pending, step("validate", 1))

    # Not before Postgres has them, although due (STEPS_IN_REDIS_S=0 here).
    assert await store.steps.compact() == 0
    assert await redis_client.exists(keys.steps(run), keys.steps_seen(run)) == 2

    assert await make_flusher().drain(timeout_s=10)
    assert await store.steps.compact() == 1
    assert await redis_client.exists(keys.steps(run), keys.steps_seen(run)) == 0
    state = await store.get(run)
    assert state is not None
    assert state.status is Status.OK
    assert await store.steps.after(pending) != []

    from_postgres = await postgres.steps_after(pool, run, traceability_id=state.traceability_id)
    assert from_postgres == recorded
    assert [s.step for _, s in from_postgres] == ["validate", "validate", "respond"]
    first = recorded[0][0]
    assert (
        await postgres.steps_after(pool, run, traceability_id=state.traceability_id, after=first)
        == recorded[1:]
    )

    # A late report of a step it had is refused, not recorded again.
    assert not await store.steps.record(run, step("validate", 1))
    assert await make_flusher().drain(timeout_s=10)
    assert await rows(pool, "SELECT count(*) FROM run_step WHERE correlation_id = 's-1'") == [(3,)]


async def test_a_partitions_finished_runs_are_compacted_together_up_to_the_limit(
    store: RunStore,
    redis_client: RedisClient,
    keys: Keys,
    make_flusher: Callable[..., Flusher],
) -> None:
    """One call per partition takes out the steps of up to ``limit`` of its runs."""
    same = [cid for cid in (f"b-{n}" for n in range(200)) if keys.of(cid) == keys.of("b-0")][:3]
    for run in same:
        await claim(store, run)
        await store.finish(run, Status.OK, step=step("respond", 1))
    assert await make_flusher().drain(timeout_s=10)

    assert await store.steps.compact(limit=2) == 2
    assert await redis_client.exists(*(keys.steps(run) for run in same)) == 1
    assert await store.steps.compact(limit=2) == 1
    assert await redis_client.exists(*(keys.steps(run) for run in same)) == 0
    assert await store.steps.compact(limit=2) == 0


async def test_steps_stay_in_redis_while_a_consumer_owes_earlier_entries(
    store: RunStore,
    redis_client: RedisClient,
    keys: Keys,
    make_flusher: Callable[..., Flusher],
) -> None:
    """An entry delivered but not written (its flusher died) holds back compaction of every
    run of its partition that ended after it, until another flusher takes it over."""
    run = "s-3"
    await claim(store, run)
    partition = keys.of(run)
    # A consumer takes the claim's entry and dies before writing it.
    await redis_client.xgroup_create(partition.writebehind, WRITEBEHIND_GROUP, id="0")
    await redis_client.xreadgroup(WRITEBEHIND_GROUP, "dead", {partition.writebehind: ">"}, count=1)
    await store.steps.record(run, step("validate", 1))
    await store.finish(run, Status.OK, step=step("respond", 2))
    assert await make_flusher("live").drain(timeout_s=10)

    assert await store.steps.compact() == 0
    assert await redis_client.exists(keys.steps(run)) == 1

    assert await make_flusher("live", claim_idle_ms=0).drain(timeout_s=10)
    assert await store.steps.compact() == 1


async def test_migrate_is_versioned_and_safe_to_run_concurrently(
    pool: AsyncConnectionPool,
) -> None:
    versions = await asyncio.gather(*(postgres.migrate(pool) for _ in range(3)))

    assert versions == [len(postgres.MIGRATIONS)] * 3
    assert await rows(pool, "SELECT version FROM schema_version ORDER BY 1") == [
        (v,) for v in range(1, len(postgres.MIGRATIONS) + 1)
    ]
    tables = await rows(
        pool, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1"
    )
    assert tables == [("event_log",), ("process_store",), ("run_step",), ("schema_version",)]


async def test_states_and_events_arrive(
    store: RunStore,
    redis_client: RedisClient,
    keys: Keys,
    pool: AsyncConnectionPool,
    make_flusher: Callable[..., Flusher],
) -> None:
    await run_one_process(store, redis_client, keys, "w-1")
    await claim(store, "w-2")
    flusher = make_flusher()

    assert await flusher.drain(timeout_s=10)

    assert await postgres.get_run(pool, "w-1") == await store.get("w-1")
    assert await postgres.get_run(pool, "w-2") == await store.get("w-2")
    assert await postgres.get_run(pool, "nobody") is None
    events = await postgres.events_by_correlation(pool, "w-1")
    assert [(e.correlation_id, e.status, e.step) for e in events] == [("w-1", "ok", 1)]
    assert await postgres.events_by_traceability(pool, "t-w-1") == []  # the event carried none
    assert await flusher.backlog() == 0
    assert await redis_client.xpending(keys.of("w-1").writebehind, WRITEBEHIND_GROUP) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }


async def test_replayed_entries_leave_identical_rows(
    store: RunStore,
    redis_client: RedisClient,
    keys: Keys,
    pool: AsyncConnectionPool,
    make_flusher: Callable[..., Flusher],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for i in range(20):
        await run_one_process(store, redis_client, keys, f"r-{i}")
    crashing = make_flusher("c1")

    async def crash_before_ack(*_: object) -> None:
        """The replica dies after the commit and before XACK."""

    monkeypatch.setattr(crashing, "_ack", crash_before_ack)
    assert await crashing.drain(timeout_s=10)
    first = await rows(pool, "SELECT * FROM process_store ORDER BY correlation_id")
    first_events = await rows(pool, "SELECT * FROM event_log ORDER BY id")
    assert await crashing.backlog() == 80  # 3 states + 1 event per process, none acked

    restarted = make_flusher("c1")  # same consumer name: reads its own pending entries
    assert await restarted.drain(timeout_s=10)

    assert await rows(pool, "SELECT * FROM process_store ORDER BY correlation_id") == first
    assert await rows(pool, "SELECT * FROM event_log ORDER BY id") == first_events
    assert len(first) == 20
    assert len(first_events) == 20
    assert await restarted.backlog() == 0


async def test_a_stale_entry_never_overwrites_a_newer_row(
    store: RunStore,
    redis_client: RedisClient,
    keys: Keys,
    pool: AsyncConnectionPool,
    make_flusher: Callable[..., Flusher],
) -> None:
    await claim(store, "s-1")
    stream = keys.of("s-1").writebehind
    (_, claimed_entry), *_ = await entries(redis_client, stream)
    await store.finish("s-1", Status.OK, data="final")
    flusher = make_flusher()
    assert await flusher.drain(timeout_s=10)

    # Late, out-of-order deliveries: the version-1 state, and a delete of version 1.
    await redis_client.xadd(stream, claimed_entry)
    body = orjson.dumps({"correlationId": "s-1", "version": 1})
    await redis_client.xadd(stream, {"kind": "delete", "body": body})
    assert await flusher.drain(timeout_s=10)

    row = await postgres.get_run(pool, "s-1")
    assert row is not None
    assert (row.status, row.data, row.version) == (Status.OK, "final", 2)


async def test_an_abandoned_start_stays_abandoned_even_if_its_claim_arrives_late(
    store: RunStore,
    redis_client: RedisClient,
    keys: Keys,
    pool: AsyncConnectionPool,
    make_flusher: Callable[..., Flusher],
) -> None:
    await claim(store, "a-1")
    stream = keys.of("a-1").writebehind
    (_, claimed_entry), *_ = await entries(redis_client, stream)
    flusher = make_flusher()
    assert await flusher.drain(timeout_s=10)
    assert await postgres.get_run(pool, "a-1") is not None

    assert await store.abandon(1, StartFailed("a-1", 503, "engine down"))
    assert await flusher.drain(timeout_s=10)
    row = await postgres.get_run(pool, "a-1")
    assert row is not None
    assert (row.status, row.error["error"]) == (Status.ABANDONED, "engine down")

    # A dead replica's claimed entry for the same version lands after the abandonment.
    await redis_client.xadd(stream, claimed_entry)
    assert await flusher.drain(timeout_s=10)
    row = await postgres.get_run(pool, "a-1")
    assert row is not None
    assert row.status is Status.ABANDONED

    # The same id claimed again: its versions go on, so every step of it is kept.
    await claim(store, "a-1")
    await store.finish("a-1", Status.OK, data="second try")
    assert await flusher.drain(timeout_s=10)
    row = await postgres.get_run(pool, "a-1")
    assert row is not None
    assert (row.status, row.data) == (Status.OK, "second try")


async def test_events_come_back_in_step_order(
    redis_client: RedisClient,
    keys: Keys,
    pool: AsyncConnectionPool,
    make_flusher: Callable[..., Flusher],
) -> None:
    for step, name in [(None, "completed"), (3, "c"), (1, "a"), (2, "b-retry"), (2, "b")]:
        record = EventRecord(
            correlation_id="e-1",
            traceability_id="trace-1",
            status="ok",
            step=step,
            step_name=name,
            request_data={"nested": [1, {"x": None}]},
            execution_time=12,
        )
        await append_event(redis_client, keys, record)
    assert await make_flusher().drain(timeout_s=10)

    by_trace = await postgres.events_by_traceability(pool, "trace-1")
    by_cid = await postgres.events_by_correlation(pool, "e-1")

    assert by_trace == by_cid
    assert [e.step_name for e in by_cid] == ["a", "b-retry", "b", "c", "completed"]
    assert by_cid[0].request_data == {"nested": [1, {"x": None}]}
    assert by_cid[0].execution_time == 12


async def test_a_dead_consumers_entries_are_claimed_by_another(
    store: RunStore,
    redis_client: RedisClient,
    keys: Keys,
    pool: AsyncConnectionPool,
    make_flusher: Callable[..., Flusher],
) -> None:
    for i in range(10):
        await run_one_process(store, redis_client, keys, f"d-{i}")
    delivered = 0
    for partition in keys.partitions:
        stream = partition.writebehind
        await redis_client.xgroup_create(stream, WRITEBEHIND_GROUP, id="0", mkstream=True)
        found = cast(
            list[Any],
            await redis_client.xreadgroup(WRITEBEHIND_GROUP, "dead", {stream: ">"}, count=1000),
        )
        delivered += sum(len(items) for _, items in found)
    assert delivered == 40  # now pending on "dead", which never comes back
    await asyncio.sleep(0.3)

    assert await make_flusher("alive", claim_idle_ms=200).drain(timeout_s=10)

    states = await rows(pool, "SELECT correlation_id, status, version FROM process_store")
    assert sorted(states) == sorted((f"d-{i}", "ok", 3) for i in range(10))
    assert await rows(pool, "SELECT count(*) FROM event_log") == [(10,)]
    for partition in keys.partitions:
        pending = await redis_client.xpending(partition.writebehind, WRITEBEHIND_GROUP)
        assert pending["pending"] == 0


async def test_poison_entries_are_isolated_then_dead_lettered(
    store: RunStore,
    redis_client: RedisClient,
    keys: Keys,
    pool: AsyncConnectionPool,
    make_flusher: Callable[..., Flusher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    await claim(store, "ok-1")
    bad = EventRecord(correlation_id="bad-1", status="ok", request_data="s3cr3t \x00 byte")
    await append_event(redis_client, keys, bad)  # Postgres jsonb refuses \u0000
    await append_event(redis_client, keys, EventRecord(correlation_id="ok-1", status="ok"))
    await redis_client.xadd(keys.of("ok-1").writebehind, {"kind": "state", "body": b"{not json"})
    flusher = make_flusher(max_deliveries=2)

    assert await flusher.drain(timeout_s=10)

    # The good rows are in; the undecodable entry is dead at once; the rejected one waits.
    assert await postgres.get_run(pool, "ok-1") is not None
    assert len(await postgres.events_by_correlation(pool, "ok-1")) == 1
    dead = await dead_letters(redis_client, keys)
    assert [fields[b"reason"].startswith(b"undecodable") for _, fields in dead] == [True]
    assert await flusher.backlog() == 1

    assert await flusher.drain(timeout_s=10)  # second delivery: rejected again -> dead

    dead = await dead_letters(redis_client, keys)
    assert len(dead) == 2
    _, fields = dead[1]
    assert fields[b"kind"] == b"event"
    assert b"rejected 2 times" in fields[b"reason"]
    assert EventRecord.from_json(fields[b"body"]) == bad
    assert await flusher.backlog() == 0
    assert await postgres.events_by_correlation(pool, "bad-1") == []
    # What a row carries (process variables) never reaches the logs.
    assert "rejected" in caplog.text
    assert "s3cr3t" not in caplog.text


# --- Postgres outage ---------------------------------------------------------------------


def stop_postgres_fast(server: servers.Server) -> None:
    """Fast shutdown (SIGINT: disconnect sessions), not the smart one `stop()` starts with,
    which would wait for the flusher's pooled connections to close."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGINT)
    server.stop()


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if await condition():
                return
            await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_postgres_outage_loses_nothing_and_duplicates_nothing(
    store: RunStore,
    redis_client: RedisClient,
    keys: Keys,
    schema_url: str,
    postgres_service: tuple[str, servers.Server | None],
) -> None:
    server = postgres_service[1]
    url, proxy = schema_url, None
    if server is None:  # an external database cannot be stopped from here: cut it off
        target = conninfo_to_dict(schema_url)
        proxy = TcpProxy(str(target.get("host", "127.0.0.1")), int(str(target.get("port", 5432))))
        await proxy.up()
        url = make_conninfo(schema_url, host="127.0.0.1", port=proxy.port)
    # Unchecked, as the flusher process's: its own retry must get past the connections the
    # outage broke.
    pool = await postgres.open_pool(url, max_size=4, timeout_s=2, checked=False)
    await postgres.migrate(pool)
    flusher = Flusher(redis_client, keys, pool, consumer="c1", batch=100, idle_ms=50,
                      claim_idle_ms=30_000, max_backoff_s=1)  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(flusher.run(stop))
    ids = [f"o-{i:03}" for i in range(500)]
    try:
        for cid in ids:
            await claim(store, cid)
        await wait_for(lambda: has_backlog(flusher, 0), timeout_s=30)

        if proxy:
            await proxy.down()
        elif server is not None:
            await asyncio.to_thread(stop_postgres_fast, server)
        try:
            for cid in ids:
                await append_event(redis_client, keys, EventRecord(correlation_id=cid, status="ok"))
                await store.finish(cid, Status.OK, data={"cid": cid})
            await asyncio.sleep(2)  # the flusher tries, fails, backs off; nothing is acked
            assert await flusher.backlog() == 1000
            assert not task.done()
        finally:
            if proxy:
                await proxy.up()
            elif server is not None:
                await asyncio.to_thread(server.start)

        await wait_for(lambda: has_backlog(flusher, 0), timeout_s=60)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)
        await pool.close()
        if proxy:
            await proxy.down()

    async with await psycopg.AsyncConnection.connect(schema_url) as conn:
        states = await (
            await conn.execute("SELECT correlation_id, status, version FROM process_store")
        ).fetchall()
        events = await (
            await conn.execute("SELECT correlation_id, count(*) FROM event_log GROUP BY 1")
        ).fetchall()
    assert sorted(states) == [(cid, "ok", 2) for cid in ids]
    assert sorted(events) == [(cid, 1) for cid in ids]


async def has_backlog(flusher: Flusher, expected: int) -> bool:
    return await flusher.backlog() == expected


async def test_run_stops_promptly(make_flusher: Callable[..., Flusher]) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(make_flusher(idle_ms=1_000).run(stop))
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(task, timeout=2)
