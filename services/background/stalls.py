"""Runs that sit at a step longer than their process allows: ``stalled``, raised once.

A process declares a step's threshold in its BPMN, on the activity, as Camunda extension
properties already carry settings::

    <bpmn:userTask id="review">
      <bpmn:extensionElements>
        <camunda:properties>
          <camunda:property name="flowgate:stallAfter" value="PT4H" />
        </camunda:properties>
      </bpmn:extensionElements>
    </bpmn:userTask>

(an ISO 8601 duration, or seconds). One replica at a time looks (a lease, as the backlog's),
every ``STALL_INTERVAL_MS``: the thresholds of the latest definitions (their XML read once
per definition), then per declared step one history query for its instances still open past
the threshold. Each such activity instance of a run flowgate knows is raised once, whichever
replica looks: a ``SET NX`` on ``{p:n}:stalled:{activityInstanceId}`` decides, then the run
gets an audit row (``stalled``), an entry in ``{p:n}:stalls:{cid}`` that its event streams
send as ``event: stalled`` (services/api/progress.py), a wake-up on its channel, and
``flowgate_runs_stalled_total`` counts it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from flowgate.services.api.metrics import ApiMetrics
from flowgate.services.api.runs import Runs
from flowgate.shared.camunda import CamundaClient, CamundaError
from flowgate.shared.contract import STALLED
from flowgate.shared.eventlog import EventRecord, append_event
from flowgate.shared.keys import Keys
from flowgate.shared.lease import Lease, lead
from flowgate.shared.redis_client import RedisClient, publish
from flowgate.shared.state import iso
from flowgate.shared.variables import parse_date

log = logging.getLogger(__name__)

#: The extension property naming a step's threshold.
PROPERTY = "flowgate:stallAfter"
LEASE_S = 30.0
#: The latest definitions are listed again this often (new deployments).
DEFINITIONS_EVERY_S = 60.0
_CAMUNDA = "http://camunda.org/schema/1.0/bpmn"
_DURATION = TypeAdapter(timedelta)


def thresholds(xml: str) -> dict[str, float]:
    """Activity id -> seconds, for every activity of ``xml`` that declares
    ``flowgate:stallAfter``; a value that is no duration is skipped with a warning."""
    found: dict[str, float] = {}
    for element in ET.fromstring(xml).iter():
        activity = element.get("id")
        for prop in element.findall(f"./{{*}}extensionElements/{{{_CAMUNDA}}}properties/*"):
            if prop.get("name") != PROPERTY or activity is None:
                continue
            value = (prop.get("value") or "").strip()
            try:
                seconds = float(value) if value.isdigit() else _DURATION.validate_python(value)
            except ValidationError:
                log.warning("not a duration", extra={"activity": activity, "value": value})
                continue
            found[activity] = seconds if isinstance(seconds, float) else seconds.total_seconds()
    return found


class Stalls:
    def __init__(
        self,
        camunda: CamundaClient,
        redis: RedisClient,
        keys: Keys,
        runs: Runs,
        metrics: ApiMetrics,
        *,
        replica_id: str,
        interval_s: float,
        remember_s: int,
    ) -> None:
        self._camunda = camunda
        self._redis = redis
        self._keys = keys
        self._runs = runs
        self._metrics = metrics
        self._interval_s = interval_s
        self._remember_s = remember_s
        self._lease = Lease(redis, keys.stalls_lease, holder=replica_id, ttl_s=LEASE_S)
        #: definition id -> its thresholds (a definition's XML never changes).
        self._by_definition: dict[str, dict[str, float]] = {}
        #: (process key, activity id) -> seconds, for the latest definitions.
        self._declared: dict[tuple[str, str], float] = {}
        self._listed_at = float("-inf")

    async def run(self, stop: asyncio.Event) -> None:
        """Look while this replica holds the lease, until ``stop``; engine or Redis trouble
        is logged and tried again, never raised."""
        await lead(
            self._lease,
            stop,
            every_s=self._interval_s,
            work=self.look,
            errors=(CamundaError,),
            what="stall check",
        )

    async def look(self) -> int:
        """One pass; how many stalls it raised."""
        if time.monotonic() - self._listed_at > DEFINITIONS_EVERY_S:
            await self._read_declarations()
        raised = 0
        now = datetime.now(UTC)
        for activity, process_keys in self._activities().items():
            for key, seconds in process_keys.items():
                started_before = now - timedelta(seconds=seconds)
                found = await self._camunda.open_activities(activity, started_before=started_before)
                mine = [a for a in found if a.get("processDefinitionKey") == key]
                if mine:
                    raised += await self._raise(mine, seconds)
        return raised

    def _activities(self) -> dict[str, dict[str, float]]:
        by_activity: dict[str, dict[str, float]] = {}
        for (key, activity), seconds in self._declared.items():
            by_activity.setdefault(activity, {})[key] = seconds
        return by_activity

    async def _read_declarations(self) -> None:
        declared: dict[tuple[str, str], float] = {}
        for definition in await self._camunda.latest_definitions():
            definition_id, key = str(definition["id"]), str(definition["key"])
            if definition_id not in self._by_definition:
                xml = await self._camunda.definition_xml(definition_id)
                self._by_definition[definition_id] = thresholds(xml)
            for activity, seconds in self._by_definition[definition_id].items():
                declared[key, activity] = seconds
        self._declared = declared
        self._listed_at = time.monotonic()

    async def _raise(self, activities: list[dict[str, Any]], seconds: float) -> int:
        keys = await self._camunda.business_keys(
            sorted({str(a["processInstanceId"]) for a in activities})
        )
        raised = 0
        for activity in activities:
            cid = keys.get(str(activity["processInstanceId"]))
            if cid is None:
                continue
            first = await self._redis.set(
                self._keys.stalled(cid, str(activity["id"])), "1", nx=True, ex=self._remember_s
            )
            if first and await self._tell(cid, activity, seconds):
                raised += 1
        return raised

    async def _tell(self, cid: str, activity: dict[str, Any], seconds: float) -> bool:
        state = await self._runs.get(cid)
        if state is None or state.finished:
            return False  # not flowgate's run, or over already
        stall = {
            "activity": activity["activityId"],
            "activityInstanceId": activity["id"],
            "since": iso(parse_date(str(activity["startTime"]))),
            "thresholdS": seconds,
        }
        stalls_key = self._keys.stalls(cid)
        await self._redis.rpush(stalls_key, orjson.dumps(stall))
        await self._redis.expire(stalls_key, self._remember_s)
        await append_event(
            self._redis,
            self._keys,
            EventRecord.of_run(
                state,
                status="stalled",
                step_name=str(activity["activityId"]),
                metadata=stall,
            ),
        )
        await publish(self._redis, self._keys.of(cid).channel, cid.encode() + b"\n" + STALLED)
        self._metrics.runs_stalled.labels(state.process_key, str(activity["activityId"])).inc()
        log.info("run stalled", extra={"correlationId": cid, "activity": stall["activity"]})
        return True
