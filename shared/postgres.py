"""Postgres: the connection pool, versioned migrations, and the read queries.

Postgres is the durable copy. Redis holds live state; the write-behind
(services/flusher/writebehind.py) copies every state change, step and audit event here, and
the API reads here when Redis no longer has a run (``get_run``) or its steps
(``steps_after``), and for the audit trail (``events_by_*``). Columns come from the
records (shared/state.py, shared/eventlog.py); the migrations below are their history.

Tables live in the connection's current schema (the first of ``search_path``), so a
deployment can choose its schema and each test gets its own.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from flowgate.shared.aio import Backoff, sleep_or_stop
from flowgate.shared.eventlog import EVENT_COLUMNS, EventRecord
from flowgate.shared.state import RunState
from flowgate.shared.steps import MAX_STEPS, StepEvent

log = logging.getLogger(__name__)

# Versioned migrations: append, never edit one that has shipped. Index i is version i + 1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE process_store (
        correlation_id  text PRIMARY KEY,
        process_key     text NOT NULL,
        status          text NOT NULL,
        data            jsonb,
        error           jsonb,
        instance_id     text,
        traceability_id text,
        batch_id        text,
        application_id  text,
        request_hash    text,
        started_at      timestamptz NOT NULL,
        updated_at      timestamptz NOT NULL,
        version         bigint NOT NULL
    );
    CREATE INDEX process_store_status_idx ON process_store (status);
    CREATE INDEX process_store_updated_at_idx ON process_store (updated_at);
    CREATE INDEX process_store_traceability_id_idx ON process_store (traceability_id);

    CREATE TABLE event_log (
        id                 bigserial PRIMARY KEY,
        stream_id          text NOT NULL UNIQUE,
        correlation_id     text NOT NULL,
        step               integer,
        step_name          text,
        process_name       text,
        status             text NOT NULL,
        http_method        text,
        endpoint           text,
        request_data       jsonb,
        response_data      jsonb,
        error_message      text,
        http_status_code   integer,
        batch_id           text,
        traceability_id    text,
        application_id     text,
        target_system      text,
        originating_system text,
        identifiers        jsonb,
        result             jsonb,
        metadata           jsonb,
        execution_time     integer,
        created_at         timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX event_log_correlation_id_idx ON event_log (correlation_id);
    CREATE INDEX event_log_traceability_id_idx ON event_log (traceability_id);
    """,
    # A start's engine call is recorded when sent (shared/state.py start_sent_at).
    "ALTER TABLE process_store ADD COLUMN start_sent_at timestamptz;",
    # What a run the engine ends returns (shared/state.py fetch_variables).
    "ALTER TABLE process_store ADD COLUMN fetch_variables jsonb;",
    # Where the run's end is delivered (shared/state.py callback_url).
    "ALTER TABLE process_store ADD COLUMN callback_url text;",
    # A run's steps (shared/steps.py), read here once its record in Redis is compacted;
    # keyed by the step's entry in that record, which is its id on the progress stream.
    """
    CREATE TABLE run_step (
        correlation_id  text NOT NULL,
        entry_ms        bigint NOT NULL,
        entry_seq       bigint NOT NULL,
        traceability_id text,
        step            jsonb NOT NULL,
        PRIMARY KEY (correlation_id, entry_ms, entry_seq)
    );
    """,
    # Who a run belongs to, who started it, and its trace (shared/state.py).
    "ALTER TABLE process_store ADD COLUMN tenant text, ADD COLUMN principal text,"
    " ADD COLUMN traceparent text;",
)

# First key of the two-int advisory lock taken while migrating; the second is the schema.
_MIGRATION_LOCK = 0x466C6F77  # "Flow"

# Step order; events without a step (for example the API's completion) come after the steps.
_EVENT_ORDER = "ORDER BY step ASC NULLS LAST, created_at, id"


async def open_pool(
    database_url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    timeout_s: float = 10.0,
    checked: bool = True,
) -> AsyncConnectionPool:
    """Create and open a pool without waiting for Postgres (it may be down at start-up:
    write-behind keeps entries in Redis until it answers; ``/readyz`` reports it).

    ``checked``: each connection is checked before use (a round trip), so a restarted
    Postgres costs a reconnect, not an error; a caller that retries anyway may skip it.
    Connections run in autocommit and writers use explicit transactions.
    """
    pool = AsyncConnectionPool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout_s,
        open=False,
        kwargs={"autocommit": True},
        check=AsyncConnectionPool.check_connection if checked else None,
        name="flowgate",
    )
    await pool.open(wait=False)
    return pool


