"""9. The engine call's HTTP client: CPU per call, httpx beside aiohttp and pyreqwest.

Every start makes one engine call, and the API's profile puts a third of a start's CPU in
httpx. Here only the client runs: the stand-in engine (bench/stubengine.py, pinned to CPU 0)
answers ``POST …/process-definition/key/benchmark/start``; this process (CPU 1) sends it the
body a start sends (orjson-encoded, as ``CamundaClient`` does), ``clients_concurrency``
calls in flight over kept-alive connections, and decodes each JSON answer. CPU per call is
this process's CPU time (every thread: pyreqwest runs a Rust runtime) over the calls made;
calls/s is wall-clock. The clients take turns, A B C A B C.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import orjson

from bench import ours
from bench.harness import SERVER_CPU, Run, Stack, summary
from bench.profile import Profile
from flowgate.shared.contract import SystemVariables
from flowgate.shared.variables import to_camunda

Call = Callable[[bytes], Awaitable[Any]]
HEADERS = {"accept": "application/json", "content-type": "application/json"}
TIMEOUT_S = 10.0


def _body(cid: str) -> bytes:
    """What a start sends: the caller's variables and the system variables, typed."""
    system = SystemVariables.new(cid).to_variables()
    variables = {"userId": f"user-{cid}", "amount": 125, **system}
    return orjson.dumps({"businessKey": cid, "variables": to_camunda(variables)})


async def _httpx(url: str, calls: int, concurrency: int) -> tuple[float, float]:
    import httpx

    async with httpx.AsyncClient() as client:

        async def call(body: bytes) -> Any:
            response = await client.request(
                "POST", url, content=body, headers=HEADERS, timeout=httpx.Timeout(TIMEOUT_S)
            )
            return orjson.loads(response.content)

        return await _drive(call, calls, concurrency)


async def _aiohttp(url: str, calls: int, concurrency: int) -> tuple[float, float]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def call(body: bytes) -> Any:
            async with session.post(url, data=body, headers=HEADERS) as response:
                return orjson.loads(await response.read())

        return await _drive(call, calls, concurrency)


async def _pyreqwest(url: str, calls: int, concurrency: int) -> tuple[float, float]:
    from pyreqwest.client import ClientBuilder

    timeout = timedelta(seconds=TIMEOUT_S)
    async with ClientBuilder().timeout(timeout).build() as client:

        async def call(body: bytes) -> Any:
            request = client.post(url).headers(HEADERS).body_bytes(body).build()
            response = await request.send()
            return orjson.loads(bytes(await response.bytes()))

        return await _drive(call, calls, concurrency)


async def _drive(
    call: Callable[[bytes], Awaitable[Any]], calls: int, concurrency: int
) -> tuple[float, float]:
    """(CPU µs per call, calls per second) for ``calls`` calls, ``concurrency`` at a time."""
    bodies = [_body(f"c{n}") for n in range(calls)]
    queue = iter(bodies)

    async def lane() -> None:
        for body in queue:
            answer = await call(body)
            if not answer.get("id"):
                raise RuntimeError(f"no instance id in {answer!r}")

    await asyncio.gather(*(lane() for _ in range(concurrency)))  # warm the pool
    queue = iter(bodies)
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / calls * 1e6, calls / wall


CLIENTS: dict[str, Callable[[str, int, int], Awaitable[tuple[float, float]]]] = {
    "httpx": _httpx,
    "aiohttp": _aiohttp,
    "pyreqwest": _pyreqwest,
}


async def run(run_: Run, stack: Stack, profile: Profile) -> dict[str, Any]:
    prefix = f"bc{uuid.uuid4().hex[:6]}"
    stub = ours.start_stub(run_, stack, prefix=prefix, mode="park", cpu=SERVER_CPU)
    url = f"{stub.url}/process-definition/key/benchmark/start"
    samples: dict[str, dict[str, list[float]]] = {
        name: {"cpu_us": [], "calls_per_s": []} for name in CLIENTS
    }
    for _ in range(profile.rounds * 2):
        for name, client in CLIENTS.items():
            cpu_us, rate = await client(url, profile.client_calls, profile.client_concurrency)
            samples[name]["cpu_us"].append(cpu_us)
            samples[name]["calls_per_s"].append(rate)
    for name, s in samples.items():
        print(f"  {name}: {summary(s['cpu_us'], 1)['median']} µs CPU per call, "
              f"{summary(s['calls_per_s'], 0)['median']} calls/s")  # fmt: skip
    return {
        "method": __doc__,
        "engine": "stand-in (bench/stubengine.py), not Camunda",
        "calls_per_round": profile.client_calls,
        "concurrency": profile.client_concurrency,
        "by_client": {
            name: {measure: summary(values, 1) for measure, values in s.items()}
            for name, s in samples.items()
        },
    }
