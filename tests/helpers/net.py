"""Network faults for tests, and loopback servers tests talk to."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn
from starlette.types import ASGIApp

from tests.helpers.waiting import until


@contextlib.asynccontextmanager
async def serving(app: ASGIApp) -> AsyncIterator[str]:
    """``app`` served by uvicorn on a free loopback port, for the block; yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    served = asyncio.create_task(server.serve())
    try:
        await until(lambda: server.started, timeout_s=10, what="the server to listen")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(served, 10)


class TcpProxy:
    """A loopback TCP proxy that can go down and come back on the same port: an outage of
    a server the test cannot (or should not) stop for everyone."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            writer.close()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}
            writer.close()
            up_writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        # Half-close, not abort: a request passed on late must still reach the server.
        with contextlib.suppress(OSError):
            writer.write_eof()


class SlowProxy(TcpProxy):
    """A TCP proxy that holds back each request whose bytes contain ``marker`` for
    ``delay_s`` (or drops it, with ``None``: the client waits for an answer that never
    comes) and passes everything else at once: an engine slow to take one kind of call."""

    def __init__(self, host: str, port: int, marker: bytes, delay_s: float | None) -> None:
        super().__init__(host, port)
        self.marker = marker
        self.delay_s = delay_s
        self.held = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            writer.close()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._hold(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}
            writer.close()
            up_writer.close()

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if self.marker in data:
                    self.held += 1
                    if self.delay_s is None:
                        continue  # dropped: the engine never hears of it
                    await asyncio.sleep(self.delay_s)
                writer.write(data)
                await writer.drain()
        # Half-close, not abort: a request passed on late must still reach the server.
        with contextlib.suppress(OSError):
            writer.write_eof()


class CallbackReceiver:
    """A loopback HTTP server that records what is POSTed to it and answers each request
    with the next status of ``answers`` (the last one repeats); ``None`` never answers (a
    receiver that hangs)."""

    def __init__(self, answers: list[int | None]) -> None:
        self._answers = answers
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.arrived = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._hanging: set[asyncio.StreamWriter] = set()
        self._release = asyncio.Event()
        self.url = ""

    async def __aenter__(self) -> CallbackReceiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self._release.set()
        for writer in self._hanging:
            writer.transport.abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._answer(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass  # the client went away
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in head[1:] if line)
        }
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append((headers, body))
        self.arrived.set()
        answer = self._answers[min(len(self.requests), len(self._answers)) - 1]
        if answer is None:  # hang until the receiver closes
            self._hanging.add(writer)
            await self._release.wait()
            return
        writer.write(f"HTTP/1.1 {answer} X\r\ncontent-length: 0\r\n\r\n".encode())
        await writer.drain()
