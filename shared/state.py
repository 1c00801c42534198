"""The run's record, :class:`RunState`, and its one codec.

One record, four shapes, all derived from the dataclass below so that none can drift:

=============  ==============================================================================
shape          form
=============  ==============================================================================
wire object    camelCase names (the seed's), ``data``/``error`` as JSON values, times as
               JavaScript ISO strings (``2025-01-31T12:00:00.123Z``), ``version`` a number:
               what the write-behind stream carries and a completion message publishes
Redis hash     the same names, every value text; ``data``/``error`` hold JSON text
Lua            ``state_json(key)`` (:data:`STATE_JSON_LUA`) builds the wire object from the
               hash inside a script, generated from :data:`FIELDS`
Postgres row   snake_case columns (:data:`COLUMNS`), ``data``/``error`` as jsonb
=============  ==============================================================================

A field added to :class:`RunState` appears in all four; a migration adds its column
(tests/integration/test_state_columns.py fails until it does).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson

from flowgate.shared.redis_client import text


class Status(StrEnum):
    PENDING = "pending"
    OK = "ok"
    ERROR = "error"
    #: The start never reached the engine (``error`` holds its StartFailed answer); the
    #: correlationId is free again: a new start with it claims it afresh.
    ABANDONED = "abandoned"
    #: Cancelled by a client (POST /api/process/cancel): its engine instance was deleted.
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class RunState:
    """One run as Redis holds it; times are aware UTC datetimes (millisecond precision)."""

    correlation_id: str
    status: Status
    process_key: str
    request_hash: str | None
    instance_id: str | None
    traceability_id: str | None
    batch_id: str | None
    application_id: str | None
    data: Any
    error: Any
    started_at: datetime
    updated_at: datetime
    version: int
    #: When the starter sent the engine's start call (None: not sent yet). From then on an
    #: engine instance may exist, so the claim is never given up without looking for it.
    start_sent_at: datetime | None = None
    #: The start's ``fetchVariables``: the root variables a run the engine ends returns
    #: (None: all of them but the system variables).
    fetch_variables: Any = None
    #: Where the final status body is POSTed once the run ends (services/background/callbacks.py).
    callback_url: str | None = None
    #: The tenant the run belongs to (None: the default tenant; shared/tenancy.py), and the
    #: principal that started it (never a secret: ``key:<n>``, a token's subject).
    tenant: str | None = None
    principal: str | None = None
    #: The run's W3C trace context (shared/tracing.py), also its instance's ``traceparent``.
    traceparent: str | None = None

    @property
    def finished(self) -> bool:
        return self.status is not Status.PENDING

    def to_dict(self) -> dict[str, Any]:
        """The wire object (see the module docstring)."""
        return {f.wire: f.kind.to_wire(getattr(self, f.attr)) for f in FIELDS}

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def to_hash(self) -> dict[str, str]:
        """The Redis hash: every value as text (JSON text for ``data``/``error``). Fields
        without a value are left out: a run's record stays for its whole retention, and an
        empty field costs as much memory as a short one (readers take a missing field as
        none)."""
        fields = ((f.wire, f.kind.to_text(getattr(self, f.attr))) for f in FIELDS)
        return {wire: value for wire, value in fields if value not in ("", "null")}

    def to_row(self) -> tuple[Any, ...]:
        """Parameters in :data:`COLUMNS` order (jsonb values still plain Python)."""
        return tuple(getattr(self, f.attr) for f in FIELDS)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> RunState:
        return cls(**{f.attr: f.kind.from_wire(obj.get(f.wire)) for f in FIELDS})

    @classmethod
    def from_json(cls, raw: bytes | str) -> RunState:
        return cls.from_dict(orjson.loads(raw))

    @classmethod
    def from_hash(cls, fields: Mapping[Any, Any]) -> RunState:
        """From the hash as redis-py reads it."""
        hashed = {text(k): text(v) for k, v in fields.items()}
        return cls(**{f.attr: f.kind.from_text(hashed.get(f.wire, "")) for f in FIELDS})

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RunState:
        return cls(**{f.attr: f.kind.from_column(row[f.attr]) for f in FIELDS})


# --- the codec -------------------------------------------------------------------------------


class Kind(StrEnum):
    """How one field is written in each shape."""

    TEXT = "text"
    STATUS = "status"
    INT = "int"
    JSON = "json"
    TIME = "time"

    def to_wire(self, value: Any) -> Any:
        if value is None:
            return None
        if self is Kind.TIME:
            return iso(value)
        if self is Kind.STATUS:
            return value.value
        return value

    def from_wire(self, value: Any) -> Any:
        if self is Kind.JSON or value is None:
            return value
        if self is Kind.TIME:
            return parse_iso(value)
        if self is Kind.STATUS:
            return Status(value)
        if self is Kind.INT:
            return int(value)
        return str(value)

    def to_text(self, value: Any) -> str:
        if self is Kind.JSON:
            return dump_json(value)
        wire = self.to_wire(value)
        return "" if wire is None else str(wire)

    def from_text(self, text: str) -> Any:
        if self is Kind.JSON:
            return orjson.loads(text or "null")
        return self.from_wire(text or None)

    def from_column(self, value: Any) -> Any:
        if self is Kind.TIME and value is not None:
            return value.astimezone(UTC)
        return self.from_wire(value)


@dataclass(frozen=True, slots=True)
class Field:
    attr: str  # the dataclass attribute and the Postgres column
    wire: str  # the camelCase name of the wire object and the Redis hash
    kind: Kind


def _kind(hint: Any) -> Kind:
    if args := [arg for arg in typing.get_args(hint) if arg is not type(None)]:
        hint = args[0]  # `X | None`: the kind of X
    if hint is datetime:
        return Kind.TIME
    if hint is Status:
        return Kind.STATUS
    if hint is int:
        return Kind.INT
    if hint is Any:
        return Kind.JSON
    return Kind.TEXT  # str, str | None


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def fields_of(record: type) -> tuple[Field, ...]:
    """The codec fields of a record dataclass, from its annotations."""
    hints = typing.get_type_hints(record)
    return tuple(
        Field(f.name, _camel(f.name), _kind(hints[f.name])) for f in dataclasses.fields(record)
    )


FIELDS = fields_of(RunState)
COLUMNS = tuple(f.attr for f in FIELDS)
#: Fields written as JSON values (``data``, ``error``): jsonb in Postgres.
JSON_COLUMNS = frozenset(f.attr for f in FIELDS if f.kind is Kind.JSON)


def _lua_field(f: Field) -> str:
    # JSON text and numbers are embedded verbatim (cjson would turn [] into {} and round
    # large integers); text is quoted by cjson.
    encode = "json_raw" if f.kind in (Kind.JSON, Kind.INT) else "json_str"
    return f"'\"{f.wire}\":' .. {encode}(h.{f.wire})"


#: ``state_json(key)``: the wire object of the hash at ``key``, built inside a script.
STATE_JSON_LUA = f"""
local function json_str(v)
  if v == nil or v == false or v == '' then return 'null' end
  return cjson.encode(v)
end
local function json_raw(v)
  if v == nil or v == false or v == '' then return 'null' end
  return v
end
local function state_json(key)
  local flat = redis.call('HGETALL', key)
  local h = {{}}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  return '{{' .. {" .. ',' .. ".join(_lua_field(f) for f in FIELDS)} .. '}}'
end
"""


# --- values ----------------------------------------------------------------------------------


def iso(moment: datetime) -> str:
    """The one timestamp format: ISO 8601, UTC, milliseconds, ``Z`` (as JavaScript writes it)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def dump_json(value: Any) -> str:
    """JSON text for ``data``/``error`` and audit values; unknown types become their ``str``."""
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
