"""The API in-process (httpx over ASGI, the real lifespan) against real Redis, Postgres and
the Camunda engine.

Nothing here runs a worker: a test finishes a run itself through ``/api/process/complete``
(or ``RunStore.finish``), which is what the worker does too.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from functools import partial
from http import HTTPStatus
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from flowgate.services.api.drain import DrainHook
from flowgate.services.api.pace import MIN_SAMPLES
from flowgate.shared import postgres
from flowgate.shared.camunda import EngineUnavailable
from flowgate.shared.contract import SystemVariables
from flowgate.shared.settings import Settings
from flowgate.shared.state import Status
from flowgate.shared.steps import StepEvent, StepStatus
from tests.helpers.api import Api, cid, running_app, start_body
from tests.helpers.engine import EngineAdmin, deploy_bpmn as deploy
from tests.helpers.net import TcpProxy
from tests.helpers.waiting import until

MakeSettings = Callable[..., Settings]


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
async def api(make_settings: MakeSettings, engine_url: str) -> AsyncIterator[Api]:
    await deploy(engine_url)
    settings = make_settings(camunda_base_url=engine_url, sync_timeout_ms=1_000)
    async with running_app(settings) as running:
        yield running


# --- start ---------------------------------------------------------------------------------


async def test_start_answers_200_with_the_result_when_it_finishes_within_the_wait(
    api: Api,
) -> None:
    correlation_id = cid()
    start = asyncio.create_task(
        api.client.post(
            "/api/process/start",
            json=start_body(correlation_id, userId="u1"),
            headers={"Prefer": "wait=20"},
        )
    )
    await until(lambda: api.deps.waitroom.parked == 1)
    done = await api.client.post(
        "/api/process/complete",
        json={"correlationId": correlation_id, "status": "ok", "data": {"answer": 42}},
    )
    assert done.status_code == 200
    assert done.json() == {"received": True, "changed": True}

    response = await start
    assert response.status_code == 200
    url = f"/api/process/status/{correlation_id}"
    assert response.json() == {
        "status": "ok",
        "correlationId": correlation_id,
        "result": {"answer": 42},
        "statusUrl": url,
    }
    assert response.headers["content-location"] == url
    assert response.headers["preference-applied"] == "wait=20"


async def test_start_sets_the_system_variables_and_the_business_key(
    api: Api, engine_url: str
) -> None:
    correlation_id = cid()
    response = await api.client.post(
        "/api/process/start",
        json=start_body(correlation_id, userId="u1"),
        headers={"Prefer": "respond-async"},
    )
    assert response.status_code == 202
    state = await api.deps.store.get(correlation_id)
    assert state is not None
    assert state.instance_id is not None
    async with EngineAdmin(engine_url) as camunda:
        instances = await camunda.historic_process_instances(
            processInstanceBusinessKey=correlation_id
        )
        variables = await camunda.process_variables(state.instance_id)
    assert [i["id"] for i in instances] == [state.instance_id]
    assert variables["userId"] == "u1"
    assert variables["correlationId"] == correlation_id
    assert variables["traceability_id"] == state.traceability_id
    assert variables["batch_id"] == state.batch_id
    assert variables["application_id"] == state.application_id
    assert variables["identifiers"] == {"applicationId": state.application_id}
    for value in (state.traceability_id, state.batch_id, state.application_id):
        assert uuid.UUID(str(value)).version == 4


async def test_start_answers_202_with_location_when_the_wait_ends(api: Api) -> None:
    correlation_id = cid()
    began = time.monotonic()
    response = await api.client.post("/api/process/start", json=start_body(correlation_id))
    assert 1.0 <= time.monotonic() - began < 5  # SYNC_TIMEOUT_MS = 1000 in this fixture
    assert response.status_code == 202
    url = f"/api/process/status/{correlation_id}"
    assert response.json() == {
        "status": "pending",
        "correlationId": correlation_id,
        "statusUrl": url,
    }
    assert response.headers["location"] == url
    assert response.headers["retry-after"] == "2"
    assert "preference-applied" not in response.headers


async def test_prefer_respond_async_answers_at_once(api: Api) -> None:
    response = await api.client.post(
        "/api/process/start",
        json=start_body(cid()),
        headers={"Prefer": "respond-async"},
    )
    assert response.status_code == 202
    assert response.headers["preference-applied"] == "respond-async"
    assert api.deps.waitroom.parked == 0


async def test_prefer_wait_is_capped_by_max_wait(
    make_settings: MakeSettings, engine_url: str
) -> None:
    await deploy(engine_url)
    settings = make_settings(camunda_base_url=engine_url, max_wait_ms=1_000)
    async with running_app(settings) as api:
        began = time.monotonic()
        response = await api.client.post(
            "/api/process/start", json=start_body(cid()), headers={"Prefer": "wait=3600"}
        )
        assert time.monotonic() - began < 5
    assert response.status_code == 202
    assert response.headers["preference-applied"] == "wait=1"


async def test_an_error_outcome_answers_500_with_the_error(api: Api) -> None:
    correlation_id = cid()
    start = asyncio.create_task(
        api.client.post("/api/process/start", json=start_body(correlation_id))
    )
    await until(lambda: api.deps.waitroom.parked == 1)
    await api.deps.store.finish(correlation_id, Status.ERROR, error="validation failed")
    response = await start
    assert response.status_code == 500
    assert response.json() == {
        "status": "error",
        "correlationId": correlation_id,
        "error": "validation failed",
        "statusUrl": f"/api/process/status/{correlation_id}",
    }


async def test_concurrent_duplicates_start_one_instance_and_share_the_outcome(
    api: Api, engine_url: str
) -> None:
    correlation_id = cid()
    body = start_body(correlation_id, userId="u1")
    starts = [
        asyncio.create_task(api.client.post("/api/process/start", json=body)) for _ in range(20)
    ]
    await until(lambda: api.deps.waitroom.parked == 20)
    await api.deps.store.finish(correlation_id, Status.OK, data={"n": 1})
    responses = await asyncio.gather(*starts)
    assert {r.status_code for r in responses} == {200}
    assert all(r.json()["result"] == {"n": 1} for r in responses)
    async with EngineAdmin(engine_url) as camunda:
        instances = await camunda.historic_process_instances(
            processInstanceBusinessKey=correlation_id
        )
    assert len(instances) == 1

    # Once finished, a repeated start returns the stored outcome at once.
    again = await api.client.post("/api/process/start", json=body)
    assert again.status_code == 200
    assert again.json()["result"] == {"n": 1}


async def test_a_duplicate_with_other_variables_or_key_is_422(api: Api) -> None:
    correlation_id = cid()
    first = await api.client.post(
        "/api/process/start",
        json=start_body(correlation_id, userId="u1"),
        headers={"Prefer": "respond-async"},
    )
    assert first.status_code == 202
    for body in (
        start_body(correlation_id, userId="u2"),
        start_body(correlation_id, key="onboard-user", userId="u1"),
    ):
        response = await api.client.post("/api/process/start", json=body)
        assert response.status_code == 422
        assert response.json()["field"] == "correlationId"
        assert "already used" in response.json()["message"]


async def test_unknown_process_key_is_404_naming_it_and_leaves_nothing_pending(
    api: Api,
) -> None:
    correlation_id = cid()
    response = await api.client.post(
        "/api/process/start", json=start_body(correlation_id, key="no-such-process")
    )
    assert response.status_code == 404
    assert response.json() == {
        "statusCode": 404,
        "error": "Not Found",
        "message": "no process definition with key 'no-such-process'",
        "field": "processKey",
    }
    state = await api.deps.store.get(correlation_id)
    assert state is not None
    assert state.status is Status.ABANDONED
    # Whoever follows the status URL learns why, not that the run never existed.
    status = await api.client.get(f"/api/process/status/{correlation_id}")
    assert status.status_code == 404
    assert status.json()["field"] == "processKey"
    # The id is free again: a corrected start succeeds.
    retry = await api.client.post(
        "/api/process/start", json=start_body(correlation_id), headers={"Prefer": "respond-async"}
    )
    assert retry.status_code == 202


async def test_an_unreachable_engine_is_503_with_retry_after_and_leaves_nothing_pending(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings(camunda_base_url="http://127.0.0.1:9/engine-rest")
    async with running_app(settings) as api:
        correlation_id = cid()
        response = await api.client.post("/api/process/start", json=start_body(correlation_id))
        assert response.status_code == 503
        assert response.headers["retry-after"].isdigit()
        assert "unreachable" in response.json()["message"]
        state = await api.deps.store.get(correlation_id)
        assert state is not None
        assert state.status is Status.ABANDONED  # nothing left pending


async def test_a_start_whose_answer_was_lost_is_found_not_started_twice(
    api: Api, engine_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine started the instance but its answer never arrived (read timeout)."""
    start_for_real = api.deps.camunda.start_process

    async def answer_lost(*args: Any, **kwargs: Any) -> Any:
        await start_for_real(*args, **kwargs)
        raise EngineUnavailable("read timeout")

    monkeypatch.setattr(api.deps.camunda, "start_process", answer_lost)
    correlation_id = cid()
    response = await api.client.post(
        "/api/process/start",
        json=start_body(correlation_id),
        headers={"Prefer": "respond-async"},
    )
    assert response.status_code == 202
    state = await api.deps.store.get(correlation_id)
    assert state is not None
    assert state.instance_id is not None
    async with EngineAdmin(engine_url) as camunda:
        found = await camunda.historic_process_instances(processInstanceBusinessKey=correlation_id)
    assert [instance["id"] for instance in found] == [state.instance_id]


