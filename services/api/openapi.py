"""The OpenAPI 3.1 document (``/openapi.json``) and the self-contained ``/docs`` page
(docs.html, next to this module).

Built from the endpoint table (services/api/routes.py: paths, methods, access, parameters,
answers) and the pydantic models in services/api/schemas.py, so the document cannot drift
from what the endpoints validate and answer. Security schemes appear only when the
deployment configures them (API_KEYS, COMPLETE_TOKEN), so the document tells a client
exactly what this deployment wants.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from flowgate.services.api.auth import Access, Auth
from flowgate.services.api.endpoints import Endpoint, Reply
from flowgate.services.api.progress import EVENT_ID_PATTERN
from flowgate.services.api.routes import MAX_PAGE
from flowgate.services.api.schemas import ID_PATTERN, RUN_STATUS, ErrorBody

_ERRORS = {
    400: "Malformed JSON, or a missing or invalid field (named in `field`).",
    401: "Missing or invalid credentials.",
    403: "The credential lacks the scope this endpoint needs (named in `error`).",
    404: "No such process (or process definition), or another tenant's: they look alike.",
    408: "The body did not arrive within the read timeout.",
    413: "The body is larger than MAX_BODY_BYTES.",
    415: "The body is not declared as application/json.",
    422: "The correlationId is already used by a start asking for something else: another "
    "processKey, variables, fetchVariables or callbackUrl (`field` is `correlationId`).",
    409: "The run had already ended another way.",
    502: "The process engine failed.",
    429: "A limit of the caller's tenant is reached (TENANT_*): `Retry-After`, "
    "`RateLimit-Policy` and `RateLimit` say which and when to retry.",
    503: "A dependency (the engine, Redis or Postgres) is unreachable; retry after Retry-After.",
}

_STATUS_URL = "The status URL of this run: `/api/process/status/{correlationId}`."

#: Every parameter an endpoint may name in its ``parameters``.
PARAMETERS: dict[str, dict[str, Any]] = {
    "Prefer": {
        "in": "header",
        "description": "RFC 7240: `wait=N` (seconds, capped by MAX_WAIT_MS) or `respond-async`.",
        "schema": {"type": "string"},
    },
    "wait": {
        "in": "query",
        "description": "Long-poll: wait up to N seconds (capped by MAX_WAIT_MS) for the outcome.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "limit": {
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 50},
    },
    "cursor": {
        "in": "query",
        "description": "`nextCursor` of the previous page.",
        "schema": {"type": "string"},
    },
    "correlationId": {
        "in": "path",
        # `all` is the list endpoint's path, not an id.
        "schema": {"type": "string", "pattern": r"^(?!all$)" + ID_PATTERN[1:]},
    },
    "id": {"in": "path", "schema": {"type": "string", "pattern": ID_PATTERN}},
    "taskId": {
        "in": "path",
        "description": "A user task's id, as `GET /api/process/tasks/{correlationId}` lists it.",
        "schema": {"type": "string", "pattern": ID_PATTERN},
    },
    "until": {
        "in": "query",
        "description": "With `wait`: answer as soon as this step (an activity id, or a "
        "flowgate step name) has finished, with `milestone`, instead of at the end.",
        "schema": {"type": "string", "pattern": ID_PATTERN},
    },
    "Last-Event-ID": {
        "in": "header",
        "description": "Resume after this event (an EventSource sends it on reconnect).",
        "schema": {"type": "string", "pattern": EVENT_ID_PATTERN},
    },
    "lastEventId": {
        "in": "query",
        "description": "The same as the `Last-Event-ID` header, for clients that cannot set it.",
        "schema": {"type": "string", "pattern": EVENT_ID_PATTERN},
    },
    "by": {
        "in": "query",
        "schema": {"type": "string", "enum": ["traceabilityId", "correlationId"]},
    },
}

#: Every header a reply may name in its ``headers``.
HEADERS: dict[str, dict[str, Any]] = {
    "Content-Location": {"description": _STATUS_URL, "required": True},
    "Location": {"description": _STATUS_URL, "required": True},
    "Retry-After": {
        "description": "Seconds to wait before polling. On a 202, a prediction: the median "
        "time the process's recent runs took, less what this run has taken (RETRY_AFTER_S "
        "until there are enough of them); on a 503, when to try again.",
        "required": True,
        "schema": {"type": "string", "pattern": r"^[0-9]+$"},
    },
    "Preference-Applied": {
        "description": "RFC 7240: the preference honoured (`wait=N` or `respond-async`)."
    },
    RUN_STATUS: {
        "description": "The run's status (`pending`, `ok`, `error`, `cancelled`): a run that "
        "ended `error` is HTTP 500 as in the seed, a fault of the server is 500 without it.",
        "required": True,
        "schema": {"type": "string", "enum": ["pending", "ok", "error", "cancelled"]},
    },
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


#: One Server-Sent Event as clients parse it (OpenAPI 3.2's itemSchema, read by tools).
_SSE_EVENT = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "event": {
            "type": "string",
            "enum": ["step", "task_created", "task_completed", "stalled", "end"],
        },
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "`step`: the step (`step`, `status`, `data`, `error`, `at`, "
            "`activityId`, `activityType`, and `waitingOn` while pending); `task_created` / "
            "`task_completed`: a user task (`taskId`, `activity`, `assignee`), opened or "
            "closed (on connecting, each open one is `task_created`); `stalled`: the run "
            "sat at a step past its declared threshold (`activity`, `activityInstanceId`, "
            "`since`, `thresholdS`); `end`: the final status body.",
        },
        "retry": {"type": "integer"},
    },
}


def _reply(reply: Reply) -> dict[str, Any]:
    refs = [_ref(model) for model in reply.models]
    schema: dict[str, Any] = (
        refs[0] if len(refs) == 1 else {"oneOf": refs} if refs else {"type": "object"}
    )
    if reply.media_type == "text/event-stream":
        schema = _SSE_EVENT
    elif reply.media_type != "application/json":
        schema = {"type": "string"}
    answer: dict[str, Any] = {"description": reply.description}
    if reply.media_type is not None:
        answer["content"] = {reply.media_type: {"schema": schema}}
    if reply.headers:
        answer["headers"] = {
            name: {"schema": {"type": "string"}, "required": False, **HEADERS[name]}
            for name in reply.headers
        }
    return answer


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _parameter(name: str) -> dict[str, Any]:
    spec = PARAMETERS[name]
    return {"name": name, "required": spec["in"] == "path", **spec}


def _operation(endpoint: Endpoint, auth: Auth) -> dict[str, Any]:
    errors = list(endpoint.errors)
    operation: dict[str, Any] = {
        "operationId": endpoint.operation or _camel(endpoint.handler.__name__),
        "summary": endpoint.summary,
    }
    if endpoint.description:
        operation["description"] = endpoint.description
    if endpoint.parameters:
        operation["parameters"] = [_parameter(name) for name in endpoint.parameters]
    if endpoint.body:
        operation["requestBody"] = {
            "required": endpoint.body_required,
            "content": {"application/json": {"schema": _ref(endpoint.body)}},
        }
    if name := _scheme_name(endpoint.access, auth):
        operation["security"] = [{name: []}]
        errors.append(401)
        if name == "apiKey":  # a client credential may lack the scope
            errors.append(403)
    if endpoint.scope is not None:
        scoped = f"Needs the `{endpoint.scope.value}` scope"
        if endpoint.read_token:
            scoped += ", or this run's read token"
        operation["description"] = f"{operation.get('description', '')}\n\n{scoped}.".strip()
    if endpoint.limited:
        errors.append(429)
    operation["responses"] = {
        **{str(code): _reply(reply) for code, reply in endpoint.replies.items()},
        **{str(code): _reply(Reply(_ERRORS[code], ErrorBody)) for code in sorted(errors)},
    }
    return operation


_SCHEMES: dict[str, dict[str, Any]] = {
    "apiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "One of API_KEYS; `Authorization: Bearer <key>` works as well, and so "
        "does a bearer token of OIDC_ISSUER when one is configured.",
    },
    "completeToken": {"type": "http", "scheme": "bearer", "description": "COMPLETE_TOKEN."},
    "metricsToken": {"type": "http", "scheme": "bearer", "description": "METRICS_TOKEN."},
}
_TOKENS = {Access.COMPLETER: "completeToken", Access.OPERATOR: "metricsToken"}


def _scheme_name(access: Access, auth: Auth) -> str | None:
    scheme = auth.scheme(access)
    return _TOKENS[access] if scheme == "token" else "apiKey" if scheme == "key" else None


def build_openapi(endpoints: Sequence[Endpoint], auth: Auth) -> dict[str, Any]:
    """The document for ``endpoints`` as this deployment serves them."""
    documented = list(endpoints)
    validation: JsonSchemaMode = "validation"
    serialization: JsonSchemaMode = "serialization"
    pairs: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (e.body, validation) for e in documented if e.body is not None
    ]
    replied: set[type[BaseModel]] = {ErrorBody}
    replied.update(m for e in documented for r in e.replies.values() for m in r.models)
    pairs += [(model, serialization) for model in replied]
    _, top = models_json_schema(
        sorted(pairs, key=lambda pair: pair[0].__name__),
        ref_template="#/components/schemas/{model}",
    )
    paths: dict[str, Any] = {}
    for endpoint in documented:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint, auth)
    components: dict[str, Any] = {"schemas": top["$defs"]}
    used = {_scheme_name(e.access, auth) for e in documented}
    schemes = {name: scheme for name, scheme in _SCHEMES.items() if name in used}
    if schemes:
        components["securitySchemes"] = schemes
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


def render_openapi(endpoints: Sequence[Endpoint], auth: Auth) -> bytes:
    return orjson.dumps(build_openapi(endpoints, auth))


def docs_html() -> str:
    """A page that renders /openapi.json in the browser; no external assets (works offline)."""
    return (Path(__file__).parent / "docs.html").read_text(encoding="utf-8")