async def migrate(pool: AsyncConnectionPool) -> int:
    """Apply the migrations this schema lacks; returns the schema version now in place.

    The advisory lock (per schema) makes concurrent replicas wait for each other instead of
    racing to create the same tables; it is released with the transaction.
    """
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))", (_MIGRATION_LOCK,)
        )
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_version")
        row = await cur.fetchone()
        current = int(row[0]) if row else 0
        for version, sql in enumerate(MIGRATIONS[current:], start=current + 1):
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
    return len(MIGRATIONS)


async def migrate_when_up(pool: AsyncConnectionPool, stop: asyncio.Event) -> bool:
    """Apply the migrations, retrying while Postgres is down (readers serve from Redis
    meanwhile, and the write-behind streams keep every entry); False if ``stop`` came
    first."""
    backoff = Backoff(base_s=0.5, cap_s=10.0)
    while not stop.is_set():
        try:
            version = await migrate(pool)
        except (psycopg.Error, PoolTimeout) as exc:
            log.warning("migrations not applied yet; retrying", extra={"error": repr(exc)})
            await sleep_or_stop(stop, backoff.next_delay_s())
        else:
            log.info("postgres schema ready", extra={"version": version})
            return True
    return False


async def ping(pool: AsyncConnectionPool) -> None:
    """Raise unless Postgres answers (readiness)."""
    async with pool.connection() as conn:
        await conn.execute("SELECT 1")


async def get_run(pool: AsyncConnectionPool, correlation_id: str) -> RunState | None:
    """The last state the write-behind stored, for a process Redis no longer holds."""
    async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT * FROM process_store WHERE correlation_id = %s", (correlation_id,)
        )
        row = await cur.fetchone()
    return None if row is None else RunState.from_row(row)


async def steps_after(
    pool: AsyncConnectionPool,
    correlation_id: str,
    *,
    traceability_id: str | None,
    after: str | None = None,
    count: int = MAX_STEPS,
) -> list[tuple[str, StepEvent]]:
    """The steps of the run ``traceability_id`` of ``correlation_id`` after the entry id
    ``after`` (exclusive; None: from the first), oldest first, with their ids."""
    ms, seq = (int(part) for part in after.split("-")) if after else (-1, -1)
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT entry_ms, entry_seq, step FROM run_step"
            " WHERE correlation_id = %s AND traceability_id IS NOT DISTINCT FROM %s"
            " AND (entry_ms, entry_seq) > (%s, %s)"
            " ORDER BY entry_ms, entry_seq LIMIT %s",
            (correlation_id, traceability_id, ms, seq, count),
        )
        rows = await cur.fetchall()
    return [(f"{row[0]}-{row[1]}", StepEvent.from_dict(row[2])) for row in rows]


async def events_by_traceability(
    pool: AsyncConnectionPool, traceability_id: str
) -> list[EventRecord]:
    """The audit trail of one run by its traceability id, in step order."""
    return await _events(pool, {"traceability_id": traceability_id})


async def events_by_correlation(
    pool: AsyncConnectionPool, correlation_id: str, *, traceability_id: str | None = None
) -> list[EventRecord]:
    """The audit trail by correlation id, in step order: of the run with
    ``traceability_id`` when given, else of every run that used the id."""
    if traceability_id is None:
        return await _events(pool, {"correlation_id": correlation_id})
    return await _events(
        pool, {"correlation_id": correlation_id, "traceability_id": traceability_id}
    )


async def _events(pool: AsyncConnectionPool, where: dict[str, str]) -> list[EventRecord]:
    query = sql.SQL("SELECT {columns} FROM event_log WHERE {where} {order}").format(
        columns=sql.SQL(", ").join(map(sql.Identifier, EVENT_COLUMNS)),
        where=sql.SQL(" AND ").join(
            sql.SQL("{} = %s").format(sql.Identifier(column)) for column in where
        ),
        order=sql.SQL(_EVENT_ORDER),
    )
    async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, tuple(where.values()))
        rows = await cur.fetchall()
    return [EventRecord(**{**row, "created_at": row["created_at"].astimezone(UTC)}) for row in rows]


async def table_columns(pool: AsyncConnectionPool, table: str) -> list[str]:
    """The columns of ``table`` in the current schema (the records' drift check)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position",
            (table,),
        )
        return [str(row[0]) for row in await cur.fetchall()]
