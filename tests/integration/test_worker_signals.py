"""Worker processes (``python -m flowgate.services.worker``) killed, stopped, restarted and doubled.

The workers serve the real bpmn/ processes. Their call-onboarding-api step calls a test
onboarding server (ONBOARDING_API_URL) that holds each request until the test opens its
gate: that is how a task is caught "in hand" when the worker is killed or stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from deploy.local.servers import free_port
from flowgate.shared.camunda import CamundaClient
from flowgate.shared.keys import Keys
from flowgate.shared.settings import Settings
from flowgate.shared.state import Status
from flowgate.shared.store.runs import RunStore
from tests.helpers.engine import EngineAdmin
from tests.helpers.worker import RunClient, WorkerProcess

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CALL_ONBOARDING = "onboard-user.call-onboarding-api"


class OnboardingServer:
    """``POST /onboarding/complete``: answers ``{"onboarded": true}`` once the gate is open."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.requests: list[bytes] = []
        #: The Idempotency-Key of each request, in the same order.
        self.idempotency_keys: list[bytes] = []
        self.received = asyncio.Event()
        self.delay_s = 0.0
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> OnboardingServer:
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:  # keep-alive: httpx reuses the connection
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.lower().split(b"\r\n")
                        if line.startswith(b"content-length:")
                    ),
                    0,
                )
                body = await reader.readexactly(length)
                self.requests.append(body)
                self.idempotency_keys.append(
                    next(
                        (
                            line.partition(b":")[2].strip()
                            for line in head.split(b"\r\n")
                            if line.lower().startswith(b"idempotency-key:")
                        ),
                        b"",
                    )
                )
                self.received.set()
                await self.gate.wait()
                await asyncio.sleep(self.delay_s)
                reply = b'{"onboarded": true, "customerId": "cust-1"}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(reply), reply)
                )
                await writer.drain()
        writer.close()


@pytest.fixture
async def onboarding_server() -> AsyncIterator[OnboardingServer]:
    async with OnboardingServer() as server:
        yield server
        server.gate.set()


