"""8. Live progress and callbacks, on one API replica (stand-in engine, park mode).

The API is pinned to CPU 0; this process (the streams, the receiver, the recorder) to CPU 1.
Runs are started through the API (``Prefer: respond-async``) against the stand-in engine in
``park`` mode, which never ends anything; this process plays the worker with the worker's
own calls on ``RunStore``.

* Step delivery: a probe run has a live-progress stream open
  (``GET /api/process/events/{id}``); ``RunStore.record_step`` records a step for it
  (stream entry + PUBLISH in one Lua script, as a worker does) and the latency is from that
  call's return to the client reading the ``event: step``.
* Callback delivery: the probe run was started with a ``callbackUrl`` on a loopback receiver
  here; ``RunStore.finish`` ends it (as a worker does) and the latency is from that call's
  return to the POST arriving. Replicas look for due callbacks every 100 ms, so most of it is
  that poll; the stream's ``event: end`` latency is recorded too.

One probe at a time, A B A B: A with only the probe's stream open, B with ``progress_streams``
other streams open on the same replica. At the end every other run is ended and every one
of their streams must read its ``event: end``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import orjson
from redis.asyncio import Redis

from bench import ours
from bench.harness import LOAD_CPU, SERVER_CPU, Run, Stack, summary
from bench.profile import Profile
from bench.rawhttp import Pool
from flowgate.services.background.callbacks import POLL_INTERVAL_S
from flowgate.shared.keys import Keys
from flowgate.shared.state import Status
from flowgate.shared.steps import StepEvent, StepStatus
from flowgate.shared.store.runs import RunStore

ASYNC = {"Prefer": "respond-async"}
STREAMS_GAUGE = "flowgate_api_event_streams"
CONNECT_CONCURRENCY = 200
#: No probe waits longer than this for its event or its callback.
PROBE_TIMEOUT_S = 30.0


@dataclass
class Stream:
    """One ``text/event-stream`` read over a raw connection: each event's kind and the
    moment its last line was read, in a queue."""

    cid: str
    events: asyncio.Queue[tuple[str, float]] = field(default_factory=asyncio.Queue)
    _writer: asyncio.StreamWriter | None = None
    _task: asyncio.Task[None] | None = None

    async def open(self, port: int) -> None:
        reader, self._writer = await asyncio.open_connection("127.0.0.1", port)
        path = f"/api/process/events/{quote(self.cid, safe='')}"
        self._writer.write(
            f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"stream {self.cid}: {head.splitlines()[0]!r}")
        self._task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        """Chunked transfer coding around SSE lines; an event ends at a blank line."""
        buffer, kind = b"", ""
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                buffer += (await reader.readexactly(size + 2))[:-2]
                *lines, buffer = buffer.split(b"\r\n")
                for line in lines:
                    if line.startswith(b"event: "):
                        kind = line[7:].decode()
                    elif not line and kind:
                        self.events.put_nowait((kind, time.perf_counter()))
                        kind = ""

    async def next(self, kind: str) -> float:
        """When the next event of ``kind`` was read (others before it are skipped)."""
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            while True:
                got, at = await self.events.get()
                if got == kind:
                    return at

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        if self._writer:
            self._writer.close()


class Receiver:
    """A loopback HTTP server taking callbacks: when each run's first one arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, asyncio.Future[float]] = {}
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.url = ""

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:  # kept-alive connections: their handlers read EOF
            writer.close()
        await asyncio.sleep(0.05)

    def expect(self, cid: str) -> asyncio.Future[float]:
        return self.arrived.setdefault(cid, asyncio.get_running_loop().create_future())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                at = time.perf_counter()
                arrived = self.expect(orjson.loads(body)["correlationId"])
                if not arrived.done():
                    arrived.set_result(at)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        self._writers.discard(writer)
        writer.close()


def _step(n: int) -> StepEvent:
    return StepEvent(
        step=f"step-{n}", status=StepStatus.OK, activity_id=f"step-{n}",
        activity_instance_id=f"step-{n}:{uuid.uuid4().hex}", activity_type="serviceTask",
        at=datetime.now(UTC), data={"n": n},
    )  # fmt: skip


