"""The records and the tables agree: a field added to RunState or EventRecord needs a
migration, and this fails until it has one."""

from __future__ import annotations

from flowgate.shared import postgres
from flowgate.shared.eventlog import EVENT_COLUMNS
from flowgate.shared.state import COLUMNS


async def test_the_tables_have_exactly_the_records_columns(schema_url: str) -> None:
    pool = await postgres.open_pool(schema_url)
    try:
        await postgres.migrate(pool)
        assert set(await postgres.table_columns(pool, "process_store")) == set(COLUMNS)
        # `id` orders rows of one step; `stream_id` makes replays idempotent.
        assert set(await postgres.table_columns(pool, "event_log")) == {
            "id",
            "stream_id",
            *EVENT_COLUMNS,
        }
    finally:
        await pool.close()
