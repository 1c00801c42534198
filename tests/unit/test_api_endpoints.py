"""The endpoint table: every endpoint has an access decision, and the router enforces it."""

from __future__ import annotations

import io
import logging
import re

import httpx
import orjson
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from flowgate.services.api import errors
from flowgate.services.api.auth import Access, Auth
from flowgate.services.api.endpoints import ENDPOINTS, Endpoint, routes
from flowgate.services.api.metrics import ApiMetrics
from flowgate.services.api.openapi import build_openapi
from flowgate.services.api.requestid import RequestIdMiddleware
from flowgate.services.worker.metrics import WorkerMetrics
from flowgate.shared.logs import JsonFormatter
from flowgate.shared.tenancy import Scope

#: What each endpoint asks for when credentials are configured: changing one is a decision.
EXPECTED_ACCESS = {
    ("POST", "/api/process/start"): Access.CLIENT,
    ("GET", "/api/process/status/all"): Access.CLIENT,
    ("GET", "/api/process/status/{correlationId}"): Access.CLIENT,
    ("GET", "/api/process/events/{correlationId}"): Access.CLIENT,
    ("POST", "/api/process/cancel/{correlationId}"): Access.CLIENT,
    ("POST", "/api/process/message/{correlationId}"): Access.CLIENT,
    ("POST", "/api/process/retry/{correlationId}"): Access.CLIENT,
    ("GET", "/api/process/tasks/{correlationId}"): Access.CLIENT,
    ("POST", "/api/process/tasks/{correlationId}/{taskId}/complete"): Access.CLIENT,
    ("POST", "/api/process/complete"): Access.COMPLETER,
    ("GET", "/api/event-log/{id}"): Access.CLIENT,
    ("GET", "/api/process/event-log/{id}"): Access.CLIENT,
    ("GET", "/healthz"): Access.PUBLIC,
    ("GET", "/readyz"): Access.PUBLIC,
    ("GET", "/metrics"): Access.OPERATOR,
    ("GET", "/openapi.json"): Access.PUBLIC,
    ("GET", "/docs"): Access.PUBLIC,
}


#: The scope each client endpoint needs: changing one is a decision too.
EXPECTED_SCOPE = {
    ("POST", "/api/process/start"): Scope.START,
    ("GET", "/api/process/status/all"): Scope.READ,
    ("GET", "/api/process/status/{correlationId}"): Scope.READ,
    ("GET", "/api/process/events/{correlationId}"): Scope.READ,
    ("POST", "/api/process/cancel/{correlationId}"): Scope.CANCEL,
    ("POST", "/api/process/message/{correlationId}"): Scope.MESSAGE,
    ("POST", "/api/process/retry/{correlationId}"): Scope.START,
    ("GET", "/api/process/tasks/{correlationId}"): Scope.READ,
    ("POST", "/api/process/tasks/{correlationId}/{taskId}/complete"): Scope.MESSAGE,
    ("GET", "/api/event-log/{id}"): Scope.READ,
    ("GET", "/api/process/event-log/{id}"): Scope.READ,
}


def test_every_endpoint_has_the_access_decided_for_it() -> None:
    assert {(e.method, e.path): e.access for e in ENDPOINTS} == EXPECTED_ACCESS
    scoped = {(e.method, e.path): e.scope for e in ENDPOINTS if e.scope is not None}
    assert scoped == EXPECTED_SCOPE
    assert all(e.scope is not None for e in ENDPOINTS if e.access is Access.CLIENT)
    readable = {e.path for e in ENDPOINTS if e.read_token}
    assert readable == {
        "/api/process/status/{correlationId}",
        "/api/process/events/{correlationId}",
    }


def _scoped() -> list[Endpoint]:
    return [e for e in ENDPOINTS if e.scope is not None]


@pytest.mark.parametrize("endpoint", _scoped(), ids=lambda e: f"{e.method} {e.path}")
async def test_a_key_without_the_endpoints_scope_is_403_naming_it(endpoint: Endpoint) -> None:
    assert endpoint.scope is not None
    others = "+".join(scope for scope in Scope if scope not in (endpoint.scope, Scope.ADMIN))
    auth = Auth((SecretStr(f"narrow@shop:{others}"),))
    app = Starlette(routes=routes(auth), exception_handlers=errors.HANDLERS)
    path = re.sub(r"\{[^}]+\}", "x", endpoint.path)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        answer = await client.request(endpoint.method, path, headers={"X-API-Key": "narrow"})
    assert answer.status_code == 403
    assert repr(endpoint.scope.value) in answer.json()["message"]


