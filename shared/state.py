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
from collections.abc import Callable, Mapping
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
        return {f.wire: f.convert.to_wire(getattr(self, f.attr)) for f in FIELDS}

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def to_hash(self) -> dict[str, str]:
        """The Redis hash: every value as text (JSON text for ``data``/``error``). Fields
        without a value are left out: a run's record stays for its whole retention, and an
        empty field costs as much memory as a short one (readers take a missing field as
        none)."""
        return {
            f.wire: value
            for f in FIELDS
            if (value := f.convert.to_text(getattr(self, f.attr))) not in ("", "null")
        }

    def to_row(self) -> tuple[Any, ...]:
        """Parameters in :data:`COLUMNS` order (jsonb values still plain Python)."""
        return tuple(getattr(self, f.attr) for f in FIELDS)

    # The readers pass FIELDS' values in order: they are the dataclass's fields, in order.

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> RunState:
        return cls(*[f.convert.from_wire(obj.get(f.wire)) for f in FIELDS])

    @classmethod
    def from_json(cls, raw: bytes | str) -> RunState:
        return cls.from_dict(orjson.loads(raw))

    @classmethod
    def from_hash(cls, fields: Mapping[Any, Any]) -> RunState:
        """From the hash as redis-py reads it."""
        hashed = {text(k): text(v) for k, v in fields.items()}
        return cls(*[f.convert.from_text(hashed.get(f.wire, "")) for f in FIELDS])

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RunState:
        return cls(*[f.convert.from_column(row[f.attr]) for f in FIELDS])


# --- values ----------------------------------------------------------------------------------


def iso(moment: datetime) -> str:
    """The one timestamp format: ISO 8601, UTC, milliseconds, ``Z`` (as JavaScript writes it)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def dump_json(value: Any) -> str:
    """JSON text for ``data``/``error`` and audit values; unknown types become their ``str``."""
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


# --- the codec -------------------------------------------------------------------------------


class Kind(StrEnum):
    """How one field is written in each shape (its :class:`Conversions`)."""

    TEXT = "text"
    STATUS = "status"
    INT = "int"
    JSON = "json"
    TIME = "time"


@dataclass(frozen=True, slots=True)
class Conversions:
    """One kind's value from and to each shape. No value is ``None`` in Python, on the wire
    and in a column, and ``""`` in the hash (``null`` for JSON)."""

    to_wire: Callable[[Any], Any]
    from_wire: Callable[[Any], Any]
    to_text: Callable[[Any], str]
    from_text: Callable[[str], Any]
    from_column: Callable[[Any], Any]


def _same(value: Any) -> Any:
    return value


def _optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``convert``, with no value left as none."""
    return lambda value: None if value is None else convert(value)


def _as_text(to_wire: Callable[[Any], Any]) -> Callable[[Any], str]:
    return lambda value: "" if value is None else str(to_wire(value))


def _from_text(from_wire: Callable[[Any], Any]) -> Callable[[str], Any]:
    return lambda text: from_wire(text) if text else None


def _json_from_text(text: str) -> Any:
    return orjson.loads(text or "null")


def _status_value(status: Status) -> str:
    return status.value


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def _conversions(to_wire: Callable[[Any], Any], from_wire: Callable[[Any], Any]) -> Conversions:
    return Conversions(
        to_wire=_optional(to_wire),
        from_wire=_optional(from_wire),
        to_text=_as_text(to_wire),
        from_text=_from_text(from_wire),
        from_column=_optional(from_wire),
    )


#: Looked up once per field (:class:`Field`), not branched on per value: the codec runs
#: several times a request, and this halved its cost (bench/ANALYSIS.md, 2026-12-06).
CONVERSIONS: dict[Kind, Conversions] = {
    Kind.TEXT: _conversions(_same, str),
    Kind.STATUS: _conversions(_status_value, Status),
    Kind.INT: _conversions(_same, int),
    Kind.JSON: Conversions(
        to_wire=_same,
        from_wire=_same,
        to_text=dump_json,
        from_text=_json_from_text,
        from_column=_same,
    ),
    Kind.TIME: dataclasses.replace(
        _conversions(iso, parse_iso),
        from_column=_optional(_utc),
    ),
}


@dataclass(frozen=True, slots=True)
class Field:
    attr: str  # the dataclass attribute and the Postgres column
    wire: str  # the camelCase name of the wire object and the Redis hash
    kind: Kind
    convert: Conversions


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
    fields = []
    for f in dataclasses.fields(record):
        kind = _kind(hints[f.name])
        fields.append(Field(f.name, _camel(f.name), kind, CONVERSIONS[kind]))
    return tuple(fields)


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
