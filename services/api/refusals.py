"""Starts a replica already knows to refuse, answered before routing.

A tenant past its starts per second is refused by every replica until the time Redis last
named, and each replica remembers that time (services/api/limits.py). While a flood lasts
those refusals are most of what the flooded replica does, and on the full path each walked
routing, the access check, the exception handler and the error body's model, while other
tenants' requests waited behind it on the one event loop (`make bench` section 13). This
answers them first, with the start endpoint's own 429 (headers and body made once per
limit), for an API key's holder with the ``start`` scope; anything else (a JWT, a read
token, a wrong credential or none, a start not refused) goes the full way, which decides
as before. It sits inside the request id, tracing and metrics middleware, which see it as
the start route.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from flowgate.services.api.auth import Auth
from flowgate.services.api.endpoints import Endpoint
from flowgate.services.api.errors import limited_answer
from flowgate.services.api.limits import Limits
from flowgate.shared.tracing import OFF, Tracing


@dataclass(frozen=True, slots=True)
class _Route:
    """What the metrics label an answer by (services/api/metrics.py reads ``route``)."""

    route: str


class EarlyRefusals:
    def __init__(
        self, app: ASGIApp, *, auth: Auth, endpoint: Endpoint, tracing: Tracing = OFF
    ) -> None:
        self.app = app
        self._auth = auth
        self._method, self._path, self._scope = endpoint.method, endpoint.path, endpoint.scope
        self._endpoint = _Route(endpoint.path)
        self._tracing = tracing
        #: The 429 by policy ("starts";q=50;w=1): the same bytes for every refusal.
        self._answers: dict[str, Response] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == self._method
            and scope["path"] == self._path
        ):
            answer = self._refusal(scope)
            if answer is not None:
                scope["endpoint"] = self._endpoint
                self._tracing.name_request(self._method, self._path)
                # A list of its own each time: middleware may add to the headers it is sent.
                headers = list(answer.raw_headers)
                await send({"type": "http.response.start", "status": 429, "headers": headers})
                await send({"type": "http.response.body", "body": answer.body})
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> Response | None:
        state = scope.get("state") or {}
        if "deps" not in state:
            return None  # before the lifespan has started: nothing to refuse from yet
        limits: Limits = state["deps"].limits
        who = self._auth.key_holder(Headers(scope=scope))
        if who is None or (self._scope is not None and not who.may(self._scope)):
            return None
        refused = limits.refused_start(who.tenant)
        if refused is None:
            return None
        policy = refused.headers["RateLimit-Policy"]
        if (answer := self._answers.get(policy)) is None:
            answer = self._answers[policy] = limited_answer(refused)
        return answer
