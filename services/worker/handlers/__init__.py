"""The processes this worker serves: one module per BPMN process, declared with the registry."""

from __future__ import annotations

from services.worker.handlers import benchmark, onboard_user
from services.worker.registry import Registry


def build_registry() -> Registry:
    """Every process in ``bpmn/``; a topic registered twice fails here, at start-up."""
    return Registry.of([onboard_user.process, benchmark.process])
