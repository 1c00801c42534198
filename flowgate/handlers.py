"""The handler author's API: declare processes and their steps, write handlers.

A process module exports one :class:`Process` (or several, in a list); ``WORKER_PROCESSES``
names it as ``package.module:NAME``. Each step is a BPMN external task whose topic is
``<process key>.<step name>``; its handler takes its input model (and optionally the
:class:`TaskContext`) and returns its output. The framework does the rest: locks, retries,
timeouts, completing or failing the task, the run's progress and audit rows.

A handler signals a business outcome with :class:`BusinessRuleError` (the BPMN error the
process models); any other exception fails the attempt and the engine retries it.

Names here are stable across releases; the modules they come from are not.
"""

from __future__ import annotations

from flowgate.services.worker.context import TaskContext, TaskLogger
from flowgate.services.worker.registry import (
    BusinessRuleError,
    HandlerFn,
    Process,
    Step,
    StepResult,
)

__all__ = [
    "BusinessRuleError",
    "HandlerFn",
    "Process",
    "Step",
    "StepResult",
    "TaskContext",
    "TaskLogger",
]