async def test_a_variable_the_engine_cannot_take_is_400_naming_variables(api: Api) -> None:
    correlation_id = cid()
    response = await api.client.post(
        "/api/process/start", json=start_body(correlation_id, huge=2**63)
    )
    assert response.status_code == 400
    assert response.json()["field"] == "variables"
    assert await api.deps.store.get(correlation_id) is None


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        (b'{"' + b"n" * 256 + b'": 1}', "longer than 255"),
        (b'{"a\\u0000b": 1}', "'a\\x00b'"),
        (b'{"note": "nul \\u0000 here"}', "'note'"),
        (b'{"doc": {"deep": ["x\\u0000"]}}', "'doc'"),
        (b'{"doc": {"k\\u0000": 1}}', "'doc'"),
        (b'{"big": 18446744073709551616}', "'big'"),
        (b'{"big": 123456789012345678901234567890}', "'big'"),
        (b'{"long": 9223372036854775808}', "'long'"),
    ],
)
async def test_variables_the_engine_or_the_audit_table_would_refuse_are_400_at_once(
    api: Api, variables: bytes, named: str
) -> None:
    correlation_id = cid()
    content = b'{"processKey": "benchmark", "correlationId": "%s", "variables": %s}' % (
        correlation_id.encode(),
        variables,
    )
    response = await api.client.post(
        "/api/process/start", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["field"] == "variables"
    assert named in response.json()["message"]
    assert "retry-after" not in response.headers
    assert await api.deps.store.get(correlation_id) is None  # nothing claimed


async def test_a_huge_integer_outside_the_variables_changes_nothing(api: Api) -> None:
    content = b'{"processKey": "benchmark", "correlationId": "%s", "extra": %s}' % (
        cid().encode(),
        b"9" * 30,
    )
    response = await api.client.post(
        "/api/process/start",
        content=content,
        headers={"content-type": "application/json", "Prefer": "respond-async"},
    )
    assert response.status_code == 202


async def test_a_completion_postgres_could_not_store_is_400(api: Api) -> None:
    correlation_id = cid()
    await api.client.post(
        "/api/process/start", json=start_body(correlation_id), headers={"Prefer": "respond-async"}
    )
    response = await api.client.post(
        "/api/process/complete",
        json={"correlationId": correlation_id, "status": "ok", "data": {"x": "a\u0000b"}},
    )
    assert response.status_code == 400
    assert response.json()["field"] == "data"


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "headers", "status", "field"),
    [
        (b'{"processKey": "benchmark",', {}, 400, None),
        (b"[1, 2]", {}, 400, None),
        (b'{"correlationId": "x"}', {}, 400, "processKey"),
        (b'{"processKey": "benchmark"}', {}, 400, "correlationId"),
        (b'{"processKey": "benchmark", "correlationId": "a/b"}', {}, 400, "correlationId"),
        (b'{"processKey": "benchmark", "correlationId": "a\\tb"}', {}, 400, "correlationId"),
        (
            b'{"processKey": "benchmark", "correlationId": "' + b"x" * 256 + b'"}',
            {},
            400,
            "correlationId",
        ),
        (b'{"processKey": "bench/mark", "correlationId": "a"}', {}, 400, "processKey"),
        (b'{"processKey": true, "correlationId": "a"}', {}, 400, "processKey"),
        (b'{"processKey": "b", "correlationId": "a", "variables": [1]}', {}, 400, "variables"),
        (b'{"processKey": "b", "correlationId": "a", "variables": "x"}', {}, 400, "variables"),
        (  # a system variable flowgate sets on every start (SYSTEM_VARIABLES_FROM_CLIENTS)
            b'{"processKey": "benchmark", "correlationId": "a", "variables": {"batch_id": "b"}}',
            {},
            400,
            "variables",
        ),
        (b'{"processKey": "b", "correlationId": "a"}', {"content-type": "text/plain"}, 415, None),
        (b'{"processKey": "b", "correlationId": "a"}', {"content-type": ""}, 415, None),
    ],
)
async def test_bad_start_bodies_are_answered_with_a_clear_error(
    api: Api, content: bytes, headers: dict[str, str], status: int, field: str | None
) -> None:
    response = await api.client.post(
        "/api/process/start",
        content=content,
        headers={"content-type": "application/json", **headers},
    )
    assert response.status_code == status
    body = response.json()
    assert body["statusCode"] == status  # Fastify's shape, which the seed's clients log
    assert body["error"] == HTTPStatus(status).phrase
    assert isinstance(body["message"], str)
    assert body["message"]
    assert body.get("field") == field
    if field:
        assert field in body["message"]
    assert await api.deps.store.pages.page(cursor=None, limit=10) == ([], None)


