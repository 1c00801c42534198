"""What a client written for the seed (fastify-camunda) reads, pinned field by field, from
the README's "Switching from fastify-camunda" (add beside, never rename or drop).

Two replicas share Redis and Postgres: a start parked on one wakes when the run is finished
through the other. The correlationIds are the business ids the seed's guide recommends.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import pytest

from flowgate.shared import postgres
from flowgate.shared.settings import Settings
from tests.helpers.api import BENCHMARK, Api, running_app
from tests.helpers.engine import deploy_bpmn
from tests.helpers.waiting import until

MakeSettings = Callable[..., Settings]

#: JavaScript's Date#toISOString: milliseconds and Z.
JS_ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

IDS = [
    "user@example.com",
    "order 42",
    "50% done",
    "who*what?",
    "list[1]",
    "{tagged}",
    "Müller-Lüdenscheid 東京",
]


@pytest.fixture
async def replicas(make_settings: MakeSettings, engine_url: str) -> AsyncIterator[tuple[Api, Api]]:
    await deploy_bpmn(engine_url)
    settings = make_settings(camunda_base_url=engine_url)
    async with running_app(settings) as a, running_app(settings) as b:
        yield a, b


def url(correlation_id: str) -> str:
    return f"/api/process/status/{quote(correlation_id, safe='')}"


def body(correlation_id: Any, **extra: Any) -> dict[str, Any]:
    return {"processKey": BENCHMARK, "correlationId": correlation_id, **extra}


@pytest.mark.parametrize("suffix", IDS)
async def test_a_business_id_goes_through_start_wait_wake_status_list_and_event_log(
    replicas: tuple[Api, Api], suffix: str
) -> None:
    a, b = replicas
    correlation_id = f"{suffix} {id(suffix)}-{asyncio.get_running_loop().time()}"
    start = asyncio.create_task(
        a.client.post(
            "/api/process/start",
            json=body(correlation_id, variables={"userId": "u1"}),
            headers={"Prefer": "wait=20"},
        )
    )
    await until(lambda: a.deps.waitroom.parked == 1, what="the start to park on A")
    # A long-poll on the status URL, parked on B.
    poll = asyncio.create_task(b.client.get(url(correlation_id), params={"wait": 20}))
    await until(lambda: b.deps.waitroom.parked == 1, what="the long-poll to park on B")
    pending = await a.client.get(url(correlation_id))
    assert pending.status_code == 202
    # "queued" until the watcher records the engine's first step ("start").
    assert pending.json()["status"] == "pending"
    assert pending.json()["data"]["step"] in {"queued", "start"}
    assert pending.headers["location"] == url(correlation_id)

    done = await b.client.post(
        "/api/process/complete",
        json={"correlationId": correlation_id, "status": "ok", "data": {"n": 1}},
    )
    assert done.json() == {"received": True, "changed": True}

    answer, polled = await start, await poll
    assert answer.status_code == 200
    assert answer.json()["result"] == {"n": 1}
    assert answer.headers["content-location"] == url(correlation_id)
    assert answer.json()["statusUrl"] == url(correlation_id)
    assert polled.status_code == 200
    assert polled.json()["correlationId"] == correlation_id

    listed = (await a.client.get("/api/process/status/all", params={"limit": 500})).json()
    # The seed lists each run's id and its stored record under `data`.
    records = {p["correlationId"]: p["data"] for p in listed["processes"]}
    assert records[correlation_id]["status"] == "ok"
    assert records[correlation_id]["data"] == {"n": 1}
    assert set(records[correlation_id]) == {"status", "data", "error", "startedAt", "updatedAt"}

    async def audited() -> bool:
        return len(await postgres.events_by_correlation(a.deps.pool, correlation_id)) == 2

    await until(audited, what="the audit rows")
    for path in ("/api/event-log/", "/api/process/event-log/"):
        log = await b.client.get(path + quote(correlation_id, safe=""))
        assert [row["step_name"] for row in log.json()["eventLog"]] == ["start", "complete"]


async def test_status_and_start_answers_keep_the_seeds_fields(replicas: tuple[Api, Api]) -> None:
    a, _ = replicas
    correlation_id = f"user-{asyncio.get_running_loop().time()}@example.com"
    accepted = await a.client.post(
        "/api/process/start", json=body(correlation_id), headers={"Prefer": "respond-async"}
    )
    assert accepted.status_code == 202
    assert accepted.json() == {
        "status": "pending",
        "correlationId": correlation_id,
        "statusUrl": url(correlation_id),
    }
    status = (await a.client.get(url(correlation_id))).json()
    assert {"status", "correlationId", "data", "error", "startedAt", "updatedAt"} <= set(status)
    assert JS_ISO.match(status["startedAt"])
    assert JS_ISO.match(status["updatedAt"])

    await a.client.post(
        "/api/process/complete",
        json={"correlationId": correlation_id, "status": "error", "error": "boom"},
    )
    failed = await a.client.get(url(correlation_id))
    assert failed.status_code == 500
    assert (failed.json()["status"], failed.json()["error"]) == ("error", "boom")
    again = await a.client.post("/api/process/start", json=body(correlation_id))
    assert again.status_code == 500
    assert {k: again.json()[k] for k in ("status", "correlationId", "error")} == {
        "status": "error",
        "correlationId": correlation_id,
        "error": "boom",
    }


async def test_an_unknown_id_is_the_seeds_not_found(replicas: tuple[Api, Api]) -> None:
    a, _ = replicas
    answer = await a.client.get(url("nobody@example.com"))
    assert answer.status_code == 404
    assert answer.json()["status"] == "not_found"
    assert answer.json()["correlationId"] == "nobody@example.com"
    assert answer.json()["message"]


async def test_the_list_is_count_and_processes(replicas: tuple[Api, Api]) -> None:
    a, _ = replicas
    page = (await a.client.get("/api/process/status/all")).json()
    assert set(page) >= {"count", "processes", "nextCursor"}
    assert page["count"] == len(page["processes"])


async def test_the_event_log_of_an_unknown_id_is_empty_on_both_paths(
    replicas: tuple[Api, Api],
) -> None:
    a, _ = replicas
    for path in ("/api/event-log/nobody", "/api/process/event-log/nobody"):
        answer = await a.client.get(path)
        assert (answer.status_code, answer.json()) == (200, {"eventLog": []})


async def test_a_numeric_correlation_id_is_its_string(replicas: tuple[Api, Api]) -> None:
    a, _ = replicas
    number = int(asyncio.get_running_loop().time() * 1000)
    answer = await a.client.post(
        "/api/process/start", json=body(number), headers={"Prefer": "respond-async"}
    )
    assert answer.status_code == 202
    assert answer.json()["correlationId"] == str(number)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"correlationId": "c"}, "processKey"),
        ({"processKey": BENCHMARK}, "correlationId"),
        ({"processKey": BENCHMARK, "correlationId": ""}, "correlationId"),
        ({"processKey": BENCHMARK, "correlationId": "c", "variables": [1]}, "variables"),
        ({"processKey": BENCHMARK, "correlationId": "c", "variables": None}, "variables"),
    ],
)
async def test_a_400_is_fastify_shaped_and_names_the_field(
    replicas: tuple[Api, Api], payload: dict[str, Any], field: str
) -> None:
    a, _ = replicas
    answer = await a.client.post("/api/process/start", json=payload)
    assert answer.status_code == 400
    error = answer.json()
    assert (error["statusCode"], error["error"]) == (400, "Bad Request")
    assert field in error["message"]


async def test_a_completion_body_is_checked_before_its_run_is_looked_up(
    replicas: tuple[Api, Api],
) -> None:
    a, _ = replicas
    answer = await a.client.post(
        "/api/process/complete",
        json={"correlationId": "nobody", "status": "error", "error": {"code": 1}},
    )
    assert answer.status_code == 400
    assert answer.json()["field"] == "error"


async def test_a_run_that_ended_error_is_told_from_a_server_fault_by_a_header(
    replicas: tuple[Api, Api],
) -> None:
    a, _ = replicas
    correlation_id = f"order {asyncio.get_running_loop().time()}"
    accepted = await a.client.post(
        "/api/process/start", json=body(correlation_id), headers={"Prefer": "respond-async"}
    )
    assert accepted.headers["flowgate-run-status"] == "pending"
    pending = await a.client.get(url(correlation_id))
    assert (pending.status_code, pending.headers["flowgate-run-status"]) == (202, "pending")
    await a.client.post(
        "/api/process/complete",
        json={"correlationId": correlation_id, "status": "error", "error": "declined"},
    )
    for answer in (
        await a.client.get(url(correlation_id)),
        await a.client.post("/api/process/start", json=body(correlation_id)),
        await a.client.post(f"/api/process/cancel/{quote(correlation_id, safe='')}"),
    ):
        assert answer.headers["flowgate-run-status"] == "error", answer.text
        assert answer.json()["status"] == "error"
    unknown = await a.client.get(url("nobody"))
    assert "flowgate-run-status" not in unknown.headers
