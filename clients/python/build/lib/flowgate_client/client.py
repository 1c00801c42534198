"""flowgate over HTTP: :class:`AsyncClient`, and :class:`Client` with the same methods, sync.
(One module past 400 lines: the two classes are twins, kept side by side so they stay alike.)

What both share lives in plain functions and two small state holders (:class:`_Run`,
:class:`_Stream`), so the sync and async classes are only the loops around the I/O:

* :meth:`~AsyncClient.run` starts a run and follows it to its end with long-polls, retrying
  what is safe to retry (a start with the same correlationId never starts a second run);
  giving up on the wait (``timeout``) never cancels the run;
* :meth:`~AsyncClient.events` follows the run's live progress and reconnects by itself with
  ``Last-Event-ID``, so a caller sees every step once and then the end;
* :meth:`~AsyncClient.start`, :meth:`~AsyncClient.status` and :meth:`~AsyncClient.cancel`
  are one request each, and so are the ways to take part in a running process:
  :meth:`~AsyncClient.tasks` and :meth:`~AsyncClient.complete_task` (user tasks),
  :meth:`~AsyncClient.send_message` and :meth:`~AsyncClient.retry` (an incident's step).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

from flowgate_client.errors import (
    ApiError,
    NotFound,
    RateLimited,
    RunCancelled,
    RunFailed,
    Unavailable,
)
from flowgate_client.models import Event, RunStatus, UserTask
from flowgate_client.sse import Decoder

#: A long-poll asks for at most this (the server caps it at its MAX_WAIT_MS, 60 s by default).
LONG_POLL_S = 50.0
#: Beyond the wait asked for, how long an answer may take to arrive.
SLACK_S = 10.0
#: A live stream sends a heartbeat every 15 s: silence longer than this means it is broken.
STREAM_READ_S = 45.0
RECONNECT_S, RECONNECT_MAX_S = 1.0, 30.0

_RUN_BODY = ("status", "correlationId")


# --- the protocol, without I/O ------------------------------------------------------------


def _path(kind: str, correlation_id: str) -> str:
    return f"/api/process/{kind}/{quote(correlation_id, safe='')}"


def _start_request(
    process_key: str,
    correlation_id: str,
    variables: Mapping[str, Any] | None,
    *,
    wait: float | None,
    wait_until: str | None,
    callback_url: str | None,
    fetch_variables: list[str] | None,
    read_token: bool = False,
) -> tuple[dict[str, Any], dict[str, str]]:
    body: dict[str, Any] = {"processKey": process_key, "correlationId": correlation_id}
    if read_token:
        body["readToken"] = True
    if variables is not None:
        body["variables"] = dict(variables)
    if wait_until is not None:
        body["waitUntil"] = wait_until
    if callback_url is not None:
        body["callbackUrl"] = callback_url
    if fetch_variables is not None:
        body["fetchVariables"] = fetch_variables
    if wait is None:
        return body, {}
    return body, {"Prefer": f"wait={int(wait)}" if wait > 0 else "respond-async"}


def _action_request(
    wait: float | None, wait_until: str | None, **fields: Any
) -> tuple[dict[str, Any], dict[str, str]]:
    """A body for an action on a running process, and its ``Prefer`` header."""
    body = {name: value for name, value in fields.items() if value is not None}
    if wait_until is not None:
        body["waitUntil"] = wait_until
    if wait is None:
        return body, {}
    return body, {"Prefer": f"wait={int(wait)}" if wait > 0 else "respond-async"}


def _tasks(response: httpx.Response) -> list[UserTask]:
    if response.status_code != 200:
        raise _error(response.status_code, _json(response.content), response.headers)
    return [UserTask.from_json(task) for task in response.json()["tasks"]]


def _status_params(wait: float | None, until: str | None) -> dict[str, str]:
    params = {"wait": str(int(wait))} if wait else {}
    if until is not None:
        params["until"] = until
    return params


def _timeout(wait: float | None) -> httpx.Timeout:
    return httpx.Timeout(SLACK_S + (wait or 0), connect=SLACK_S)


def _answer(response: httpx.Response) -> RunStatus:
    """The run a start, status or cancel answered; raises the error it answered instead."""
    try:
        body = response.json()
    except ValueError:
        body = None
    run_body = isinstance(body, dict) and all(key in body for key in _RUN_BODY)
    if response.status_code in (200, 202, 409, 500) and run_body:
        return RunStatus.from_json(body)
    raise _error(response.status_code, body, response.headers)


def _error(status_code: int, body: Any, headers: Mapping[str, str]) -> ApiError:
    if status_code == 404:
        return NotFound(status_code, body)
    retry = headers.get("retry-after", "")
    retry_after = float(retry) if retry.isdigit() else RECONNECT_S
    if status_code in (502, 503, 504):
        return Unavailable(status_code, body, retry_after)
    if status_code == 429:
        return RateLimited(status_code, body, retry_after)
    return ApiError(status_code, body)


def _outcome(run: RunStatus) -> Any:
    """The result of a finished run, or the error it ended with."""
    if run.status == "error":
        raise RunFailed(run)
    if run.status == "cancelled":
        raise RunCancelled(run)
    return run.data


class _Run:
    """Following one run to its end: what to ask next, and how long to wait for it.

    It starts, then long-polls the status. A status read that answers an error after the
    start was accepted means the start was given up (the engine never got it, or refused
    it: the status answers what the start would have) or Redis lost the run: it starts
    again, which is safe (a start with the same correlationId never starts a second run)
    and answers for itself (the new run, or the engine's refusal, raised to the caller).
    """

    def __init__(self, timeout: float | None) -> None:
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.last: RunStatus | None = None
        #: The next request is a start (at first, and after a given-up start).
        self.starting = True

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finished

    def answered(self, run: RunStatus) -> None:
        self.last = run
        self.starting = False

    def outcome(self) -> Any:
        assert self.last is not None
        return _outcome(self.last)

    def wait(self) -> float:
        """Seconds the next long-poll may wait; TimeoutError once the deadline passed."""
        if self.deadline is None:
            return LONG_POLL_S
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the run did not end within the timeout (it goes on)")
        return max(min(LONG_POLL_S, left), 1.0)

    def pause(self, error: Exception) -> float:
        """How long to pause before asking again after ``error``; re-raises an answer that
        asking again cannot change, or when the deadline would pass meanwhile."""
        if isinstance(error, ApiError) and not isinstance(error, Unavailable):
            if self.starting:
                raise error  # the start itself was refused (400, 404, 422, ...)
            self.starting = True  # the start was given up: start again at once
            return 0.0
        if isinstance(error, Unavailable) and not self.starting:
            self.starting = True  # a given-up start answers its 502/503 on status too
        pause = error.retry_after if isinstance(error, Unavailable) else RECONNECT_S
        if self.deadline is not None and time.monotonic() + pause >= self.deadline:
            raise error
        return pause


class _Stream:
    """Following one run's event stream across reconnects."""

    def __init__(self, last_event_id: str | None) -> None:
        self.last_id = last_event_id
        self.decoder = Decoder()
        self.failures = 0

    def headers(self) -> dict[str, str]:
        self.decoder = Decoder(retry_ms=self.decoder.retry_ms)
        headers = {"Accept": "text/event-stream"}
        if self.last_id:
            headers["Last-Event-ID"] = self.last_id
        return headers

    def opened(self, response: httpx.Response, body: bytes) -> bool:
        """Whether events follow (False: the end was had already); raises an error answer."""
        if response.status_code == 204:
            return False
        if response.status_code != 200:
            raise _error(response.status_code, _json(body), response.headers)
        self.failures = 0
        return True

    def line(self, text: str) -> Event | None:
        raw = self.decoder.feed(text)
        if raw is None:
            return None
        if raw.id:
            self.last_id = raw.id
        return Event(raw.id or "", raw.event, _json(raw.data.encode()))

    def pause(self, error: Exception | None) -> float:
        """Seconds before reconnecting; re-raises an error that a reconnect cannot cure."""
        if isinstance(error, ApiError) and not isinstance(error, Unavailable):
            raise error
        if isinstance(error, Unavailable):
            return error.retry_after
        self.failures += 1
        base = (self.decoder.retry_ms or RECONNECT_S * 1000) / 1000
        return float(min(base * 2.0 ** (self.failures - 1), RECONNECT_MAX_S))


def _json(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


def _headers(api_key: str | None, token: str | None) -> dict[str, str]:
    """An API key, or a bearer token (an OIDC token, a run's read token)."""
    if api_key and token:
        raise ValueError("an API key or a bearer token, not both")
    if token:
        return {"Authorization": f"Bearer {token}"}
    return {"X-API-Key": api_key} if api_key else {}


# --- async --------------------------------------------------------------------------------


class AsyncClient:
    """``async with AsyncClient("http://flowgate:8000", api_key=...) as flowgate: ...``
    (or ``token=`` for a bearer token: an OIDC token, a run's read token)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        token: str | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        headers = _headers(api_key, token)
        self._http = http or httpx.AsyncClient(base_url=base_url, headers=headers)
        self._owned = http is None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owned:
            await self._http.aclose()

    async def start(
        self,
        process_key: str,
        correlation_id: str,
        variables: Mapping[str, Any] | None = None,
        *,
        wait: float | None = None,
        wait_until: str | None = None,
        callback_url: str | None = None,
        fetch_variables: list[str] | None = None,
        read_token: bool = False,
    ) -> RunStatus:
        """Start a run (or join the one with this correlationId) and wait up to ``wait``
        seconds (None: the server's default, 0: not at all) for its end or ``wait_until``.
        ``read_token``: the answer's ``read_token`` reads this run only (for a browser)."""
        body, headers = _start_request(
            process_key, correlation_id, variables, wait=wait, wait_until=wait_until,
            callback_url=callback_url, fetch_variables=fetch_variables, read_token=read_token,
        )  # fmt: skip
        response = await self._http.post(
            "/api/process/start", json=body, headers=headers, timeout=_timeout(wait or 60)
        )
        return _answer(response)

    async def status(
        self, correlation_id: str, *, wait: float | None = None, until: str | None = None
    ) -> RunStatus:
        """The run now, or within ``wait`` seconds once it ends (or reaches ``until``)."""
        response = await self._http.get(
            _path("status", correlation_id),
            params=_status_params(wait, until),
            timeout=_timeout(wait),
        )
        return _answer(response)

    async def cancel(self, correlation_id: str, reason: str | None = None) -> RunStatus:
        """Cancel the run; its status afterwards (``cancelled``, or how it had ended)."""
        response = await self._http.post(
            _path("cancel", correlation_id), json={"reason": reason} if reason else None
        )
        return _answer(response)

    async def tasks(self, correlation_id: str) -> list[UserTask]:
        """The run's open user tasks, oldest first (none once it has ended)."""
        return _tasks(await self._http.get(_path("tasks", correlation_id)))

    async def complete_task(
        self,
        correlation_id: str,
        task_id: str,
        variables: Mapping[str, Any] | None = None,
        *,
        wait: float | None = None,
        wait_until: str | None = None,
    ) -> RunStatus:
        """Complete one of the run's user tasks; the run once it has ended, reached
        ``wait_until`` or paused again (``tasks``: those open then), or within ``wait``."""
        body, headers = _action_request(wait, wait_until, variables=variables)
        path = f"{_path('tasks', correlation_id)}/{quote(task_id, safe='')}/complete"
        response = await self._http.post(
            path, json=body, headers=headers, timeout=_timeout(wait or 60)
        )
        return _answer(response)

    async def send_message(
        self,
        correlation_id: str,
        message_name: str,
        variables: Mapping[str, Any] | None = None,
        *,
        message_id: str | None = None,
        wait: float | None = None,
        wait_until: str | None = None,
    ) -> RunStatus:
        """Send a BPMN message to the run (held until it waits for it); the run as
        :meth:`complete_task` answers. The same ``message_id`` is delivered at most once."""
        body, headers = _action_request(
            wait, wait_until, messageName=message_name, variables=variables, messageId=message_id
        )
        response = await self._http.post(
            _path("message", correlation_id), json=body, headers=headers,
            timeout=_timeout(wait or 60),
        )  # fmt: skip
        return _answer(response)

    async def retry(
        self, correlation_id: str, *, wait: float | None = None, wait_until: str | None = None
    ) -> RunStatus:
        """Retry a run an incident ended, from its failed step; the run as a start answers."""
        body, headers = _action_request(wait, wait_until)
        response = await self._http.post(
            _path("retry", correlation_id), json=body, headers=headers,
            timeout=_timeout(wait or 60),
        )  # fmt: skip
        return _answer(response)

    async def run(
        self,
        process_key: str,
        correlation_id: str,
        variables: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - it bounds each long-poll too
        fetch_variables: list[str] | None = None,
    ) -> Any:
        """Start the run and return its result once it ends; raises :class:`RunFailed` or
        :class:`RunCancelled` for another end, TimeoutError after ``timeout`` seconds (the
        run goes on). Engine or store outages are waited out."""
        follow = _Run(timeout)
        while not follow.finished:
            try:
                if follow.starting:
                    follow.answered(await self.start(
                        process_key, correlation_id, variables,
                        wait=follow.wait(), fetch_variables=fetch_variables,
                    ))  # fmt: skip
                else:
                    follow.answered(await self.status(correlation_id, wait=follow.wait()))
            except (ApiError, httpx.TransportError) as error:
                await asyncio.sleep(follow.pause(error))
        return follow.outcome()

    async def events(
        self, correlation_id: str, *, last_event_id: str | None = None
    ) -> AsyncIterator[Event]:
        """Every step of the run as it finishes, then its end; reconnects on its own."""
        stream = _Stream(last_event_id)
        while True:
            error: Exception | None = None
            try:
                async with self._http.stream(
                    "GET",
                    _path("events", correlation_id),
                    headers=stream.headers(),
                    timeout=httpx.Timeout(STREAM_READ_S, connect=SLACK_S),
                ) as response:
                    body = b"" if response.status_code == 200 else await response.aread()
                    if not stream.opened(response, body):
                        return
                    async for text in response.aiter_lines():
                        if event := stream.line(text):
                            yield event
                            if event.kind == "end":
                                return
            except (Unavailable, httpx.TransportError) as exc:
                error = exc
            await asyncio.sleep(stream.pause(error))


# --- sync ---------------------------------------------------------------------------------


class Client:
    """``with Client("http://flowgate:8000", api_key=...) as flowgate: ...``"""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        token: str | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        headers = _headers(api_key, token)
        self._http = http or httpx.Client(base_url=base_url, headers=headers)
        self._owned = http is None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self._http.close()

    def start(
        self,
        process_key: str,
        correlation_id: str,
        variables: Mapping[str, Any] | None = None,
        *,
        wait: float | None = None,
        wait_until: str | None = None,
        callback_url: str | None = None,
        fetch_variables: list[str] | None = None,
        read_token: bool = False,
    ) -> RunStatus:
        """See :meth:`AsyncClient.start`."""
        body, headers = _start_request(
            process_key, correlation_id, variables, wait=wait, wait_until=wait_until,
            callback_url=callback_url, fetch_variables=fetch_variables, read_token=read_token,
        )  # fmt: skip
        response = self._http.post(
            "/api/process/start", json=body, headers=headers, timeout=_timeout(wait or 60)
        )
        return _answer(response)

    def status(
        self, correlation_id: str, *, wait: float | None = None, until: str | None = None
    ) -> RunStatus:
        """See :meth:`AsyncClient.status`."""
        response = self._http.get(
            _path("status", correlation_id),
            params=_status_params(wait, until),
            timeout=_timeout(wait),
        )
        return _answer(response)

    def cancel(self, correlation_id: str, reason: str | None = None) -> RunStatus:
        """See :meth:`AsyncClient.cancel`."""
        response = self._http.post(
            _path("cancel", correlation_id), json={"reason": reason} if reason else None
        )
        return _answer(response)

    def tasks(self, correlation_id: str) -> list[UserTask]:
        """See :meth:`AsyncClient.tasks`."""
        return _tasks(self._http.get(_path("tasks", correlation_id)))

    def complete_task(
        self,
        correlation_id: str,
        task_id: str,
        variables: Mapping[str, Any] | None = None,
        *,
        wait: float | None = None,
        wait_until: str | None = None,
    ) -> RunStatus:
        """See :meth:`AsyncClient.complete_task`."""
        body, headers = _action_request(wait, wait_until, variables=variables)
        path = f"{_path('tasks', correlation_id)}/{quote(task_id, safe='')}/complete"
        response = self._http.post(path, json=body, headers=headers, timeout=_timeout(wait or 60))
        return _answer(response)

    def send_message(
        self,
        correlation_id: str,
        message_name: str,
        variables: Mapping[str, Any] | None = None,
        *,
        message_id: str | None = None,
        wait: float | None = None,
        wait_until: str | None = None,
    ) -> RunStatus:
        """See :meth:`AsyncClient.send_message`."""
        body, headers = _action_request(
            wait, wait_until, messageName=message_name, variables=variables, messageId=message_id
        )
        response = self._http.post(
            _path("message", correlation_id), json=body, headers=headers,
            timeout=_timeout(wait or 60),
        )  # fmt: skip
        return _answer(response)

    def retry(
        self, correlation_id: str, *, wait: float | None = None, wait_until: str | None = None
    ) -> RunStatus:
        """See :meth:`AsyncClient.retry`."""
        body, headers = _action_request(wait, wait_until)
        response = self._http.post(
            _path("retry", correlation_id), json=body, headers=headers,
            timeout=_timeout(wait or 60),
        )  # fmt: skip
        return _answer(response)

    def run(
        self,
        process_key: str,
        correlation_id: str,
        variables: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        fetch_variables: list[str] | None = None,
    ) -> Any:
        """See :meth:`AsyncClient.run`."""
        follow = _Run(timeout)
        while not follow.finished:
            try:
                if follow.starting:
                    follow.answered(self.start(
                        process_key, correlation_id, variables,
                        wait=follow.wait(), fetch_variables=fetch_variables,
                    ))  # fmt: skip
                else:
                    follow.answered(self.status(correlation_id, wait=follow.wait()))
            except (ApiError, httpx.TransportError) as error:
                time.sleep(follow.pause(error))
        return follow.outcome()

    def events(self, correlation_id: str, *, last_event_id: str | None = None) -> Iterator[Event]:
        """See :meth:`AsyncClient.events`."""
        stream = _Stream(last_event_id)
        while True:
            error: Exception | None = None
            try:
                with self._http.stream(
                    "GET",
                    _path("events", correlation_id),
                    headers=stream.headers(),
                    timeout=httpx.Timeout(STREAM_READ_S, connect=SLACK_S),
                ) as response:
                    body = b"" if response.status_code == 200 else response.read()
                    if not stream.opened(response, body):
                        return
                    for text in response.iter_lines():
                        if event := stream.line(text):
                            yield event
                            if event.kind == "end":
                                return
            except (Unavailable, httpx.TransportError) as exc:
                error = exc
            time.sleep(stream.pause(error))