@pytest.mark.parametrize("path", ["/api/process/complete", "/metrics"])
async def test_internal_endpoints_without_their_own_token_need_an_admin_key(path: str) -> None:
    auth = Auth((SecretStr("root"), SecretStr("reader@shop:read")))
    app = Starlette(routes=routes(auth), exception_handlers=errors.HANDLERS)
    method = "POST" if path.endswith("complete") else "GET"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        answer = await client.request(method, path, headers={"X-API-Key": "reader"})
    assert answer.status_code == 403
    assert "'admin'" in answer.json()["message"]


def _guarded() -> list[Endpoint]:
    return [e for e in ENDPOINTS if e.access is not Access.PUBLIC]


@pytest.mark.parametrize("endpoint", _guarded(), ids=lambda e: f"{e.method} {e.path}")
async def test_the_router_refuses_a_guarded_endpoint_without_credentials(
    endpoint: Endpoint,
) -> None:
    auth = Auth((SecretStr("client-key"),), SecretStr("complete-token"))
    app = Starlette(routes=routes(auth), exception_handlers=errors.HANDLERS)
    path = re.sub(r"\{[^}]+\}", "x", endpoint.path)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        answer = await client.request(endpoint.method, path)
    assert answer.status_code == 401
    assert "www-authenticate" in answer.headers


@pytest.mark.parametrize("endpoint", _guarded(), ids=lambda e: f"{e.method} {e.path}")
def test_the_document_states_the_credentials_each_guarded_endpoint_needs(
    endpoint: Endpoint,
) -> None:
    spec = build_openapi(ENDPOINTS, Auth((SecretStr("k"),), SecretStr("t")))
    operation = spec["paths"][endpoint.path][endpoint.method.lower()]
    assert operation["security"]
    assert "401" in operation["responses"]


def test_every_endpoint_with_a_body_documents_what_reading_it_can_answer() -> None:
    """parsing.read_json answers 408 (the body came too slowly), 413 (too large) and 415
    (not JSON) before any endpoint's own checks: the schema says so for each."""
    spec = build_openapi(ENDPOINTS, Auth((), None, None))
    for endpoint in (e for e in ENDPOINTS if e.body is not None):
        documented = spec["paths"][endpoint.path][endpoint.method.lower()]["responses"]
        assert {"400", "408", "413", "415"} <= set(documented), endpoint.path


@pytest.mark.parametrize(
    ("raised", "status"),
    [
        # uvloop's word for a write to a connection a failed Redis closed
        ("unable to perform operation on <TCPTransport closed=True reading=False "
         "0x7f>; the handler is closed", 503),
        ("dictionary changed size during iteration", 500),
    ],
)  # fmt: skip
async def test_a_closed_redis_connection_under_uvloop_is_503_and_any_other_runtime_error_500(
    raised: str, status: int
) -> None:
    async def route(request: Request) -> Response:
        raise RuntimeError(raised)

    app = Starlette(routes=[Route("/x", route)], exception_handlers=errors.HANDLERS)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        answer = await client.get("/x")
    assert answer.status_code == status
    assert ("retry-after" in answer.headers) == (status == 503)


async def test_every_answer_carries_a_request_id_and_log_lines_name_it() -> None:
    async def route(request: Request) -> Response:
        logging.getLogger("flowgate.test").warning("serving")
        return Response("ok")

    app = Starlette(routes=[Route("/x", route)], middleware=[Middleware(RequestIdMiddleware)])
    transport = httpx.ASGITransport(app=app)
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("flowgate.test")
    logger.addHandler(handler)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            own = await client.get("/x", headers={"X-Request-ID": "req-42"})
            made = await client.get("/x")
            unsafe = await client.get("/x", headers={"X-Request-ID": "a b\tc"})
    finally:
        logger.removeHandler(handler)
    assert own.headers["x-request-id"] == "req-42"
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe.headers["x-request-id"])
    logged = [orjson.loads(line)["requestId"] for line in lines.getvalue().splitlines()]
    assert logged == ["req-42", made.headers["x-request-id"], unsafe.headers["x-request-id"]]


def test_metrics_name_the_build_the_process_and_label_answers_by_route_template() -> None:
    for metrics, component in ((ApiMetrics(), "api"), (WorkerMetrics(), "worker")):
        lines = metrics.render().decode().splitlines()
        [line] = [line for line in lines if line.startswith("flowgate_build_info{")]
        assert f'component="{component}"' in line
        assert 'version="' in line
        names = {line.split("{")[0].split(" ")[0] for line in lines if not line.startswith("#")}
        standard = {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"}
        assert standard <= names
    served = {route.path: route.endpoint for route in routes(Auth((), None))}
    assert all(getattr(e, "route", None) == path for path, e in served.items())
