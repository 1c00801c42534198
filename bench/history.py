"""Work already done, for section 10: the engine's history and both gateways' stores grown
to a given number of finished runs, and what the watcher's history read costs as they grow.

The engine's history grows by copies of the rows real runs left (every ``act_hi_*`` table's
rows of each finished instance, each copy with its own ids and its times moved into the
past, where a watermark query must skip them), so the tables, their indexes and their
statistics are what that many runs would leave. flowgate's Redis and Postgres grow through
its own store (a claim and a finish per run, written behind by the flusher, as a finished
run is retained); the reference gateway's tables by copies of its own rows.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from bench.harness import summary
from flowgate.shared.camunda import CamundaClient
from flowgate.shared.contract import SystemVariables
from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import connect
from flowgate.shared.state import Status
from flowgate.shared.store.runs import RunStore

#: The columns of the history tables that hold an id of one run's own records: a copy gets
#: its own. Definition ids, deployment ids and byte arrays
#: are shared, as they are between real runs.
_OWN_IDS = frozenset(
    {
        "id_",
        "proc_inst_id_",
        "root_proc_inst_id_",
        "execution_id_",
        "act_inst_id_",
        "parent_act_inst_id_",
        "task_id_",
        "call_proc_inst_id_",
        "super_process_instance_id_",
        "ext_task_id_",
        "var_inst_id_",
        "business_key_",
        "event_subscr_id_",
    }
)


def grow_engine_history(database_url: str, finished: int) -> int:
    """Copy finished runs' history until the engine holds ``finished`` of them; how many
    it holds now."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        have = _finished(conn)
        if have == 0 or have >= finished:
            return have
        copies = -(-(finished - have) // have)
        span = conn.execute(
            "SELECT extract(epoch FROM max(end_time_) - min(start_time_)) + 1"
            " FROM act_hi_procinst WHERE end_time_ IS NOT NULL"
        ).fetchone()
        assert span is not None
        tables = conn.execute(
            "SELECT table_name FROM information_schema.columns WHERE table_schema ="
            " current_schema() AND table_name LIKE 'act_hi_%' AND column_name = 'proc_inst_id_'"
        ).fetchall()
        with conn.transaction():
            conn.execute(
                "CREATE TEMP TABLE templates ON COMMIT DROP AS SELECT proc_inst_id_"
                " FROM act_hi_procinst WHERE end_time_ IS NOT NULL"
            )
            for (table,) in tables:
                _copy(conn, table, copies=copies, span_s=float(span[0]))
        conn.execute("ANALYZE")
        return _finished(conn)


def _finished(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM act_hi_procinst WHERE end_time_ IS NOT NULL"
    ).fetchone()
    return int(row[0]) if row else 0


def _copy(conn: psycopg.Connection[Any], table: str, *, copies: int, span_s: float) -> None:
    """``copies`` copies of the table's rows of the template instances, copy ``g`` with
    ids of its own (the md5 of the original and ``g``: the same in every table, and as
    short as the engine's) and times ``g`` spans earlier."""
    columns = conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position",
        (table,),
    ).fetchall()
    values: list[sql.Composable] = []
    for name, kind in columns:
        column = sql.Identifier(name)
        if name in _OWN_IDS:
            values.append(sql.SQL("md5({} || '/' || g)").format(column))
        elif kind.startswith("timestamp"):
            values.append(sql.SQL("{} - g * {} * interval '1 second'").format(column, span_s))
        else:
            values.append(column)
    conn.execute(
        sql.SQL(
            "INSERT INTO {table} ({columns}) SELECT {values} FROM {table}"
            " CROSS JOIN generate_series(1, {copies}) AS g"
            " WHERE proc_inst_id_ IN (SELECT proc_inst_id_ FROM templates)"
        ).format(
            table=sql.Identifier(table),
            columns=sql.SQL(", ").join(sql.Identifier(name) for name, _ in columns),
            values=sql.SQL(", ").join(values),
            copies=copies,
        )
    )


def grow_table(database_url: str, table: str, key: str, rows: int) -> int:
    """Copy the rows of a gateway's ``table`` (``key`` suffixed ``-h<g>``) until it has
    ``rows``; how many it has now."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        have = int((count.fetchone() or [0])[0])
        if have == 0 or have >= rows:
            return have
        columns = [
            name
            for (name,) in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema ="
                " current_schema() AND table_name = %s AND column_default IS NULL"
                " ORDER BY ordinal_position",
                (table,),
            ).fetchall()
        ]
        values: list[sql.Composable] = [
            sql.SQL("{} || '-h' || g").format(sql.Identifier(name))
            if name == key
            else sql.Identifier(name)
            for name in columns
        ]
        conn.execute(
            sql.SQL(
                "INSERT INTO {table} ({columns}) SELECT {values} FROM {table}"
                " CROSS JOIN generate_series(1, {copies}) AS g"
            ).format(
                table=sql.Identifier(table),
                columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
                values=sql.SQL(", ").join(values),
                copies=-(-(rows - have) // have),
            )
        )
        return int((conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(table))).fetchone() or [0])[0])  # fmt: skip


async def grow_flowgate(redis_url: str, *, cluster: bool, prefix: str, runs: int) -> float:
    """``runs`` finished runs in flowgate's store under ``prefix``, as a run leaves its
    record (its write-behind entries go to Postgres through the flusher, then its steps
    leave Redis), ready when the flusher has compacted them all; seconds taken. Waiting
    for that keeps the catching up out of the rounds measured after: they are to show what
    retained runs cost, not what growing the store did."""
    redis = connect(redis_url, cluster=cluster, max_connections=64)
    keys = Keys(prefix)
    # Due for compaction at once, as these runs' 30 s have passed long ago.
    store = RunStore(redis, keys, result_ttl_s=86_400, pending_ttl_s=86_400, steps_in_redis_s=0)
    result = {"validated": True, "backgroundCheckPassed": True, "onboarded": True}
    numbers = iter(range(runs))
    t0 = time.perf_counter()

    async def lane() -> None:
        for n in numbers:
            cid = f"grown-{n}"
            await store.claim(SystemVariables.new(cid), "onboard-user", uuid.uuid4().hex * 2)
            await store.finish(cid, Status.OK, data={"userId": f"user-{n}", **result})

    async def due() -> int:
        now_ms = int(time.time() * 1000)
        counts = [await redis.zcount(p.compact, "-inf", now_ms) for p in keys.partitions]
        return sum(counts)

    try:
        await asyncio.gather(*(lane() for _ in range(64)))
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if not await due():
                break
            await asyncio.sleep(0.5)
    finally:
        await redis.aclose()
    return time.perf_counter() - t0


async def watcher_reads(engine_url: str, *, reads: int) -> dict[str, Any]:
    """What the watcher's history pass (services/background/watcher.py, history mode)
    costs: its three queries from a watermark a second back, ``reads`` times, ms each."""
    async with CamundaClient(engine_url, timeout_s=30) as camunda:
        took: list[float] = []
        for _ in range(reads):
            since = datetime.now(UTC) - timedelta(seconds=1)
            t0 = time.perf_counter()
            await asyncio.gather(
                camunda.ended_instances(since, max_results=500),
                camunda.ended_activities(since, max_results=500),
                camunda.incidents_since(since, max_results=500),
            )
            took.append((time.perf_counter() - t0) * 1000)
    return summary(took, 2)
