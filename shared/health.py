"""``/healthz`` and ``/metrics`` on a small port, with a bare asyncio server (the worker's
and the standalone flusher's).

Two read-only GET routes do not justify a web framework there: this answers HTTP/1.0
style (one request per connection, ``Connection: close``), which is all probes and
Prometheus need. Port 0 turns it off. It listens on loopback unless its ``*_HEALTH_HOST``
says otherwise (a container's probes come from outside: 0.0.0.0 there), and ``/metrics``
asks for ``METRICS_TOKEN`` when it is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Callable

import orjson
from pydantic import SecretStr

log = logging.getLogger(__name__)

#: A client gets this long to send its request line and headers.
REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 8192

#: Says whether the process is healthy, and the details ``/healthz`` shows.
HealthCheck = Callable[[], tuple[bool, dict[str, object]]]
Metrics = Callable[[], bytes]


@contextlib.asynccontextmanager
async def serve_health(
    port: int,
    *,
    status: HealthCheck,
    metrics: Metrics,
    host: str = "127.0.0.1",
    metrics_token: SecretStr | None = None,
) -> AsyncIterator[asyncio.Server | None]:
    """Serve while the block runs; ``status()`` says (healthy, details) for ``/healthz``.

    ``/metrics`` asks for ``Authorization: Bearer <metrics_token>`` when one is given.
    """
    token = metrics_token.get_secret_value().encode() if metrics_token else None
    if port == 0:
        yield None
        return

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            code, content_type, body = _route(head, status, metrics, token)
            writer.write(
                f"HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a probe that went away or sent garbage: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(on_connect, host, port, limit=MAX_REQUEST_BYTES)
    log.info("health endpoint listening", extra={"port": port})
    try:
        yield server
    finally:
        server.close()
        # Python 3.11's wait_closed returns at once; 3.12 waits for connections: bound it.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                await server.wait_closed()


def _route(
    head: bytes, status: HealthCheck, metrics: Metrics, token: bytes | None
) -> tuple[str, str, bytes]:
    method, _, rest = head.partition(b" ")
    path = rest.partition(b" ")[0].partition(b"?")[0]
    if method != b"GET":
        return "405 Method Not Allowed", "text/plain", b"method not allowed\n"
    if path == b"/healthz":
        healthy, details = status()
        code = "200 OK" if healthy else "503 Service Unavailable"
        body = orjson.dumps({"status": "ok" if healthy else "unhealthy", **details})
        return code, "application/json", body
    if path == b"/metrics":
        if token is not None and not hmac.compare_digest(_bearer(head), token):
            return "401 Unauthorized", "text/plain", b"missing or invalid metrics token\n"
        return "200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics()
    return "404 Not Found", "text/plain", b"not found\n"


def _bearer(head: bytes) -> bytes:
    """The bearer token of the request head's Authorization header (empty if none)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
    return b""
