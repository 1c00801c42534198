"""Python values <-> Camunda typed variables (``{"type", "value", "valueInfo"}``).

The engine must never receive an untyped value: it would Java-serialize dicts and lists
into base64 blobs nobody else can read (Camunda REST reference, "Variables").
So every value is sent with an explicit type:

======================  ===================================================================
Python                  Camunda
======================  ===================================================================
``None``                ``Null``
``bool``                ``Boolean`` (checked before ``int``: ``bool`` is an ``int``)
``int``                 ``Integer`` within int32, ``Long`` within int64, else an error
``float``               ``Double`` (NaN and infinities are an error: JSON cannot carry them)
``str`` <= 4000 chars   ``String``
``str`` > 4000 chars    ``Json`` holding the JSON string: the engine's String column holds
                        4000 characters, Json is unbounded, and :func:`from_camunda` gives
                        the same ``str`` back
``datetime`` (aware)    ``Date``, ``2015-10-06T16:34:42.000+0200`` (milliseconds). Naive
                        datetimes are an error: guessing a zone would shift the instant
``date``                ``String`` in ISO form (``2024-05-01``): Camunda has no date-only
                        type, and a ``Date`` would invent a time of day and a zone
``bytes``/``bytearray`` ``Bytes`` (base64)
``dict``/``list``/      ``Json`` whose value is the JSON text (needs the engine's Spin plugin)
``tuple``
======================  ===================================================================

Anything else raises :class:`VariableError`, a ``ValueError`` whose message names the
variable, so the API can answer 400 with it.

Reading accepts what the engine sends back with ``deserializeValues=false``: ``Json`` and
``Object`` serialized as ``application/json`` are parsed (text that is not valid JSON, which
the engine accepts without checking, stays a ``str``), ``Date`` becomes an aware
``datetime``, ``Bytes`` becomes ``bytes``; other types keep their value as sent.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

import orjson

#: The engine stores String variables in a 4000-character column (2000 on Oracle).
MAX_STRING_CHARS = 4000
_INT32 = range(-(2**31), 2**31)
_INT64 = range(-(2**63), 2**63)


class VariableError(ValueError):
    """A value that cannot become a Camunda variable; the message names the variable."""


def to_camunda(values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Type every value for the engine's REST API (the table in the module docstring)."""
    return {name: _typed(name, value) for name, value in values.items()}


def from_camunda(variables: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Turn the engine's typed variables back into plain Python values."""
    return {name: _plain(variable) for name, variable in variables.items()}


def parse_date(text: str) -> datetime:
    """Read a date the engine wrote (``2015-10-06T16:34:42.000+0200``) as an aware datetime
    (``fromisoformat``: a twentieth of ``strptime``'s cost, on every task a worker fetches);
    ValueError for one without its offset."""
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset")
    return parsed


def format_date(value: datetime) -> str:
    """The engine's date format (Java ``yyyy-MM-dd'T'HH:mm:ss.SSSZ``): ms and ``+0200``."""
    return f"{value:%Y-%m-%dT%H:%M:%S}.{value.microsecond // 1000:03d}{value:%z}"


def _typed(name: str, value: Any) -> dict[str, Any]:  # noqa: C901 - one branch per type
    """One variable's wire form; raises :class:`VariableError` naming ``name``."""
    if value is None:
        return {"type": "Null", "value": None}
    if isinstance(value, bool):
        return {"type": "Boolean", "value": value}
    if isinstance(value, int):
        return {"type": _int_type(name, value), "value": int(value)}
    if isinstance(value, float):
        if not math.isfinite(value):
            raise VariableError(f"variable {name!r}: {value} cannot be sent (not finite)")
        return {"type": "Double", "value": value}
    if isinstance(value, str):
        if len(value) > MAX_STRING_CHARS:
            return {"type": "Json", "value": _json_text(name, value)}
        return {"type": "String", "value": str(value)}
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise VariableError(f"variable {name!r}: naive datetime; give it a time zone")
        return {"type": "Date", "value": format_date(value)}
    if isinstance(value, date):
        return {"type": "String", "value": value.isoformat()}
    if isinstance(value, bytes | bytearray):
        return {"type": "Bytes", "value": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict | list | tuple):
        return {"type": "Json", "value": _json_text(name, value)}
    raise VariableError(f"variable {name!r}: unsupported type {type(value).__name__}")


def _int_type(name: str, value: int) -> str:
    if value in _INT32:
        return "Integer"
    if value in _INT64:
        return "Long"
    raise VariableError(f"variable {name!r}: {value} does not fit a 64-bit Long")


def _json_text(name: str, value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError as exc:
        raise VariableError(f"variable {name!r}: not JSON-serializable ({exc})") from exc


def _plain(variable: Mapping[str, Any]) -> Any:
    """One typed variable as a Python value; unknown types keep the value as sent."""
    kind, value = variable.get("type"), variable.get("value")
    if value is None:
        return None
    if kind == "Json" or (kind == "Object" and _is_json_object(variable)):
        return _parse_json(value)
    if kind == "Date":
        return parse_date(value)
    if kind == "Bytes":
        return base64.b64decode(value)
    return value


def _parse_json(text: str) -> Any:
    """The engine stores Json text without checking it: text that does not parse stays text."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _is_json_object(variable: Mapping[str, Any]) -> bool:
    info = variable.get("valueInfo") or {}
    return bool(info.get("serializationDataFormat") == "application/json")
