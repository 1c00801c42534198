"""15. The Redis client: CPU per call, redis-py (hiredis) beside coredis and valkey-glide.

Every run costs flowgate's processes a few dozen Redis calls, and redis-py is the largest
single share of the API's and the worker's profiles. Here only the client runs, against the
bench's Redis, on uvloop as the services run, ``clients_concurrency`` calls in flight. Three
calls of the store's own shapes:

* ``read``: HGETALL of a finished run's state hash (a status read, ``RunStore.get``);
* ``step``: the store's STEP script (shared/store/scripts.py) recording a new step of a
  pending run: the transition a worker makes after each task (EVALSHA, its SHA loaded once);
* ``read 6``: six state hashes in one non-transactional pipeline (``RunStore.get_many``).

CPU per call is this process's CPU time (every thread: valkey-glide runs a Rust runtime) over
the calls made; calls/s is wall-clock. The clients take turns, A B C A B C. The store keeps
redis-py unless another is cheaper by at least 1.3x on the transitions (issue 22).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson
import uvloop

from bench.harness import Run, Stack, summary
from bench.profile import Profile
from flowgate.shared.state import RunState, Status
from flowgate.shared.store.scripts import STEP

#: One call of a shape, by its number (each step records a new activity instance).
Call = Callable[[int], Awaitable[Any]]
#: One client's calls, by shape ("read", "step", "read 6").
Shapes = dict[str, Call]
READ_MANY = 6


def _state(cid: str, status: Status) -> dict[Any, Any]:
    now = datetime.now(UTC)
    return RunState(
        correlation_id=cid, status=status, process_key="onboard-user", request_hash="h" * 64,
        instance_id=str(uuid.uuid4()), traceability_id=str(uuid.uuid4()),
        batch_id=str(uuid.uuid4()), application_id=str(uuid.uuid4()),
        data={"userId": cid, "validated": True, "riskScore": 14, "onboarded": True},
        error=None, started_at=now, updated_at=now, version=3,
    ).to_hash()  # fmt: skip


class _Keys:
    """The keys of one client's run records (its own prefix, so clients never share)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.reads = [f"{{{prefix}}}:state:done-{n}" for n in range(READ_MANY)]
        self.pending = f"{{{prefix}}}:state:pending"

    def step(self, n: int) -> tuple[list[str], list[str | bytes]]:
        """STEP's KEYS and ARGV for the ``n``-th new step of the pending run."""
        p = self.prefix
        keys = [self.pending, f"{{{p}}}:steps", f"{{{p}}}:seen", f"{{{p}}}:claimed",
                f"{{{p}}}:wb", f"{{{p}}}:compact"]  # fmt: skip
        step = orjson.dumps({"step": "validate-user", "status": "ok", "activityInstanceId": n})
        args: list[str | bytes] = ["pending", f"a{n}", step, "", "1000", f"{{{p}}}:ch", "1"]
        return keys, args

    def records(self) -> dict[str, dict[Any, Any]]:
        return {
            **{key: _state(f"done-{n}", Status.OK) for n, key in enumerate(self.reads)},
            self.pending: _state("pending", Status.PENDING),
        }


async def _redis_py(host: str, port: int, keys: _Keys) -> tuple[Shapes, Callable[[], Any]]:
    import redis.asyncio as redis

    client = redis.Redis(host=host, port=port, protocol=3)
    for key, fields in keys.records().items():
        await client.hset(key, mapping=fields)
    step = client.register_script(STEP.source())

    async def read_many(_: int) -> Any:
        async with client.pipeline(transaction=False) as pipe:
            for key in keys.reads:
                pipe.hgetall(key)
            return await pipe.execute()

    async def record(n: int) -> Any:
        k, a = keys.step(n)
        return await step(keys=k, args=a)

    shapes: Shapes = {
        "read": lambda _: client.hgetall(keys.reads[0]),
        "step": record,
        "read 6": read_many,
    }
    return shapes, client.aclose


async def _coredis(host: str, port: int, keys: _Keys) -> tuple[Shapes, Callable[[], Any]]:
    import coredis

    client: coredis.Redis[bytes] = coredis.Redis(host=host, port=port)
    await client.__aenter__()
    for key, fields in keys.records().items():
        await client.hset(key, fields)
    step = client.register_script(STEP.source())

    async def read_many(_: int) -> Any:
        async with client.pipeline(transaction=False) as pipe:
            replies = [pipe.hgetall(key) for key in keys.reads]
        return [await reply for reply in replies]

    async def record(n: int) -> Any:
        k, a = keys.step(n)
        return await step(keys=k, args=a)

    async def close() -> None:
        await client.__aexit__(None, None, None)

    shapes: Shapes = {
        "read": lambda _: client.hgetall(keys.reads[0]),
        "step": record,
        "read 6": read_many,
    }
    return shapes, close


