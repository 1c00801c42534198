"""Python values <-> Camunda typed variables (shared/variables.py)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
import pytest

from flowgate.shared.variables import (
    MAX_STRING_CHARS,
    VariableError,
    from_camunda,
    parse_date,
    to_camunda,
)

PLUS_TWO = timezone(timedelta(hours=2))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, {"type": "Null", "value": None}),
        (True, {"type": "Boolean", "value": True}),
        (False, {"type": "Boolean", "value": False}),
        (0, {"type": "Integer", "value": 0}),
        (2**31 - 1, {"type": "Integer", "value": 2**31 - 1}),
        (-(2**31), {"type": "Integer", "value": -(2**31)}),
        (2**31, {"type": "Long", "value": 2**31}),
        (-(2**31) - 1, {"type": "Long", "value": -(2**31) - 1}),
        (2**63 - 1, {"type": "Long", "value": 2**63 - 1}),
        (1.5, {"type": "Double", "value": 1.5}),
        ("hello", {"type": "String", "value": "hello"}),
        ("", {"type": "String", "value": ""}),
        (b"\x00\xff", {"type": "Bytes", "value": "AP8="}),
        (bytearray(b"hi"), {"type": "Bytes", "value": "aGk="}),
        ({"a": [1, None]}, {"type": "Json", "value": '{"a":[1,null]}'}),
        ([1, "x"], {"type": "Json", "value": '[1,"x"]'}),
        ((1, 2), {"type": "Json", "value": "[1,2]"}),
        (date(2024, 5, 1), {"type": "String", "value": "2024-05-01"}),
        (
            datetime(2015, 10, 6, 16, 34, 42, 123456, tzinfo=PLUS_TWO),
            {"type": "Date", "value": "2015-10-06T16:34:42.123+0200"},
        ),
        (
            datetime(2015, 10, 6, 16, 34, 42, tzinfo=UTC),
            {"type": "Date", "value": "2015-10-06T16:34:42.000+0000"},
        ),
    ],
)
def test_to_camunda_types_every_value(value: Any, expected: dict[str, Any]) -> None:
    assert to_camunda({"v": value}) == {"v": expected}


def test_bool_is_not_sent_as_integer() -> None:
    """bool is a subclass of int: the check order matters."""
    assert to_camunda({"flag": True})["flag"]["type"] == "Boolean"


def test_string_at_the_limit_stays_string() -> None:
    text = "x" * MAX_STRING_CHARS
    assert to_camunda({"s": text}) == {"s": {"type": "String", "value": text}}


def test_longer_string_goes_as_json_and_comes_back_as_str() -> None:
    """The engine's String column holds 4000 chars (longer gives a 500); Json is unbounded."""
    text = "é" * (MAX_STRING_CHARS + 1)
    sent = to_camunda({"s": text})
    assert sent["s"]["type"] == "Json"
    assert from_camunda(sent) == {"s": text}


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (datetime(2024, 1, 1), "naive datetime"),  # noqa: DTZ001 - the point of the test
        (2**63, "64-bit Long"),
        (float("nan"), "not finite"),
        (float("inf"), "not finite"),
        (Decimal("1.5"), "unsupported type Decimal"),
        ({1: "a"}, "not JSON-serializable"),
        ({"a": {1, 2}}, "not JSON-serializable"),
    ],
)
def test_unsendable_values_raise_naming_the_variable(value: Any, fragment: str) -> None:
    with pytest.raises(VariableError, match=fragment) as caught:
        to_camunda({"amount": value})
    assert "'amount'" in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_from_camunda_reads_every_type() -> None:
    variables: dict[str, dict[str, Any]] = {
        "s": {"type": "String", "value": "x", "valueInfo": {}},
        "i": {"type": "Integer", "value": 1, "valueInfo": {}},
        "l": {"type": "Long", "value": 2**40, "valueInfo": {}},
        "h": {"type": "Short", "value": 3, "valueInfo": {}},
        "d": {"type": "Double", "value": 2.5, "valueInfo": {}},
        "b": {"type": "Boolean", "value": False, "valueInfo": {}},
        "n": {"type": "Null", "value": None, "valueInfo": {}},
        "j": {"type": "Json", "value": '{"a":[1,2]}', "valueInfo": {}},
        "o": {
            "type": "Object",
            "value": '{"x":2}',
            "valueInfo": {
                "objectTypeName": "java.util.HashMap",
                "serializationDataFormat": "application/json",
            },
        },
        "t": {"type": "Date", "value": "2015-10-06T14:34:42.123+0000", "valueInfo": {}},
        "y": {"type": "Bytes", "value": "aGVsbG8=", "valueInfo": {}},
    }
    assert from_camunda(variables) == {
        "s": "x",
        "i": 1,
        "l": 2**40,
        "h": 3,
        "d": 2.5,
        "b": False,
        "n": None,
        "j": {"a": [1, 2]},
        "o": {"x": 2},
        "t": datetime(2015, 10, 6, 14, 34, 42, 123000, tzinfo=UTC),
        "y": b"hello",
    }


def test_date_comes_back_aware_with_the_engines_offset() -> None:
    value = from_camunda({"t": {"type": "Date", "value": "2015-10-06T16:34:42.000+0200"}})["t"]
    assert value == datetime(2015, 10, 6, 14, 34, 42, tzinfo=UTC)
    assert value.utcoffset() == timedelta(hours=2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2015-10-06T16:34:42.123+0200", datetime(2015, 10, 6, 14, 34, 42, 123_000, UTC)),
        ("2015-10-06T16:34:42.000+0000", datetime(2015, 10, 6, 16, 34, 42, tzinfo=UTC)),
    ],
)
def test_the_engines_dates_are_read_aware(text: str, expected: datetime) -> None:
    parsed = parse_date(text)
    assert parsed == expected
    assert parsed.tzinfo is not None


@pytest.mark.parametrize("text", ["2015-10-06T16:34:42.000", "yesterday", ""])
def test_a_date_without_its_offset_or_no_date_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"offset|Invalid isoformat"):
        parse_date(text)


def test_unknown_types_and_java_objects_keep_the_raw_value() -> None:
    java = {
        "type": "Object",
        "value": "rO0ABXNy",
        "valueInfo": {"serializationDataFormat": "application/x-java-serialized-object"},
    }
    xml = {"type": "Xml", "value": "<a/>"}
    assert from_camunda({"java": java, "xml": xml}) == {"java": "rO0ABXNy", "xml": "<a/>"}


def test_json_the_engine_accepted_without_checking_stays_text() -> None:
    assert from_camunda({"j": {"type": "Json", "value": "{not json"}}) == {"j": "{not json"}


def test_null_values_of_any_type_read_as_none() -> None:
    assert from_camunda({"j": {"type": "Json", "value": None}}) == {"j": None}


def test_round_trip() -> None:
    values = {
        "none": None,
        "flag": True,
        "small": 7,
        "big": 2**40,
        "ratio": 0.25,
        "name": "Ada",
        "raw": b"\x01\x02",
        "doc": {"nested": {"list": [1, "two", None, 3.5, True]}},
        "items": [{"a": 1}],
        "when": datetime(2024, 2, 29, 23, 59, 59, 999000, tzinfo=UTC),
    }
    wire = orjson.loads(orjson.dumps(to_camunda(values)))
    assert from_camunda(wire) == values
