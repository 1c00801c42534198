"""End to end through the load balancer of the `make up` stack (see conftest.py).

Replicas and workers are real processes: the tests kill them (SIGKILL), stop them
(SIGTERM), pause them (SIGSTOP) and bring them back with `stack up`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flowgate_client import AsyncClient, Event

from deploy.local import servers
from tests.helpers.net import CallbackReceiver
from tests.helpers.stack import Stack, engine_instances, wait_until

pytestmark = [pytest.mark.engine, pytest.mark.slow]  # their stack runs its own engine

START = "/api/process/start"
ONBOARD_RESULT = {"userId", "validated", "backgroundCheckPassed", "onboarded", "riskScore"}


def _cid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _onboard(cid: str) -> dict[str, Any]:
    return {"processKey": "onboard-user", "correlationId": cid, "variables": {"userId": "u-1"}}


@contextlib.asynccontextmanager
async def client(base_url: str, timeout_s: float = 90) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as c:
        yield c


@contextlib.contextmanager
def workers_paused(stack: Stack) -> Iterator[None]:
    """SIGSTOP both workers (runs stay parked at their first task); SIGCONT on the way out."""
    names = ("worker-1", "worker-2")
    for name in names:
        stack.signal(name, signal.SIGSTOP)
    try:
        yield
    finally:
        for name in names:
            with contextlib.suppress(ProcessLookupError):
                stack.signal(name, signal.SIGCONT)


async def wait_finished(c: httpx.AsyncClient, cids: list[str], timeout_s: float = 90) -> None:
    """Every run ends ``ok``, read through the balancer (long-polling ``?wait=``)."""
    deadline = time.monotonic() + timeout_s

    async def one(cid: str) -> None:
        while True:
            response = await c.get(f"/api/process/status/{cid}", params={"wait": 10})
            if response.status_code == 200:
                body = response.json()
                assert body["status"] == "ok", body
                assert body["correlationId"] == cid
                return
            assert response.status_code == 202, (response.status_code, response.text)
            assert time.monotonic() < deadline, f"{cid} still pending"

    await asyncio.gather(*(one(cid) for cid in cids))


async def park(
    stack: Stack, c: httpx.AsyncClient, prefix: str, count: int
) -> list[asyncio.Task[Any]]:
    """``count`` starts whose engine instances exist while no worker runs: parked requests."""
    tasks = [
        asyncio.create_task(c.post(START, json=_onboard(f"{prefix}-{i}"), timeout=90))
        for i in range(count)
    ]
    await asyncio.to_thread(
        wait_until, lambda: engine_instances(stack, prefix) >= count, 30, f"{count} instances"
    )
    await asyncio.sleep(0.5)  # from the engine's answer to the parked wait: a few ms
    assert not any(t.done() for t in tasks), [t.result() for t in tasks if t.done()]
    return tasks


def test_make_up_brings_up_the_whole_stack(healthy_stack: Stack) -> None:
    stack = healthy_stack
    ready = httpx.get(f"{stack.api_url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    definitions = httpx.get(f"{stack.engine_url}/process-definition", timeout=10).json()
    assert {"onboard-user", "benchmark"} <= {d["key"] for d in definitions}
    status = stack.command("ps")
    names = ("redis", "postgres", "engine", "api-1", "api-2", "worker-1", "worker-2", "flusher")
    for name in (*names, "nginx"):
        assert any(line.startswith(name) and " ready " in line for line in status.splitlines()), (
            status
        )
    # A second `up` is harmless: nothing restarts.
    pids = {name: stack.pid(name) for name in ("engine", "api-1", "nginx")}
    again = stack.command("up")
    assert "already running" in again
    assert pids == {name: stack.pid(name) for name in pids}
    # The replicas leave the write-behind to the flusher process: the audit trail (read
    # from Postgres) fills in all the same.
    cid = _cid("flush")
    started = httpx.post(f"{stack.api_url}{START}", json=_onboard(cid), timeout=60)
    assert started.status_code == 200, started.text

    def audited() -> bool:
        log = httpx.get(f"{stack.api_url}/api/event-log/{cid}", timeout=10).json()["eventLog"]
        steps = {row["step_name"] for row in log}
        return "start" in steps and any(row["status"] == "success" for row in log)

    wait_until(audited, 20, "the run's audit rows in Postgres")


async def test_200_concurrent_starts_spread_over_both_replicas(healthy_stack: Stack) -> None:
    stack = healthy_stack
    before = len(stack.access_log())
    prefix = _cid("conc")
    async with client(stack.api_url) as c:

        async def start(i: int) -> httpx.Response:
            body = {"processKey": "benchmark", "correlationId": f"{prefix}-{i}", "variables": {}}
            return await c.post(START, json=body, headers={"Prefer": "wait=55"})

        responses = await asyncio.gather(*(start(i) for i in range(200)))
    for i, response in enumerate(responses):
        assert response.status_code == 200, (i, response.status_code, response.text)
        body = response.json()
        assert body["status"] == "ok"
        assert body["correlationId"] == f"{prefix}-{i}"
    starts = [line for line in stack.access_log()[before:] if f"POST {START}" in line]
    assert len(starts) == 200
    upstreams = Counter(line.split("upstream=")[1].split()[0] for line in starts)
    replicas = {f"127.0.0.1:{port}" for port in stack.replica_ports}
    assert set(upstreams) == replicas, upstreams
    assert min(upstreams.values()) >= 40, f"unbalanced: {upstreams}"


async def test_replica_killed_with_parked_requests(healthy_stack: Stack) -> None:
    """SIGKILL: its clients lose the connection, but every run finishes and is readable."""
    stack = healthy_stack
    prefix = _cid("kill")
    with workers_paused(stack):
        async with client(stack.replica_url("api-1")) as direct:
            tasks = await park(stack, direct, prefix, 10)
            pid = stack.signal("api-1", signal.SIGKILL)
            results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        assert isinstance(result, httpx.TransportError), result
    # Its sockets close a moment before the kernel has finished the process off.
    await asyncio.to_thread(wait_until, lambda: not servers.pid_alive(pid), 5, "api-1 gone")
    async with client(stack.api_url) as c:
        await wait_finished(c, [f"{prefix}-{i}" for i in range(10)])
        # The balancer keeps serving on the other replica meanwhile.
        response = await c.post(START, json=_onboard(_cid("after-kill")))
        assert response.status_code == 200, response.text


async def test_a_replica_killed_behind_the_balancer_is_never_seen_by_its_clients(
    healthy_stack: Stack,
) -> None:
    """SIGKILL with starts and status long-polls parked on both replicas: the balancer
    resends the starts (idempotent by correlationId: each joins its run) and the reads to
    the other replica, so every client gets its answer and none a 5xx."""
    stack = healthy_stack
    starts, polled = _cid("lb-kill"), _cid("lb-kill-poll")
    async with client(stack.api_url) as lb:
        await both_replicas_balanced(stack, lb)
        with workers_paused(stack):
            for i in range(12):
                accepted = await lb.post(
                    START, json=_onboard(f"{polled}-{i}"), headers={"Prefer": "respond-async"}
                )
                assert accepted.status_code == 202, accepted.text
            polls = [
                asyncio.create_task(lb.get(f"/api/process/status/{polled}-{i}?wait=50"))
                for i in range(12)
            ]
            parked = await park(stack, lb, starts, 24)
            before = len(stack.access_log())
            pid = stack.signal("api-1", signal.SIGKILL)
            await asyncio.to_thread(wait_until, lambda: not servers.pid_alive(pid), 5, "api-1")
            await asyncio.sleep(1)  # the resent requests park on api-2 before the runs go on
        answers = await asyncio.wait_for(asyncio.gather(*parked, *polls), timeout=80)
    codes = Counter(answer.status_code for answer in answers)
    assert set(codes) <= {200, 202}, [(a.status_code, a.text) for a in answers]
    resent = [line for line in stack.access_log()[before:] if ", 127.0.0.1:" in line]
    assert resent, "no request was parked on the killed replica: the test proved nothing"
    async with client(stack.api_url) as lb:
        cids = [f"{starts}-{i}" for i in range(24)] + [f"{polled}-{i}" for i in range(12)]
        await wait_finished(lb, cids)
        for cid in cids:  # one engine instance each: a resent start joined its run
            assert _instances(stack, cid) == 1, cid


async def both_replicas_balanced(stack: Stack, lb: httpx.AsyncClient) -> None:
    """Until the balancer sends requests to both replicas again: after a replica's death
    nginx leaves it out for its fail_timeout, even once it is back."""
    replicas = {f"127.0.0.1:{port}" for port in stack.replica_ports}
    deadline = time.monotonic() + 15
    while True:
        before = len(stack.access_log())
        for _ in range(4):
            assert (await lb.get("/healthz")).status_code == 200
        used = {line.split("upstream=")[1].split()[0] for line in stack.access_log()[before:]}
        if used == replicas:
            return
        assert time.monotonic() < deadline, f"the balancer uses only {used}"
        await asyncio.sleep(0.5)


def _instances(stack: Stack, correlation_id: str) -> int:
    """Engine instances (running or ended) of one correlationId."""
    response = httpx.get(
        f"{stack.engine_url}/history/process-instance/count",
        params={"processInstanceBusinessKey": correlation_id},
        timeout=10,
    )
    response.raise_for_status()
    return int(response.json()["count"])


async def test_replica_sigterm_answers_parked_requests_with_202(healthy_stack: Stack) -> None:
    stack = healthy_stack
    prefix, via_lb = _cid("term"), _cid("term-lb")
    async with client(stack.replica_url("api-1")) as direct, client(stack.api_url) as lb:
        with workers_paused(stack):
            parked = await park(stack, direct, prefix, 10)
            balanced = await park(stack, lb, via_lb, 10)
            pid = stack.signal("api-1", signal.SIGTERM)
            began = time.monotonic()
            answers = await asyncio.wait_for(asyncio.gather(*parked), timeout=10)
            answered_s = time.monotonic() - began
            await asyncio.to_thread(
                wait_until, lambda: not servers.pid_alive(pid), 15, "api-1 to exit"
            )
        # Parked on api-1: 202 at once, with where to look.
        for i, response in enumerate(answers):
            assert response.status_code == 202, response.text
            body = response.json()
            assert body["status"] == "pending"
            assert body["statusUrl"] == f"/api/process/status/{prefix}-{i}"
            assert response.headers["Location"] == body["statusUrl"]
            assert int(response.headers["Retry-After"]) >= 1
        assert answered_s < 5, f"parked requests answered {answered_s:.1f} s after SIGTERM"
        # Through the balancer nobody sees an error: 202 from api-1, 200 from api-2.
        for response in await asyncio.wait_for(asyncio.gather(*balanced), timeout=60):
            assert response.status_code in (200, 202), response.text
        cids = [f"{prefix}-{i}" for i in range(10)] + [f"{via_lb}-{i}" for i in range(10)]
        await wait_finished(lb, cids)


async def test_worker_stopped_while_the_other_keeps_going(healthy_stack: Stack) -> None:
    stack = healthy_stack
    prefix = _cid("wstop")
    async with client(stack.api_url) as c:
        batch = [
            asyncio.create_task(c.post(START, json=_onboard(f"{prefix}-{i}"))) for i in range(40)
        ]
        await asyncio.sleep(0.5)
        pid = stack.pid("worker-1")
        await asyncio.to_thread(stack.command, "down", "worker-1")
        assert not servers.pid_alive(pid)
        assert "worker-1" not in stack.command("ps")
        for response in await asyncio.gather(*batch):
            assert response.status_code in (200, 202), response.text
        await wait_finished(c, [f"{prefix}-{i}" for i in range(40)])
        # Only worker-2 is left, and it does all the work.
        later = await asyncio.gather(
            *(c.post(START, json=_onboard(f"{prefix}-later-{i}")) for i in range(10))
        )
        for response in later:
            assert response.status_code == 200, response.text
            assert set(response.json()["result"]) >= ONBOARD_RESULT


async def test_live_progress_cancel_and_callback_through_the_balancer(
    healthy_stack: Stack,
) -> None:
    """The events stream is not held in nginx's buffers: the first step arrives while the
    run waits for a worker; a cancel (on whichever replica) ends the stream and is POSTed
    to a callback on localhost, which `make up` allows."""
    stack = healthy_stack
    cid = _cid("live")
    events: list[Event] = []
    first_step = asyncio.Event()
    async with CallbackReceiver([200]) as hook, AsyncClient(stack.api_url) as flowgate:

        async def follow() -> None:
            async for event in flowgate.events(cid):
                events.append(event)
                first_step.set()

        with workers_paused(stack):
            started = await flowgate.start("onboard-user", cid, {"userId": "u-1"}, wait=0,
                                           callback_url=hook.url)  # fmt: skip
            assert started.status == "pending"
            async with asyncio.TaskGroup() as group:
                stream = group.create_task(follow())
                await asyncio.wait_for(first_step.wait(), timeout=30)
                assert not stream.done()
                cancelled = await flowgate.cancel(cid, reason="e2e")
                await asyncio.wait_for(stream, timeout=30)
        await asyncio.wait_for(hook.arrived.wait(), timeout=30)
    assert cancelled.status == "cancelled"
    assert (events[0].kind, events[0].data["step"]) == ("step", "start")
    assert (events[-1].kind, events[-1].data["status"]) == ("end", "cancelled")
    headers, body = hook.requests[0]
    assert headers["flowgate-delivery"]
    assert json.loads(body)["status"] == "cancelled"


async def test_down_stops_everything_and_up_keeps_the_data(stack: Stack) -> None:
    stack.ensure_up()
    cid = _cid("keep")
    async with client(stack.api_url) as c:
        response = await c.post(START, json=_onboard(cid))
        assert response.status_code == 200, response.text
    names = ("redis", "postgres", "engine", "api-1", "api-2", "worker-1", "worker-2", "nginx")
    pids = {name: stack.pid(name) for name in names}
    stack.command("down")
    for name, pid in pids.items():
        assert not servers.pid_alive(pid), f"{name} (pid {pid}) still runs after down"
    assert not servers.port_open(int(stack.api_url.rsplit(":", 1)[1]))
    assert "nothing is running" in stack.command("ps")
    stack.command("up")
    async with client(stack.api_url) as c:
        status = await c.get(f"/api/process/status/{cid}")
        assert status.status_code == 200, status.text
        assert status.json()["status"] == "ok"


def test_a_port_held_by_another_program_is_named(stack: Stack, tmp_path: Path) -> None:
    """`up` refuses a port it does not own, says which variable moves it, starts nothing."""
    ports = {name: str(servers.free_port()) for name in (
        "STACK_API_PORT", "STACK_ENGINE_PORT", "STACK_POSTGRES_PORT")}  # fmt: skip
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**stack.env, **ports, "STACK_REDIS_PORT": str(taken.getsockname()[1])}
        env.pop("STACK_API_REPLICA_PORTS")
        env.pop("STACK_WORKER_HEALTH_PORTS")
        other = Stack(tmp_path, env, stack.api_url, stack.engine_url, stack.replica_ports)
        with pytest.raises(servers.ServerError, match="STACK_REDIS_PORT") as error:
            other.command("up")
    assert "already in use" in str(error.value)
    assert (
        not (tmp_path / "stack.json").exists()
        or '"processes": {}' in (tmp_path / "stack.json").read_text()
    )
