"""``python -m flowgate.services.api`` / ``flowgate-api``: an API replica, the HTTP app and its
background work (services/background/), served by uvicorn.

On SIGTERM (or SIGINT) the replica first answers every parked request with 202 + Location
(:class:`flowgate.services.api.drain.DrainHook`), then lets uvicorn stop: close the listener, finish
in-flight requests (now quick), run the lifespan's shutdown (flush write-behind), exit.
"""

from __future__ import annotations

import logging
import resource
from types import FrameType

import uvicorn

from flowgate.services import background
from flowgate.services.api.app import create_app
from flowgate.services.api.drain import DrainHook
from flowgate.shared.logs import configure_logging
from flowgate.shared.settings import load_settings


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a hook that fires at the signal, not after the requests end."""

    def __init__(self, config: uvicorn.Config, drain: DrainHook) -> None:
        super().__init__(config)
        self._drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._drain.trigger()
        super().handle_exit(sig, frame)


def raise_open_files_limit() -> int:
    """Every parked request holds a socket: let the process open as many as it may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return max(soft, hard)


def main() -> None:
    settings = load_settings()
    configure_logging(settings.log_level)
    raise_open_files_limit()
    # httpx (callbacks) logs every request at INFO: one line per delivery is noise, not news.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    drain = DrainHook()
    config = uvicorn.Config(
        create_app(settings, drain=drain, alongside=background.alongside(settings)),
        host=settings.api_host,
        port=settings.api_port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_config=None,  # configure_logging() owns the handlers (JSON lines)
        access_log=False,
        server_header=False,
        # No client address is read anywhere: rewriting it from proxy headers is work for
        # nothing on every request.
        proxy_headers=False,
        # Longer than the load balancer's idle timeout, so it never reuses a socket we
        # have just closed (a 502 otherwise).
        timeout_keep_alive=settings.keepalive_s,
        # Parked requests are released at SIGTERM; this bounds the rest.
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    DrainingServer(config, drain).run()


if __name__ == "__main__":
    main()
