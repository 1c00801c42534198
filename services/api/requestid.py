"""Request ids: every answer carries ``X-Request-ID``, the client's own when it sent a
sane one, else a new one, and every log line written while serving the request names it
(shared/logs.py), beside the run's correlationId once the request has named one.

A pure ASGI middleware (no buffering of streamed answers, as services/api/metrics.py's).
"""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flowgate.shared.logs import CORRELATION_ID, REQUEST_ID

HEADER = b"x-request-id"
#: What is echoed as given: short, and nothing a log line or a header could trip on.
_SANE = re.compile(rb"^[A-Za-z0-9._:/+=@-]{1,128}$")


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == HEADER), None)
        request_id = (
            given if given is not None and _SANE.match(given) else uuid.uuid4().hex.encode()
        )
        request_token = REQUEST_ID.set(request_id.decode())
        run_token = CORRELATION_ID.set(None)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (HEADER, request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            CORRELATION_ID.reset(run_token)
            REQUEST_ID.reset(request_token)
