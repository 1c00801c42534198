"""JSON logs, one object per line, with the context a handler or request adds.

Loggers are ``logging.getLogger(__name__)``; extra context goes in ``extra=`` (for example
``log.info("task completed", extra={"correlationId": cid, "topic": topic})``) and comes
out as top-level JSON fields.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.orjson import OrjsonFormatter

#: The request being served and the run it names (services/api/requestid.py): every log
#: line written meanwhile carries them, as ``requestId`` and ``correlationId``.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
CORRELATION_ID: ContextVar[str | None] = ContextVar("correlation_id", default=None)

#: The trace of the span being served (shared/tracing.py, when tracing is on), as ``traceId``.
TRACE_ID: ContextVar[str | None] = ContextVar("trace_id", default=None)
_CONTEXT = (("requestId", REQUEST_ID), ("correlationId", CORRELATION_ID), ("traceId", TRACE_ID))


class JsonFormatter(OrjsonFormatter):
    """python-json-logger's orjson formatter: ``ts`` (ISO, UTC), ``level``, ``logger``,
    ``msg``, the ids the context holds, every ``extra=`` field, and ``exc`` for an
    exception."""

    def __init__(self) -> None:
        super().__init__(
            "{levelname}{name}{message}",
            style="{",
            timestamp="ts",
            rename_fields={
                "levelname": "level",
                "name": "logger",
                "message": "msg",
                "exc_info": "exc",
            },
            json_default=str,
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        log_data["level"] = record.levelname.lower()
        log_data["ts"] = datetime.fromtimestamp(record.created, tz=UTC).isoformat(
            timespec="milliseconds"
        )
        for name, var in _CONTEXT:  # (an explicit ``extra=`` value comes first)
            if name not in log_data and (value := var.get()) is not None:
                log_data[name] = value


def configure_logging(level: str = "INFO") -> None:
    """Send every log record to stderr as JSON (uvicorn's loggers included)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
