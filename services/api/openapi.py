"""The OpenAPI 3.1 document (``/openapi.json``) and the self-contained ``/docs`` page
(docs.html, next to this module).

Schemas come from the pydantic models in services/api/schemas.py, so the document cannot
drift from what the endpoints validate and answer. Security schemes appear only when the
deployment configures them (API_KEYS, COMPLETE_TOKEN), so the document tells a client
exactly what this deployment wants.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from services.api.auth import Auth
from services.api.schemas import (
    CORRELATION_ID_PATTERN,
    CompleteAck,
    CompleteRequest,
    ErrorBody,
    EventLog,
    Health,
    Pending,
    ProcessStatus,
    Readiness,
    StartFailedBody,
    StartOk,
    StartRequest,
    StatusPage,
)

_MODELS: list[tuple[type[BaseModel], Any]] = [
    (StartRequest, "validation"),
    (CompleteRequest, "validation"),
    *(
        (model, "serialization")
        for model in (
            StartOk,
            StartFailedBody,
            Pending,
            ProcessStatus,
            StatusPage,
            CompleteAck,
            EventLog,
            ErrorBody,
            Health,
            Readiness,
        )
    ),
]

_ERRORS = {
    400: "Malformed JSON, or a missing or invalid field (named in `field`).",
    401: "Missing or invalid credentials.",
    404: "No such process (or process definition).",
    413: "The body is larger than MAX_BODY_BYTES.",
    415: "The body is not declared as application/json.",
    422: "The correlationId is already used by a start with another processKey or variables.",
    502: "The process engine failed.",
    503: "A dependency (the engine, Redis or Postgres) is unreachable; retry after Retry-After.",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref(model)}},
    }
    if headers:
        response["headers"] = headers
    return response


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): _json(ErrorBody, _ERRORS[code]) for code in codes}


def _header(
    description: str, *, required: bool = False, pattern: str | None = None
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if pattern:
        schema["pattern"] = pattern
    return {"description": description, "required": required, "schema": schema}


_STATUS_URL = "The status URL of this run: `/api/process/status/{correlationId}`."
_PREFER = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "description": "RFC 7240: `wait=N` (seconds, capped by MAX_WAIT_MS) or `respond-async`.",
    "schema": {"type": "string"},
}
_WAIT = {
    "name": "wait",
    "in": "query",
    "required": False,
    "description": "Long-poll: wait up to N seconds (capped by MAX_WAIT_MS) for the outcome.",
    "schema": {"type": "integer", "minimum": 0},
}


def build_openapi(auth: Auth) -> dict[str, Any]:
    _, top = models_json_schema(_MODELS, ref_template="#/components/schemas/{model}")
    schemas = top["$defs"]
    client_security: list[dict[str, list[str]]] = []
    complete_security: list[dict[str, list[str]]] = []
    security_schemes: dict[str, Any] = {}
    client_errors: tuple[int, ...] = ()
    complete_errors: tuple[int, ...] = ()
    if auth.clients_need_key:
        security_schemes["apiKey"] = {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": "One of API_KEYS; `Authorization: Bearer <key>` works as well.",
        }
        client_security = [{"apiKey": []}]
        client_errors = (401,)
    if auth.completion_needs_token:
        security_schemes["completeToken"] = {"type": "http", "scheme": "bearer"}
        complete_security = [{"completeToken": []}]
        complete_errors = (401,)

    retry_after = _header("Seconds to wait before polling.", required=True, pattern=r"^[0-9]+$")
    applied = _header("RFC 7240: the preference honoured (`wait=N` or `respond-async`).")
    content_location = _header(_STATUS_URL, required=True)
    status_responses = {
        str(code): _json(
            ProcessStatus,
            f"The process is `{name}`.",
            **{"Content-Location": content_location},
            **(
                {"Location": _header(_STATUS_URL, required=True), "Retry-After": retry_after}
                if code == 202
                else {}
            ),
        )
        for code, name in ((200, "ok"), (202, "pending"), (500, "error"))
    }
    paths: dict[str, Any] = {
        "/api/process/start": {
            "post": {
                "operationId": "startProcess",
                "summary": "Start a process; answer with its result, or 202 and a status URL.",
                "description": (
                    "Waits up to SYNC_TIMEOUT_MS (or `Prefer: wait=N`) for the outcome. "
                    "Idempotent by correlationId: a repeated start joins the running one or "
                    "returns its stored outcome."
                ),
                "parameters": [_PREFER],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(StartRequest)}},
                },
                "responses": {
                    "200": _json(
                        StartOk,
                        "The process finished `ok` within the wait.",
                        **{"Content-Location": content_location, "Preference-Applied": applied},
                    ),
                    "202": _json(
                        Pending,
                        "Still running when the wait ended; poll `Location`.",
                        Location=_header(_STATUS_URL, required=True),
                        **{"Retry-After": retry_after, "Preference-Applied": applied},
                    ),
                    "500": _json(
                        StartFailedBody,
                        "The process finished `error` within the wait.",
                        **{"Content-Location": content_location},
                    ),
                    **_errors(400, *client_errors, 404, 413, 415, 422, 502, 503),
                },
                **({"security": client_security} if client_security else {}),
            }
        },
        "/api/process/status/all": {
            "get": {
                "operationId": "listProcesses",
                "summary": "Processes Redis holds, newest first, a page at a time.",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "required": False,
                        "description": "`nextCursor` of the previous page.",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": _json(StatusPage, "One page."),
                    **_errors(400, *client_errors, 503),
                },
                **({"security": client_security} if client_security else {}),
            }
        },
        "/api/process/status/{correlationId}": {
            "get": {
                "operationId": "processStatus",
                "summary": "The state of one run (Redis, else Postgres); `?wait=N` long-polls.",
                "parameters": [
                    {
                        "name": "correlationId",
                        "in": "path",
                        "required": True,
                        # `all` is the list endpoint's path, not an id.
                        "schema": {
                            "type": "string",
                            "pattern": r"^(?!all$)" + CORRELATION_ID_PATTERN[1:],
                        },
                    },
                    _WAIT,
                    _PREFER,
                ],
                "responses": {**status_responses, **_errors(400, *client_errors, 404, 503)},
                **({"security": client_security} if client_security else {}),
            }
        },
        "/api/process/complete": {
            "post": {
                "operationId": "completeProcess",
                "summary": "Record a run's outcome and wake its waiters on every replica.",
                "description": "A completion for a finished process changes nothing "
                "(`changed: false`).",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(CompleteRequest)}},
                },
                "responses": {
                    "200": _json(CompleteAck, "Received."),
                    **_errors(400, *complete_errors, 404, 413, 415, 503),
                },
                **({"security": complete_security} if complete_security else {}),
            }
        },
        "/api/event-log/{id}": {
            "get": {
                "operationId": "eventLog",
                "summary": "The audit trail of one run, in step order.",
                "description": "By traceabilityId; by correlationId when no run has that "
                "traceabilityId, or with `?by=correlationId`.",
                "parameters": [
                    {
                        "name": "id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": CORRELATION_ID_PATTERN},
                    },
                    {
                        "name": "by",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["traceabilityId", "correlationId"]},
                    },
                ],
                "responses": {
                    "200": _json(EventLog, "The events."),
                    **_errors(400, *client_errors, 503),
                },
                **({"security": client_security} if client_security else {}),
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Alive.",
                "responses": {"200": _json(Health, "Alive.")},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Redis, Postgres, the engine and the wait room's subscription.",
                "responses": {
                    "200": _json(Readiness, "Ready."),
                    "503": _json(Readiness, "Not ready; `error` names what is down."),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics of this replica.",
                "responses": {
                    "200": {
                        "description": "Text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/docs": {
            "get": {
                "operationId": "docs",
                "summary": "A readable rendering of this document.",
                "responses": {
                    "200": {
                        "description": "HTML.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    components: dict[str, Any] = {"schemas": schemas}
    if security_schemes:
        components["securitySchemes"] = security_schemes
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "flowgate",
            "version": "0.1.0",
            "description": "Start Camunda 7 processes over HTTP: 200 with the result, or 202 "
            "and a status URL.",
        },
        "paths": paths,
        "components": components,
    }


def render_openapi(auth: Auth) -> bytes:
    return orjson.dumps(build_openapi(auth))


def docs_html() -> str:
    """A page that renders /openapi.json in the browser; no external assets (works offline)."""
    return (Path(__file__).parent / "docs.html").read_text(encoding="utf-8")
