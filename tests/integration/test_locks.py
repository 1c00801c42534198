"""A departed worker's lingering long poll can lock tasks after it is gone (the engine does
not notice the client went away); live workers unlock them at once."""

from __future__ import annotations

import asyncio
import time
import uuid

import redis.asyncio as aioredis

from flowgate.services.worker.locks import Locks
from flowgate.shared.aio import stop_and_wait
from flowgate.shared.camunda import CamundaClient, TopicRequest
from flowgate.shared.keys import Keys
from tests.helpers.engine import one_task_bpmn


async def test_tasks_locked_to_a_departed_worker_are_unlocked_by_a_live_one(
    engine_url: str, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    key = f"janitor-{uuid.uuid4().hex[:8]}"
    topic = TopicRequest(f"{key}.work", lock_duration_ms=600_000)
    async with CamundaClient(engine_url) as camunda:
        await camunda.deploy(key, {f"{key}.bpmn": one_task_bpmn(key, topic.topic_name)})
        await camunda.start_process(key)
        # What the departed worker's abandoned poll did after it was gone: a 10-minute lock.
        (task,) = await camunda.fetch_and_lock(
            "gone-1", [topic], max_tasks=1, async_response_timeout_ms=5_000
        )

        def locks(worker_id: str) -> Locks:
            keys = Keys(redis_prefix)
            return Locks(
                camunda, redis_client, keys, worker_id=worker_id, topics=[topic], poll_window_s=5
            )

        await locks("gone-1").departed("gone-1")
        began = time.monotonic()
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            sweeping = tasks.create_task(locks("live-1").sweep_departed(stop))
            try:
                again = await camunda.fetch_and_lock(
                    "live-1", [topic], max_tasks=1, async_response_timeout_ms=5_000
                )
            finally:
                await stop_and_wait(stop, [sweeping])
        assert [t.id for t in again] == [task.id]
        assert time.monotonic() - began < 5  # not the ten minutes of the lock
        await camunda.complete(task.id, worker_id="live-1")
