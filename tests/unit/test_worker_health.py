"""The worker's probe port: loopback by default, /metrics behind METRICS_TOKEN when set."""

from __future__ import annotations

import httpx
from pydantic import SecretStr

from deploy.local.servers import free_port
from flowgate.shared.health import serve_health


def healthy() -> tuple[bool, dict[str, object]]:
    return True, {"workerId": "w1"}


async def test_metrics_need_the_token_and_probes_do_not() -> None:
    port = free_port()
    async with (
        serve_health(
            port, status=healthy, metrics=lambda: b"m 1\n", metrics_token=SecretStr("t0k")
        ) as server,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        assert server is not None
        assert {sock.getsockname()[0] for sock in server.sockets} == {"127.0.0.1"}
        assert (await client.get("/healthz")).json() == {"status": "ok", "workerId": "w1"}
        assert (await client.get("/metrics")).status_code == 401
        wrong = await client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = await client.get("/metrics", headers={"Authorization": "Bearer t0k"})
        assert (right.status_code, right.content) == (200, b"m 1\n")


async def test_without_a_token_metrics_are_open_on_loopback() -> None:
    port = free_port()
    async with (
        serve_health(port, status=healthy, metrics=lambda: b"m 1\n"),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        assert (await client.get("/metrics")).status_code == 200
