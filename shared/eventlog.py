"""The audit trail: one :class:`EventRecord` per step outcome, start and completion.

Records travel through the write-behind stream (``kind=event``) rather than straight to
Postgres, so logging an event costs one Redis round trip and survives a Postgres outage;
the API's write-behind (services/flusher/writebehind.py) inserts them into
``event_log`` idempotently, by stream entry id. The fields are the seed's ``event_log``
columns, snake_case, in one place: :data:`EVENT_COLUMNS` derives from the dataclass, and the
stream body, the insert and the reads all use it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import RedisClient
from flowgate.shared.state import RunState, dump_json, parse_iso


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class EventRecord:
    """One ``event_log`` row; ``*_data``, ``identifiers``, ``result`` and ``metadata`` are
    any JSON value. ``created_at`` is when it happened, not when it reached Postgres."""

    correlation_id: str
    status: str
    step: int | None = None
    step_name: str | None = None
    process_name: str | None = None
    http_method: str | None = None
    endpoint: str | None = None
    request_data: Any = None
    response_data: Any = None
    error_message: str | None = None
    http_status_code: int | None = None
    batch_id: str | None = None
    traceability_id: str | None = None
    application_id: str | None = None
    target_system: str | None = None
    originating_system: str | None = None
    identifiers: Any = None
    result: Any = None
    metadata: Any = None
    #: Milliseconds the step took.
    execution_time: int | None = None
    created_at: datetime = field(default_factory=_now)

    @classmethod
    def of_run(cls, state: RunState, **fields: Any) -> EventRecord:
        """A row of this run: its correlationId, process and system ids filled in (``fields``
        may name another process: a call activity's)."""
        run: dict[str, Any] = {
            "correlation_id": state.correlation_id,
            "process_name": state.process_key,
            "batch_id": state.batch_id,
            "traceability_id": state.traceability_id,
            "application_id": state.application_id,
        }
        return cls(**{**run, **fields})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``created_at`` as an ISO string, to the microsecond); its JSON
        values are shared, not copied (``asdict`` would copy them deeply)."""
        fields = {name: getattr(self, name) for name in EVENT_COLUMNS}
        return {**fields, "created_at": self.created_at.astimezone(UTC).isoformat()}

    def to_json(self) -> bytes:
        return dump_json(self.to_dict()).encode()

    def to_row(self) -> tuple[Any, ...]:
        """Parameters in :data:`EVENT_COLUMNS` order (JSON columns still plain Python)."""
        return tuple(getattr(self, name) for name in EVENT_COLUMNS)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> EventRecord:
        created = obj["created_at"]
        if not isinstance(created, datetime):
            created = parse_iso(created)
        return cls(**{**obj, "created_at": created.astimezone(UTC)})

    @classmethod
    def from_json(cls, raw: bytes | str) -> EventRecord:
        return cls.from_dict(orjson.loads(raw))


EVENT_COLUMNS = tuple(f.name for f in dataclasses.fields(EventRecord))
#: Columns holding any JSON value (jsonb in Postgres).
EVENT_JSON_COLUMNS = frozenset(
    name for name, hint in typing.get_type_hints(EventRecord).items() if hint is Any
)


async def append_event(redis: RedisClient, keys: Keys, record: EventRecord) -> None:
    """Queue ``record`` for ``event_log`` (one XADD to its run's partition; the flusher
    writes it to Postgres)."""
    stream = keys.of(record.correlation_id).writebehind
    await redis.xadd(stream, {"kind": "event", "body": record.to_json()})
