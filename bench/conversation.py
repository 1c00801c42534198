"""14. Talking to a running process: a user task's completion and a message, answered.

The real stack: one API process pinned to CPU 0, one worker (floating), the engine on
PostgreSQL, Redis. The process is the example ``approve-order`` (bpmn/): two user tasks
(``review``, ``sign_off``), then a message catch (``order-confirmed``), then a worker books
the order. ``conversation_background`` other runs wait at their first user task all along.

Per probe, A B: one run through flowgate and one through the engine's REST API alone.

* task: flowgate's ``POST /api/process/tasks/{cid}/{taskId}/complete`` (``Prefer:
  wait=10``), answered with the run's next open task; the engine's own time for the same
  step is ``POST /task/{id}/complete`` plus the ``GET /task`` that shows the next one.
* message: flowgate's ``POST /api/process/message/{cid}`` with ``waitUntil`` on the catch
  event, answered once the engine has taken the message (the step is recorded); the
  engine's own time is ``POST /message`` (it answers once its transaction commits).

Latencies are from the request to the answer, in ms, p50 and p99 of every probe. Beside
them, the engine's REST calls per action (mean), from its access log: the lines logged from
the request until shortly after its answer, but the workers' own (``/external-task/...``),
so on the flowgate side a background read may rarely count too.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any
from urllib.parse import quote

from bench import ours
from bench.cost import endpoint
from bench.engine import Engine
from bench.harness import SERVER_CPU, Run, Stack, summary
from bench.profile import Profile
from bench.rawhttp import Pool
from flowgate.shared.camunda import CamundaClient
from flowgate.shared.deployment import deploy_directory
from flowgate.shared.settings import BUNDLED_BPMN

PROCESS = "approve-order"
MESSAGE = "order-confirmed"
WAIT = {"Prefer": "wait=10"}


class Failed(Exception):
    """A probe did not go as it should (counted, not fatal: it is a finding)."""


#: Tomcat logs a call once it has answered it: the count waits this long after the answer.
_LOGGED_S = 0.05


class Calls:
    """The engine's REST calls logged since :meth:`mark`, but the workers'. Read from the
    access log's end (it holds every earlier section's calls too)."""

    def __init__(self, stack: Stack) -> None:
        assert stack.engine_calls is not None, "the engine was started without its access log"
        self._log = stack.engine_calls
        self._offset = 0
        self.counted: list[int] = []

    def mark(self) -> None:
        self._offset = self._log.stat().st_size if self._log.exists() else 0

    async def count(self) -> None:
        await asyncio.sleep(_LOGGED_S)
        with self._log.open("rb") as log:
            log.seek(self._offset)
            lines = log.read().decode().splitlines()
        own = [e for e in map(endpoint, lines) if not e.split()[1].startswith("/external-task/")]
        self.counted.append(len(own))


async def _timed(call: Any, calls: Calls) -> tuple[float, Any]:
    calls.mark()
    began = time.perf_counter()
    answer = await call
    took = (time.perf_counter() - began) * 1000
    await calls.count()
    return took, answer


async def _engine_tasks(engine: Engine, instance: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = await engine.call("GET", f"/task?processInstanceId={instance}")
    return found


async def _until_task(read: Any, key: str) -> dict[str, Any]:
    for _ in range(200):
        for task in await read():
            if task.get("taskDefinitionKey") == key:
                return dict(task)
        await asyncio.sleep(0.02)
    raise Failed(f"no {key} task")


async def _through_flowgate(api: Pool, cid: str, calls: dict[str, Calls]) -> tuple[float, float]:
    body = {"processKey": PROCESS, "correlationId": cid, "variables": {"orderId": cid}}
    started = await api.request("POST", "/api/process/start", body, {"Prefer": "respond-async"})
    if started.status != 202:
        raise Failed(f"start {started.status}")
    path = quote(cid, safe="")

    async def open_tasks() -> list[dict[str, Any]]:
        listed = await api.request("GET", f"/api/process/tasks/{path}")
        return list(listed.json()["tasks"]) if listed.status == 200 else []

    review = await _until_task(open_tasks, "review")
    task_ms, answer = await _timed(
        api.request(
            "POST",
            f"/api/process/tasks/{path}/{review['id']}/complete",
            {"variables": {"reviewed": True}},
            WAIT,
        ),
        calls["task"],
    )
    nxt = [
        t for t in (answer.json() or {}).get("tasks", []) if t["taskDefinitionKey"] == "sign_off"
    ]
    if answer.status != 200 or not nxt:
        raise Failed(f"task answer {answer.status} {answer.body[:200]!r}")
    signed = await api.request(
        "POST",
        f"/api/process/tasks/{path}/{nxt[0]['id']}/complete",
        {"variables": {"approved": True}},
        WAIT,
    )
    if signed.status != 200:
        raise Failed(f"sign-off {signed.status}")
    message = {"messageName": MESSAGE, "waitUntil": "confirmation", "variables": {"paid": True}}
    message_ms, answer = await _timed(
        api.request("POST", f"/api/process/message/{path}", message, WAIT), calls["message"]
    )
    if answer.status != 200:
        raise Failed(f"message answer {answer.status} {answer.body[:200]!r}")
    return task_ms, message_ms


async def _through_engine(engine: Engine, key: str, calls: dict[str, Calls]) -> tuple[float, float]:
    started = await engine.call(
        "POST",
        f"/process-definition/key/{PROCESS}/start",
        {"businessKey": key, "variables": {"orderId": {"value": key, "type": "String"}}},
    )
    instance = str(started["id"])
    review = await _until_task(lambda: _engine_tasks(engine, instance), "review")

    async def complete_and_see_next() -> dict[str, Any]:
        await engine.call("POST", f"/task/{review['id']}/complete", {"variables": {}})
        return await _until_task(lambda: _engine_tasks(engine, instance), "sign_off")

    task_ms, sign_off = await _timed(complete_and_see_next(), calls["task"])
    approved = {"approved": {"value": True, "type": "Boolean"}}
    await engine.call("POST", f"/task/{sign_off['id']}/complete", {"variables": approved})
    correlate = {"messageName": MESSAGE, "processInstanceId": instance}
    message_ms, _ = await _timed(
        engine.pool.request("POST", f"{engine.base}/message", correlate), calls["message"]
    )
    return task_ms, message_ms


async def run(run_: Run, stack: Stack, profile: Profile) -> dict[str, Any]:
    if why := ours.available("flowgate.services.api"):
        return {"skipped": why}
    async with CamundaClient(stack.engine_url) as client:
        await deploy_directory(client, BUNDLED_BPMN)
    prefix = f"bc{uuid.uuid4().hex[:6]}"
    database_url = ours.new_schema(stack, "conversation")
    server = ours.start_api(
        run_, stack, engine_url=stack.engine_url, prefix=prefix,
        database_url=database_url, cpu=SERVER_CPU,
    )  # fmt: skip
    ours.start_worker(
        run_, stack, engine_url=stack.engine_url, prefix=prefix,
        database_url=database_url, cpu=None,
    )  # fmt: skip
    api, engine = Pool("127.0.0.1", server.port, 16), Engine(stack.engine_url, connections=16)
    sides: dict[str, dict[str, list[float]]] = {
        "flowgate": {"task": [], "message": []},
        "engine": {"task": [], "message": []},
    }
    counted = {side: {what: Calls(stack) for what in ("task", "message")} for side in sides}
    failures: list[str] = []
    try:
        waiting = [f"{prefix}-w{n}" for n in range(profile.conversation_background)]
        gate = asyncio.Semaphore(16)

        async def park(cid: str) -> None:
            async with gate:
                body = {"processKey": PROCESS, "correlationId": cid, "variables": {"orderId": cid}}
                await api.request("POST", "/api/process/start", body, {"Prefer": "respond-async"})

        await asyncio.gather(*(park(cid) for cid in waiting))
        for n in range(profile.rounds * profile.conversation_probes):
            for side in sides:
                key = f"{prefix}-{side[0]}{n}"
                try:
                    task_ms, message_ms = await (
                        _through_flowgate(api, key, counted[side])
                        if side == "flowgate"
                        else _through_engine(engine, key, counted[side])
                    )
                except (Failed, RuntimeError, KeyError, TypeError) as exc:
                    failures.append(f"{side}: {exc}")
                    continue
                sides[side]["task"].append(task_ms)
                sides[side]["message"].append(message_ms)
    finally:
        await api.close()
        await engine.close()
    result = {
        side: {what: summary(values) for what, values in measured.items()}
        for side, measured in sides.items()
    }
    calls = {
        side: {
            what: round(sum(c.counted) / len(c.counted), 2) if c.counted else None
            for what, c in by_action.items()
        }
        for side, by_action in counted.items()
    }
    for what in ("task", "message"):
        print(
            f"  {what}: flowgate p50 {result['flowgate'][what].get('median')} ms"
            f" ({calls['flowgate'][what]} engine calls), engine alone p50"
            f" {result['engine'][what].get('median')} ms ({calls['engine'][what]})"
        )
    return {
        "method": __doc__,
        "runs_waiting": profile.conversation_background,
        "latency_ms": result,
        "engine_calls": calls,
        "failed": len(failures),
        "failures_sample": failures[:3],
    }
