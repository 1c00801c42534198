"""flowgate inside your own process: the API as an ASGI app, the worker as a coroutine.

``create_app(settings)`` is the Starlette app ``flowgate-api`` serves (run its
``alongside`` background work with :func:`background`, as the console script does);
``serve(settings, registry, stop=...)`` runs one worker until ``stop`` is set and it has
drained. Settings come from the environment with :func:`load_settings`, or as keyword
arguments.

Names here are stable across releases; the modules they come from are not.
"""

from __future__ import annotations

from flowgate.services.api.app import create_app
from flowgate.services.background import alongside as background
from flowgate.services.worker.app import serve
from flowgate.services.worker.registry import Registry, load_registry
from flowgate.shared.settings import Settings, load_settings

__all__ = [
    "Registry",
    "Settings",
    "background",
    "create_app",
    "load_registry",
    "load_settings",
    "serve",
]
