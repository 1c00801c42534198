"""Programs run in the background for a test, as a deployment runs them, and waiting on
what they serve."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import httpx


@contextlib.contextmanager
def background(
    commands: Mapping[str, tuple[Sequence[str], Mapping[str, str]]], logs: Path
) -> Iterator[None]:
    """Run each ``name: (argv, env)`` until the block ends (SIGTERM, then SIGKILL after
    30 s); each logs to ``logs/<name>.log``, shown when the block fails."""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for name, (argv, env) in commands.items():
            log = logs / f"{name.replace('/', '-').replace(' ', '-')}.log"
            with log.open("wb") as out:
                procs.append((
                    subprocess.Popen(
                        list(argv), env=dict(env), cwd=logs, stdout=out, stderr=subprocess.STDOUT
                    ),
                    log,
                ))  # fmt: skip
        yield
    except BaseException:
        for _, log in procs:
            sys.stderr.write(f"--- {log.name}\n{log.read_text()[-3000:]}\n")
        raise
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def until(probe: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    """Poll ``probe`` (an HTTP error counts as not yet) until true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if probe():
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def until_ok(url: str, what: str, timeout_s: float = 60) -> None:
    until(lambda: httpx.get(url, timeout=2).status_code == 200, f"{what}: {url} 200", timeout_s)
