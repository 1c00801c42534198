"""The run's record: every shape round-trips, and the scripts use only its field names."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from flowgate.shared.lua import Script
from flowgate.shared.state import FIELDS, STATE_JSON_LUA, RunState, Status, iso
from flowgate.shared.steps import StepStatus
from flowgate.shared.store import scripts  # noqa: F401 - declares the store's scripts
from flowgate.shared.store.runs import BESIDE_THE_RECORD

STATE = RunState(
    correlation_id="user@example.com",
    status=Status.ERROR,
    process_key="onboard-user",
    request_hash="h",
    instance_id=None,
    traceability_id="t",
    batch_id="b",
    application_id="a",
    data={"list": [], "big": 2**62},
    error="boom",
    started_at=datetime(2025, 1, 31, 12, 0, 0, 123_000, tzinfo=UTC),
    updated_at=datetime(2025, 1, 31, 12, 0, 1, 456_000, tzinfo=UTC),
    version=3,
)


#: Every field with a value (STATE leaves the optional ones out).
FULL = dataclasses.replace(
    STATE,
    status=Status.PENDING,
    instance_id="i-1",
    error={"code": "E", "details": [1, None]},
    start_sent_at=datetime(2025, 1, 31, 12, 0, 0, 789_000, tzinfo=UTC),
    fetch_variables=["result"],
    callback_url="https://example.com/hook",
    tenant="acme",
    principal="key:1",
    traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
)


@pytest.mark.parametrize("state", [STATE, FULL], ids=["without optional fields", "every field"])
def test_every_shape_round_trips(state: RunState) -> None:
    assert RunState.from_dict(state.to_dict()) == state
    assert RunState.from_json(state.to_json()) == state
    assert RunState.from_hash(state.to_hash()) == state
    row = dict(zip((f.attr for f in FIELDS), state.to_row(), strict=True))
    assert RunState.from_row(row) == state


def test_fields_without_a_value_stay_out_of_the_hash() -> None:
    assert {"instanceId", "startSentAt", "tenant", "fetchVariables"}.isdisjoint(STATE.to_hash())
    assert {f.wire for f in FIELDS} == set(FULL.to_hash())


def test_a_column_s_time_reads_as_utc() -> None:
    row = dict(zip((f.attr for f in FIELDS), FULL.to_row(), strict=True))
    row["started_at"] = row["started_at"].astimezone(timezone(timedelta(hours=2)))
    started = RunState.from_row(row).started_at
    assert started.tzinfo is UTC
    assert started == FULL.started_at


def test_times_are_javascript_iso_strings() -> None:
    assert STATE.to_dict()["startedAt"] == "2025-01-31T12:00:00.123Z"
    assert iso(datetime(2025, 1, 31, 13, 0, tzinfo=UTC)) == "2025-01-31T13:00:00.000Z"


def test_the_generated_lua_names_every_field() -> None:
    assert re.findall(r'"(\w+)":', STATE_JSON_LUA) == [f.wire for f in FIELDS]


def test_the_transition_scripts_write_only_fields_of_the_record() -> None:
    # Quoted words in those calls are field names, or (as values) statuses.
    wire = {f.wire for f in FIELDS} | {status.value for status in Status} | set(BESIDE_THE_RECORD)
    used = {
        name
        for script in Script.declared.values()
        for call in re.findall(r"'(?:HSET|HGET|HMGET|HINCRBY)',\s*K\.state,([^)]*)\)", script.body)
        for name in re.findall(r"'(\w+)'", call)
    }
    assert used
    assert used <= wire, used - wire


def test_a_step_left_by_the_engine_is_spelled_like_a_cancelled_run() -> None:
    assert StepStatus.CANCELLED.value == Status.CANCELLED.value == "cancelled"
    assert StepStatus("canceled") is StepStatus.CANCELLED  # as recorded before
