"""flowgate as a team installs it: the wheel in a fresh virtual environment, the team's own
process package beside it, outside the repository, run through the console scripts.

That is the proof of "without forking": nothing here imports from the checkout. The
servers (Redis, PostgreSQL, the engine) are the session's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from deploy.local.servers import free_port
from flowgate.shared.settings import Settings
from tests.helpers.engine import team_env, team_package
from tests.helpers.processes import background, until, until_ok

ROOT = Path(__file__).resolve().parents[2]
MakeSettings = Callable[..., Settings]
# What it proves is the packaging; the engine checks have their own tests on both engines.
pytestmark = pytest.mark.engine_agnostic
SCRIPTS = ("flowgate-api", "flowgate-worker", "flowgate-flusher", "flowgate-deploy")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)])
    [built] = dist.glob("flowgate_bpmn-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with only the wheel (and what it depends on)."""
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", str(root)])
    _run([str(root / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)])
    return root / "bin"


def test_the_wheel_installs_one_top_level_name_and_its_license(wheel: Path, venv: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert {name.split("/")[0] for name in names} == {
        "flowgate",
        f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info",
    }
    assert any(name.endswith("licenses/LICENSE") for name in names), names
    for script in SCRIPTS:
        assert (venv / script).exists(), script
    # The handler API is importable from the installed package, and nothing generic is.
    probe = "import flowgate.handlers, flowgate.embed; import importlib.util as u;" + (
        "print(all(u.find_spec(n) is None for n in ('shared', 'services', 'tests', 'bench')))"
    )
    assert _run([str(venv / "python"), "-c", probe], cwd=venv).strip() == "True"
    # Installed, there is no bpmn/ to fall back on: the deploy step names the setting.
    env = {"PATH": os.environ["PATH"], "CAMUNDA_BASE_URL": "http://127.0.0.1:9/engine-rest"}
    refused = subprocess.run(
        [str(venv / "flowgate-deploy")], env=env, capture_output=True, text=True, check=False
    )
    assert refused.returncode != 0
    assert "set BPMN_DIR" in refused.stderr, refused.stderr


@pytest.mark.slow
def test_a_teams_package_runs_end_to_end_through_the_installed_scripts(
    venv: Path, make_settings: MakeSettings, engine_url: str, tmp_path: Path
) -> None:
    key, name = f"installed-{uuid.uuid4().hex[:8]}", f"team_{uuid.uuid4().hex[:6]}"
    bpmn_dir = team_package(tmp_path, name, key)
    settings = make_settings(camunda_base_url=engine_url)
    api_port = free_port()
    env = {
        "PATH": f"{venv}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(tmp_path),  # the team's package; not the checkout
        **team_env(settings, name=name, bpmn_dir=bpmn_dir),
        "FLUSHER_HEALTH_PORT": str(free_port()),
        "API_PORT": str(api_port),
        "WRITEBEHIND_IN_API": "false",  # the flusher script writes behind
        "SHUTDOWN_GRACE_S": "5",
    }
    assert key in _run([str(venv / "flowgate-deploy")], env=env, cwd=tmp_path)
    scripts = ("flowgate-worker", "flowgate-flusher", "flowgate-api")
    with background({s: ([str(venv / s)], env) for s in scripts}, tmp_path):
        api = f"http://127.0.0.1:{api_port}"
        until_ok(f"{api}/readyz", "the installed API")
        correlation_id = f"installed-{uuid.uuid4().hex}"
        answer = httpx.post(
            f"{api}/api/process/start",
            json={"processKey": key, "correlationId": correlation_id, "variables": {"name": "Ada"}},
            headers={"Prefer": "wait=30"},
            timeout=40,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["result"] == {"greeting": "hello, Ada"}
        # The flusher wrote the run's audit trail behind (the event log reads PostgreSQL).
        log = f"{api}/api/event-log/{correlation_id}?by=correlationId"
        until(lambda: bool(httpx.get(log, timeout=5).json()["eventLog"]), "its audit rows")


def _run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    result = subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, check=False, timeout=600
    )
    assert result.returncode == 0, f"{argv}: {result.stdout[-2000:]}{result.stderr[-4000:]}"
    return result.stdout