@dataclass
class _Bench:
    api: ours.Api
    starts: Pool
    store: RunStore
    receiver: Receiver

    async def start(self, cid: str, callback: bool = False) -> None:
        body: dict[str, Any] = {"processKey": "benchmark", "correlationId": cid}
        if callback:
            body["callbackUrl"] = self.receiver.url
        response = await self.starts.request("POST", "/api/process/start", body, ASYNC)
        if response.status != 202:
            raise RuntimeError(f"start {cid}: {response.status} {response.body[:200]!r}")

    async def streams(self, cids: list[str]) -> list[Stream]:
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(cid: str) -> Stream:
            async with gate:
                await self.start(cid)
                stream = Stream(cid)
                await stream.open(self.api.port)
                return stream

        streams = list(await asyncio.gather(*(one(cid) for cid in cids)))
        await self.following(len(streams))
        return streams

    async def following(self, count: int) -> None:
        """Until the replica follows ``count`` runs' streams (each has subscribed)."""
        deadline = time.monotonic() + PROBE_TIMEOUT_S + count / 100
        while True:
            samples = await asyncio.to_thread(ours.metrics, self.api)
            if samples.get(STREAMS_GAUGE, 0) >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {samples.get(STREAMS_GAUGE)} of {count} streams open")
            await asyncio.sleep(0.005)

    async def probe(self, background: int) -> tuple[float, float, float]:
        """(step ms, end ms, callback ms) for one run."""
        cid = f"probe-{uuid.uuid4().hex[:16]}"
        await self.start(cid, callback=True)
        stream = Stream(cid)
        await stream.open(self.api.port)
        try:
            await self.following(background + 1)  # not measured
            await self.store.steps.record(cid, _step(1))
            recorded = time.perf_counter()
            step_at = await stream.next("step")
            callback = self.receiver.expect(cid)
            # At a random phase of the replicas' 100 ms look for due callbacks: a probe loop
            # paced by the last callback's arrival would always land just after one.
            await asyncio.sleep(random.uniform(0, POLL_INTERVAL_S))
            await self.store.finish(cid, Status.OK, data={"marker": cid})
            finished = time.perf_counter()
            end_at = await stream.next("end")
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                called_at = await callback
        finally:
            await stream.close()
        return (
            (step_at - recorded) * 1000,
            (end_at - finished) * 1000,
            (called_at - finished) * 1000,
        )


async def _round(bench: _Bench, side: str, probes: int, background: int) -> dict[str, list[float]]:
    step, end, callback = [], [], []
    for _ in range(probes):
        s, e, c = await bench.probe(background)
        step.append(s)
        end.append(e)
        callback.append(c)
    print(f"  {side}: step p50 {summary(step)['median']} ms, "
          f"callback p50 {summary(callback)['median']} ms")  # fmt: skip
    return {"step": step, "end": end, "callback": callback}


async def _end_all(bench: _Bench, streams: list[Stream]) -> dict[str, int]:
    """End every background run; count the streams that read their end."""
    for stream in streams:
        await bench.store.finish(stream.cid, Status.OK, data={"marker": stream.cid})
    ended = await asyncio.gather(
        *(stream.next("end") for stream in streams), return_exceptions=True
    )
    for stream in streams:
        await stream.close()
    return {"streams": len(streams), "ended": sum(isinstance(at, float) for at in ended)}


async def run(run_: Run, stack: Stack, profile: Profile) -> dict[str, Any]:
    if why := ours.available("flowgate.services.api"):
        return {"skipped": why}
    prefix = f"bs{uuid.uuid4().hex[:6]}"
    stub = ours.start_stub(run_, stack, prefix=prefix, mode="park", cpu=LOAD_CPU)
    api = ours.start_api(
        run_, stack, engine_url=stub.url, prefix=prefix,
        database_url=ours.new_schema(stack, "progress"), cpu=SERVER_CPU,
        extra_env={"CALLBACK_ALLOWED_HOSTS": "127.0.0.1"},  # the loopback receiver
    )  # fmt: skip
    redis = Redis.from_url(stack.redis_url)
    store = RunStore(redis, Keys(prefix), result_ttl_s=3600, pending_ttl_s=3600)
    background: list[Stream] = []
    rounds: dict[str, list[dict[str, list[float]]]] = {"quiet": [], "streams": []}
    closings: list[dict[str, int]] = []
    try:
        async with Receiver() as receiver:
            bench = _Bench(api, Pool("127.0.0.1", api.port, 16), store, receiver)
            await _round(bench, "warm-up", profile.progress_probes // 4 or 1, 0)
            for _ in range(profile.rounds):
                for side in rounds:
                    if side == "streams":
                        cids = [
                            f"bg-{uuid.uuid4().hex[:16]}" for _ in range(profile.progress_streams)
                        ]
                        background = await bench.streams(cids)
                    rounds[side].append(
                        await _round(bench, side, profile.progress_probes, len(background))
                    )
                    if background:
                        closings.append(await _end_all(bench, background))
                        background = []
                        print(f"  {closings[-1]['ended']}/{closings[-1]['streams']} streams "
                              "read their end")  # fmt: skip
            await bench.starts.close()
    finally:
        for stream in background:
            await stream.close()
        await redis.aclose()
    return {
        "method": __doc__,
        "engine": "stand-in (bench/stubengine.py, park mode), not Camunda",
        "by_side": {
            side: {
                measure: summary([v for r in results for v in r[measure]])
                for measure in ("step", "end", "callback")
            }
            for side, results in rounds.items()
        },
        "open_streams": profile.progress_streams,
        "streams_ended": {
            "streams": sum(c["streams"] for c in closings),
            "ended": sum(c["ended"] for c in closings),
        },
        "target_p99_ms": {"step": 50, "callback": 300},
    }
