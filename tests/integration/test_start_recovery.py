"""Never a second engine instance, never a stranded claim: starts whose engine call was
slow, lost or never made, against the real engine, Redis and Postgres.

The engine is reached through a proxy that holds back (or drops) start calls, as an engine
queueing on its database does; everything else reaches it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import pytest

from flowgate.services.api.starter import StartCommand
from flowgate.shared import postgres
from flowgate.shared.contract import SystemVariables
from flowgate.shared.eventlog import EventRecord
from flowgate.shared.settings import Settings
from flowgate.shared.state import RunState, Status
from tests.helpers.api import BENCHMARK, Api, cid, running_app, start_body
from tests.helpers.engine import EngineAdmin, deploy_bpmn
from tests.helpers.net import SlowProxy
from tests.helpers.waiting import until

pytestmark = pytest.mark.slow

MakeSettings = Callable[..., Settings]


@contextlib.asynccontextmanager
async def engine_behind(
    engine_url: str, delay_s: float | None
) -> AsyncIterator[tuple[str, SlowProxy]]:
    """The engine's URL through a proxy that holds back start calls for ``delay_s``."""
    parts = urlsplit(engine_url)
    proxy = SlowProxy(parts.hostname or "127.0.0.1", parts.port or 80, b"/start", delay_s)
    await proxy.up()
    try:
        yield f"http://127.0.0.1:{proxy.port}{parts.path}", proxy
    finally:
        await proxy.down()


def slow_engine_settings(make_settings: MakeSettings, url: str, **overrides: object) -> Settings:
    # An engine call gives up after 1 s; an unconfirmed start is looked for for 6 s.
    return make_settings(
        camunda_base_url=url,
        camunda_timeout_ms=1_000,
        engine_start_window_ms=6_000,
        sync_timeout_ms=500,
        **overrides,
    )


async def instances(engine_url: str, correlation_id: str) -> list[str]:
    async with EngineAdmin(engine_url) as admin:
        found = await admin.historic_process_instances(processInstanceBusinessKey=correlation_id)
    return [str(instance["id"]) for instance in found]


async def test_a_start_the_engine_takes_late_is_found_and_never_started_twice(
    make_settings: MakeSettings, engine_url: str
) -> None:
    await deploy_bpmn(engine_url)
    async with engine_behind(engine_url, delay_s=3.0) as (url, proxy):
        settings = slow_engine_settings(make_settings, url)
        async with running_app(settings) as api:
            correlation_id = cid()
            first = await api.client.post("/api/process/start", json=start_body(correlation_id))
            # The engine call timed out: nothing is known, so nothing is given up.
            assert first.status_code == 202
            assert first.headers["location"].endswith(correlation_id)
            # The client retries with the same id while the first start is in limbo.
            again = await api.client.post("/api/process/start", json=start_body(correlation_id))
            assert again.status_code == 202
            assert proxy.held == 1  # the retry joined; it sent no second start

            state = await _attached(api, correlation_id)
            assert await instances(engine_url, correlation_id) == [state.instance_id]
            # The audit trail has the start, though its answer was lost.
            rows = await _events(api, correlation_id)
            assert [(r.step_name, r.metadata["recovered"]) for r in rows] == [("start", True)]


async def test_a_start_the_engine_never_took_is_given_up_after_its_window(
    make_settings: MakeSettings, engine_url: str
) -> None:
    await deploy_bpmn(engine_url)
    async with engine_behind(engine_url, delay_s=None) as (url, _):
        settings = slow_engine_settings(make_settings, url)
        async with running_app(settings) as api:
            correlation_id = cid()
            first = await api.client.post("/api/process/start", json=start_body(correlation_id))
            assert first.status_code == 202
            # Whoever follows the status URL gets the end without coming back again.
            status = await api.client.get(
                f"/api/process/status/{correlation_id}", params={"wait": 20}
            )
            assert status.status_code == 503
            assert "did not confirm" in status.json()["message"]
            assert status.headers["retry-after"].isdigit()
    assert await instances(engine_url, correlation_id) == []
    # Retrying with the same id now starts exactly one instance.
    async with running_app(make_settings(camunda_base_url=engine_url)) as api:
        retry = await api.client.post(
            "/api/process/start", json=start_body(correlation_id), headers={"Prefer": "wait=0"}
        )
        assert retry.status_code == 202
        state = await _attached(api, correlation_id)
    assert await instances(engine_url, correlation_id) == [state.instance_id]


