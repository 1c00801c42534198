"""A run's steps as they end: one :class:`StepEvent` per activity instance, in a bounded
per-run record in Redis (``{p}:steps:{cid}``, see shared/store/steps.py).

Two sources write it, and each step is recorded once whichever comes first:

* a flowgate worker, at once, for the external tasks it runs (services/worker/executor.py);
* the engine's history, for every other step: user tasks, Java delegates, timers, other
  teams' workers, events and gateways (services/background/watcher.py).

A step is named by its activity id, or for an external task served by flowgate also by its
step name; ``step`` holds the name a reader knows it by (the step name where there is one).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import orjson

from flowgate.shared.state import dump_json, iso, parse_iso

#: Steps one run keeps (the oldest go first): bounded, like everything held per run.
MAX_STEPS = 1_000


class StepStatus(StrEnum):
    """Spelled as a run's status is (``cancelled``, not the engine's ``canceled``)."""

    OK = "ok"  # the activity completed
    ERROR = "error"  # it threw a BPMN error, or failed with no retries left
    CANCELLED = "cancelled"  # the engine left it (an interrupting event, a deletion)

    @classmethod
    def _missing_(cls, value: object) -> StepStatus | None:
        # Steps recorded before the spelling was aligned, still in Redis or Postgres.
        return cls.CANCELLED if value == "canceled" else None


@dataclass(frozen=True, slots=True)
class StepEvent:
    step: str
    status: StepStatus
    activity_id: str
    activity_instance_id: str
    activity_type: str
    at: datetime
    data: Any = None
    error: Any = None

    def names(self) -> frozenset[str]:
        """Every name a client may call this step by."""
        return frozenset({self.step, self.activity_id})

    def to_dict(self) -> dict[str, Any]:
        """The wire object (what a live-progress event carries)."""
        body: dict[str, Any] = {
            "step": self.step,
            "status": self.status.value,
            "activityId": self.activity_id,
            "activityInstanceId": self.activity_instance_id,
            "activityType": self.activity_type,
            "at": iso(self.at),
        }
        if self.data is not None:
            body["data"] = self.data
        if self.error is not None:
            body["error"] = self.error
        return body

    def to_json(self) -> bytes:
        return dump_json(self.to_dict()).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> StepEvent:
        return cls.from_dict(orjson.loads(raw))

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> StepEvent:
        return cls(
            step=obj["step"],
            status=StepStatus(obj["status"]),
            activity_id=obj["activityId"],
            activity_instance_id=obj["activityInstanceId"],
            activity_type=obj["activityType"],
            at=parse_iso(obj["at"]),
            data=obj.get("data"),
            error=obj.get("error"),
        )
