"""flowgate_client's protocol: SSE decoding, reconnecting with Last-Event-ID, run's retries.

The server is an httpx.MockTransport here; tests/integration/test_progress.py runs the same
client against real replicas.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest
from flowgate_client import AsyncClient, Client, NotFound, RateLimited, RunCancelled, RunFailed
from flowgate_client.sse import Decoder, RawEvent

Handler = Callable[[httpx.Request], httpx.Response]


def _client(handler: Handler) -> AsyncClient:
    http = httpx.AsyncClient(base_url="http://flowgate", transport=httpx.MockTransport(handler))
    return AsyncClient("http://flowgate", http=http)


def _run(status: str, **extra: object) -> dict[str, object]:
    return {"status": status, "correlationId": "c-1", **extra}


def test_the_decoder_follows_the_whatwg_rules_it_needs() -> None:
    decoder = Decoder()
    lines = [
        ": connected", "retry: 250", "id: 1-0", "event: step", "data: {\"a\":", "data: 1}", "",
        "", "id: bad\0id", "data:plain", "",
    ]  # fmt: skip
    events = [event for line in lines if (event := decoder.feed(line))]
    assert events == [RawEvent("1-0", "step", '{"a":\n1}'), RawEvent(None, "message", "plain")]
    assert decoder.retry_ms == 250


async def test_events_reconnect_after_the_last_id_and_stop_at_the_end() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("last-event-id"))
        if len(seen) == 1:  # the connection breaks after one step
            body = 'retry: 10\nid: 5-0\nevent: step\ndata: {"step":"a"}\n\n'
        else:
            body = f"id: end\nevent: end\ndata: {json.dumps(_run('ok', data={'n': 1}))}\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    async with _client(handler) as flowgate:
        events = [event async for event in flowgate.events("c-1")]
    assert seen == [None, "5-0"]
    assert [(e.id, e.kind) for e in events] == [("5-0", "step"), ("end", "end")]
    assert events[0].step is not None
    assert events[0].step.step == "a"
    assert events[1].run is not None
    assert events[1].run.data == {"n": 1}


async def test_events_after_the_end_yield_nothing_and_unknown_runs_raise() -> None:
    async with _client(lambda _: httpx.Response(204)) as flowgate:
        assert [e async for e in flowgate.events("c-1", last_event_id="end")] == []
    missing = httpx.Response(404, json={"status": "not_found", "correlationId": "c-1"})
    async with _client(lambda _: missing) as flowgate:
        with pytest.raises(NotFound):
            [e async for e in flowgate.events("c-1")]


async def test_run_polls_until_the_end_and_retries_an_unavailable_engine() -> None:
    answers = [
        httpx.Response(503, json={"message": "engine down"}, headers={"retry-after": "0"}),
        httpx.Response(202, json=_run("pending")),
        httpx.Response(200, json=_run("ok", data={"n": 2})),
    ]
    requests: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(f"{request.method} {request.url.path}")
        return answers.pop(0)

    async with _client(handler) as flowgate:
        assert await flowgate.run("p", "c-1", {"x": 1}) == {"n": 2}
    assert requests == [
        "POST /api/process/start",  # 503: the same start again is safe
        "POST /api/process/start",
        "GET /api/process/status/c-1",
    ]


@pytest.mark.parametrize(
    ("answer", "raised"),
    [
        (httpx.Response(500, json=_run("error", error={"message": "no"})), RunFailed),
        (httpx.Response(409, json=_run("cancelled", error="withdrawn")), RunCancelled),
    ],
)
def test_run_raises_for_another_end(answer: httpx.Response, raised: type[Exception]) -> None:
    http = httpx.Client(base_url="http://flowgate", transport=httpx.MockTransport(lambda _: answer))
    with Client("http://flowgate", http=http) as flowgate, pytest.raises(raised):
        flowgate.run("p", "c-1")


def _given_up_then_ok() -> tuple[Handler, list[str]]:
    """A start answered 202 whose start the server then gave up (its status answers the
    start's 503, then its 404 "no such process definition" once Redis dropped the record),
    and a new start that runs to the end."""
    answers = [
        httpx.Response(202, json=_run("pending")),
        httpx.Response(503, json={"message": "interrupted; retry"}, headers={"retry-after": "0"}),
        httpx.Response(202, json=_run("pending")),
        httpx.Response(404, json={"status": "not_found", "correlationId": "c-1"}),
        httpx.Response(200, json=_run("ok", data={"n": 3})),
    ]
    requests: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(f"{request.method} {request.url.path}")
        return answers.pop(0)

    return handler, requests


_STARTED_AGAIN = [
    "POST /api/process/start",
    "GET /api/process/status/c-1",  # 503: the start was given up
    "POST /api/process/start",
    "GET /api/process/status/c-1",  # 404: Redis lost the run
    "POST /api/process/start",
]


async def test_run_starts_again_after_a_given_up_start() -> None:
    handler, requests = _given_up_then_ok()
    async with _client(handler) as flowgate:
        assert await flowgate.run("p", "c-1", timeout=30) == {"n": 3}
    assert requests == _STARTED_AGAIN


def test_run_starts_again_after_a_given_up_start_sync() -> None:
    handler, requests = _given_up_then_ok()
    http = httpx.Client(base_url="http://flowgate", transport=httpx.MockTransport(handler))
    with Client("http://flowgate", http=http) as flowgate:
        assert flowgate.run("p", "c-1", timeout=30) == {"n": 3}
    assert requests == _STARTED_AGAIN


async def test_run_raises_what_a_start_is_refused_for() -> None:
    refused = httpx.Response(404, json={"message": "no process definition with key 'p'"})
    async with _client(lambda _: refused) as flowgate:
        with pytest.raises(NotFound, match="no process definition"):
            await flowgate.run("p", "c-1")


async def test_a_read_token_is_asked_for_and_a_429_says_when_to_retry() -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if len(sent) == 1:
            return httpx.Response(202, json=_run("pending", readToken="rt-1", statusUrl="/s"))
        headers = {"Retry-After": "3", "RateLimit-Policy": '"starts";q=2;w=1'}
        return httpx.Response(
            429, json={"message": "limit of 2 starts per second"}, headers=headers
        )

    async with _client(handler) as flowgate:
        started = await flowgate.start("p", "c-1", wait=0, read_token=True)
        with pytest.raises(RateLimited) as limited:
            await flowgate.start("p", "c-2", wait=0)
    assert started.read_token == "rt-1"
    assert json.loads(sent[0].content)["readToken"] is True
    assert limited.value.retry_after == 3.0
    assert "readToken" not in json.loads(sent[1].content)


def test_a_bearer_token_is_sent_instead_of_a_key() -> None:
    with Client("http://flowgate", token="t-1") as flowgate:
        assert flowgate._http.headers["authorization"] == "Bearer t-1"
    with pytest.raises(ValueError, match="not both"):
        Client("http://flowgate", api_key="k", token="t")
