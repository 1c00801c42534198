"""camunda-external-task-client-python3 (PyPI 4.5.0) completing the benchmark topic.

``python -m bench.runners.py3client URL WORKER_ID MAX_TASKS``: its documented synchronous
``ExternalTaskWorker.subscribe`` with a no-op handler, configured like the seed's workers
(lock 20 s, long poll 30 s). Runs until it is killed.
"""

from __future__ import annotations

import sys
from typing import Any

from camunda.external_task.external_task_worker import ExternalTaskWorker  # type: ignore

from bench.engine import TOPIC


def handle(task: Any) -> Any:
    return task.complete({})


def main() -> None:
    url, worker_id, max_tasks = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = {
        "maxTasks": max_tasks,
        "lockDuration": 20_000,
        "asyncResponseTimeout": 30_000,
        "retries": 3,
        "retryTimeout": 1_000,
        "sleepSeconds": 1,
    }
    ExternalTaskWorker(worker_id=worker_id, base_url=url, config=config).subscribe([TOPIC], handle)


if __name__ == "__main__":
    main()
