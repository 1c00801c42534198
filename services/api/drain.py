"""The drain at SIGTERM: answer every parked request with 202 before uvicorn waits for them.

uvicorn runs the lifespan's shutdown only after in-flight requests have finished, and a
parked request may wait a minute. :class:`DrainHook` lets the signal handler release the
wait room at once instead (services/api/__main__.py calls :meth:`DrainHook.trigger`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable


class DrainHook:
    """``trigger()`` is safe from a signal handler or another thread: it only schedules the
    release on the app's loop. No lock (a handler interrupting a lock holder on the same
    thread would deadlock): each side writes its own flag first and then reads the
    other's, so at least one of them releases (releasing twice is harmless).
    """

    def __init__(self) -> None:
        self._triggered = False
        self._target: tuple[asyncio.AbstractEventLoop, Callable[[], None]] | None = None

    def trigger(self) -> None:
        self._triggered = True
        target = self._target
        if target is not None:
            loop, release = target
            with contextlib.suppress(RuntimeError):  # loop already closed: nothing parked
                loop.call_soon_threadsafe(release)

    def attach(self, release: Callable[[], None]) -> None:
        self._target = (asyncio.get_running_loop(), release)
        if self._triggered:
            release()

    def detach(self) -> None:
        self._target = None
