"""Milestones, live progress, cancellation and callbacks, over HTTP on two replicas, with a
real engine, Redis, Postgres and a flowgate worker.

The process: start -> ``prepare`` (an external task a flowgate worker does) -> ``approve``
(a user task, completed in the engine by the test) -> end; so a run stays pending between
its milestones for as long as the test wants.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from flowgate_client import AsyncClient, RunCancelled
from flowgate_client.sse import Decoder
from pydantic import BaseModel
from standardwebhooks import Webhook

from flowgate.services.background import callbacks
from flowgate.services.worker.registry import Process, Registry, Step
from flowgate.shared import postgres
from flowgate.shared.camunda import CamundaClient
from flowgate.shared.deployment import deploy_directory
from flowgate.shared.settings import Settings
from tests.helpers.api import BENCHMARK, Api, cid, running_app
from tests.helpers.engine import EngineAdmin, bpmn, deploy_bpmn
from tests.helpers.net import CallbackReceiver
from tests.helpers.replica import replica
from tests.helpers.waiting import until
from tests.helpers.worker import running_worker

pytestmark = pytest.mark.slow

MakeSettings = Callable[..., Settings]
SECRET = "a-callback-secret"


class Anything(BaseModel):
    """The step takes no input of its own."""


def gated_process(key: str) -> Process:
    process = Process(key, [Step("prepare", success="Prepared", error="Not prepared")])

    @process.handler("prepare")
    async def prepare(data: Anything) -> dict[str, Any]:
        return {"prepared": True}

    return process


def gated_bpmn(key: str) -> str:
    return bpmn(
        key,
        f"""<bpmn:sequenceFlow id="f1" sourceRef="start" targetRef="prepare" />
    <bpmn:serviceTask id="prepare" camunda:type="external" camunda:topic="{key}.prepare">
      <bpmn:incoming>f1</bpmn:incoming><bpmn:outgoing>f2</bpmn:outgoing>
    </bpmn:serviceTask>
    <bpmn:sequenceFlow id="f2" sourceRef="prepare" targetRef="approve" />
    <bpmn:userTask id="approve"><bpmn:incoming>f2</bpmn:incoming>
      <bpmn:outgoing>f_end</bpmn:outgoing></bpmn:userTask>
    <bpmn:sequenceFlow id="f_end" sourceRef="approve" targetRef="end" />""",
    )


@dataclass
class Stack:
    a: Api
    b: Api
    key: str
    engine_url: str
    settings: Settings

    def url(self, kind: str, correlation_id: str) -> str:
        return f"/api/process/{kind}/{quote(correlation_id, safe='')}"

    async def start(self, api: Api, correlation_id: str, **body: Any) -> httpx.Response:
        wait = body.pop("wait", "respond-async")
        return await api.client.post(
            "/api/process/start",
            json={"processKey": self.key, "correlationId": correlation_id, **body},
            headers={"Prefer": wait if wait == "respond-async" else f"wait={wait}"},
        )

    async def approve(self, correlation_id: str, **variables: Any) -> None:
        """Complete the run's user task in the engine, as a person would."""
        async with EngineAdmin(self.engine_url) as admin:

            async def tasks() -> list[Any]:
                state = await self.a.deps.store.get(correlation_id)
                assert state is not None
                return await admin.user_tasks(str(state.instance_id))

            async def waiting() -> bool:
                return bool(await tasks())

            await until(waiting, timeout_s=20, what="the user task")
            [found] = await tasks()
            await admin.complete_user_task(found["id"], variables)


async def deploy(engine_url: str, tmp_path: Path, key: str, text: str) -> None:
    folder = tmp_path / f"bpmn-{key}"
    folder.mkdir()
    (folder / f"{key}.bpmn").write_text(text)
    async with CamundaClient(engine_url) as camunda:
        await deploy_directory(camunda, folder)


@pytest.fixture
async def stack(
    make_settings: MakeSettings, engine_url: str, tmp_path: Path
) -> AsyncIterator[Stack]:
    key = f"gated-{uuid.uuid4().hex[:8]}"
    await deploy_bpmn(engine_url)  # the bundled examples (benchmark)
    await deploy(engine_url, tmp_path, key, gated_bpmn(key))
    settings = make_settings(
        camunda_base_url=engine_url,
        sync_timeout_ms=1_000,
        callback_secret=SECRET,
        callback_allowed_hosts="127.0.0.1",
        callback_timeout_ms=1_000,
        camunda_async_response_timeout_ms=1_000,
        steps_in_redis_s=0,  # a finished run's steps are read from Postgres at once
    )
    async with (
        running_app(settings) as a,
        running_app(settings) as b,
        running_worker(settings, Registry.of([gated_process(key)])),
    ):
        yield Stack(a, b, key, engine_url, settings)


