"""What this machine needs before `make up` and `make test`, and installing what is missing.

    python3 deploy/local/bootstrap.py            install what is missing (or say how)
    python3 deploy/local/bootstrap.py --check    only list what is missing (exit 1 if any)
    python3 deploy/local/bootstrap.py --for up   only what `make up` needs here: where a
                                                 Docker engine answers, compose runs the
                                                 stack and only the virtualenv is needed

The one list of system packages the project needs is :data:`NEEDS`. As root on a Debian
machine the missing ones are installed with apt-get; otherwise it stops and prints the one
command to run. `make install` (and so `make up` and `make test`) runs it first, and CI runs
`make test`: nobody has to read a script to get started.

Standard library only, and runnable by the system's ``python3``: it runs before the
project's virtualenv exists (which itself may need ``python3-venv``).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: Where Debian keeps PostgreSQL's server programs (not on PATH).
POSTGRES_BIN_DIRS = tuple(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True))
#: Services Debian starts when it installs them: the local stack brings up its own, on its
#: own ports, and the default ones would hold 6379, 5432 and 80.
AUTOSTARTED = ("redis-server", "postgresql", "nginx")


@dataclass(frozen=True)
class Need:
    """A program the project runs, the Debian package that provides it, and the Homebrew
    formula for a machine without apt (None: part of Python there)."""

    what: str
    package: str
    found: Callable[[str], bool]  # given a PATH
    brew: str | None
    #: Needed to bring the stack up natively (`make up` without Docker), not only to test.
    native_stack: bool = True


def _on_path(program: str, *extra_dirs: str) -> Callable[[str], bool]:
    def found(path: str) -> bool:
        return shutil.which(program, path=os.pathsep.join([path, *extra_dirs])) is not None

    return found


def _python_venv(path: str) -> bool:
    check = [sys.executable, "-c", "import venv, ensurepip"]
    return subprocess.run(check, capture_output=True, check=False).returncode == 0


NEEDS: tuple[Need, ...] = (
    Need("Redis (state, wake-ups, write-behind stream)", "redis-server",
         _on_path("redis-server"), "redis"),
    Need("PostgreSQL (durable copy, audit trail)", "postgresql",
         _on_path("initdb", *POSTGRES_BIN_DIRS), "postgresql@16"),
    Need("nginx (the local stack's load balancer)", "nginx", _on_path("nginx"), "nginx"),
    Need("wrk (the benchmarks' load generator)", "wrk", _on_path("wrk"), "wrk",
         native_stack=False),
    Need("a Java 17 JDK (builds and runs the engine)", "openjdk-17-jdk-headless",
         _on_path("javac"), "openjdk@17"),
    Need("Maven (builds the engine)", "maven", _on_path("mvn"), "maven"),
    Need("venv for Python", "python3-venv", _python_venv, None),
)  # fmt: skip


def needs_for(purpose: str, *, docker: bool) -> tuple[Need, ...]:
    """What ``purpose`` needs on this machine: ``up`` only what the stack it will bring up
    runs (compose where ``docker`` answers: just the virtualenv), ``test`` everything."""
    if purpose == "up" and docker:
        return tuple(need for need in NEEDS if need.package == "python3-venv")
    if purpose == "up":
        return tuple(need for need in NEEDS if need.native_stack)
    return NEEDS


def docker_answers() -> bool:
    """A Docker engine answers here (what `make up` then uses; FLOWGATE_NO_DOCKER=1: never)."""
    if os.environ.get("FLOWGATE_NO_DOCKER") or shutil.which("docker") is None:
        return False
    try:
        probe = subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


def missing(path: str | None = None, needs: Sequence[Need] = NEEDS) -> list[Need]:
    """The needs not met on ``path`` (default: this process's PATH)."""
    search = os.environ.get("PATH", "") if path is None else path
    return [need for need in needs if not need.found(search)]


def install_command(packages: Sequence[str]) -> list[list[str]]:
    """The commands that install ``packages`` on Debian."""
    return [
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only list what is missing")
    parser.add_argument("--dry-run", action="store_true", help="print what would be run")
    parser.add_argument(
        "--for", dest="purpose", choices=("up", "test"), default="test",
        help="up: only what `make up` needs on this machine; test (default): everything",
    )  # fmt: skip
    args = parser.parse_args(argv)

    needs = needs_for(args.purpose, docker=args.purpose == "up" and docker_answers())
    absent = missing(needs=needs)
    if not absent:
        return 0
    packages = [need.package for need in absent]
    for need in absent:
        print(f"missing: {need.what} (Debian package {need.package})", file=sys.stderr)
    brew = [need.brew for need in absent if need.brew]
    if args.check:
        return 1
    commands = install_command(packages)
    if args.dry_run:
        for command in commands:
            print(" ".join(command))
        return 0
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        without_apt = f"; without apt (macOS): brew install {' '.join(brew)}" if brew else ""
        print(
            "\nInstall them, then run the make target again:\n\n"
            f"    sudo {' '.join(commands[0])} && sudo {' '.join(commands[1])}{without_apt}\n",
            file=sys.stderr,
        )
        return 1
    print(f"installing {' '.join(packages)} ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in commands:
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    for service in (name for name in AUTOSTARTED if name in packages):
        subprocess.run(["service", service, "stop"], capture_output=True, check=False)
    still = missing(needs=needs)
    if still:
        print(f"still missing after install: {[n.package for n in still]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
