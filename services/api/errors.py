"""Every error the API answers, as JSON, from one place.

Endpoints raise :class:`ApiError` (or let a dependency's error escape); the handlers below,
installed by ``create_app``, turn each into a JSON body with the right status and headers.
A bug is logged with its traceback and answered like every other error.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from flowgate.services.api.limits import Limited
from flowgate.services.api.schemas import ErrorBody, JSONResponse
from flowgate.services.api.starter import StartRefused
from flowgate.shared.camunda import CamundaError, EngineUnavailable
from flowgate.shared.contract import StartFailed

log = logging.getLogger(__name__)

#: Retry-After on answers that ask the client to come back (a dependency is down).
RETRY_LATER_S = 5


class ApiError(Exception):
    """Raised anywhere in a request; answered as :class:`ErrorBody` (Fastify's shape)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = ErrorBody.of(status_code, message, field=field, **extra)
        self.headers = headers or {}

    @classmethod
    def unknown_run(cls, correlation_id: str) -> ApiError:
        """404 for a correlationId no store knows, as the seed's clients read it."""
        return cls(
            404,
            f"no process with correlationId {correlation_id!r}",
            field="correlationId",
            status="not_found",
            correlationId=correlation_id,
        )

    @classmethod
    def of(cls, failed: StartFailed) -> ApiError:
        """The answer to a start that did not reach the engine (its starter's answer)."""
        retry = {"Retry-After": str(RETRY_LATER_S)} if failed.status_code >= 500 else None
        return cls(failed.status_code, failed.error, field=failed.field, headers=retry)


Handler = Callable[[Request, Exception], Awaitable[Response]]


async def start_refused(request: Request, exc: Exception) -> Response:
    """A start that did not go ahead: its answer (422, 503 + Retry-After, the engine's)."""
    assert isinstance(exc, StartRefused)
    return await api_error(request, ApiError.of(exc.failed))


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body, status_code=exc.status_code, headers=exc.headers)


async def limited(request: Request, exc: Exception) -> Response:
    """A tenant's limit is reached (services/api/limits.py): 429 with the headers saying which."""
    assert isinstance(exc, Limited)
    return limited_answer(exc)


def limited_answer(exc: Limited) -> Response:
    return JSONResponse(ErrorBody.of(429, str(exc)), status_code=429, headers=exc.headers)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (unknown path, wrong method), keeping headers such as Allow."""
    assert isinstance(exc, HTTPException)
    message = {
        404: f"no such endpoint: {request.url.path}",
        405: f"method {request.method} not allowed",
    }
    body = ErrorBody.of(exc.status_code, message.get(exc.status_code, str(exc.detail)))
    return JSONResponse(body, status_code=exc.status_code, headers=dict(exc.headers or {}))


def unavailable(name: str) -> Handler:
    """A dependency (Redis, Postgres) failed: 503 and come back later."""

    async def handler(request: Request, exc: Exception) -> Response:
        log.warning("%s unavailable", name, extra={"error": repr(exc), "path": request.url.path})
        body = ErrorBody.of(503, f"{name} is unavailable; retry later")
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_LATER_S)})

    return handler


async def engine_failed(request: Request, exc: Exception) -> Response:
    """The engine did not do what an endpoint asked (a start has its own answers, in
    starter.py): 503 when it did not answer, 502 when it answered an error."""
    log.warning("engine call failed", extra={"error": str(exc), "path": request.url.path})
    if isinstance(exc, EngineUnavailable):
        body = ErrorBody.of(503, "the process engine is unavailable; retry later")
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_LATER_S)})
    return JSONResponse(ErrorBody.of(502, f"the process engine failed: {exc}"), status_code=502)


async def runtime_error(request: Request, exc: Exception) -> Response:
    """uvloop reports a write to a connection the peer has closed as ``RuntimeError`` ("unable
    to perform operation on <TCPTransport closed=True ...>; the handler is closed") where
    asyncio raises ``ConnectionError``, and redis-py passes it on. The API's only asyncio
    transports are Redis's (the engine's client and psycopg do their own I/O): so that is
    Redis unavailable, 503. Any other ``RuntimeError`` is a bug."""
    if "handler is closed" in str(exc):
        return await redis_unavailable(request, exc)
    return await internal_error(request, exc)


async def internal_error(request: Request, exc: Exception) -> Response:
    """A bug: logged with its traceback, answered as JSON like every other error."""
    log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    return JSONResponse(ErrorBody.of(500, "internal error"), status_code=500)


async def client_gone(request: Request, exc: Exception) -> Response:
    """The client went away mid-request: nobody reads the answer, nothing to log as a fault."""
    log.info("client disconnected mid-request", extra={"path": request.url.path})
    return Response(status_code=499)


redis_unavailable = unavailable("Redis")

HANDLERS: dict[type[Exception] | int, Handler] = {
    ApiError: api_error,
    StartRefused: start_refused,
    Limited: limited,
    HTTPException: http_error,
    ClientDisconnect: client_gone,
    CamundaError: engine_failed,
    RuntimeError: runtime_error,
}