def _sent(data: Any) -> Any:
    """An event's data less ``waitingOn`` (what the run waited for when it was sent)."""
    return {k: v for k, v in data.items() if k != "waitingOn"} if isinstance(data, dict) else data


def parse_stream(text: str) -> list[tuple[str, str, Any]]:
    """(id, event, data) of every event in a Server-Sent Events body."""
    decoder, events = Decoder(), []
    for line in text.splitlines():
        if raw := decoder.feed(line):
            events.append((raw.id or "", raw.event, orjson.loads(raw.data)))
    return events


# --- milestones ------------------------------------------------------------------------------


async def test_a_start_waiting_for_a_step_answers_when_a_worker_has_done_it(stack: Stack) -> None:
    run = cid()
    answer = await stack.start(stack.a, run, waitUntil="prepare", wait=20)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "pending"
    assert body["milestone"]["step"] == "prepare"
    assert body["milestone"]["status"] == "ok"
    assert body["milestone"]["data"] == {"prepared": True}
    assert answer.headers["content-location"] == body["statusUrl"] == stack.url("status", run)

    # On the other replica, from the record at once (it was reached before this asked).
    again = await stack.b.client.get(stack.url("status", run), params={"until": "prepare"})
    assert again.status_code == 200
    assert again.json()["milestone"]["step"] == "prepare"

    # A user task as the milestone, parked on B, reached through the engine's history.
    parked = asyncio.create_task(
        stack.b.client.get(stack.url("status", run), params={"until": "approve", "wait": 20})
    )
    await until(lambda: stack.b.deps.waitroom.parked == 1, what="the long-poll to park")
    await stack.approve(run, approved=True)
    reached = (await parked).json()
    # The step and the run's end come in one watcher pass: either answer is right.
    assert reached.get("milestone", {}).get("step") == "approve" or reached["status"] == "ok"
    final = await stack.a.client.get(stack.url("status", run), params={"wait": 20})
    assert final.status_code == 200
    assert final.json()["data"]["approved"] is True


async def test_a_milestone_not_reached_answers_the_end_or_202(stack: Stack) -> None:
    run = cid()
    assert (await stack.start(stack.a, run, waitUntil="prepare", wait=20)).status_code == 200
    waiting = await stack.b.client.get(
        stack.url("status", run), params={"until": "no-such-step", "wait": 1}
    )
    assert waiting.status_code == 202
    assert "milestone" not in waiting.json()
    await stack.approve(run)
    ended = await stack.b.client.get(
        stack.url("status", run), params={"until": "no-such-step", "wait": 20}
    )
    assert ended.status_code == 200
    assert ended.json()["status"] == "ok"
    bad = await stack.b.client.get(stack.url("status", run), params={"until": "a/b"})
    assert bad.status_code == 400
    assert bad.json()["field"] == "until"


# --- live progress ---------------------------------------------------------------------------