@pytest.fixture
def spawn(
    make_settings: Callable[..., Settings],
    engine_url: str,
    onboarding_server: OnboardingServer,
    tmp_path: Path,
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start a worker process: its settings from make_settings plus keyword overrides."""
    started: list[WorkerProcess] = []
    base = make_settings()

    def start(name: str, **overrides: object) -> WorkerProcess:
        env = {
            **os.environ,
            "REDIS_URL": base.redis_url,
            "REDIS_CLUSTER": str(base.redis_cluster).lower(),
            "DATABASE_URL": base.database_url,
            "REDIS_PREFIX": base.redis_prefix,
            "CAMUNDA_BASE_URL": engine_url,
            "ONBOARDING_API_URL": onboarding_server.url,
            "WORKER_NAME": name,
            "WORKER_HEALTH_PORT": str(free_port()),
            "CAMUNDA_ASYNC_RESPONSE_TIMEOUT_MS": "1000",
            "WORKER_SHUTDOWN_GRACE_S": "1",
            "LOG_LEVEL": "INFO",
            **{key.upper(): str(value) for key, value in overrides.items()},
        }
        worker = WorkerProcess(env, tmp_path / f"{name}-{len(started)}.log")
        started.append(worker)
        return worker

    yield start
    # SIGTERM, not SIGKILL: a killed worker's abandoned long poll would lock the next
    # test's tasks (the engine is shared by the session).
    for worker in started:
        worker.stop()


@pytest.fixture
async def client(
    engine_url: str, redis_client: aioredis.Redis, make_settings: Callable[..., Settings]
) -> AsyncIterator[RunClient]:
    from flowgate.shared.deployment import deploy_directory

    keys = Keys(make_settings().redis_prefix)
    async with CamundaClient(engine_url) as camunda:
        await deploy_directory(camunda)
        # The engine is shared by the session and these workers run the real processes:
        # runs other tests left unfinished (the API's, schemathesis's) are not ours to work.
        for key in ("onboard-user", "benchmark"):
            async with EngineAdmin(engine_url) as admin:
                for run in await admin.historic_process_instances(
                    processDefinitionKey=key, unfinished=True
                ):
                    await admin.delete_process_instance(run["id"])
        client = RunClient(
            camunda, RunStore(redis_client, keys, result_ttl_s=600, pending_ttl_s=600)
        )
        yield client
        await client.cleanup()


async def test_sigkill_mid_task_redelivers_after_the_lock_expires(
    spawn: Callable[..., WorkerProcess], onboarding_server: OnboardingServer, client: RunClient
) -> None:
    first = spawn("killed", camunda_lock_duration_ms=2_000)
    await first.ready()
    cid = await client.start("onboard-user", userId="user-kill")
    await asyncio.wait_for(onboarding_server.received.wait(), 15)  # the task is in hand
    first.kill()
    killed_at = time.monotonic()

    second = spawn("survivor", camunda_lock_duration_ms=2_000)
    onboarding_server.gate.set()
    state = await client.outcome(cid, timeout_s=20)
    assert state.status is Status.OK
    assert time.monotonic() - killed_at >= 1.5  # it waited for the dead worker's lock
    # The step ran again, on the survivor (requests of other runs are not this test's),
    # with the same idempotency key, so the system on the other side can drop the repeat.
    keys = [
        key
        for body, key in zip(
            onboarding_server.requests, onboarding_server.idempotency_keys, strict=True
        )
        if b'"user-kill"' in body
    ]
    assert len(keys) == 2
    assert keys[0] == keys[1] != b""
    assert (
        await second.metric(
            "flowgate_worker_tasks_total", {"topic": CALL_ONBOARDING, "outcome": "completed"}
        )
        >= 1
    )


async def test_sigterm_unlocks_tasks_in_hand_for_another_worker_at_once(
    spawn: Callable[..., WorkerProcess], onboarding_server: OnboardingServer, client: RunClient
) -> None:
    # A lock far longer than the test: only an unlock can explain a quick hand-over.
    leaving = spawn("leaving", camunda_lock_duration_ms=120_000)
    await leaving.ready()
    cid = await client.start("onboard-user", userId="user-term")
    await asyncio.wait_for(onboarding_server.received.wait(), 15)
    staying = spawn("staying", camunda_lock_duration_ms=120_000)
    await staying.ready()

    leaving.proc.send_signal(signal.SIGTERM)
    assert await leaving.exited(timeout_s=10) == 0  # 1 s grace, then cancel and unlock
    onboarding_server.gate.set()
    state = await client.outcome(cid, timeout_s=15)  # far inside the 120 s lock
    assert state.status is Status.OK
    assert (
        await staying.metric(
            "flowgate_worker_tasks_total", {"topic": CALL_ONBOARDING, "outcome": "completed"}
        )
        >= 1
    )


async def test_sigterm_while_idle_exits_at_once_and_peers_clean_up_after_its_poll(
    spawn: Callable[..., WorkerProcess], client: RunClient
) -> None:
    leaving = spawn("idle", camunda_async_response_timeout_ms=60_000)
    await leaving.ready()
    await asyncio.sleep(0.5)  # its long poll is pending in the engine
    started = time.monotonic()
    leaving.proc.send_signal(signal.SIGTERM)
    assert await leaving.exited(timeout_s=10) == 0
    assert time.monotonic() - started < 5  # the 60 s poll was cancelled, not waited out

    # The engine would keep that poll pending, first in line, and lock the next task for a
    # worker that is gone. The leaving worker cancels it on its way out (a poll with its own
    # id: unique-worker-request), and a live worker's janitor unlocks whatever it still
    # grabbed: either way the next task is handled long before its lock (20 s) expires.
    peer = spawn("peer")
    await peer.ready()
    began = time.monotonic()
    cid = await client.start("benchmark")
    state = await client.outcome(cid, timeout_s=10)
    assert state.status is Status.OK
    assert time.monotonic() - began < 10


async def test_a_restarted_worker_unlocks_what_its_predecessor_held(
    spawn: Callable[..., WorkerProcess], onboarding_server: OnboardingServer, client: RunClient
) -> None:
    crashed = spawn("slot", camunda_lock_duration_ms=120_000)
    await crashed.ready()
    cid = await client.start("onboard-user", userId="user-restart")
    await asyncio.wait_for(onboarding_server.received.wait(), 15)
    crashed.kill()

    restarted = spawn("slot", camunda_lock_duration_ms=120_000)  # same WORKER_NAME
    onboarding_server.gate.set()
    state = await client.outcome(cid, timeout_s=20)  # far less than the 120 s lock
    assert state.status is Status.OK
    log = restarted.log.read_text()
    assert "(predecessor)" in log


async def test_two_worker_processes_share_the_load_without_doing_a_task_twice(
    spawn: Callable[..., WorkerProcess], onboarding_server: OnboardingServer, client: RunClient
) -> None:
    workers = [spawn("pair", worker_concurrency=2) for _ in range(2)]
    await asyncio.gather(*(w.ready() for w in workers))
    onboarding_server.delay_s = 0.3  # long enough that one worker cannot take everything
    onboarding_server.gate.set()

    runs = 8
    cids = await asyncio.gather(
        *(client.start("onboard-user", userId=f"user-pair-{i}") for i in range(runs))
    )
    states = await asyncio.gather(*(client.outcome(cid, timeout_s=30) for cid in cids))
    assert {s.status for s in states} == {Status.OK}

    done = [
        await w.metric(
            "flowgate_worker_tasks_total", {"topic": CALL_ONBOARDING, "outcome": "completed"}
        )
        for w in workers
    ]
    assert all(count > 0 for count in done), done
    assert sum(done) == runs
    assert len(onboarding_server.requests) == runs  # every call made exactly once
    for worker in workers:
        for outcome in ("lock_lost", "gone"):
            assert not await worker.metric("flowgate_worker_tasks_total", {"outcome": outcome})
    # Both processes took distinct slots of the same name.
    slots = {
        line.split('"slot":"')[1].split('"')[0]
        for worker in workers
        for line in worker.log.read_text().splitlines()
        if '"slot":"' in line
    }
    assert slots == {"pair/0", "pair/1"}
