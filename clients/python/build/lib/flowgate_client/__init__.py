"""A typed client for flowgate: start BPMN processes over HTTP, wait, follow, cancel.

    from flowgate_client import Client

    with Client("http://127.0.0.1:8000") as flowgate:
        result = flowgate.run("onboard-user", "user-123", {"userId": "user-123"})

Only httpx is needed. :class:`AsyncClient` has the same methods for asyncio.
"""

from flowgate_client.client import AsyncClient, Client
from flowgate_client.errors import (
    ApiError,
    FlowgateError,
    NotFound,
    RateLimited,
    RunCancelled,
    RunFailed,
    Unavailable,
)
from flowgate_client.models import Event, Milestone, RunStatus, UserTask

__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "Event",
    "FlowgateError",
    "Milestone",
    "NotFound",
    "RateLimited",
    "RunCancelled",
    "RunFailed",
    "RunStatus",
    "Unavailable",
    "UserTask",
]