async def test_the_event_stream_sends_every_step_then_the_end_and_resumes(stack: Stack) -> None:
    run = cid()
    assert (await stack.start(stack.a, run)).status_code == 202
    streaming = asyncio.create_task(
        stack.b.client.get(stack.url("events", run), headers={"Accept": "text/event-stream"})
    )
    await until(lambda: stack.b.deps.waitroom.parked >= 1, what="the stream to follow the run")
    await stack.approve(run, approved=True)
    live = await streaming
    assert live.status_code == 200
    assert live.headers["content-type"].startswith("text/event-stream")
    assert live.headers["x-accel-buffering"] == "no"
    assert live.text.startswith(": connected")
    events = parse_stream(live.text)
    # The user task it waited at was told as it opened (it may have ended with the run).
    told = [(kind, data["activity"]) for _, kind, data in events if kind.startswith("task_")]
    assert told[0] == ("task_created", "approve")
    events = [event for event in events if not event[1].startswith("task_")]
    kinds = [kind for _, kind, _ in events]
    assert kinds[-1] == "end"
    assert set(kinds[:-1]) == {"step"}
    # In the order recorded: the worker's step at once, the engine's a pass later.
    steps = [data["step"] for _, kind, data in events if kind == "step"]
    assert {"start", "prepare", "approve"} <= set(steps)
    assert steps.index("prepare") < steps.index("approve")
    ids = [event_id for event_id, _, _ in events]
    assert len(set(ids)) == len(ids)
    end = events[-1][2]
    assert end["status"] == "ok"
    assert end["data"]["approved"] is True

    # A reconnect after the second event gets the rest, nothing twice.
    resumed = await stack.a.client.get(stack.url("events", run), headers={"Last-Event-ID": ids[1]})
    assert [event_id for event_id, _, _ in parse_stream(resumed.text)] == ids[2:]
    # The same once its steps have left Redis for Postgres.
    steps_key = stack.a.deps.keys.steps(run)

    async def compacted() -> bool:
        return await stack.a.deps.redis.exists(steps_key) == 0

    await until(compacted, timeout_s=20, what="the steps to leave Redis")
    again = await stack.b.client.get(stack.url("events", run))
    # The same events, less what the run waited for when each was sent live.
    assert "waitingOn" in events[0][2], "a step sent while the run was pending says it"
    assert parse_stream(again.text) == [(i, kind, _sent(data)) for i, kind, data in events]
    resumed = await stack.a.client.get(stack.url("events", run), headers={"Last-Event-ID": ids[1]})
    assert [event_id for event_id, _, _ in parse_stream(resumed.text)] == ids[2:]
    # One after the end gets nothing more (an EventSource stops on 204).
    after_end = await stack.a.client.get(stack.url("events", run), headers={"Last-Event-ID": "end"})
    assert after_end.status_code == 204
    unknown = await stack.a.client.get(stack.url("events", cid()))
    assert unknown.status_code == 404
    bad = await stack.a.client.get(stack.url("events", run), headers={"Last-Event-ID": "x"})
    assert bad.status_code == 400


async def test_a_stream_cut_by_its_replicas_drain_resumes_on_another_with_no_gap(
    stack: Stack, tmp_path: Path
) -> None:
    run = cid()
    assert (await stack.start(stack.a, run, waitUntil="prepare", wait=20)).status_code == 200
    received: list[tuple[str, str]] = []
    async with (
        replica(stack.settings, tmp_path, "doomed") as doomed,
        httpx.AsyncClient(base_url=doomed.url, timeout=30) as http,
        http.stream("GET", stack.url("events", run)) as stream,
    ):
        decoder = Decoder()
        lines = stream.aiter_lines()
        while len(received) < 2:  # start and prepare, then the replica goes away
            if (raw := decoder.feed(await anext(lines))) and not raw.event.startswith("task_"):
                received.append((raw.id or "", raw.event))
        doomed.process.terminate()
        async for line in lines:  # the drain ends the stream, with a retry hint
            decoder.feed(line)
        assert decoder.retry_ms is not None
    async with AsyncClient(str(stack.b.client.base_url), http=stack.b.client) as flowgate:
        following = asyncio.create_task(
            _collect(flowgate.events(run, last_event_id=received[-1][0]))
        )
        await stack.approve(run)
        rest = await following
        everything = await _collect(flowgate.events(run))
    # (User tasks are told on each connection anew: the steps and the end are the record.)
    recorded = [(e.id, e.kind) for e in rest if not e.kind.startswith("task_")]
    assert received + recorded == [(e.id, e.kind) for e in everything]
    assert everything[-1].kind == "end"


async def _collect(events: AsyncIterator[Any]) -> list[Any]:
    return [event async for event in events]


# --- cancellation ----------------------------------------------------------------------------


