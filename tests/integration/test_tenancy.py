"""Who may do what, on a replica with real Redis, PostgreSQL and engine: tenants cannot see
each other's runs, read tokens read one run, OIDC tokens of a real local issuer name their
tenant, and a tenant's burst meets its own limit, not another tenant's."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.local import stack
from deploy.local.servers import free_port
from flowgate.services.api.errors import limited_answer
from flowgate.services.api.limits import Limited
from flowgate.services.api.readtokens import ReadTokens
from flowgate.shared.contract import SystemVariables
from flowgate.shared.settings import Settings
from flowgate.shared.state import Status
from tests.helpers.api import Api, cid, running_app, start_body
from tests.helpers.engine import deploy_bpmn
from tests.helpers.issuer import AUDIENCE, LocalIssuer, local_issuer
from tests.helpers.replica import Replica, replica

MakeSettings = Callable[..., Settings]
pytestmark = pytest.mark.engine_agnostic  # who sees which run is flowgate's alone
ROOT, ALPHA, BETA = "root-key", "alpha-key", "beta-key"
KEYS = f"{ROOT},{ALPHA}@alpha:start+read+cancel+message,{BETA}@beta:start+read+cancel+message"


def key(value: str) -> dict[str, str]:
    return {"X-API-Key": value}


@pytest.fixture
async def issuer() -> AsyncIterator[LocalIssuer]:
    async with local_issuer() as running:
        yield running


@pytest.fixture
async def api(
    make_settings: MakeSettings, engine_url: str, issuer: LocalIssuer
) -> AsyncIterator[Api]:
    await deploy_bpmn(engine_url)
    settings = make_settings(
        camunda_base_url=engine_url,
        api_keys=KEYS,
        oidc_issuer=issuer.url,
        oidc_audience=AUDIENCE,
        oidc_jwks_min_refresh_s=0,
    )
    async with running_app(settings) as running:
        yield running


async def start(api: Api, credential: dict[str, str], correlation_id: str, **extra: Any) -> Any:
    started = await api.client.post(
        "/api/process/start",
        json={**start_body(correlation_id), **extra},
        headers={**credential, "Prefer": "respond-async"},
    )
    assert started.status_code == 202, started.text
    return started.json()


async def test_another_tenants_run_looks_like_no_run(api: Api) -> None:
    run = cid()
    await start(api, key(ALPHA), run)
    unknown = cid()
    calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", "/api/process/status/{}", None),
        ("GET", "/api/process/events/{}", None),
        ("GET", "/api/process/tasks/{}", None),
        ("POST", "/api/process/tasks/{}/t-1/complete", {}),
        ("POST", "/api/process/message/{}", {"messageName": "confirmed"}),
        ("POST", "/api/process/cancel/{}", {}),
        ("POST", "/api/process/retry/{}", {}),
    ]
    for method, path, body in calls:
        theirs = await api.client.request(method, path.format(run), json=body, headers=key(BETA))
        none = await api.client.request(method, path.format(unknown), json=body, headers=key(BETA))
        assert theirs.status_code == none.status_code == 404, (path, theirs.text)
        assert theirs.text == none.text.replace(unknown, run)  # no existence oracle
    mine = await api.client.get(f"/api/process/status/{run}", headers=key(ALPHA))
    assert mine.status_code == 202  # and the run was neither cancelled nor touched

    def listed(page: httpx.Response) -> set[str]:
        assert page.status_code == 200, page.text
        return {item["correlationId"] for item in page.json()["processes"]}

    assert run not in listed(await api.client.get("/api/process/status/all", headers=key(BETA)))
    assert run in listed(await api.client.get("/api/process/status/all", headers=key(ALPHA)))
    assert run in listed(await api.client.get("/api/process/status/all", headers=key(ROOT)))

    trail = await api.client.get(
        f"/api/event-log/{run}", params={"by": "correlationId"}, headers=key(BETA)
    )
    assert trail.json()["eventLog"] == []


async def test_an_ended_run_a_replica_keeps_in_memory_is_still_no_run_to_another_tenant(
    api: Api,
) -> None:
    """Ended runs are answered from the replica's memory (services/api/settled.py), their
    tenant checked there too: no round trip, and still no existence oracle."""
    run = cid()
    await api.deps.store.claim(SystemVariables(run, "b", f"t-{run}", "a"), "p", "h", tenant="alpha")
    await api.deps.store.finish(run, Status.OK, data={"n": 1})
    assert (await api.client.get(f"/api/process/status/{run}", headers=key(ALPHA))).is_success
    # Behind the replica's back: were the record read, alpha would no longer see the run.
    await api.deps.redis.hset(api.deps.keys.state(run), "tenant", "beta")
    mine = await api.client.get(f"/api/process/status/{run}", headers=key(ALPHA))
    assert mine.status_code == 200
    assert mine.json()["data"] == {"n": 1}  # from memory
    theirs = await api.client.get(f"/api/process/status/{run}", headers=key(BETA))
    assert theirs.status_code == 404, theirs.text


async def test_a_run_records_who_started_it(api: Api) -> None:
    run = cid()
    await start(api, key(ALPHA), run)
    state = await api.deps.store.get(run)
    assert state is not None
    assert (state.tenant, state.principal) == ("alpha", "key:2")  # the second API_KEYS entry


async def test_a_start_with_an_id_another_tenant_holds_is_refused_not_joined(api: Api) -> None:
    run = cid()
    await start(api, key(ALPHA), run)
    joined = await api.client.post(
        "/api/process/start",
        json=start_body(run),
        headers={**key(BETA), "Prefer": "respond-async"},
    )
    assert joined.status_code == 422
    assert joined.json()["field"] == "correlationId"


async def test_a_read_token_reads_its_run_only_until_it_expires(api: Api) -> None:
    run, other = cid(), cid()
    token = (await start(api, key(ALPHA), run, readToken=True))["readToken"]
    await start(api, key(ALPHA), other)
    bearer = {"Authorization": f"Bearer {token}"}

    assert (await api.client.get(f"/api/process/status/{run}", headers=bearer)).status_code == 202
    query = await api.client.get(f"/api/process/status/{run}", params={"access_token": token})
    assert query.status_code == 202
    other_events = await api.client.get(
        f"/api/process/events/{other}", params={"access_token": token}
    )
    assert other_events.status_code == 404
    assert (await api.client.get(f"/api/process/status/{other}", headers=bearer)).status_code == 404
    cancel = await api.client.post(f"/api/process/cancel/{run}", json={}, headers=bearer)
    assert cancel.status_code == 403
    # Ended (by its tenant's key), its whole stream comes at once.
    await api.client.post(f"/api/process/cancel/{run}", json={}, headers=key(ALPHA))
    events = await api.client.get(f"/api/process/events/{run}", params={"access_token": token})
    assert events.status_code == 200
    assert "event: end" in events.text
    listed = await api.client.get("/api/process/status/all", headers=bearer)
    assert listed.status_code == 403

    # The same deployment's key (kept in Redis), a token past its expiry.
    expired = await ReadTokens(api.deps.redis, api.deps.keys, secret=None, ttl_s=-120).issue(
        run, "alpha"
    )
    late = await api.client.get(
        f"/api/process/status/{run}", headers={"Authorization": f"Bearer {expired}"}
    )
    assert late.status_code == 401, late.text
    assert "expired" in late.json()["message"]


async def test_oidc_tokens_name_the_tenant_whose_runs_they_see(
    api: Api, issuer: LocalIssuer
) -> None:
    run = cid()
    await start(api, {"Authorization": f"Bearer {issuer.token(tenant='alpha')}"}, run)
    own = {"Authorization": f"Bearer {issuer.token(tenant='alpha', scope='read')}"}
    other = {"Authorization": f"Bearer {issuer.token(tenant='beta', scope='read')}"}
    assert (await api.client.get(f"/api/process/status/{run}", headers=own)).status_code == 202
    assert (await api.client.get(f"/api/process/status/{run}", headers=other)).status_code == 404
    cancel = await api.client.post(f"/api/process/cancel/{run}", json={}, headers=own)
    assert cancel.status_code == 403
    assert "'cancel'" in cancel.json()["message"]
    wrong = {"Authorization": f"Bearer {issuer.token(audience='another-api')}"}
    refused = await api.client.get(f"/api/process/status/{run}", headers=wrong)
    assert refused.status_code == 401
    assert "www-authenticate" in refused.headers


async def test_a_tenants_burst_meets_its_own_limits_only(
    make_settings: MakeSettings, engine_url: str
) -> None:
    await deploy_bpmn(engine_url)
    settings = make_settings(
        camunda_base_url=engine_url, api_keys=KEYS, tenant_starts_per_s=2, tenant_runs_in_flight=3
    )
    async with running_app(settings) as api:
        answers = [
            await api.client.post(
                "/api/process/start",
                json=start_body(cid()),
                headers={**key(ALPHA), "Prefer": "respond-async"},
            )
            for _ in range(6)
        ]
        codes = [answer.status_code for answer in answers]
        assert codes.count(202) <= 3, codes
        assert codes.count(429) >= 3, codes
        for answer in (a for a in answers if a.status_code == 429):
            assert answer.headers["retry-after"] == "1"
            assert answer.headers["ratelimit-policy"] in ('"starts";q=2;w=1', '"runs";q=3;w=1')
            assert answer.headers["ratelimit"].endswith(";r=0;t=1")
        # Beta's start goes ahead: alpha's burst is alpha's.
        theirs = await api.client.post(
            "/api/process/start",
            json=start_body(cid()),
            headers={**key(BETA), "Prefer": "respond-async"},
        )
        assert theirs.status_code == 202


async def test_a_start_the_replica_knows_to_refuse_is_answered_alike_before_the_endpoint(
    make_settings: MakeSettings, engine_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once Redis has refused a tenant's start, the replica refuses its next starts from
    memory before routing (services/api/refusals.py): the same answer, a request id, and
    counted as the start route's 429, without the endpoint (or its Redis call) running."""
    await deploy_bpmn(engine_url)
    settings = make_settings(camunda_base_url=engine_url, api_keys=KEYS, tenant_starts_per_s=1)
    async with running_app(settings) as api:
        alpha = {**key(ALPHA), "Prefer": "respond-async"}
        assert (
            await api.client.post("/api/process/start", json=start_body(cid()), headers=alpha)
        ).status_code == 202
        by_redis = await api.client.post(
            "/api/process/start", json=start_body(cid()), headers=alpha
        )
        assert by_redis.status_code == 429
        asked: list[str] = []

        async def start_rate(tenant: str) -> None:
            asked.append(tenant)

        monkeypatch.setattr(api.deps.limits, "start_rate", start_rate)
        from_memory = await api.client.post("/api/process/start", content=b"{", headers=alpha)
        assert from_memory.status_code == 429
        assert asked == []
        assert from_memory.json() == by_redis.json()
        for name in ("retry-after", "ratelimit-policy", "ratelimit", "content-type"):
            assert from_memory.headers[name] == by_redis.headers[name], name
        assert from_memory.headers["x-request-id"] != by_redis.headers["x-request-id"]
        # Another tenant's start, and a credential without the scope, go the full way.
        beta = {**key(BETA), "Prefer": "respond-async"}
        assert (
            await api.client.post("/api/process/start", json=start_body(cid()), headers=beta)
        ).status_code == 202
        assert asked == ["beta"]
        wrong = await api.client.post(
            "/api/process/start", content=b"{", headers=key("no-such-key")
        )
        assert wrong.status_code == 401
        exposed = (await api.client.get("/metrics", headers=key(ROOT))).text
        assert (
            'flowgate_api_outcomes_total{method="POST",route="/api/process/start",status="429"} 2.0'
            in exposed
        )


