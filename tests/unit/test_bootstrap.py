"""The bootstrap finds exactly what is missing, and says how it would install it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from deploy.local import bootstrap
from deploy.local.servers import ROOT


def only(tmp_path: Path, *programs: str) -> str:
    """A PATH holding links to just ``programs`` (from this machine's PATH)."""
    for program in programs:
        found = shutil.which(program)
        assert found, f"{program} is needed to run this test"
        (tmp_path / program).symlink_to(found)
    return str(tmp_path)


def test_with_every_server_hidden_all_of_them_are_missing(tmp_path: Path) -> None:
    path = only(tmp_path, "python3")
    needs = [need for need in bootstrap.NEEDS if need.package != "python3-venv"]
    hidden = bootstrap.missing(path, needs)
    # PostgreSQL's programs live outside PATH on Debian, so it is found there still.
    expected = {"redis-server", "nginx", "wrk", "openjdk-17-jdk-headless", "maven"}
    if not bootstrap.POSTGRES_BIN_DIRS:
        expected.add("postgresql")
    assert {need.package for need in hidden} == expected


def test_a_program_on_path_is_not_missing(tmp_path: Path) -> None:
    path = only(tmp_path, "redis-server", "nginx", "wrk", "javac", "mvn")
    assert [need.package for need in bootstrap.missing(path)] == []


def test_the_dry_run_installs_exactly_what_is_missing(tmp_path: Path) -> None:
    path = only(tmp_path, "python3", "javac", "mvn", "nginx")
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "local" / "bootstrap.py"), "--dry-run"],
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        check=True,
    )
    install = result.stdout.splitlines()[-1].split()
    assert install[:5] == ["apt-get", "install", "-y", "-qq", "--no-install-recommends"]
    expected = {"redis-server", "wrk"} | (set() if bootstrap.POSTGRES_BIN_DIRS else {"postgresql"})
    assert set(install[5:]) == expected
    assert "missing: Redis" in result.stderr


def test_nothing_missing_means_nothing_to_do() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "local" / "bootstrap.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_make_up_needs_only_what_its_stack_runs() -> None:
    """Compose (a Docker engine answers) needs only the virtualenv; the native stack needs
    its servers but not the benchmarks' load generator; the tests need everything."""
    packages = {
        (purpose, docker): {need.package for need in bootstrap.needs_for(purpose, docker=docker)}
        for purpose in ("up", "test")
        for docker in (True, False)
    }
    assert packages["up", True] == {"python3-venv"}
    assert "wrk" not in packages["up", False]
    assert {"redis-server", "postgresql", "nginx", "maven"} <= packages["up", False]
    assert packages["test", True] == packages["test", False] == {n.package for n in bootstrap.NEEDS}


def test_without_apt_the_hint_names_the_homebrew_formulas() -> None:
    empty = str(ROOT / "nonexistent")  # not even apt-get
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "local" / "bootstrap.py"), "--for", "up"],
        env={**os.environ, "PATH": empty, "FLOWGATE_NO_DOCKER": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1  # no apt-get on that PATH: it says how, installs nothing
    assert "brew install redis" in result.stderr
