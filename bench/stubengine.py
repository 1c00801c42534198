"""A stand-in for the engine's REST API, for the micro-benchmarks ONLY (items 2, 3, 4, 6).

    python -m bench.stubengine PORT REDIS_URL REDIS_PREFIX MODE

It answers ``POST …/process-definition/key/{key}/start`` with a new instance id and:

* ``instant``: then completes the process state at once through
  ``flowgate.shared.store.runs.RunStore.finish`` (the worker's own completion path), so a start
  through the API measures the wait room and the state path without the engine;
* ``park``:    does nothing more; the benchmark completes states itself when it wants to.

Every other request gets ``200 []`` (``GET …/engine`` a one-engine list). A raw asyncio
protocol, not a framework, so the stand-in costs as little CPU as possible. It is never part
of the product and its figures are labelled "stand-in engine" in the report.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import cast

import orjson

from flowgate.shared.keys import Keys
from flowgate.shared.redis_client import connect
from flowgate.shared.state import Status
from flowgate.shared.store.runs import RunStore

_HEADER_END = b"\r\n\r\n"


def _response(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


_EMPTY = _response(b"[]")
_ENGINES = _response(b'[{"name":"default"}]')
_VERSION = _response(b'{"version":"stand-in"}')


class StubEngine:
    def __init__(self, store: RunStore, mode: str) -> None:
        self.store = store
        self.instant = mode == "instant"
        self.tasks: set[asyncio.Task[bool]] = set()

    def answer(self, method: bytes, path: bytes, body: bytes) -> bytes:
        if method == b"POST" and path.endswith(b"/start"):
            request = orjson.loads(body or b"{}")
            key = path.rsplit(b"/", 2)[-2].decode()
            business_key = request.get("businessKey")
            started = {
                "id": uuid.uuid4().hex,
                "definitionId": f"{key}:1:stand-in",
                "businessKey": business_key,
                "ended": False,
                "suspended": False,
                "tenantId": None,
                "links": [],
            }
            if self.instant and business_key:
                self.complete(business_key)
            return _response(orjson.dumps(started))
        if path.endswith(b"/engine"):
            return _ENGINES
        if path.endswith(b"/version"):
            return _VERSION
        return _EMPTY

    def complete(self, correlation_id: str) -> None:
        task = asyncio.ensure_future(
            self.store.finish(correlation_id, Status.OK, data={"stub": True})
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class _Protocol(asyncio.Protocol):
    def __init__(self, engine: StubEngine) -> None:
        self.engine = engine
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(_HEADER_END)) >= 0:
            head = bytes(self.buffer[:end])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            method, path, _ = head.split(b" ", 2)
            assert self.transport is not None
            self.transport.write(self.engine.answer(method, path, body))


async def serve(port: int, redis_url: str, prefix: str, mode: str, cluster: bool) -> None:
    redis = connect(redis_url, cluster=cluster, max_connections=256)
    store = RunStore(redis, Keys(prefix), result_ttl_s=3600, pending_ttl_s=3600)
    engine = StubEngine(store, mode)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Protocol(engine), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    port, redis_url, prefix, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    cluster = sys.argv[5:] == ["cluster"]
    if mode not in ("instant", "park"):
        raise SystemExit(f"mode must be instant or park, not {mode!r}")
    try:
        import uvloop

        uvloop.run(serve(port, redis_url, prefix, mode, cluster))
    except ImportError:
        asyncio.run(serve(port, redis_url, prefix, mode, cluster))


if __name__ == "__main__":
    main()
