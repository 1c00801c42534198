"""The audit trail: one :class:`EventRecord` per step outcome, start and completion.

Records travel through the write-behind stream (``kind=event``) rather than straight to
Postgres, so logging an event costs one Redis round trip and survives a Postgres outage;
shared/writebehind.py inserts them into ``event_log`` (idempotently, by stream entry id).
The columns are the seed's; the body of the stream entry uses the same (snake_case) names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from redis.asyncio import Redis

from shared.keys import Keys


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
    execution_time_ms: int | None = None
    created_at: datetime = field(default_factory=_now)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``created_at`` as ISO 8601 UTC)."""
        return {**asdict(self), "created_at": self.created_at.astimezone(UTC).isoformat()}

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), default=str, option=orjson.OPT_NON_STR_KEYS)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> EventRecord:
        created = obj["created_at"]
        return cls(
            **{
                **obj,
                "created_at": created
                if isinstance(created, datetime)
                else datetime.fromisoformat(created),
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> EventRecord:
        return cls.from_dict(orjson.loads(raw))


async def append_event(redis: Redis, keys: Keys, record: EventRecord) -> None:
    """Queue ``record`` for ``event_log`` (one XADD; the flusher writes it to Postgres)."""
    await redis.xadd(keys.writebehind, {"kind": "event", "body": record.to_json()})
