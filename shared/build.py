"""What build is running and what the process uses, on every process's ``/metrics``:
``flowgate_build_info`` and the standard ``process_*`` and ``python_*`` series."""

from __future__ import annotations

import platform
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
)

DISTRIBUTION = "flowgate-bpmn"


def version() -> str:
    """The installed distribution's version (``unknown`` in a checkout never installed)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def register_build_info(registry: CollectorRegistry, component: str) -> None:
    """``flowgate_build_info{version, python, component} 1``, and the process's CPU, memory,
    open files (``process_*``), interpreter and garbage collector (``python_*``)."""
    Info("flowgate_build", "The running build", registry=registry).info(
        {"version": version(), "python": platform.python_version(), "component": component}
    )
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