async def test_a_claim_whose_start_was_never_sent_is_given_up_within_seconds(
    make_settings: MakeSettings, engine_url: str
) -> None:
    """A replica that died between its claim and the engine call, or a claim that Redis
    ran after the replica had answered 503 already: no engine call, ever."""
    await deploy_bpmn(engine_url)
    async with running_app(make_settings(camunda_base_url=engine_url)) as api:
        correlation_id = cid()
        await api.deps.store.claim(
            SystemVariables.new(correlation_id), BENCHMARK, "h", look_after_s=0
        )
        began = asyncio.get_running_loop().time()
        status = await api.client.get(f"/api/process/status/{correlation_id}", params={"wait": 20})
        assert asyncio.get_running_loop().time() - began < 5
        assert status.status_code == 503
        assert "interrupted" in status.json()["message"]
        retry = await api.client.post(
            "/api/process/start", json=start_body(correlation_id), headers={"Prefer": "wait=0"}
        )
        assert retry.status_code == 202
        state = await _attached(api, correlation_id)
    assert await instances(engine_url, correlation_id) == [state.instance_id]


async def test_a_start_that_joined_a_claim_never_sent_starts_afresh_within_its_wait(
    make_settings: MakeSettings, engine_url: str
) -> None:
    """A start resent by the balancer after its replica died between claim and engine call
    joins that claim; once recovery gives the claim up, the start goes ahead itself, as its
    client would have done: the client sees no 503, and the engine gets one instance."""
    await deploy_bpmn(engine_url)
    async with running_app(make_settings(camunda_base_url=engine_url)) as api:
        correlation_id = cid()
        body = start_body(correlation_id)
        command_hash = StartCommand(BENCHMARK, correlation_id, body["variables"]).request_hash
        await api.deps.store.claim(
            SystemVariables.new(correlation_id), BENCHMARK, command_hash, look_after_s=0
        )
        answer = await api.client.post(
            "/api/process/start", json=body, headers={"Prefer": "wait=8"}
        )
        assert answer.status_code == 202, answer.text
        state = await _attached(api, correlation_id)
    assert await instances(engine_url, correlation_id) == [state.instance_id]


async def test_a_replica_that_stops_with_a_start_in_flight_leaves_it_to_another(
    make_settings: MakeSettings, engine_url: str
) -> None:
    """Replica A stops while the engine is still taking its start; replica B attaches the
    instance (and writes its audit row) once the engine has created it."""
    await deploy_bpmn(engine_url)
    async with engine_behind(engine_url, delay_s=3.0) as (url, _):
        settings = slow_engine_settings(make_settings, url, shutdown_grace_s=1)
        correlation_id = cid()
        async with running_app(settings) as replica_a:
            started = await replica_a.client.post(
                "/api/process/start",
                json=start_body(correlation_id),
                headers={"Prefer": "respond-async"},
            )
            assert started.status_code == 202
        async with running_app(settings) as replica_b:
            state = await _attached(replica_b, correlation_id)
            assert await instances(engine_url, correlation_id) == [state.instance_id]
            assert [r.step_name for r in await _events(replica_b, correlation_id)] == ["start"]


async def test_wait_bounds_a_start_when_the_engine_stalls(
    make_settings: MakeSettings, engine_url: str
) -> None:
    await deploy_bpmn(engine_url)
    async with engine_behind(engine_url, delay_s=None) as (url, _):
        settings = make_settings(camunda_base_url=url, camunda_timeout_ms=30_000)
        async with running_app(settings) as api:
            began = asyncio.get_running_loop().time()
            answer = await api.client.post(
                "/api/process/start", json=start_body(cid()), headers={"Prefer": "wait=1"}
            )
            assert answer.status_code == 202
            assert asyncio.get_running_loop().time() - began < 3


async def _attached(api: Api, correlation_id: str) -> RunState:
    async def attached() -> bool:
        state = await api.deps.store.get(correlation_id)
        return state is not None and state.instance_id is not None

    await until(attached, timeout_s=20, what="the instance to be attached")
    state = await api.deps.store.get(correlation_id)
    assert state is not None
    assert state.status is Status.PENDING
    return state


async def _events(api: Api, correlation_id: str) -> list[EventRecord]:
    async def written() -> bool:
        return bool(await postgres.events_by_correlation(api.deps.pool, correlation_id))

    await until(written, timeout_s=10, what="the audit row")
    return await postgres.events_by_correlation(api.deps.pool, correlation_id)
