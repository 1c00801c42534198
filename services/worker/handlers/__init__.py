"""The example processes, one module per BPMN process in ``bpmn/``, declared with the registry.

A worker serves them unless ``WORKER_PROCESSES`` names others (services/worker/registry.py
``load_registry``): a team installs flowgate and points it at its own modules.
"""

from __future__ import annotations

from flowgate.services.worker.handlers import approve_order, benchmark, onboard_user

PROCESSES = (onboard_user.process, benchmark.process, approve_order.process)
