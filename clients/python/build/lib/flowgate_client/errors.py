"""What can go wrong, as a small tree: catch :class:`FlowgateError` for all of it.

``FlowgateError``
  ``ApiError``          the server refused the request (its Fastify-style error body)
    ``NotFound``        404: no such run (or process definition)
    ``Unavailable``     502/503: the engine or a store is down; ``retry_after`` says when
    ``RateLimited``     429: a limit of the caller's tenant; ``retry_after`` says when
  ``RunFailed``         the run ended ``error`` (``run.error`` says why)
  ``RunCancelled``      the run was cancelled
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowgate_client.models import RunStatus


class FlowgateError(Exception):
    """Anything this client raises."""


class ApiError(FlowgateError):
    """The server answered an error: ``status_code``, its ``message`` and ``field``."""

    def __init__(self, status_code: int, body: Any) -> None:
        body = body if isinstance(body, dict) else {}
        self.status_code = status_code
        self.message = str(body.get("message") or body.get("error") or f"HTTP {status_code}")
        self.field: str | None = body.get("field")
        self.body = body
        super().__init__(f"{status_code}: {self.message}")


class NotFound(ApiError):
    """404: no such run (or no such process definition, on start)."""


class Unavailable(ApiError):
    """502/503: try again after ``retry_after`` seconds (a start with the same
    correlationId is safe to repeat: it never starts a second run)."""

    def __init__(self, status_code: int, body: Any, retry_after: float) -> None:
        super().__init__(status_code, body)
        self.retry_after = retry_after


class RateLimited(ApiError):
    """429: a limit of the caller's tenant is reached (``body["message"]`` names it); try
    again after ``retry_after`` seconds."""

    def __init__(self, status_code: int, body: Any, retry_after: float) -> None:
        super().__init__(status_code, body)
        self.retry_after = retry_after


class RunFailed(FlowgateError):
    """The run ended ``error``; ``run`` is its final status."""

    def __init__(self, run: RunStatus) -> None:
        self.run = run
        super().__init__(f"run {run.correlation_id!r} failed: {run.error!r}")


class RunCancelled(FlowgateError):
    """The run was cancelled; ``run`` is its final status."""

    def __init__(self, run: RunStatus) -> None:
        self.run = run
        super().__init__(f"run {run.correlation_id!r} was cancelled: {run.error!r}")
