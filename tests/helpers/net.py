"""Network faults for tests."""

from __future__ import annotations

import asyncio
import contextlib


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
