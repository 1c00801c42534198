"""``/healthz`` and ``/metrics`` on a small port, with a bare asyncio server.

Two read-only GET routes do not justify a web framework in the worker: this answers HTTP/1.0
style (one request per connection, ``Connection: close``), which is all probes and
Prometheus need. Port 0 turns it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import orjson

log = logging.getLogger(__name__)

#: A client gets this long to send its request line and headers.
REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 8192

#: Says whether the worker is healthy, and the details ``/healthz`` shows.
HealthCheck = Callable[[], tuple[bool, dict[str, object]]]
Metrics = Callable[[], bytes]


@contextlib.asynccontextmanager
async def serve_health(
    port: int, *, status: HealthCheck, metrics: Metrics, host: str = "0.0.0.0"
) -> AsyncIterator[asyncio.Server | None]:
    """Serve while the block runs; ``status()`` says (healthy, details) for ``/healthz``."""
    if port == 0:
        yield None
        return

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            code, content_type, body = _route(head, status, metrics)
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


def _route(head: bytes, status: HealthCheck, metrics: Metrics) -> tuple[str, str, bytes]:
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
        return "200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics()
    return "404 Not Found", "text/plain", b"not found\n"
