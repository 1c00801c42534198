"""The API in-process (httpx over ASGI, with its real lifespan) and what tests say to it."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.types import Receive, Scope, Send

from flowgate.services import background
from flowgate.services.api.app import create_app
from flowgate.services.api.deps import Deps
from flowgate.services.api.drain import DrainHook
from flowgate.shared.settings import Settings
from flowgate.shared.tracing import Tracing

BENCHMARK = "benchmark"  # bpmn/benchmark.bpmn: one external task nobody works on here


@dataclass
class Api:
    client: httpx.AsyncClient
    deps: Deps


@contextlib.asynccontextmanager
async def running_app(
    settings: Settings, *, drain: DrainHook | None = None, tracing: Tracing | None = None
) -> AsyncIterator[Api]:
    """A replica in-process (the app and its background work, as ``python -m flowgate.services.api``
    runs them), and a client that talks to it."""
    app = create_app(
        settings, drain=drain, alongside=background.alongside(settings), tracing=tracing
    )
    async with app.router.lifespan_context(app) as state:
        assert isinstance(state, Mapping)

        async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
            scope["state"] = dict(state)  # what uvicorn does with the lifespan's state
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://api", timeout=30
        ) as client:
            yield Api(client=client, deps=state["deps"])


def cid() -> str:
    return f"c-{uuid.uuid4().hex}"


def start_body(correlation_id: str, key: str = BENCHMARK, **variables: Any) -> dict[str, Any]:
    return {"processKey": key, "correlationId": correlation_id, "variables": variables}