async def test_a_cancel_on_one_replica_answers_a_start_parked_on_another(stack: Stack) -> None:
    run = cid()
    assert (await stack.start(stack.a, run, waitUntil="prepare", wait=20)).status_code == 200
    parked = asyncio.create_task(stack.start(stack.b, run, wait=30))
    await until(lambda: stack.b.deps.waitroom.parked == 1, what="the start to park on B")
    cancelled = await stack.a.client.post(
        stack.url("cancel", run), json={"reason": "the customer withdrew"}
    )
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["error"] == "the customer withdrew"
    woken = await asyncio.wait_for(parked, 5)
    assert woken.status_code == 409
    assert woken.json()["status"] == "cancelled"

    state = await stack.a.deps.store.get(run)
    assert state is not None
    async with EngineAdmin(stack.engine_url) as admin:
        history = await admin.historic_process_instance(str(state.instance_id))
    assert history is not None
    assert history["state"] == "EXTERNALLY_TERMINATED"
    # Twice is harmless; status and the stream say cancelled.
    again = await stack.b.client.post(stack.url("cancel", run))
    assert again.status_code == 200
    assert again.json()["status"] == "cancelled"
    status = await stack.b.client.get(stack.url("status", run))
    assert status.status_code == 409
    assert status.json()["status"] == "cancelled"
    stream = await stack.b.client.get(stack.url("events", run))
    assert parse_stream(stream.text)[-1][1:] == ("end", status.json())

    async def stored() -> bool:
        row = await postgres.get_run(stack.a.deps.pool, run)
        events = await postgres.events_by_correlation(stack.a.deps.pool, run)
        cancel_rows = [e for e in events if e.step_name == "cancel"]
        return row is not None and row.status.value == "cancelled" and len(cancel_rows) == 1

    await until(stored, timeout_s=10, what="the cancelled row and its audit row")
    metrics = stack.a.deps.metrics.registry
    assert metrics.get_sample_value("flowgate_api_cancels_total", {"outcome": "cancelled"}) == 1


async def test_cancel_answers_409_for_an_ended_run_and_404_for_an_unknown_one(
    stack: Stack,
) -> None:
    run = cid()
    assert (await stack.start(stack.a, run, waitUntil="prepare", wait=20)).status_code == 200
    await stack.approve(run)
    ended = await stack.a.client.get(stack.url("status", run), params={"wait": 20})
    assert ended.json()["status"] == "ok"
    refused = await stack.a.client.post(stack.url("cancel", run))
    assert refused.status_code == 409
    assert refused.json() == ended.json()
    unknown = await stack.a.client.post(stack.url("cancel", cid()))
    assert unknown.status_code == 404
    assert unknown.json()["status"] == "not_found"
    too_long = await stack.a.client.post(stack.url("cancel", run), json={"reason": "x" * 1001})
    assert too_long.status_code == 400
    assert too_long.json()["field"] == "reason"


async def test_a_cancel_racing_a_completion_ends_in_exactly_one_state(stack: Stack) -> None:
    for _ in range(5):
        run = cid()
        started = await stack.a.client.post(
            "/api/process/start",
            json={"processKey": BENCHMARK, "correlationId": run},
            headers={"Prefer": "respond-async"},
        )
        assert started.status_code == 202
        cancel, complete = await asyncio.gather(
            stack.a.client.post(stack.url("cancel", run)),
            stack.b.client.post(
                "/api/process/complete",
                json={"correlationId": run, "status": "ok", "data": {"won": "complete"}},
            ),
        )
        final = (await stack.a.client.get(stack.url("status", run))).json()
        if final["status"] == "cancelled":
            assert cancel.status_code == 200
            assert complete.json()["changed"] is False
        else:
            assert final["status"] == "ok"
            assert complete.json()["changed"] is True
            assert cancel.status_code == 409


async def test_the_client_runs_a_process_and_raises_for_a_cancelled_one(stack: Stack) -> None:
    async with AsyncClient(str(stack.a.client.base_url), http=stack.a.client) as flowgate:
        run = cid()
        running = asyncio.create_task(flowgate.run(stack.key, run, {"n": 1}, timeout=30))
        await until(lambda: stack.a.deps.waitroom.parked == 1, what="the run to be followed")
        await stack.approve(run, approved=True)
        result = await running
        assert result["approved"] is True
        assert result["n"] == 1

        doomed = cid()
        following = asyncio.create_task(flowgate.run(stack.key, doomed, timeout=30))
        await until(lambda: stack.a.deps.waitroom.parked == 1, what="the run to be followed")
        assert (await flowgate.cancel(doomed, "no longer needed")).status == "cancelled"
        with pytest.raises(RunCancelled, match="no longer needed"):
            await following


# --- callbacks -------------------------------------------------------------------------------