async def test_variables_nested_too_deep_are_400(
    make_settings: MakeSettings, engine_url: str
) -> None:
    settings = make_settings(camunda_base_url=engine_url, max_variables_depth=3)
    nested: dict[str, Any] = {"a": {"b": {"c": 1}}}
    async with running_app(settings) as api:
        ok = await api.client.post(
            "/api/process/start",
            json=start_body(cid(), key="no-such-process", **nested),
        )
        too_deep = await api.client.post("/api/process/start", json=start_body(cid(), x=nested))
    assert ok.status_code == 404  # validated fine, then the engine has no such key
    assert too_deep.status_code == 400
    assert too_deep.json() == {
        "statusCode": 400,
        "error": "Bad Request",
        "message": "variables: nested deeper than 3 levels",
        "field": "variables",
    }


async def test_a_body_over_the_limit_is_413(make_settings: MakeSettings, engine_url: str) -> None:
    settings = make_settings(camunda_base_url=engine_url, max_body_bytes=1_000)
    async with running_app(settings) as api:
        response = await api.client.post(
            "/api/process/start", json=start_body(cid(), blob="x" * 2_000)
        )

        # No Content-Length to go by: the limit holds while reading the stream.
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b" " * 600

        streamed = await api.client.post(
            "/api/process/start",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
    for answer in (response, streamed):
        assert answer.status_code == 413
        assert answer.json()["message"] == "the body is larger than 1000 bytes"


async def test_unknown_paths_and_methods_answer_json(api: Api) -> None:
    missing = await api.client.get("/nope")
    assert missing.status_code == 404
    assert missing.json()["message"] == "no such endpoint: /nope"
    wrong = await api.client.delete("/api/process/start")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"
    assert "error" in wrong.json()


async def test_a_202s_retry_after_is_predicted_from_the_processs_recent_runs(api: Api) -> None:
    """Runs of the process that took about three seconds: a new run is told to come back
    when it is likely done, not after the configured two."""
    took = []
    for _ in range(MIN_SAMPLES):
        correlation_id = cid()
        started = await api.client.post(
            "/api/process/start",
            json=start_body(correlation_id),
            headers={"Prefer": "respond-async"},
        )
        assert started.headers["retry-after"] == "2"  # nothing learnt yet
        took.append(correlation_id)
    await asyncio.sleep(3)
    for correlation_id in took:
        await api.deps.store.finish(correlation_id, Status.OK, data={})
        assert (await api.client.get(f"/api/process/status/{correlation_id}")).status_code == 200
    pending = await api.client.post(
        "/api/process/start", json=start_body(cid()), headers={"Prefer": "respond-async"}
    )
    assert pending.status_code == 202
    assert pending.headers["retry-after"] in {"3", "4"}


# --- status --------------------------------------------------------------------------------


async def test_status_reads_pending_ok_error_and_404(api: Api) -> None:
    ok_id, error_id = cid(), cid()
    for correlation_id in (ok_id, error_id):
        response = await api.client.post(
            "/api/process/start",
            json=start_body(correlation_id),
            headers={"Prefer": "respond-async"},
        )
        assert response.status_code == 202

    pending = await api.client.get(f"/api/process/status/{ok_id}")
    assert pending.status_code == 202
    assert pending.headers["retry-after"] == "2"
    body = pending.json()
    assert body["status"] == "pending"
    # The seed's "queued" until a step reports: the engine's start event may have by now.
    assert body["data"]["step"] in {"queued", "start"}
    assert body["startedAt"] == body["updatedAt"] or body["startedAt"] < body["updatedAt"]

    # A recorded step is the progress a pending status shows, read or waited for. (The engine
    # watcher records the start event first; the run then waits on a task nobody works.)
    async def started() -> bool:
        return await api.deps.store.steps.find(ok_id, "start") is not None

    await until(started, timeout_s=10)
    at = datetime.now(UTC)
    step = StepEvent("validate", StepStatus.OK, "validate", "validate:1", "serviceTask", at)
    assert await api.deps.store.steps.record(ok_id, step)
    for query in ("", "?wait=1"):
        pending = await api.client.get(f"/api/process/status/{ok_id}{query}")
        assert (pending.status_code, pending.json().get("data")) == (202, {"step": "validate"}), (
            pending.text
        )

    await api.deps.store.finish(ok_id, Status.OK, data=[1, 2])
    await api.deps.store.finish(error_id, Status.ERROR, error={"code": "E1"})
    ok = await api.client.get(f"/api/process/status/{ok_id}")
    assert ok.status_code == 200
    assert ok.headers["content-location"] == f"/api/process/status/{ok_id}"
    assert {k: ok.json()[k] for k in ("status", "correlationId", "data", "error")} == {
        "status": "ok",
        "correlationId": ok_id,
        "data": [1, 2],
        "error": None,
    }
    error = await api.client.get(f"/api/process/status/{error_id}")
    assert error.status_code == 500
    assert error.json()["error"] == {"code": "E1"}

    unknown = cid()
    missing = await api.client.get(f"/api/process/status/{unknown}")
    assert missing.status_code == 404
    assert (missing.json()["status"], missing.json()["correlationId"]) == ("not_found", unknown)
    bad = await api.client.get("/api/process/status/tab%09here")
    assert bad.status_code == 400
    assert bad.json()["field"] == "correlationId"


async def test_status_long_polls_with_wait(api: Api) -> None:
    correlation_id = cid()
    await api.client.post(
        "/api/process/start", json=start_body(correlation_id), headers={"Prefer": "respond-async"}
    )
    poll = asyncio.create_task(api.client.get(f"/api/process/status/{correlation_id}?wait=20"))
    await until(lambda: api.deps.waitroom.parked == 1)
    await api.deps.store.finish(correlation_id, Status.OK, data="done")
    response = await poll
    assert response.status_code == 200
    assert response.json()["data"] == "done"

    began = time.monotonic()
    other = cid()
    await api.client.post(
        "/api/process/start", json=start_body(other), headers={"Prefer": "respond-async"}
    )
    timed_out = await api.client.get(f"/api/process/status/{other}", headers={"Prefer": "wait=1"})
    assert timed_out.status_code == 202
    assert timed_out.headers["preference-applied"] == "wait=1"
    assert 1.0 <= time.monotonic() - began < 5
    assert (await api.client.get(f"/api/process/status/{other}?wait=x")).status_code == 400


async def test_status_falls_back_to_postgres_when_redis_forgot(api: Api) -> None:
    correlation_id = cid()
    await api.client.post(
        "/api/process/start", json=start_body(correlation_id), headers={"Prefer": "respond-async"}
    )
    await api.deps.store.finish(correlation_id, Status.OK, data={"kept": True})

    async def written() -> bool:  # by the app's flusher, in the background
        row = await postgres.get_run(api.deps.pool, correlation_id)
        return row is not None and row.status is Status.OK

    await until(written)
    await api.deps.redis.delete(api.deps.keys.state(correlation_id))  # as if the TTL passed

    response = await api.client.get(f"/api/process/status/{correlation_id}")
    assert response.status_code == 200
    assert response.json()["data"] == {"kept": True}
    # A late completion neither changes it nor is told "unknown".
    late = await api.client.post(
        "/api/process/complete", json={"correlationId": correlation_id, "status": "error"}
    )
    assert late.status_code == 200
    assert late.json() == {"received": True, "changed": False}


async def test_an_id_used_again_after_its_record_expired_is_a_run_of_its_own(
    make_settings: MakeSettings, engine_url: str
) -> None:
    """Redis forgets a finished run after RESULT_TTL_S; the id then starts a new run, whose
    versions count from 1 again. Postgres must hold the new run (status, audit trail) once
    Redis forgets it too, and keep the old run's trail under its traceability id."""
    await deploy(engine_url)
    settings = make_settings(camunda_base_url=engine_url, result_ttl_s=1)
    correlation_id = cid()
    async with running_app(settings) as api:

        async def one_run(n: int) -> str:
            started = await api.client.post(
                "/api/process/start",
                json=start_body(correlation_id),
                headers={"Prefer": "respond-async"},
            )
            assert started.status_code == 202, started.text
            state = await api.deps.store.get(correlation_id)
            assert state is not None
            assert state.traceability_id
            trace = state.traceability_id
            done = await api.client.post(
                "/api/process/complete",
                json={"correlationId": correlation_id, "status": "ok", "data": {"run": n}},
            )
            assert done.json()["changed"] is True

            async def persisted_and_forgotten() -> bool:
                row = await postgres.get_run(api.deps.pool, correlation_id)
                trail = await postgres.events_by_traceability(api.deps.pool, trace)
                gone = not await api.deps.redis.exists(api.deps.keys.state(correlation_id))
                return gone and row is not None and row.data == {"run": n} and len(trail) == 2

            await until(persisted_and_forgotten, timeout_s=15)
            return trace

        first = await one_run(1)
        second = await one_run(2)
        status = await api.client.get(f"/api/process/status/{correlation_id}")
        assert (status.status_code, status.json()["data"]) == (200, {"run": 2})
        trail = (await api.client.get(f"/api/event-log/{correlation_id}")).json()["eventLog"]
        assert [(row["step_name"], row["traceability_id"]) for row in trail] == [
            ("start", second),
            ("complete", second),
        ]
        old = (await api.client.get(f"/api/event-log/{first}")).json()["eventLog"]
        assert [(row["step_name"], row["result"]) for row in old] == [
            ("start", None),
            ("complete", {"run": 1}),
        ]


async def test_status_all_pages_newest_first(api: Api) -> None:
    ids = []
    for _ in range(5):
        ids.append(cid())
        response = await api.client.post(
            "/api/process/start", json=start_body(ids[-1]), headers={"Prefer": "respond-async"}
        )
        assert response.status_code == 202
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = await api.client.get("/api/process/status/all", params=params)
        assert page.status_code == 200
        body = page.json()
        assert body["count"] == len(body["processes"]) <= 2
        seen += [item["correlationId"] for item in body["processes"]]
        cursor = body["nextCursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    for bad in ("limit=0", "limit=501", "limit=x", "cursor=%%%"):
        response = await api.client.get(f"/api/process/status/all?{bad}")
        assert response.status_code == 400, bad


# --- complete ------------------------------------------------------------------------------


async def test_complete_is_idempotent_and_404_for_unknown_ids(api: Api) -> None:
    correlation_id = cid()
    await api.client.post(
        "/api/process/start", json=start_body(correlation_id), headers={"Prefer": "respond-async"}
    )
    first = await api.client.post(
        "/api/process/complete",
        json={"correlationId": correlation_id, "status": "ok", "data": 1},
    )
    second = await api.client.post(
        "/api/process/complete",
        json={"correlationId": correlation_id, "status": "error", "error": "late"},
    )
    assert first.json() == {"received": True, "changed": True}
    assert second.status_code == 200
    assert second.json() == {"received": True, "changed": False}
    status = await api.client.get(f"/api/process/status/{correlation_id}")
    assert status.json()["data"] == 1

    unknown = await api.client.post(
        "/api/process/complete", json={"correlationId": cid(), "status": "ok"}
    )
    assert unknown.status_code == 404
    bad = await api.client.post(
        "/api/process/complete", json={"correlationId": correlation_id, "status": "done"}
    )
    assert bad.status_code == 400
    assert bad.json()["field"] == "status"


async def test_complete_token_and_api_keys(make_settings: MakeSettings, engine_url: str) -> None:
    settings = make_settings(
        camunda_base_url=engine_url, complete_token="s3cret", api_keys="k1, k2"
    )
    async with running_app(settings) as api:
        correlation_id = cid()
        body = start_body(correlation_id)
        async_ = {"Prefer": "respond-async"}
        assert (await api.client.post("/api/process/start", json=body)).status_code == 401
        wrong = await api.client.post(
            "/api/process/start", json=body, headers={"X-API-Key": "k3", **async_}
        )
        assert wrong.status_code == 401
        assert wrong.headers["www-authenticate"].startswith("Bearer")
        by_header = await api.client.post(
            "/api/process/start", json=body, headers={"X-API-Key": "k2", **async_}
        )
        assert by_header.status_code == 202
        by_bearer = await api.client.get(
            f"/api/process/status/{correlation_id}", headers={"Authorization": "Bearer k1"}
        )
        assert by_bearer.status_code == 202
        assert (await api.client.get("/api/process/status/all")).status_code == 401
        assert (await api.client.get(f"/api/event-log/{correlation_id}")).status_code == 401

        completion = {"correlationId": correlation_id, "status": "ok"}
        for headers in ({}, {"Authorization": "Bearer nope"}, {"X-API-Key": "k1"}):
            denied = await api.client.post(
                "/api/process/complete", json=completion, headers=headers
            )
            assert denied.status_code == 401
        allowed = await api.client.post(
            "/api/process/complete", json=completion, headers={"Authorization": "Bearer s3cret"}
        )
        assert allowed.status_code == 200
        # Probes carry no keys; metrics need a key when there is no METRICS_TOKEN.
        assert (await api.client.get("/healthz")).status_code == 200
        assert (await api.client.get("/metrics")).status_code == 401
        metrics = await api.client.get("/metrics", headers={"X-API-Key": "k1"})
        assert metrics.status_code == 200


async def test_client_keys_alone_protect_completion_and_metrics(
    make_settings: MakeSettings, engine_url: str
) -> None:
    """With API_KEYS and no COMPLETE_TOKEN, nobody without a key can finish a run."""
    settings = make_settings(camunda_base_url=engine_url, api_keys="k1")
    async with running_app(settings) as api:
        correlation_id = cid()
        started = await api.client.post(
            "/api/process/start",
            json=start_body(correlation_id),
            headers={"X-API-Key": "k1", "Prefer": "respond-async"},
        )
        assert started.status_code == 202
        forged = {"correlationId": correlation_id, "status": "ok", "data": {"forged": True}}
        anonymous = await api.client.post("/api/process/complete", json=forged)
        assert anonymous.status_code == 401
        state = await api.deps.store.get(correlation_id)
        assert state is not None
        assert state.status is Status.PENDING
        assert (await api.client.get("/metrics")).status_code == 401
        keyed = await api.client.post(
            "/api/process/complete", json=forged, headers={"X-API-Key": "k1"}
        )
        assert keyed.status_code == 200


async def test_a_metrics_token_guards_metrics_on_its_own(
    make_settings: MakeSettings, engine_url: str
) -> None:
    settings = make_settings(camunda_base_url=engine_url, metrics_token="m3trics")
    async with running_app(settings) as api:
        assert (await api.client.get("/metrics")).status_code == 401
        scraped = await api.client.get("/metrics", headers={"Authorization": "Bearer m3trics"})
        assert scraped.status_code == 200
        assert b"flowgate_api_parked_requests" in scraped.content


# --- event log -----------------------------------------------------------------------------


async def test_event_log_by_traceability_and_correlation_id(api: Api) -> None:
    correlation_id = cid()
    await api.client.post(
        "/api/process/start", json=start_body(correlation_id), headers={"Prefer": "respond-async"}
    )
    await api.client.post(
        "/api/process/complete", json={"correlationId": correlation_id, "status": "ok", "data": 7}
    )
    state = await api.deps.store.get(correlation_id)
    assert state is not None

    async def written() -> bool:  # by the app's flusher, in the background
        return len(await postgres.events_by_correlation(api.deps.pool, correlation_id)) == 2

    await until(written)
    by_trace = await api.client.get(f"/api/event-log/{state.traceability_id}")
    by_cid = await api.client.get(f"/api/event-log/{correlation_id}")
    explicit = await api.client.get(f"/api/event-log/{correlation_id}?by=correlationId")
    assert by_trace.status_code == by_cid.status_code == explicit.status_code == 200
    events = by_trace.json()["eventLog"]
    assert [(e["step_name"], e["status"]) for e in events] == [
        ("start", "started"),
        ("complete", "ok"),
    ]
    assert events[0]["traceability_id"] == state.traceability_id
    assert by_cid.json() == by_trace.json() == explicit.json()
    assert (await api.client.get(f"/api/event-log/{cid()}")).json() == {"eventLog": []}
    assert (await api.client.get("/api/event-log/x?by=other")).status_code == 400


# --- operations ----------------------------------------------------------------------------


async def test_health_readiness_metrics_and_docs(api: Api) -> None:
    assert (await api.client.get("/healthz")).json() == {"status": "alive"}
    ready = await api.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {
        "redis": True,
        "postgres": True,
        "engine": True,
        "subscription": True,
    }
    correlation_id = cid()
    start = asyncio.create_task(
        api.client.post("/api/process/start", json=start_body(correlation_id))
    )
    await until(lambda: api.deps.waitroom.parked == 1)
    parked = (await api.client.get("/metrics")).text
    assert "flowgate_api_parked_requests 1.0" in parked
    await api.deps.store.finish(correlation_id, Status.OK)
    assert (await start).status_code == 200
    metrics = (await api.client.get("/metrics")).text
    for name in (
        "flowgate_api_parked_requests 0.0",
        'flowgate_api_waits_total{how="woken"} 1.0',
        "flowgate_api_wake_latency_seconds_count 1.0",
        'flowgate_api_outcomes_total{method="POST",route="/api/process/start",status="200"} 1.0',
        'flowgate_api_request_duration_seconds_count{method="POST",route="/api/process/start"} 1.0',
        "flowgate_writebehind_backlog ",
    ):
        assert name in metrics, name

    spec = (await api.client.get("/openapi.json")).json()
    assert set(spec["paths"]) >= {
        "/api/process/start",
        "/api/process/status/{correlationId}",
        "/api/process/status/all",
        "/api/process/complete",
        "/api/event-log/{id}",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    page = await api.client.get("/docs")
    assert page.headers["content-type"].startswith("text/html")
    assert 'fetch("openapi.json")' in page.text
    assert "http" not in page.text.split("<script>")[1]  # no external assets


async def test_a_replica_answers_an_ended_runs_status_again_without_a_round_trip(
    make_settings: MakeSettings,
) -> None:
    """An end never changes while its record lives (services/api/settled.py): once seen,
    a replica serves it from memory; another replica reads the store."""
    settings = make_settings()
    async with running_app(settings) as one, running_app(settings) as two:
        run, pending = cid(), cid()
        for each in (run, pending):
            await one.deps.store.claim(SystemVariables(each, "b", f"t-{each}", "a"), "p", "h")
        await one.deps.store.finish(run, Status.OK, data={"n": 1})
        for each in (run, pending):
            assert (await one.client.get(f"/api/process/status/{each}")).status_code in (200, 202)
        for each in (run, pending):  # the records change behind the replicas' backs
            await one.deps.redis.hset(one.deps.keys.state(each), "data", '{"n": 2}')
        again = await one.client.get(f"/api/process/status/{run}")
        assert again.status_code == 200
        assert again.json()["data"] == {"n": 1}  # from memory: no round trip
        for answer in (
            await one.client.get(f"/api/process/status/{pending}"),  # pending: not kept
            await two.client.get(f"/api/process/status/{run}"),  # never seen by this one
        ):
            assert answer.json()["data"] == {"n": 2}, answer.text


async def test_an_engine_outage_degrades_readiness_without_failing_it(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings(camunda_base_url="http://127.0.0.1:9/engine-rest")
    async with running_app(settings) as api:
        ready = await api.client.get("/readyz")
        metrics = (await api.client.get("/metrics")).text
    assert ready.status_code == 200
    assert ready.json()["status"] == "degraded"
    assert ready.json()["error"] == "down: engine"
    assert ready.json()["checks"]["engine"] is False
    assert 'flowgate_api_dependency_up{dependency="engine"} 0.0' in metrics
    assert 'flowgate_api_dependency_up{dependency="redis"} 1.0' in metrics


@pytest.mark.slow
async def test_a_postgres_outage_leaves_every_replica_ready_and_serving(
    make_settings: MakeSettings, schema_url: str, engine_url: str
) -> None:
    """The write-behind rides a PostgreSQL outage out, so readiness must too: finished runs
    are read from Redis and parked requests are woken on every replica meanwhile."""
    target = conninfo_to_dict(schema_url)
    proxy = TcpProxy(str(target.get("host", "127.0.0.1")), int(str(target.get("port", 5432))))
    await proxy.up()
    settings = make_settings(
        camunda_base_url=engine_url,
        database_url=make_conninfo(schema_url, host="127.0.0.1", port=proxy.port),
    )
    async with running_app(settings) as one, running_app(settings) as two:
        finished, parked = cid(), cid()
        for run in (finished, parked):
            await one.deps.store.claim(SystemVariables(run, "b", f"t-{run}", "a"), "p", "h")
        await one.deps.store.finish(finished, Status.OK, data={"n": 1})
        assert (await one.client.get("/readyz")).json()["status"] == "ready"
        await proxy.down()
        try:
            for api in (one, two):
                ready = await api.client.get("/readyz")
                assert ready.status_code == 200, ready.text
                assert ready.json()["status"] == "degraded"
                assert ready.json()["error"] == "down: postgres"
                read = await api.client.get(f"/api/process/status/{finished}")
                assert read.status_code == 200, read.text
                assert read.json()["data"] == {"n": 1}
            waiting = asyncio.create_task(two.client.get(f"/api/process/status/{parked}?wait=20"))
            await until(lambda: two.deps.waitroom.parked == 1)
            await one.deps.store.finish(parked, Status.OK, data={"n": 2})
            woken = await waiting
            assert woken.status_code == 200, woken.text
            assert woken.json()["data"] == {"n": 2}
            metrics = (await two.client.get("/metrics")).text
            assert 'flowgate_api_dependency_up{dependency="postgres"} 0.0' in metrics
        finally:
            await proxy.up()
        for api in (one, two):
            await until(partial(_ready, api), timeout_s=20, what="PostgreSQL back in /readyz")
    await proxy.down()


async def _ready(api: Api) -> bool:
    status: str = (await api.client.get("/readyz")).json()["status"]
    return status == "ready"


async def test_the_drain_hook_answers_parked_requests_with_202_and_closes(
    make_settings: MakeSettings, engine_url: str
) -> None:
    await deploy(engine_url)
    drain = DrainHook()
    settings = make_settings(camunda_base_url=engine_url, sync_timeout_ms=60_000)
    async with running_app(settings, drain=drain) as api:
        correlation_id = cid()
        start = asyncio.create_task(
            api.client.post("/api/process/start", json=start_body(correlation_id))
        )
        await until(lambda: api.deps.waitroom.parked == 1)
        # As the SIGTERM handler does: from outside the loop's own code.
        await asyncio.to_thread(drain.trigger)
        response = await start
        assert response.status_code == 202
        assert response.headers["location"] == f"/api/process/status/{correlation_id}"
        assert response.headers["connection"] == "close"
        ready = await api.client.get("/readyz")
        assert ready.status_code == 503
        assert "draining" in ready.json()["error"]
        # Later starts are still served, without waiting.
        later = await api.client.post("/api/process/start", json=start_body(cid()))
        assert later.status_code == 202
