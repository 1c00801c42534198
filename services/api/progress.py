"""Where a run's progress is streamed: Server-Sent Events from its step record.

``GET /api/process/events/{correlationId}`` answers ``text/event-stream``:

* ``event: step``, one per step the run recorded (shared/steps.py), its ``id`` the step's
  entry in the run's record in Redis (``{p}:steps:{cid}``), its data the step's wire object
  and, while the run is pending, what it waits for then (``waitingOn``);
* ``event: task_created`` / ``event: task_completed``, without an ``id`` (a reconnect
  resumes after the last step), when a user task opens or closes: ``{"taskId",
  "activity", "assignee"?}``; on connecting, every task open then is ``task_created``;
* ``event: stalled``, without an ``id``, when the run has sat at a step past the threshold
  its process declares (services/background/stalls.py): ``{"activity",
  "activityInstanceId", "since", "thresholdS"}``; on connecting, every stall so far;
* ``event: end``, ``id: end``, the final status body (what status answers), then the
  stream closes.

The record is the truth and the run channel only a wake-up, as in the wait room: the
stream registers with the wait room first, then reads the record and the state, then sleeps
until a step or the end is announced (or a while passes), and reads again from the last id
it sent. So nothing recorded is skipped, and nothing is sent twice. A reconnect with
``Last-Event-ID`` starts after that id, on any replica; a client that comes after the end
gets every step and the end at once; one that already had the end gets 204 (an
EventSource stops reconnecting). A replica that drains ends its streams with a ``retry``
hint, and the client reconnects elsewhere with its last id. Heartbeat comments
(sse-starlette's pings) keep proxies from closing a quiet stream; ``X-Accel-Buffering: no``
keeps nginx from buffering it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
from sse_starlette import ServerSentEvent

from flowgate.services.api.deps import Deps
from flowgate.services.api.limits import Place
from flowgate.services.api.schemas import ProcessStatus
from flowgate.services.api.waitroom import RoomFull
from flowgate.shared.state import RunState

#: The ``id`` of the last event; a ``Last-Event-ID`` of it means "I have everything".
END_ID = "end"
#: What a ``Last-Event-ID`` of a step looks like (a Redis stream entry id: two 64-bit
#: numbers; at most 19 digits each keeps any match within them, where Redis would refuse
#: the read mid-stream), and any (empty is "from the start", as EventSource sends after an
#: event without an id).
STEP_ID = re.compile(r"^[0-9]{1,19}-[0-9]{1,19}$")
EVENT_ID_PATTERN = rf"^({END_ID}|[0-9]{{1,19}}-[0-9]{{1,19}})?$"
#: Steps read from the record at once (a long record is sent a page at a time).
PAGE = 100
#: Between wake-ups, the stream reads the record again anyway after this.
REREAD_S = 30.0
#: Heartbeat comments: well within common proxies' 60 s read timeouts.
PING_S = 15
#: A client that takes no event for this long is dropped (its buffer stays bounded).
SEND_TIMEOUT_S = 30.0
#: What a drained stream asks its client to wait before reconnecting (ms).
RECONNECT_MS = 500


async def events(
    d: Deps, correlation_id: str, after: str | None, place: Place
) -> AsyncIterator[ServerSentEvent]:
    """The stream's events from after ``after`` (a step id, or None for all); ``place`` is
    the stream's among its tenant's (services/api/limits.py), kept while it is open."""
    try:
        async for event in _events(d, correlation_id, after, place):
            yield event
    finally:
        await place.release()


async def _events(
    d: Deps, correlation_id: str, after: str | None, place: Place
) -> AsyncIterator[ServerSentEvent]:
    yield ServerSentEvent(comment="connected")  # the first byte at once, through any proxy
    last = after or None
    told = Told()
    try:
        async with d.waitroom.follow(correlation_id) as follower:
            d.metrics.streams.inc()
            try:
                while True:
                    page = await d.store.steps.after(correlation_id, after=last, count=PAGE)
                    state = await d.runs.get(correlation_id)
                    # A pending run's steps say what it waits for now (services/api/waiting.py).
                    waits = await d.waiting.of(state, fresh=bool(page)) if state else None
                    for entry_id, step in page:
                        last = entry_id
                        body = step.to_dict()
                        if waits is not None:
                            body["waitingOn"] = waits
                        yield _event("step", entry_id, body, d)
                    for kind, body in await told.news(d, correlation_id, waits):
                        yield _event(kind, None, body, d)
                    if len(page) == PAGE:
                        continue  # more may wait in the record: read on before sleeping
                    if state is None:
                        return
                    if state.finished:
                        # The steps recorded up to the end (its own step came with it), from
                        # Postgres once they have left Redis.
                        for entry_id, step in await d.runs.steps(state, after=last):
                            yield _event("step", entry_id, step.to_dict(), d)
                        yield _end(state, d)
                        return
                    if d.waitroom.draining:
                        yield ServerSentEvent(comment="replica going away", retry=RECONNECT_MS)
                        return
                    await follower.changed(REREAD_S)
                    await place.renew()
            finally:
                d.metrics.streams.dec()
    except RoomFull:
        yield ServerSentEvent(comment="replica full", retry=RECONNECT_MS * 10)


class Told:
    """What a stream has told besides the run's record: its open user tasks and its stalls.

    What ``waitingOn`` shows now becomes ``task_created`` (a task not told yet: on
    connecting, every open one) and ``task_completed`` (a told task no longer open); a
    stall not told yet becomes ``stalled``.
    """

    def __init__(self) -> None:
        self._told: dict[str, dict[str, Any]] = {}
        self._stalls = 0

    async def news(
        self, d: Deps, correlation_id: str, waits: list[dict[str, Any]] | None
    ) -> list[tuple[str, dict[str, Any]]]:
        events = self._moved(waits) if waits is not None else []
        stalls = await d.store.stalls(correlation_id, after=self._stalls)
        self._stalls += len(stalls)
        return events + [("stalled", stall) for stall in stalls]

    def _moved(self, waits: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        open_now = {
            str(wait["taskId"]): {key: value for key, value in wait.items() if key != "type"}
            for wait in waits
            if wait.get("type") == "userTask" and wait.get("taskId")
        }
        created = [
            ("task_created", task) for tid, task in open_now.items() if tid not in self._told
        ]
        completed = [
            ("task_completed", task) for tid, task in self._told.items() if tid not in open_now
        ]
        self._told = open_now
        return completed + created


def _event(kind: str, event_id: str | None, body: object, d: Deps) -> ServerSentEvent:
    d.metrics.stream_events.labels(kind).inc()
    return ServerSentEvent(data=orjson.dumps(body).decode(), event=kind, id=event_id)


def _end(state: RunState, d: Deps) -> ServerSentEvent:
    return _event("end", END_ID, ProcessStatus.of(state).model_dump(mode="json"), d)