async def _glide(host: str, port: int, keys: _Keys) -> tuple[Shapes, Callable[[], Any]]:
    from glide import Batch, GlideClient, GlideClientConfiguration, NodeAddress, Script

    config = GlideClientConfiguration([NodeAddress(host, port)])
    client = await GlideClient.create(config)
    for key, fields in keys.records().items():
        await client.hset(key, fields)
    step = Script(STEP.source())  # type: ignore[no-untyped-call]

    async def read_many(_: int) -> Any:
        batch = Batch(is_atomic=False)
        for key in keys.reads:
            batch.hgetall(key)
        return await client.exec(batch, raise_on_error=True)

    async def record(n: int) -> Any:
        k, a = keys.step(n)
        return await client.invoke_script(step, keys=k, args=a)

    shapes: Shapes = {
        "read": lambda _: client.hgetall(keys.reads[0]),
        "step": record,
        "read 6": read_many,
    }
    return shapes, lambda: client.close()


CLIENTS: dict[str, Callable[[str, int, _Keys], Awaitable[tuple[Shapes, Callable[[], Any]]]]] = {
    "redis-py (hiredis)": _redis_py,
    "coredis": _coredis,
    "valkey-glide": _glide,
}


async def _drive(call: Call, calls: int, concurrency: int, first: int) -> tuple[float, float]:
    """(CPU µs per call, calls per second) for ``calls`` calls, ``concurrency`` at a time;
    each answer must be what the store would get (a state, a new step)."""
    numbers = iter(range(first, first + calls))

    async def lane() -> None:
        for n in numbers:
            if not _answered(await call(n)):
                raise RuntimeError(f"call {n} was not answered as the store expects")

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / calls * 1e6, calls / wall


def _answered(answer: Any) -> bool:
    """A state hash (read), six of them (read 6), or 1: the step was new (step)."""
    if isinstance(answer, list):
        return len(answer) == READ_MANY and all(answer)
    return answer == 1 or bool(answer and isinstance(answer, dict))


async def _round(
    name: str, host: str, port: int, calls: int, concurrency: int
) -> dict[str, tuple[float, float]]:
    """One turn of one client: a warm-up, then every shape."""
    keys = _Keys(f"rc{uuid.uuid4().hex[:6]}")
    shapes, close = await CLIENTS[name](host, port, keys)
    try:
        await _drive(shapes["read"], min(calls, 200), concurrency, 0)
        return {
            shape: await _drive(call, calls, concurrency, first=1_000_000)
            for shape, call in shapes.items()
        }
    finally:
        await close()


async def run(run_: Run, stack: Stack, profile: Profile) -> dict[str, Any]:
    del run_
    if stack.redis_cluster:
        return {"skipped": "measured on a single Redis"}
    url = urlsplit(stack.redis_url)
    host, port = url.hostname or "127.0.0.1", url.port or 6379
    samples: dict[str, dict[str, dict[str, list[float]]]] = {}
    for _ in range(profile.rounds * 2):
        for name in CLIENTS:
            # uvloop, as the services run: its own loop in a thread, so the bench's loop
            # (asyncio's) is not what is measured.
            result = await asyncio.to_thread(
                uvloop.run,
                _round(name, host, port, profile.client_calls, profile.client_concurrency),
            )
            for shape, (cpu_us, rate) in result.items():
                s = samples.setdefault(name, {}).setdefault(
                    shape, {"cpu_us": [], "calls_per_s": []}
                )
                s["cpu_us"].append(cpu_us)
                s["calls_per_s"].append(rate)
    by_client = {
        name: {
            shape: {measure: summary(values, 1) for measure, values in s.items()}
            for shape, s in shapes.items()
        }
        for name, shapes in samples.items()
    }
    for name, shapes in by_client.items():
        print(f"  {name}: " + ", ".join(
            f"{shape} {s['cpu_us']['median']} µs" for shape, s in shapes.items()
        ))  # fmt: skip
    return {
        "method": __doc__,
        "calls_per_round": profile.client_calls,
        "concurrency": profile.client_concurrency,
        "by_client": by_client,
    }
