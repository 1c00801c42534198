"""What build is running: ``flowgate_build_info``, on every process's ``/metrics``."""

from __future__ import annotations

import platform
from importlib import metadata

from prometheus_client import CollectorRegistry, Info

DISTRIBUTION = "flowgate-bpmn"


def version() -> str:
    """The installed distribution's version (``unknown`` in a checkout never installed)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def register_build_info(registry: CollectorRegistry, component: str) -> None:
    """``flowgate_build_info{version, python, component} 1``."""
    Info("flowgate_build", "The running build", registry=registry).info(
        {"version": version(), "python": platform.python_version(), "component": component}
    )