async def test_a_callback_is_retried_until_delivered_and_signed(stack: Stack) -> None:
    async with CallbackReceiver([500, 200]) as receiver:
        run = cid()
        started = await stack.start(
            stack.a, run, callbackUrl=receiver.url, waitUntil="prepare", wait=20
        )
        assert started.status_code == 200
        await stack.approve(run, approved=True)
        await until(lambda: len(receiver.requests) == 2, timeout_s=20, what="two attempts")
    status = (await stack.a.client.get(stack.url("status", run))).json()
    ids = set()
    for attempt, (headers, body) in enumerate(receiver.requests, start=1):
        assert orjson.loads(body) == status
        assert headers["flowgate-attempt"] == str(attempt)
        assert headers["flowgate-delivery"] == quote(run, safe="")
        assert Webhook(SECRET.encode()).verify(body, dict(headers)) == status
        ids.add(headers["webhook-id"])
    state = await stack.a.deps.store.get(run)
    assert state is not None
    assert ids == {state.traceability_id}  # one id per run, on every attempt

    async def audited() -> bool:
        events = await postgres.events_by_correlation(stack.a.deps.pool, run)
        return [e.status for e in events if e.step_name == "callback"] == ["failed", "delivered"]

    await until(audited, timeout_s=10, what="an audit row per attempt")


async def test_an_end_is_delivered_at_once_whichever_replica_hears_of_it(
    make_settings: MakeSettings, engine_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No idle look for an hour: only the end's notice can make a replica deliver it.
    monkeypatch.setattr(callbacks, "IDLE_POLL_S", 3600.0)
    await deploy_bpmn(engine_url)
    settings = make_settings(camunda_base_url=engine_url, callback_allowed_hosts="127.0.0.1")
    async with (
        CallbackReceiver([204]) as receiver,
        running_app(settings) as a,
        running_app(settings) as b,
    ):
        run = cid()
        started = await a.client.post(
            "/api/process/start",
            json={"processKey": BENCHMARK, "correlationId": run, "callbackUrl": receiver.url},
            headers={"Prefer": "respond-async"},
        )
        assert started.status_code == 202
        await b.client.post("/api/process/complete", json={"correlationId": run, "status": "ok"})
        await asyncio.wait_for(receiver.arrived.wait(), 10)
    assert orjson.loads(receiver.requests[0][1])["status"] == "ok"


async def test_a_callback_survives_the_death_of_the_replica_delivering_it(
    make_settings: MakeSettings, engine_url: str
) -> None:
    await deploy_bpmn(engine_url)
    settings = make_settings(
        camunda_base_url=engine_url, callback_allowed_hosts="*", callback_timeout_ms=500
    )
    async with CallbackReceiver([None, 204]) as receiver:
        run = cid()
        async with running_app(settings) as a:
            started = await a.client.post(
                "/api/process/start",
                json={"processKey": BENCHMARK, "correlationId": run, "callbackUrl": receiver.url},
                headers={"Prefer": "respond-async"},
            )
            assert started.status_code == 202
            await a.client.post(
                "/api/process/complete", json={"correlationId": run, "status": "ok"}
            )
            await asyncio.wait_for(receiver.arrived.wait(), 10)
        # A is gone with the delivery in hand; B sends it once A's hold lapses.
        async with running_app(settings):
            await until(lambda: len(receiver.requests) == 2, timeout_s=20, what="B's attempt")
    assert receiver.requests[1][0]["flowgate-attempt"] == "2"


async def test_callbacks_are_off_until_their_hosts_are_allowed(
    make_settings: MakeSettings, engine_url: str
) -> None:
    settings = make_settings(camunda_base_url=engine_url)  # CALLBACK_ALLOWED_HOSTS unset
    async with running_app(settings) as api:
        refused = await api.client.post(
            "/api/process/start",
            json={"processKey": BENCHMARK, "correlationId": cid(), "callbackUrl": "http://x/"},
        )
    assert refused.status_code == 400
    assert "CALLBACK_ALLOWED_HOSTS allows no host" in refused.json()["message"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/hook", "http:// or https://"),
        ("/relative", "http:// or https://"),
        ("http://10.1.2.3/hook", "not in CALLBACK_ALLOWED_HOSTS"),
        ("http://evil.example.com/hook", "not in CALLBACK_ALLOWED_HOSTS"),
    ],
)
async def test_a_callback_url_that_may_not_be_called_is_400(
    make_settings: MakeSettings, engine_url: str, url: str, message: str
) -> None:
    await deploy_bpmn(engine_url)
    settings = make_settings(
        camunda_base_url=engine_url, callback_allowed_hosts="127.0.0.0/8,hooks.example.com"
    )
    async with running_app(settings) as api:
        refused = await api.client.post(
            "/api/process/start",
            json={"processKey": BENCHMARK, "correlationId": cid(), "callbackUrl": url},
        )
    assert refused.status_code == 400
    assert refused.json()["field"] == "callbackUrl"
    assert message in refused.json()["message"]
