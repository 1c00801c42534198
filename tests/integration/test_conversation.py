"""Talking to a running process, on the real engine: the example approve-order
(bpmn/approve-order.bpmn) has two user tasks, then waits for a message or a timer."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx
import orjson
import pytest
from flowgate_client import ApiError, AsyncClient
from flowgate_client.sse import Decoder
from pydantic import BaseModel

from flowgate.services.worker.handlers import approve_order
from flowgate.services.worker.registry import Process, Registry, Step
from flowgate.shared.camunda import CamundaClient, TopicRequest, UserTask
from flowgate.shared.settings import Settings
from tests.helpers.api import Api, cid, running_app, start_body
from tests.helpers.engine import EngineAdmin, bpmn, deploy_bpmn, one_task_bpmn
from tests.helpers.waiting import until
from tests.helpers.worker import running_worker

MakeSettings = Callable[..., Settings]
ORDER = "approve-order"


@pytest.fixture
async def api(make_settings: MakeSettings, engine_url: str) -> AsyncIterator[Api]:
    await deploy_bpmn(engine_url)
    settings = make_settings(camunda_base_url=engine_url, sync_timeout_ms=5_000)
    async with running_app(settings) as running:
        yield running


async def order(api: Api, **variables: Any) -> str:
    """A started approve-order run, waiting at its first user task."""
    correlation_id = cid()
    started = await api.client.post(
        "/api/process/start",
        json=start_body(correlation_id, ORDER, orderId=correlation_id, **variables),
        headers={"Prefer": "wait=1"},
    )
    assert started.status_code == 202, started.text
    return correlation_id


async def tasks(api: Api, correlation_id: str) -> list[dict[str, Any]]:
    listed = await api.client.get(f"/api/process/tasks/{correlation_id}")
    assert listed.status_code == 200, listed.text
    found: list[dict[str, Any]] = listed.json()["tasks"]
    return found


async def complete(api: Api, correlation_id: str, task_id: str, **variables: Any) -> httpx.Response:
    return await api.client.post(
        f"/api/process/tasks/{correlation_id}/{task_id}/complete",
        json={"variables": variables},
        headers={"Prefer": "wait=10"},
    )


async def test_completing_a_user_task_answers_with_the_next_one(api: Api) -> None:
    correlation_id = await order(api)
    [review] = await tasks(api, correlation_id)
    assert (review["taskDefinitionKey"], review["name"]) == ("review", "Review the order")
    assert review["formKey"] == "embedded:app:forms/review.html"

    answer = await complete(api, correlation_id, review["id"], reviewed=True)

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["status"], body["correlationId"]) == ("pending", correlation_id)
    assert [t["taskDefinitionKey"] for t in body["tasks"]] == ["sign_off"]
    assert answer.headers["content-location"] == f"/api/process/status/{correlation_id}"
    assert body["tasks"] == await tasks(api, correlation_id)


async def test_of_two_concurrent_completions_one_is_200_and_the_other_409(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    correlation_id = await order(api)
    [review] = await tasks(api, correlation_id)
    # The race at its narrowest: whichever completion reads the run's tasks second does so
    # only once the first has completed the task in the engine, so it finds the task gone.
    camunda = api.deps.camunda
    read, send = camunda.user_tasks, camunda.complete_user_task
    sent, reads = asyncio.Event(), 0

    async def user_tasks(instance_id: str) -> list[UserTask]:
        nonlocal reads
        reads += 1
        if reads > 1:
            await asyncio.wait_for(sent.wait(), timeout=10)
        return await read(instance_id)

    async def complete_user_task(task_id: str, *, variables: Mapping[str, Any]) -> None:
        try:
            await send(task_id, variables=variables)
        finally:
            sent.set()

    monkeypatch.setattr(camunda, "user_tasks", user_tasks)
    monkeypatch.setattr(camunda, "complete_user_task", complete_user_task)
    first, second = await asyncio.gather(
        complete(api, correlation_id, review["id"]),
        complete(api, correlation_id, review["id"]),
    )
    assert sorted([first.status_code, second.status_code]) == [200, 409]
    again = await complete(api, correlation_id, review["id"])
    assert again.status_code == 409
    assert "completed already" in again.json()["message"]


async def test_a_task_of_another_run_or_an_unknown_run_is_404(api: Api) -> None:
    mine, theirs = await order(api), await order(api)
    [their_task] = await tasks(api, theirs)
    refused = await complete(api, mine, their_task["id"])
    assert refused.status_code == 404
    assert refused.json()["field"] == "taskId"
    assert (await complete(api, mine, "no-such-task")).status_code == 404
    unknown = cid()
    assert (await api.client.get(f"/api/process/tasks/{unknown}")).status_code == 404
    assert (await complete(api, unknown, their_task["id"])).status_code == 404
    # Their task is untouched.
    assert [t["id"] for t in await tasks(api, theirs)] == [their_task["id"]]


async def test_a_rejected_order_ends_and_the_completion_answers_with_its_end(api: Api) -> None:
    correlation_id = await order(api)
    [review] = await tasks(api, correlation_id)
    assert (await complete(api, correlation_id, review["id"])).status_code == 200
    [sign_off] = await tasks(api, correlation_id)

    ended = await complete(api, correlation_id, sign_off["id"], approved=False)

    assert ended.status_code == 200, ended.text
    assert ended.json()["status"] == "ok"
    assert await tasks(api, correlation_id) == []
    late = await complete(api, correlation_id, sign_off["id"])
    assert late.status_code == 409


async def test_an_approved_order_pauses_at_its_message_wait(api: Api) -> None:
    correlation_id = await order(api)
    for variables in ({}, {"approved": True}):
        [task] = await tasks(api, correlation_id)
        answer = await complete(api, correlation_id, task["id"], **variables)
        assert answer.status_code == 200, answer.text
    # No user task is open now: the run waits for the payment service's message.
    assert answer.json()["tasks"] == []
    assert answer.json()["status"] == "pending"


# --- fix and continue ----------------------------------------------------------------------


class NoInput(BaseModel):
    pass


def two_tasks(key: str) -> bytes:
    tasks = "".join(
        f"""<bpmn:serviceTask id="{name}" camunda:type="external" camunda:topic="{key}.{name}">
      <bpmn:incoming>{incoming}</bpmn:incoming><bpmn:outgoing>{outgoing}</bpmn:outgoing>
    </bpmn:serviceTask>
    <bpmn:sequenceFlow id="{outgoing}" sourceRef="{name}" targetRef="{target}" />
    """
        for name, incoming, outgoing, target in (
            ("first", "f1", "f2", "second"),
            ("second", "f2", "f_end", "end"),
        )
    )
    flow = '<bpmn:sequenceFlow id="f1" sourceRef="start" targetRef="first" />'
    return bpmn(key, flow + tasks).encode()


async def test_an_incident_run_retried_goes_on_from_its_failed_step_only(
    make_settings: MakeSettings, engine_url: str
) -> None:
    key = f"retry-{uuid.uuid4().hex[:8]}"
    process = Process(
        key,
        [
            Step("first", "First done", "First failed"),
            Step("second", "Second done", "Second failed", retries=0, finishes_run=True),
        ],
    )
    calls: Counter[str] = Counter()
    downstream_up = False

    @process.handler("first")
    async def first(data: NoInput) -> dict[str, bool]:
        calls["first"] += 1
        return {"firstDone": True}

    @process.handler("second")
    async def second(data: NoInput) -> dict[str, bool]:
        calls["second"] += 1
        if not downstream_up:
            raise RuntimeError("downstream is down")
        return {"done": True}

    async with CamundaClient(engine_url) as camunda:
        await camunda.deploy(key, {f"{key}.bpmn": two_tasks(key)})
    settings = make_settings(
        camunda_base_url=engine_url,
        camunda_async_response_timeout_ms=500,
        worker_health_port=0,
    )
    correlation_id = cid()
    wait = {"Prefer": "wait=20"}
    async with running_app(settings) as api, running_worker(settings, Registry.of([process])):
        failed = await api.client.post(
            "/api/process/start", json=start_body(correlation_id, key), headers=wait
        )
        assert failed.status_code == 500, failed.text
        assert failed.json()["error"] == "Second failed: downstream is down"
        assert (await api.client.get(f"/api/process/status/{correlation_id}")).status_code == 500

        downstream_up = True
        retried = await api.client.post(f"/api/process/retry/{correlation_id}", headers=wait)

        assert retried.status_code == 200, retried.text
        assert retried.json()["result"] == {"done": True}
        assert calls == {"first": 1, "second": 2}, "a completed step ran again"
        status = await api.client.get(f"/api/process/status/{correlation_id}")
        assert (status.status_code, status.json()["status"]) == (200, "ok")
        again = await api.client.post(f"/api/process/retry/{correlation_id}")
        assert again.status_code == 409
        assert again.json()["status"] == "ok"
        log = f"/api/event-log/{correlation_id}?by=correlationId"

        async def audited() -> bool:
            rows = (await api.client.get(log)).json()["eventLog"]
            return "retried" in [row["status"] for row in rows]

        await until(audited, timeout_s=10, what="the retry in the audit trail")
        assert (await api.client.post(f"/api/process/retry/{cid()}")).status_code == 404


# --- messages ------------------------------------------------------------------------------


@pytest.fixture
async def booking(make_settings: MakeSettings, engine_url: str) -> AsyncIterator[Api]:
    """The API and a worker that books approved orders."""
    await deploy_bpmn(engine_url)
    settings = make_settings(
        camunda_base_url=engine_url,
        sync_timeout_ms=5_000,
        message_hold_ms=3_000,
        camunda_async_response_timeout_ms=500,
        worker_health_port=0,
    )
    async with (
        running_app(settings) as api,
        running_worker(settings, Registry.of([approve_order.process])),
    ):
        yield api


async def send(api: Api, correlation_id: str, **body: Any) -> httpx.Response:
    return await api.client.post(
        f"/api/process/message/{correlation_id}",
        json={"messageName": "order-confirmed", **body},
        headers={"Prefer": "wait=15"},
    )


async def approve(api: Api, correlation_id: str) -> httpx.Response:
    """Review and sign the order off: its message wait is armed by the second."""
    [review] = await tasks(api, correlation_id)
    assert (await complete(api, correlation_id, review["id"])).status_code == 200
    [sign_off] = await tasks(api, correlation_id)
    return await complete(api, correlation_id, sign_off["id"], approved=True)


async def confirmations(engine_url: str, instance_id: str) -> int:
    async with EngineAdmin(engine_url) as admin:
        done = await admin.historic_activities(instance_id, activityId="confirmation")
    return len(done)


@pytest.mark.parametrize("early_s", [0.0, 0.1, 0.5])
async def test_a_message_sent_before_its_wait_is_armed_is_held_and_correlated_once(
    booking: Api, engine_url: str, early_s: float
) -> None:
    correlation_id = await order(booking)
    [review] = await tasks(booking, correlation_id)
    assert (await complete(booking, correlation_id, review["id"])).status_code == 200
    [sign_off] = await tasks(booking, correlation_id)

    sending = asyncio.create_task(
        send(booking, correlation_id, variables={"paymentReference": "pay-7"}, messageId="m-1")
    )
    await asyncio.sleep(early_s)
    signed = await complete(booking, correlation_id, sign_off["id"], approved=True)
    sent = await sending

    assert signed.status_code == 200, signed.text
    assert sent.status_code == 200, sent.text
    assert sent.json()["status"] == "ok"
    assert sent.json()["data"] == {
        "orderId": correlation_id,
        "booked": True,
        "paymentReference": "pay-7",
    }
    instance = (await booking.deps.store.get(correlation_id)).instance_id  # type: ignore[union-attr]
    assert instance is not None
    assert await confirmations(engine_url, instance) == 1
    # The same messageId again: not correlated again, answered alike.
    again = await send(
        booking, correlation_id, variables={"paymentReference": "pay-7"}, messageId="m-1"
    )
    assert again.status_code in (200, 409)
    assert await confirmations(engine_url, instance) == 1


async def test_a_message_held_by_a_replica_that_went_away_is_correlated_by_another(
    make_settings: MakeSettings, engine_url: str
) -> None:
    await deploy_bpmn(engine_url)
    settings = make_settings(
        camunda_base_url=engine_url, message_hold_ms=30_000, shutdown_grace_s=1
    )
    async with (
        running_app(settings) as survivor,
        running_worker(settings, Registry.of([approve_order.process])),
    ):
        correlation_id = await order(survivor)
        async with running_app(settings) as leaving:
            held = await leaving.client.post(
                f"/api/process/message/{correlation_id}",
                json={"messageName": "order-confirmed", "messageId": "m-left",
                      "variables": {"paymentReference": "pay-9"}},
                headers={"Prefer": "wait=1"},
            )  # fmt: skip
            assert held.status_code == 202, held.text
        # Its holder is gone; the run waits for the message only now.
        assert (await approve(survivor, correlation_id)).status_code == 200
        done = await survivor.client.get(
            f"/api/process/status/{correlation_id}", headers={"Prefer": "wait=20"}
        )
        assert done.json()["status"] == "ok", done.text
        assert done.json()["data"]["paymentReference"] == "pay-9"
        state = await survivor.deps.store.get(correlation_id)
        assert state is not None
        assert state.instance_id is not None
        instance = state.instance_id
        assert await confirmations(engine_url, instance) == 1
        record = survivor.deps.keys.message(correlation_id, "m-left")
        assert await survivor.deps.redis.hget(record, "status") == b"correlated"
        # The client's retry with the same messageId is answered, never sent again.
        again = await send(
            survivor, correlation_id, variables={"paymentReference": "pay-9"}, messageId="m-left"
        )
        assert again.status_code in (200, 409), again.text
        assert await confirmations(engine_url, instance) == 1


async def test_a_message_to_a_waiting_run_answers_with_its_end(booking: Api) -> None:
    correlation_id = await order(booking)
    paused = await approve(booking, correlation_id)
    assert (paused.status_code, paused.json()["tasks"]) == (200, [])

    sent = await send(booking, correlation_id, variables={"paymentReference": "pay-1"})

    assert sent.status_code == 200, sent.text
    assert sent.json()["status"] == "ok"
    assert sent.json()["data"]["paymentReference"] == "pay-1"


async def test_one_message_id_sent_twice_at_once_is_correlated_once(
    booking: Api, engine_url: str
) -> None:
    correlation_id = await order(booking)
    body = {"variables": {"paymentReference": "pay-2"}, "messageId": "twice"}
    first = asyncio.create_task(send(booking, correlation_id, **body))
    second = asyncio.create_task(send(booking, correlation_id, **body))
    await asyncio.sleep(0.2)
    await approve(booking, correlation_id)
    answers = await asyncio.gather(first, second)
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert answers[0].json()["status"] == answers[1].json()["status"] == "ok"
    instance = (await booking.deps.store.get(correlation_id)).instance_id  # type: ignore[union-attr]
    assert instance is not None
    assert await confirmations(engine_url, instance) == 1
    conflict = await send(booking, correlation_id, messageName="other", messageId="twice")
    assert conflict.status_code == 422  # the id names another message


async def test_a_message_the_run_never_waits_for_is_409_naming_it(booking: Api) -> None:
    correlation_id = await order(booking)  # it waits at its review, not for a message
    held = await send(booking, correlation_id)
    assert held.status_code == 409, held.text
    assert "order-confirmed" in held.json()["message"]
    assert held.json()["field"] == "messageName"
    assert (await send(booking, cid())).status_code == 404


async def test_the_python_client_takes_part_in_a_run(booking: Api) -> None:
    correlation_id = cid()
    async with AsyncClient("http://api", http=booking.client) as flowgate:
        started = await flowgate.start(ORDER, correlation_id, {"orderId": correlation_id}, wait=1)
        assert started.status == "pending"
        [review] = await flowgate.tasks(correlation_id)
        paused = await flowgate.complete_task(correlation_id, review.id, wait=10)
        assert [task.task_definition_key for task in paused.tasks] == ["sign_off"]
        with pytest.raises(ApiError) as taken:
            await flowgate.complete_task(correlation_id, review.id)
        assert taken.value.status_code == 409
        await flowgate.complete_task(
            correlation_id, paused.tasks[0].id, {"approved": True}, wait=10
        )
        done = await flowgate.send_message(
            correlation_id, "order-confirmed", {"paymentReference": "p-9"}, message_id="m", wait=10
        )
        assert (done.status, done.data["paymentReference"]) == ("ok", "p-9")
        # Not an incident's run: refused (409) with its status, as a cancel of it would be.
        assert (await flowgate.retry(correlation_id)).status == "ok"


# --- what it waits for ---------------------------------------------------------------------


async def waiting_on(api: Api, correlation_id: str) -> list[dict[str, Any]]:
    status = await api.client.get(f"/api/process/status/{correlation_id}")
    assert status.status_code == 202, status.text
    found: list[dict[str, Any]] = status.json()["waitingOn"]
    return found


async def test_a_pending_status_says_what_the_run_waits_for(api: Api) -> None:
    correlation_id = await order(api)
    [review] = await waiting_on(api, correlation_id)
    assert review["type"] == "userTask"
    assert (review["activity"], review["taskId"]) == (
        "review",
        (await tasks(api, correlation_id))[0]["id"],
    )
    for variables in ({}, {"approved": True}):
        [task] = await tasks(api, correlation_id)
        assert (await complete(api, correlation_id, task["id"], **variables)).status_code == 200
    waits = {w["type"]: w for w in await waiting_on(api, correlation_id)}
    assert set(waits) == {"message", "timer"}  # the event-based gateway: whichever first
    assert waits["message"] == {
        "type": "message",
        "activity": "confirmation",
        "messageName": "order-confirmed",
    }
    assert waits["timer"]["activity"] == "confirmation_timeout"
    assert waits["timer"]["dueAt"].endswith("Z")
    # An external task nobody works on (the benchmark process, no worker here).
    other = cid()
    started = await api.client.post(
        "/api/process/start", json=start_body(other), headers={"Prefer": "respond-async"}
    )
    assert started.status_code == 202
    [task] = await waiting_on(api, other)
    assert (task["type"], task["topic"], task["retries"]) == (
        "externalTask",
        "benchmark.noop",
        None,
    )
    assert "lockedUntil" not in task
    # An unknown run's answer has none.
    assert "waitingOn" not in (await api.client.get(f"/api/process/status/{cid()}")).json()


async def test_an_actions_answer_and_the_next_status_read_show_the_waits_of_now(
    api: Api,
) -> None:
    """A status read shares what it read for a moment (waiting.py); the answer to an
    action reads afresh, in the look that finds the pause, and shares that instead."""
    correlation_id = await order(api)
    [review] = await waiting_on(api, correlation_id)  # read, and shared for a second
    answer = await complete(api, correlation_id, review["taskId"], reviewed=True)
    assert answer.status_code == 200, answer.text
    [sign_off] = answer.json()["waitingOn"]
    assert (sign_off["type"], sign_off["activity"]) == ("userTask", "sign_off")
    assert sign_off["taskId"] == answer.json()["tasks"][0]["id"]
    assert await waiting_on(api, correlation_id) == answer.json()["waitingOn"]


async def test_the_engine_lists_an_incident_among_the_waits(engine_url: str) -> None:
    key = f"incident-{uuid.uuid4().hex[:8]}"
    async with CamundaClient(engine_url) as camunda:
        await camunda.deploy(key, {f"{key}.bpmn": one_task_bpmn(key, f"{key}.work")})
        instance = await camunda.start_process(key, business_key=key)
        topic = TopicRequest(f"{key}.work", 10_000, variables=[])
        [task] = await camunda.fetch_and_lock(
            "w-incident", [topic], max_tasks=1, async_response_timeout_ms=5_000
        )
        await camunda.handle_failure(
            task.id, worker_id="w-incident", error_message="down", retries=0, retry_timeout_ms=0
        )
        waits = (await camunda.waits(instance.id)).entries
        await camunda.delete_process_instance(instance.id)
    assert {w["type"] for w in waits} == {"externalTask", "incident"}
    [incident] = [w for w in waits if w["type"] == "incident"]
    assert (incident["activity"], incident["message"]) == ("task", "down")


async def test_a_pending_runs_events_say_what_it_waits_for_and_which_tasks_open(
    api: Api,
) -> None:
    correlation_id = await order(api)

    async def started() -> bool:
        return await api.deps.store.steps.find(correlation_id, "start") is not None

    await until(started, timeout_s=10, what="the start event recorded")
    # (The in-process transport hands the body over at its end: the stream's own counter
    # says what it has sent so far.)
    sent = api.deps.metrics.stream_events.labels("task_created")

    def created() -> float:
        return float(sent._value.get())

    before = created()
    streaming = asyncio.create_task(api.client.get(f"/api/process/events/{correlation_id}"))
    [review] = await tasks(api, correlation_id)
    await until(lambda: created() == before + 1, what="the open task told")
    done = await complete(api, correlation_id, review["id"], reviewed=True)
    [sign_off] = done.json()["tasks"]
    await until(lambda: created() == before + 2, what="the next task told")
    await api.client.post(f"/api/process/cancel/{correlation_id}")  # so the stream ends
    decoder, events = Decoder(), []
    for line in (await asyncio.wait_for(streaming, 10)).text.splitlines():
        if (event := decoder.feed(line)) is not None:
            events.append((event.event, orjson.loads(event.data)))

    steps = [body for kind, body in events if kind == "step"]
    assert steps[0]["step"] == "start"
    assert [(w["type"], w["activity"]) for w in steps[0]["waitingOn"]] == [("userTask", "review")]
    # The cancel closes the open task too: the stream tells it if the engine's report of
    # that reached flowgate before the run's end did.
    while_it_ran = [
        ("task_created", review["id"]),
        ("task_completed", review["id"]),
        ("task_created", sign_off["id"]),
    ]
    closed = ("task_completed", sign_off["id"])
    assert told(events) in (while_it_ran, [*while_it_ran, closed])
    activities = [body["activity"] for kind, body in events if kind.startswith("task_")]
    assert activities[:3] == ["review", "review", "sign_off"]


def told(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, str]]:
    return [(kind, body["taskId"]) for kind, body in events if kind.startswith("task_")]


async def test_a_run_past_its_steps_threshold_is_stalled_once_with_two_replicas(
    make_settings: MakeSettings, engine_url: str
) -> None:
    key = f"stall-{uuid.uuid4().hex[:8]}"
    declared = """<bpmn:sequenceFlow id="s1" sourceRef="start" targetRef="review" />
    <bpmn:userTask id="review"><bpmn:extensionElements><camunda:properties>
      <camunda:property name="flowgate:stallAfter" value="PT1S" />
    </camunda:properties></bpmn:extensionElements>
      <bpmn:incoming>s1</bpmn:incoming><bpmn:outgoing>f_end</bpmn:outgoing></bpmn:userTask>
    <bpmn:sequenceFlow id="f_end" sourceRef="review" targetRef="end" />"""
    text = bpmn(key, declared).replace("<bpmn:outgoing>f1<", "<bpmn:outgoing>s1<")
    async with CamundaClient(engine_url) as camunda:
        await camunda.deploy(key, {f"{key}.bpmn": text.encode()})
    settings = make_settings(camunda_base_url=engine_url, stall_interval_ms=200)
    async with running_app(settings) as a, running_app(settings) as b:
        correlation_id = cid()
        started = await a.client.post(
            "/api/process/start",
            json=start_body(correlation_id, key),
            headers={"Prefer": "respond-async"},
        )
        assert started.status_code == 202
        stalled = [api.deps.metrics.runs_stalled.labels(key, "review") for api in (a, b)]

        def raised() -> float:
            return sum(float(counter._value.get()) for counter in stalled)

        await until(lambda: raised() >= 1, timeout_s=15, what="the stall")
        await asyncio.sleep(0.6)  # three more passes: none raises it again
        assert raised() == 1
        events = await a.client.get(f"/api/process/event-log/{correlation_id}")
        rows = [e for e in events.json()["eventLog"] if e["status"] == "stalled"]
        assert [row["step_name"] for row in rows] == ["review"]
        await b.client.post(f"/api/process/cancel/{correlation_id}")
        stream = await b.client.get(f"/api/process/events/{correlation_id}")
    decoder, told = Decoder(), []
    for line in stream.text.splitlines():
        if (event := decoder.feed(line)) is not None and event.event == "stalled":
            told.append(orjson.loads(event.data))
    assert [(s["activity"], s["thresholdS"]) for s in told] == [("review", 1.0)]
