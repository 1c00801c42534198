"""``python -m flowgate.services.worker`` (or ``flowgate-worker``): one worker process.

Scale by running more processes; each takes its own slot (services/worker/identity.py).
``WORKER_NAME`` names the slots (default: the host name). SIGTERM or SIGINT stops fetching
at once and drains running handlers for ``WORKER_SHUTDOWN_GRACE_S``; a second signal cuts
the grace period short.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvloop

from flowgate.services.worker.app import serve
from flowgate.services.worker.registry import Registry, load_registry
from flowgate.shared.logs import configure_logging
from flowgate.shared.settings import Settings, load_settings

log = logging.getLogger("flowgate.services.worker")


def main() -> None:
    settings = load_settings()
    configure_logging(settings.log_level)
    # httpx (handlers' ctx.http) logs every request at INFO: one line per call is noise.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    # A module that cannot be imported, a topic served twice or a step without a handler
    # stops start-up here, naming it.
    registry = load_registry(settings.worker_processes)
    # uvloop, as uvicorn runs the API: a tenth of asyncio's event-loop cost per task.
    uvloop.run(_run(settings, registry, name=settings.worker_name))


async def _run(settings: Settings, registry: Registry, *, name: str | None) -> None:
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: cancelling running handlers now")
            force.set()
        else:
            log.info("signal %s: stopping", signal.Signals(signum).name)
            stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await serve(settings, registry, stop=stop, force=force, name=name)


if __name__ == "__main__":
    main()
