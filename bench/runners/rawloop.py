"""The engine's ceiling: ``python -m bench.runners.rawloop URL LOOPS MAX_TASKS IN_FLIGHT SECONDS``.

Plain httpx fetchAndLock + complete loops (bench/engine.py ``raw_worker_loop``), no framework.
"""

from __future__ import annotations

import asyncio
import sys
import time

from bench.engine import raw_worker_loop


def main() -> None:
    url, loops, max_tasks, in_flight, seconds = sys.argv[1], *map(int, sys.argv[2:6])
    until = time.monotonic() + seconds
    coro = raw_worker_loop(url, loops=loops, max_tasks=max_tasks, in_flight=in_flight, until=until)
    try:
        import uvloop

        done = uvloop.run(coro)
    except ImportError:
        done = asyncio.run(coro)
    print(f"completed {done}")


if __name__ == "__main__":
    main()
