"""CamundaClient over httpx.MockTransport: what goes on the wire and how errors map."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from pyreqwest.exceptions import (
    CauseErrorDetails,
    ConnectError,
    ConnectTimeoutError,
    ReadError,
    ReadTimeoutError,
    RequestError,
)
from pyreqwest.middleware import Next
from pyreqwest.request import Request
from pyreqwest.response import Response

from deploy.local.servers import free_port
from flowgate.shared.camunda import (
    BadRequest,
    CamundaClient,
    CamundaError,
    DefinitionNotFound,
    EngineError,
    EngineUnavailable,
    NotFound,
    TopicRequest,
)
from flowgate.shared.settings import Settings
from tests.helpers.engine import BASE_URL, FakeEngine, answering

BASE = BASE_URL


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def client(engine: FakeEngine) -> AsyncIterator[CamundaClient]:
    async with engine.client() as camunda:
        yield camunda


def task_json(**overrides: Any) -> dict[str, Any]:
    return {
        "id": "t1",
        "topicName": "onboard-user.run-background-check",
        "workerId": "w1",
        "processInstanceId": "p1",
        "processDefinitionKey": "onboard-user",
        "businessKey": "bk",
        "activityId": "run_background_check",
        "retries": None,
        "priority": 5,
        "lockExpirationTime": "2026-01-02T03:04:05.678+0000",
        "variables": {
            "user": {"type": "Json", "value": '{"id":"u1"}', "valueInfo": {}},
            "count": {"type": "Integer", "value": 3, "valueInfo": {}},
        },
        **overrides,
    }


# --- requests -----------------------------------------------------------------------------


async def test_start_process_sends_typed_variables(
    engine: FakeEngine, client: CamundaClient
) -> None:
    engine.answer_all(200, {"id": "p1", "definitionId": "d1", "businessKey": "bk", "ended": False})
    instance = await client.start_process(
        "onboard-user", business_key="bk", variables={"user": {"id": "u1"}, "n": 2**40}
    )
    assert engine.last.method == "POST"
    assert engine.last.url == f"{BASE}/process-definition/key/onboard-user/start"
    assert engine.last.headers["content-type"] == "application/json"
    assert engine.last_body == {
        "businessKey": "bk",
        "variables": {
            "user": {"type": "Json", "value": '{"id":"u1"}'},
            "n": {"type": "Long", "value": 2**40},
        },
    }
    assert (instance.id, instance.definition_id, instance.business_key) == ("p1", "d1", "bk")
    assert instance.ended is False


async def test_start_process_escapes_the_key(engine: FakeEngine, client: CamundaClient) -> None:
    engine.answer_all(200, {"id": "p1", "definitionId": "d1"})
    await client.start_process("a/b c")
    assert engine.last.url.raw_path == b"/engine-rest/process-definition/key/a%2Fb%20c/start"


async def test_unknown_process_key_is_definition_not_found(
    engine: FakeEngine, client: CamundaClient
) -> None:
    message = "No matching process definition with key: nope and no tenant-id"
    engine.answer_all(404, {"type": "RestException", "message": message, "code": None})
    with pytest.raises(DefinitionNotFound, match="nope") as caught:
        await client.start_process("nope")
    assert isinstance(caught.value, NotFound)
    assert caught.value.status_code == 404


async def test_fetch_and_lock_read_timeout_exceeds_the_long_poll(
    engine: FakeEngine, client: CamundaClient
) -> None:
    engine.answer_all(200, [])
    topics = [
        TopicRequest("a", 20_000),
        TopicRequest("b", 5_000, variables=["x"], business_key="bk", process_definition_key="k"),
    ]
    tasks = await client.fetch_and_lock("w1", topics, max_tasks=7, async_response_timeout_ms=30_000)
    assert tasks == []
    assert engine.last.url == f"{BASE}/external-task/fetchAndLock"
    assert engine.last_body == {
        "workerId": "w1",
        "maxTasks": 7,
        "usePriority": True,
        "sorting": [{"sortBy": "createTime", "sortOrder": "asc"}],
        "asyncResponseTimeout": 30_000,
        "topics": [
            {"topicName": "a", "lockDuration": 20_000, "localVariables": False},
            {
                "topicName": "b",
                "lockDuration": 5_000,
                "localVariables": False,
                "variables": ["x"],
                "businessKey": "bk",
                "processDefinitionKey": "k",
            },
        ],
    }


async def test_a_long_poll_may_take_its_async_response_timeout_beyond_the_timeout() -> None:
    """Over a real socket: the engine holds the poll longer than ``timeout_s``."""

    async def holding(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        await asyncio.sleep(0.5)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
        writer.write(b"content-length: 2\r\n\r\n[]")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(holding, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    topics = [TopicRequest("a", lock_duration_ms=1_000)]
    async with server, CamundaClient(f"http://127.0.0.1:{port}", timeout_s=0.2) as client:
        tasks = await client.fetch_and_lock(
            "w1", topics, max_tasks=1, async_response_timeout_ms=400
        )
        assert tasks == []
        with pytest.raises(EngineUnavailable):  # no long poll: timeout_s holds
            await client.fetch_and_lock("w1", topics, max_tasks=1, async_response_timeout_ms=None)


async def test_fetch_and_lock_without_long_poll_answers_at_once(
    engine: FakeEngine, client: CamundaClient
) -> None:
    engine.answer_all(200, [])
    await client.fetch_and_lock(
        "w1", [TopicRequest("a", 1_000)], max_tasks=1, async_response_timeout_ms=None
    )
    assert "asyncResponseTimeout" not in engine.last_body


async def test_fetched_tasks_are_decoded(engine: FakeEngine, client: CamundaClient) -> None:
    engine.answer_all(200, [task_json()])
    [task] = await client.fetch_and_lock(
        "w1", [TopicRequest("a", 1_000)], max_tasks=1, async_response_timeout_ms=None
    )
    assert task.id == "t1"
    assert task.topic_name == "onboard-user.run-background-check"
    assert (task.worker_id, task.process_instance_id, task.business_key) == ("w1", "p1", "bk")
    assert (task.process_definition_key, task.activity_id) == (
        "onboard-user",
        "run_background_check",
    )
    assert task.retries is None
    assert task.priority == 5
    assert task.lock_expiration_time == datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    assert task.variables == {"user": {"id": "u1"}, "count": 3}


async def test_complete_sends_typed_variables(engine: FakeEngine, client: CamundaClient) -> None:
    await client.complete(
        "t1", worker_id="w1", variables={"ok": True}, local_variables={"score": 1.5}
    )
    assert engine.last.url == f"{BASE}/external-task/t1/complete"
    assert engine.last_body == {
        "workerId": "w1",
        "variables": {"ok": {"type": "Boolean", "value": True}},
        "localVariables": {"score": {"type": "Double", "value": 1.5}},
    }


async def test_complete_without_variables_sends_only_the_worker(
    engine: FakeEngine, client: CamundaClient
) -> None:
    await client.complete("t1", worker_id="w1")
    assert engine.last_body == {"workerId": "w1"}


@pytest.mark.parametrize("retries", [0, 1, 3])
async def test_failure_always_sends_retries(
    engine: FakeEngine, client: CamundaClient, retries: int
) -> None:
    """An omitted retries means 0 to the engine, i.e. an incident: never leave it out."""
    await client.handle_failure(
        "t1", worker_id="w1", error_message="boom", retries=retries, retry_timeout_ms=0
    )
    assert engine.last.url == f"{BASE}/external-task/t1/failure"
    assert engine.last_body == {
        "workerId": "w1",
        "errorMessage": "boom",
        "retries": retries,
        "retryTimeout": 0,
    }


async def test_failure_truncates_the_message_and_keeps_details(
    engine: FakeEngine, client: CamundaClient
) -> None:
    await client.handle_failure(
        "t1",
        worker_id="w1",
        error_message="x" * 1000,
        error_details="traceback",
        retries=2,
        retry_timeout_ms=1_500,
    )
    body = engine.last_body
    assert body["errorMessage"] == "x" * 666
    assert body["errorDetails"] == "traceback"
    assert body["retryTimeout"] == 1_500


@pytest.mark.parametrize(("retries", "retry_timeout_ms"), [(-1, 0), (1, -5)])
async def test_failure_rejects_negative_numbers_before_sending(
    engine: FakeEngine, client: CamundaClient, retries: int, retry_timeout_ms: int
) -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        await client.handle_failure(
            "t1", worker_id="w1", error_message="e", retries=retries,
            retry_timeout_ms=retry_timeout_ms,
        )  # fmt: skip
    assert engine.requests == []


async def test_bpmn_error_body(engine: FakeEngine, client: CamundaClient) -> None:
    await client.handle_bpmn_error(
        "t1", worker_id="w1", error_code="VALIDATION_ERROR", error_message="bad", variables={"a": 1}
    )
    assert engine.last.url == f"{BASE}/external-task/t1/bpmnError"
    assert engine.last_body == {
        "workerId": "w1",
        "errorCode": "VALIDATION_ERROR",
        "errorMessage": "bad",
        "variables": {"a": {"type": "Integer", "value": 1}},
    }


async def test_extend_lock_and_unlock(engine: FakeEngine, client: CamundaClient) -> None:
    await client.extend_lock("t1", worker_id="w1", new_duration_ms=10_000)
    assert engine.last.url == f"{BASE}/external-task/t1/extendLock"
    assert engine.last_body == {"workerId": "w1", "newDuration": 10_000}
    await client.unlock("t1")
    assert engine.last.method == "POST"
    assert engine.last.url == f"{BASE}/external-task/t1/unlock"
    assert engine.last.content == b""


async def test_locked_tasks_queries_by_worker(engine: FakeEngine, client: CamundaClient) -> None:
    engine.answer_all(200, [task_json(variables=None)])
    [task] = await client.locked_tasks("w 1")
    assert engine.last.url.path == "/engine-rest/external-task"
    assert dict(engine.last.url.params) == {"workerId": "w 1", "locked": "true"}
    assert task.id == "t1"
    assert task.variables == {}


async def test_deploy_is_multipart_with_file_names(
    engine: FakeEngine, client: CamundaClient
) -> None:
    engine.answer_all(
        200,
        {
            "id": "dep1",
            "name": "flowgate",
            "deployedProcessDefinitions": {
                "benchmark:2:x": {"id": "benchmark:2:x", "key": "benchmark", "version": 2}
            },
        },
    )
    deployment = await client.deploy("flowgate", {"benchmark.bpmn": b"<xml/>"})
    request = engine.last
    assert request.url == f"{BASE}/deployment/create"
    assert request.headers["content-type"].startswith("multipart/form-data")
    body = request.content
    assert b'name="deployment-name"\r\n\r\nflowgate' in body
    assert b'name="enable-duplicate-filtering"\r\n\r\ntrue' in body
    assert b'name="deploy-changed-only"\r\n\r\ntrue' in body
    assert b'name="benchmark.bpmn"; filename="benchmark.bpmn"' in body
    assert [(d.key, d.version) for d in deployment.process_definitions] == [("benchmark", 2)]


async def test_duplicate_deployment_has_no_new_definitions(
    engine: FakeEngine, client: CamundaClient
) -> None:
    engine.answer_all(200, {"id": "dep1", "name": "flowgate", "deployedProcessDefinitions": None})
    deployment = await client.deploy("flowgate", {"benchmark.bpmn": b"<xml/>"})
    assert deployment.process_definitions == ()


async def test_history_queries_read_from_a_moment_on_oldest_first(
    engine: FakeEngine, client: CamundaClient
) -> None:
    ended = {"id": "p1", "businessKey": "c1", "state": "COMPLETED",
             "endTime": "2025-01-31T12:00:00.123+0000", "deleteReason": None}  # fmt: skip
    engine.answer_all(200, [ended])
    after = datetime(2025, 1, 31, 11, 59, tzinfo=UTC)
    [instance] = await client.ended_instances(after, max_results=50)
    assert (instance.id, instance.state) == ("p1", "COMPLETED")
    assert instance.end_time == datetime(2025, 1, 31, 12, 0, 0, 123000, tzinfo=UTC)
    assert dict(engine.last.url.params) == {
        "finishedAfter": "2025-01-31T11:59:00.000+0000",
        "sortBy": "endTime",
        "sortOrder": "asc",
        "maxResults": "50",
    }


async def test_root_variables_leave_out_inner_scopes(
    engine: FakeEngine, client: CamundaClient
) -> None:
    engine.answer_all(
        200,
        [
            {"name": "doc", "type": "Json", "value": "[1]", "processInstanceId": "p1",
             "activityInstanceId": "p1"},
            {"name": "inner", "type": "String", "value": "x", "processInstanceId": "p1",
             "activityInstanceId": "task:1"},
        ],
    )  # fmt: skip
    assert await client.root_variables(["p1", "p2"]) == {"p1": {"doc": [1]}, "p2": {}}
    assert engine.last_body == {"processInstanceIdIn": ["p1", "p2"]}


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "error_class"),
    [
        (400, {"type": "RestException", "message": "locked by worker 'Y'", "code": 0}, BadRequest),
        (404, {"type": "RestException", "message": "does not exist", "code": 0}, NotFound),
        (500, {"type": "ProcessEngineException", "message": "boom", "code": 0}, EngineError),
        (503, {"type": "RestException", "message": "engine says no", "code": None}, EngineError),
    ],
)
async def test_engine_error_bodies_map_to_the_tree(
    engine: FakeEngine,
    client: CamundaClient,
    status: int,
    body: dict[str, Any],
    error_class: type[EngineError],
) -> None:
    engine.answer_all(status, body)
    with pytest.raises(error_class) as caught:
        await client.complete("t1", worker_id="w1")
    error = caught.value
    assert type(error) is error_class
    assert (error.status_code, error.type, error.message) == (status, body["type"], body["message"])
    assert error.code == body["code"]
    assert not error.is_optimistic_locking
    assert not error.is_deadlock


async def test_optimistic_locking_and_deadlock_are_recognised(
    engine: FakeEngine, client: CamundaClient
) -> None:
    engine.answer_all(500, {"type": "ProcessEngineException", "message": "ole", "code": 1})
    with pytest.raises(EngineError) as caught:
        await client.complete("t1", worker_id="w1")
    assert caught.value.is_optimistic_locking
    engine.answer_all(500, {"type": "OptimisticLockingException", "message": "ole", "code": None})
    with pytest.raises(EngineError) as caught:
        await client.complete("t1", worker_id="w1")
    assert caught.value.is_optimistic_locking
    engine.answer_all(500, {"type": "ProcessEngineException", "message": "deadlock", "code": 10000})
    with pytest.raises(EngineError) as caught:
        await client.complete("t1", worker_id="w1")
    assert caught.value.is_deadlock


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_gateway_errors_without_engine_body_are_unavailable(
    engine: FakeEngine, client: CamundaClient, status: int
) -> None:
    engine.default = httpx.Response(status, text="<html>Bad Gateway</html>")
    with pytest.raises(EngineUnavailable, match=str(status)):
        await client.complete("t1", worker_id="w1")


async def test_other_errors_without_engine_body_keep_the_text(
    engine: FakeEngine, client: CamundaClient
) -> None:
    engine.default = httpx.Response(500, text="Internal Server Error")
    with pytest.raises(EngineError) as caught:
        await client.complete("t1", worker_id="w1")
    assert caught.value.message == "Internal Server Error"


NO_CAUSE: CauseErrorDetails = {"causes": None}


@pytest.mark.parametrize(
    ("transport_error", "sent"),
    [
        (ConnectError("refused", NO_CAUSE), False),
        # pyreqwest 0.15 says "connect timeout" also for a request the server has read.
        (ConnectTimeoutError("connection timeout", NO_CAUSE), True),
        (ReadTimeoutError("slow", NO_CAUSE), True),
        (ReadError("eof", NO_CAUSE), True),
    ],
)
async def test_transport_errors_are_unavailable(transport_error: RequestError, sent: bool) -> None:
    async def fail(request: Request, _next: Next) -> Response:
        raise transport_error

    async with CamundaClient(BASE, middleware=fail) as client:
        with pytest.raises(EngineUnavailable) as caught:
            await client.start_process("k")
        assert caught.value.__cause__ is transport_error
        assert caught.value.request_sent is sent
        assert isinstance(caught.value, CamundaError)
        assert await client.engine_ok() is False


async def test_a_refused_connection_is_a_start_the_engine_never_saw() -> None:
    async with CamundaClient(f"http://127.0.0.1:{free_port()}/engine-rest") as client:
        with pytest.raises(EngineUnavailable) as caught:
            await client.start_process("k")
    assert caught.value.request_sent is False


async def test_a_start_the_engine_read_but_never_answered_may_have_been_received() -> None:
    """Over a real socket: the request arrives, no answer comes, the timeout fires."""
    received = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        received.set()
        await reader.read()  # until the client gives up and closes
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, CamundaClient(f"http://127.0.0.1:{port}", timeout_s=0.3) as client:
        with pytest.raises(EngineUnavailable) as caught:
            await client.start_process("k")
    assert received.is_set()
    assert caught.value.request_sent is True


async def test_engine_ok(engine: FakeEngine, client: CamundaClient) -> None:
    engine.answer_all(200, [{"name": "default"}])
    assert await client.engine_ok() is True
    assert engine.last.url == f"{BASE}/engine"


# --- credentials ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "header"),
    [
        ({"camunda_username": "demo", "camunda_password": "s3cr3t"}, "Basic ZGVtbzpzM2NyM3Q="),
        ({"camunda_token": "t0ken"}, "Bearer t0ken"),
        ({}, None),
    ],
)
async def test_every_engine_call_sends_the_configured_credentials(
    env: dict[str, str], header: str | None
) -> None:
    engine = FakeEngine()
    engine.answer_all(200, [])
    settings = Settings(camunda_base_url=BASE, **env)  # type: ignore[arg-type]
    async with CamundaClient.from_settings(settings, middleware=answering(engine)) as client:
        await client.engine_ok()
        await client.fetch_and_lock(
            "w1", [TopicRequest("t", 1000)], max_tasks=1, async_response_timeout_ms=None
        )
    assert [r.headers.get("authorization") for r in engine.requests] == [header, header]


async def test_refused_credentials_name_the_settings() -> None:
    engine = FakeEngine()
    engine.answer_all(401)
    async with engine.client() as client:
        with pytest.raises(EngineError) as caught:
            await client.start_process("k")
    assert caught.value.status_code == 401
    assert "CAMUNDA_USERNAME" in str(caught.value)


@pytest.mark.parametrize(
    "env",
    [
        {"camunda_username": "demo"},
        {"camunda_password": "x"},
        {"camunda_username": "demo", "camunda_password": "x", "camunda_token": "t"},
    ],
)
def test_engine_credentials_are_one_kind_and_whole(env: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match="CAMUNDA_"):
        Settings(**env)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "body", "level", "said"),
    [
        (200, {"version": "7.24.0"}, "INFO", "engine 7.24.0 at"),
        (401, None, "ERROR", "CAMUNDA_USERNAME"),
        (503, None, "WARNING", "not reachable yet"),
    ],
)
async def test_start_up_says_which_engine_answers_or_what_is_wrong(
    caplog: pytest.LogCaptureFixture, status: int, body: Any, level: str, said: str
) -> None:
    engine = FakeEngine()
    engine.answer_all(status, body)
    log = logging.getLogger("test.introduce")
    with caplog.at_level(logging.INFO, logger=log.name):
        async with engine.client() as client:
            await client.introduce(log)
    [record] = caplog.records
    assert (record.levelname, said in record.getMessage()) == (level, True), record.getMessage()
