"""Request validation, the depth limit and the OpenAPI document, without any server."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from pydantic import BaseModel, SecretStr, ValidationError

from flowgate.services.api.auth import Auth
from flowgate.services.api.endpoints import ENDPOINTS
from flowgate.services.api.openapi import build_openapi, docs_html
from flowgate.services.api.schemas import (
    CompleteRequest,
    CompleteTaskRequest,
    ErrorBody,
    JSONResponse,
    MessageRequest,
    ProcessStatus,
    StartRequest,
    json_depth,
)
from flowgate.shared.state import RunState, Status


@pytest.mark.parametrize(
    ("value", "depth"),
    [(1, 0), ("x", 0), ({}, 1), ([], 1), ({"a": 1}, 1), ({"a": [1, {"b": None}]}, 3)],
)
def test_json_depth(value: Any, depth: int) -> None:
    assert json_depth(value) == depth


def test_json_depth_of_a_very_deep_value_does_not_recurse() -> None:
    value: Any = 0
    for _ in range(100_000):
        value = [value]
    assert json_depth(value) == 100_000


@pytest.mark.parametrize(
    "correlation_id",
    [
        "a",
        "A.b_c:d-9",
        "x" * 255,
        "2b7c5f0e-8f5d-4c4e-9d59-3f1b8f0c6a11",
        # The seed's guide: use business identifiers.
        "user@example.com",
        "order 42",
        "50% off*?",
        "a[1]{tag}",
        "Müller-Lüdenscheid 東京",
        "#hash&amp;",
    ],
)
def test_valid_correlation_ids(correlation_id: str) -> None:
    StartRequest.model_validate({"processKey": "p", "correlationId": correlation_id})


def test_numbers_are_coerced_to_their_string_as_the_seed_does() -> None:
    body = StartRequest.model_validate({"processKey": 7, "correlationId": 42})
    assert (body.processKey, body.correlationId) == ("7", "42")
    with pytest.raises(ValidationError):
        StartRequest.model_validate({"processKey": "p", "correlationId": True})


@pytest.mark.parametrize(
    "correlation_id", ["", "x" * 256, "a/b", "a\n", "tab\there", "nul\x00", "c1\x85"]
)
def test_invalid_correlation_ids(correlation_id: str) -> None:
    with pytest.raises(ValidationError) as caught:
        StartRequest.model_validate({"processKey": "p", "correlationId": correlation_id})
    assert caught.value.errors()[0]["loc"] == ("correlationId",)


def test_all_is_reserved_as_a_correlation_id() -> None:
    with pytest.raises(ValidationError, match="reserved"):
        StartRequest.model_validate({"processKey": "p", "correlationId": "all"})
    schema = StartRequest.model_json_schema()["properties"]["correlationId"]
    assert schema["not"] == {"const": "all"}


@pytest.mark.parametrize("key", ["", "a/b", "a\nb", "x" * 256, ".", "..", "a\\b"])
def test_invalid_process_keys(key: str) -> None:
    with pytest.raises(ValidationError):
        StartRequest.model_validate({"processKey": key, "correlationId": "c"})


def test_variables_depth_is_limited_by_the_validation_context() -> None:
    body = {"processKey": "p", "correlationId": "c", "variables": {"a": {"b": {}}}}
    assert StartRequest.model_validate(body, context={"max_depth": 3}).variables
    with pytest.raises(ValidationError, match="nested deeper than 2 levels"):
        StartRequest.model_validate(body, context={"max_depth": 2})


def test_unknown_fields_are_ignored_and_variables_may_be_left_out_but_not_null() -> None:
    body = {"processKey": "p", "correlationId": "c", "legacy": 1}
    assert StartRequest.model_validate(body).variables == {}
    # The seed's schema: `variables` is an object when given.
    with pytest.raises(ValidationError, match="variables"):
        StartRequest.model_validate({**body, "variables": None})


def test_complete_status_is_ok_or_error_and_its_error_a_string() -> None:
    assert CompleteRequest.model_validate({"correlationId": "c", "status": "error"}).error is None
    with pytest.raises(ValidationError):
        CompleteRequest.model_validate({"correlationId": "c", "status": "pending"})
    # The seed's schema refuses any other error (before it looks the run up).
    with pytest.raises(ValidationError, match="error"):
        CompleteRequest.model_validate(
            {"correlationId": "c", "status": "error", "error": {"code": 1}}
        )


def test_error_bodies_are_fastify_shaped_and_leave_out_a_missing_field() -> None:
    assert JSONResponse(ErrorBody.of(400, "bad")).body == (
        b'{"statusCode":400,"error":"Bad Request","message":"bad"}'
    )
    assert JSONResponse(ErrorBody.of(422, "bad", field="x")).body == (
        b'{"statusCode":422,"error":"Unprocessable Entity","message":"bad","field":"x"}'
    )


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_the_document_describes_every_route_and_every_reference_resolves() -> None:
    spec = build_openapi(ENDPOINTS, Auth((), None))
    assert set(spec["paths"]) == {endpoint.path for endpoint in ENDPOINTS}
    schemas = spec["components"]["schemas"]
    for ref in _refs(spec):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    assert "securitySchemes" not in spec["components"]
    start = spec["paths"]["/api/process/start"]["post"]
    assert set(start["responses"]) >= {"200", "202", "400", "404", "413", "415", "422", "500"}
    assert start["responses"]["202"]["headers"]["Location"]["required"] is True


def test_security_appears_only_when_configured() -> None:
    spec = build_openapi(ENDPOINTS, Auth((SecretStr("k"),), SecretStr("t")))
    assert set(spec["components"]["securitySchemes"]) == {"apiKey", "completeToken"}
    paths = spec["paths"]
    assert paths["/api/process/start"]["post"]["security"] == [{"apiKey": []}]
    assert paths["/api/process/complete"]["post"]["security"] == [{"completeToken": []}]
    assert "security" not in paths["/healthz"]["get"]
    assert "401" in paths["/api/process/status/all"]["get"]["responses"]


def test_the_docs_page_needs_nothing_from_the_network() -> None:
    page = docs_html()
    assert 'fetch("openapi.json")' in page
    assert "src=" not in page
    assert "https://" not in page


@pytest.mark.parametrize("key", ["onboard-user", "a.b", "ä_1", "order:v2"])
def test_valid_process_keys(key: str) -> None:
    assert StartRequest.model_validate({"processKey": key, "correlationId": "c"}).processKey == key


@pytest.mark.parametrize("status", list(Status))
def test_a_status_body_is_the_models_json(status: Status) -> None:
    """ProcessStatus.body (the status read's fast path) and the model the OpenAPI document
    describes must not drift apart."""
    now = datetime(2026, 11, 29, 4, 5, 6, 789000, tzinfo=UTC)
    state = RunState(
        correlation_id="order-7",
        status=status,
        process_key="onboard-user",
        request_hash="h",
        instance_id="i-1",
        traceability_id="t",
        batch_id="b",
        application_id="a",
        data={"nested": [1, {"x": None}]} if status is Status.OK else None,
        error={"message": "no"} if status is Status.ERROR else None,
        started_at=now,
        updated_at=now,
        version=2,
    )
    model = ProcessStatus.of(state).model_dump(mode="json")
    assert ProcessStatus.body(state) == model
    assert orjson.dumps(ProcessStatus.body(state)) == orjson.dumps(model)


@pytest.mark.parametrize(
    "variables",
    [
        {"batch_id": "mine"},
        {"traceability_id": "t", "userId": "u"},
        {"identifiers": {"applicationId": "a"}},
        {"correlationId": "another-run"},
    ],
)
def test_a_start_may_not_set_a_system_variable(variables: dict[str, Any]) -> None:
    body = {"processKey": "p", "correlationId": "run-1", "variables": variables}
    with pytest.raises(ValidationError, match="is a system variable flowgate sets"):
        StartRequest.model_validate(body)


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (StartRequest, {"processKey": "p", "correlationId": "run-1"}),
        (StartRequest, {"processKey": "legacy", "correlationId": "run-1"}),  # opted out
        (MessageRequest, {"messageName": "paid"}),
        (CompleteTaskRequest, {}),
    ],
)
def test_no_client_sets_its_own_fetch_priority(
    model: type[BaseModel], body: dict[str, Any]
) -> None:
    variables = {"flowgatePriority": 1_000_000}
    context = {"system_variables_from": ("legacy",)}
    with pytest.raises(ValidationError, match="flowgatePriority is the run's fetch order"):
        model.model_validate({**body, "variables": variables}, context=context)


def test_a_process_opted_out_may_and_the_same_correlation_id_is_harmless() -> None:
    same = {"processKey": "p", "correlationId": "run-1", "variables": {"correlationId": "run-1"}}
    assert StartRequest.model_validate(same).variables == {"correlationId": "run-1"}
    opted = {"processKey": "legacy", "correlationId": "run-1", "variables": {"batch_id": "b"}}
    context = {"system_variables_from": ("legacy",)}
    assert StartRequest.model_validate(opted, context=context).variables == {"batch_id": "b"}
