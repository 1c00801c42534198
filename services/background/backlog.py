"""The engine's backlog by topic, for operators and the workers' autoscaler (KEDA): how
many tasks no worker has locked yet, and how long the oldest of them has waited.

One replica at a time samples it (a lease, as the watcher's), every
``BACKLOG_INTERVAL_MS``: one query for the topics with waiting tasks, then a count and the
oldest task of each, from the engine's runtime tables (consistent at once, and cheap: their
rows are the tasks still open). Only the sampling replica exports the gauges
(``flowgate_topic_backlog_tasks`` and ``flowgate_topic_oldest_task_age_seconds``), so a sum
over replicas is the engine's figure; a topic whose tasks are all taken reads 0 until the
replica stops sampling. Workers scaled to zero export nothing, which is why the API samples.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from flowgate.services.api.metrics import ApiMetrics
from flowgate.shared.camunda import CamundaClient, CamundaError
from flowgate.shared.keys import Keys
from flowgate.shared.lease import Lease, lead
from flowgate.shared.redis_client import RedisClient

log = logging.getLogger(__name__)

#: A sampling replica that stops renewing hands over after this.
LEASE_S = 30.0


class Backlog:
    def __init__(
        self,
        camunda: CamundaClient,
        redis: RedisClient,
        keys: Keys,
        metrics: ApiMetrics,
        *,
        replica_id: str,
        interval_s: float,
    ) -> None:
        self._camunda = camunda
        self._metrics = metrics
        self._interval_s = interval_s
        self._lease = Lease(redis, keys.backlog, holder=replica_id, ttl_s=LEASE_S)
        #: Topics this replica has exported: one that empties reads 0, not its last count.
        self._topics: set[str] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Sample while this replica holds the lease, until ``stop``; engine or Redis
        trouble is logged and tried again, never raised."""
        await lead(
            self._lease,
            stop,
            every_s=self._interval_s,
            work=self.sample,
            errors=(CamundaError,),
            what="backlog sample",
            idle=self._forget,
        )

    async def sample(self) -> None:
        """Read the backlog of every topic with waiting tasks and export it."""
        topics = await self._camunda.waiting_topics()
        now = datetime.now(UTC)
        for topic in sorted(self._topics | set(topics)):
            count, oldest = (
                await self._camunda.waiting_tasks(topic) if topic in topics else (0, None)
            )
            self._metrics.backlog_tasks.labels(topic).set(count)
            age = (now - oldest).total_seconds() if oldest is not None and count else 0.0
            self._metrics.oldest_task_age.labels(topic).set(max(age, 0.0))
        self._topics |= set(topics)

    def _forget(self) -> None:
        """Another replica samples (or none does): this one's figures would be stale."""
        for topic in self._topics:
            self._metrics.backlog_tasks.remove(topic)
            self._metrics.oldest_task_age.remove(topic)
        self._topics.clear()