async def test_the_load_balancer_refuses_a_credentials_flood_before_it_reaches_a_replica(
    make_settings: MakeSettings, engine_url: str, tmp_path: Path
) -> None:
    """`make up`'s nginx with TENANT_STARTS_PER_S (deploy/local/stack.py) in front of a
    replica: a credential's flood of starts is refused there, with the replica's own
    answer, and most of it never reaches the replica; another credential's start, and one
    without a credential, go on to the replica as before."""
    await deploy_bpmn(engine_url)
    settings = make_settings(camunda_base_url=engine_url)
    limited = {"API_KEYS": KEYS, "TENANT_STARTS_PER_S": "5"}
    async with replica(settings, tmp_path, "behind-nginx", **limited) as api:
        port = free_port()
        cfg = stack.Config(
            run_dir=tmp_path / "lb",
            api_port=port,
            engine_port=0,
            redis_port=0,
            postgres_port=0,
            replica_ports=[int(api.url.rsplit(":", 1)[1])],
            worker_health_ports=[],
        )
        nginx = stack.nginx_server(cfg, starts_per_s=5).start(timeout_s=15)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as lb:

                async def start_as(credential: dict[str, str]) -> httpx.Response:
                    headers = {**credential, "Prefer": "respond-async"}
                    return await lb.post(
                        "/api/process/start", json=start_body(cid()), headers=headers
                    )

                flood = await asyncio.gather(*(start_as(key(ALPHA)) for _ in range(30)))
                codes = [answer.status_code for answer in flood]
                assert 1 <= codes.count(202) <= 3, codes
                assert codes.count(429) >= 27, codes
                # nginx's refusals and the replica's alike: the body, the three headers.
                same = limited_answer(Limited("starts", 5, window_s=1, retry_after_s=1))
                for refused in (answer for answer in flood if answer.status_code == 429):
                    assert refused.content == same.body
                    assert refused.headers["content-type"] == "application/json"
                    for name, value in same.headers.items():
                        if name in ("retry-after", "ratelimit-policy", "ratelimit"):
                            assert refused.headers[name] == value, name
                    assert refused.headers["x-request-id"]
                reached = await _starts_answered(api)
                assert reached <= 6, f"{reached} of the flood's 30 starts reached the replica"
                # Another credential has its own allowance; no credential is the replica's
                # to refuse (401), however many.
                assert (await start_as(key(BETA))).status_code == 202
                anonymous = await asyncio.gather(*(start_as({}) for _ in range(10)))
                assert [answer.status_code for answer in anonymous] == [401] * 10
                assert await _starts_answered(api) == reached + 11
        finally:
            nginx.stop()


async def _starts_answered(api: Replica) -> int:
    """The starts the replica answered, whatever its answer (its /metrics, as an admin)."""
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"{api.url}/metrics", headers=key(ROOT))).text
    found = re.findall(
        r'^flowgate_api_outcomes_total\{method="POST",route="/api/process/start",'
        r'status="\d+"\} (\S+)$',
        text,
        re.MULTILINE,
    )
    return int(sum(float(count) for count in found))
