"""A minimal HTTP/1.1 keep-alive client on asyncio streams, for measuring.

A general client (httpx) spends more CPU per request than the server under test does on a
small route, and hides when the response's first bytes arrived. This one does one thing:
send a request on a kept-alive connection, read the status line and headers (the moment they
arrive is ``Response.first_byte``), then the body by Content-Length or chunked encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import orjson

_HEADER_END = b"\r\n\r\n"


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: float  # time.perf_counter() when the request was written
    first_byte: float  # ... when the status line and headers had arrived
    done: float  # ... when the body had arrived

    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None

    @property
    def latency_ms(self) -> float:
        return (self.done - self.sent) * 1000


class Connection:
    """One kept-alive connection to ``host:port``; reconnects when the server closed it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._writer is None or self._writer.is_closing() or self._reader is None:
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port, limit=1 << 20
            )
        return self._reader, self._writer

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        self._reader = self._writer = None

    async def send(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> float:
        """Write a request; returns the perf_counter time it was written."""
        _, writer = await self._open()
        payload = b"" if body is None else orjson.dumps(body)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if body is not None:
            lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(payload)}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        sent = time.perf_counter()
        await writer.drain()
        return sent

    async def receive(self, sent: float) -> Response:
        """Read one response (after :meth:`send`)."""
        reader, _ = await self._open()
        head = await reader.readuntil(_HEADER_END)
        first = time.perf_counter()
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await _read_chunked(reader)
        else:
            body = b""
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return Response(
            int(status_line.split()[1]), headers, body, sent, first, time.perf_counter()
        )

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        for attempt in (1, 2):
            try:
                sent = await self.send(method, path, body, headers)
                return await self.receive(sent)
            except (ConnectionError, asyncio.IncompleteReadError):
                # A kept-alive connection the server closed meanwhile: once more, fresh.
                await self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


class Pool:
    """``size`` connections handed out one request at a time (bounded concurrency)."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self._all = [Connection(host, port) for _ in range(size)]
        self._free: asyncio.Queue[Connection] = asyncio.Queue()
        for conn in self._all:
            self._free.put_nowait(conn)

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Response:
        conn = await self._free.get()
        try:
            return await conn.request(method, path, body, headers)
        except BaseException:
            await conn.close()
            raise
        finally:
            self._free.put_nowait(conn)

    async def close(self) -> None:
        for conn in self._all:
            await conn.close()


def split_url(url: str) -> tuple[str, int, str]:
    """``http://host:port/base`` -> (host, port, "/base")."""
    rest = url.removeprefix("http://")
    hostport, _, base = rest.partition("/")
    host, _, port = hostport.partition(":")
    return host, int(port or 80), ("/" + base).rstrip("/")
