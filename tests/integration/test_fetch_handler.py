"""The engine's long-poll handler is flowgate's (deploy/camunda SerialFetchAndLockHandler):
fetches one at a time, so two workers never both lock one task; long polls behave as the
engine's own."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from flowgate.shared.camunda import CamundaClient, LockedTask, TopicRequest
from tests.helpers.engine import one_task_bpmn


def listening_pid(port: int) -> int:
    """The process listening on loopback ``port`` (from /proc: its socket's inode)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{inode}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(fd) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir()):
                return int(pid)
        except OSError:  # another user's process, or one that has just ended
            continue
    raise AssertionError(f"nothing listens on port {port}")


def test_the_engine_runs_flowgates_long_poll_handler(engine_url: str) -> None:
    engine = listening_pid(urlsplit(engine_url).port or 80)
    # The handler's thread is named after its class, and Java names its native threads so
    # (to 15 characters).
    threads = {path.read_text().strip() for path in Path(f"/proc/{engine}/task").glob("*/comm")}
    assert "SerialFetchAndL" in threads, sorted(threads)
    assert "FetchAndLockHan" not in threads, "the engine's own handler runs as well"


async def test_concurrent_long_polls_of_many_workers_get_every_task_once(engine_url: str) -> None:
    key = f"polls-{uuid.uuid4().hex[:8]}"
    topic = TopicRequest(f"{key}.work", lock_duration_ms=60_000)
    runs = 40
    async with CamundaClient(engine_url) as camunda:
        await camunda.deploy(key, {f"{key}.bpmn": one_task_bpmn(key, topic.topic_name)})
        got: dict[str, list[LockedTask]] = {}

        async def worker(worker_id: str) -> None:
            """Polls again at once after every answer (a worker with slots free), as long as
            tasks come."""
            got[worker_id] = []
            while sum(map(len, got.values())) < runs:
                tasks = await camunda.fetch_and_lock(
                    worker_id, [topic], max_tasks=3, async_response_timeout_ms=2_000
                )
                if not tasks:
                    return
                got[worker_id] += tasks

        polling = asyncio.gather(*(worker(f"{key}-w{n}") for n in range(6)))
        await asyncio.sleep(0.2)  # the polls wait in the engine
        await asyncio.gather(*(camunda.start_process(key) for _ in range(runs)))
        await asyncio.wait_for(polling, 60)

    fetched = [task.id for tasks in got.values() for task in tasks]
    assert len(fetched) == runs
    assert len(set(fetched)) == runs, "a task was handed to two workers"
    assert sum(1 for tasks in got.values() if tasks) > 1, "one worker got every task"
