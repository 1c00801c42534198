"""The engine check (shared/engine_check.py) against real engines: the session's, configured
as deploy/camunda configures it, and one started without the settings flowgate needs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local import servers
from flowgate.shared.camunda import CamundaClient
from flowgate.shared.engine_check import PROBE_KEY, check_engine
from tests.helpers.engine import BPMN_DIR, EngineAdmin

#: What a team's engine may lack: history below full, uncaught BPMN errors ending the
#: instance, a worker's new poll not cancelling its older one.
LACKING = {
    "history-level": "audit",
    "generic-properties": {"properties": {"enableExceptionsAfterUnhandledBpmnError": False}},
    "rest-api": {"fetch-and-lock": {"unique-worker-request": False}},
}


@pytest.fixture(scope="module")
def lacking_engine(server_dir: Path, engine_url: str) -> Iterator[str]:
    """A second engine (in-memory) without the settings flowgate needs. ``engine_url`` only
    orders it after the session's engine, whose build it reuses."""
    port = servers.free_port()
    engine = servers.engine_server(
        server_dir / "lacking-engine", port, engine_settings=LACKING
    ).start(timeout_s=180)
    yield f"http://127.0.0.1:{port}/engine-rest"
    engine.stop()


async def test_an_engine_configured_as_deploy_camunda_passes_and_keeps_no_probe(
    engine_url: str,
) -> None:
    async with CamundaClient(engine_url) as client:
        assert await check_engine(client) == []
    async with EngineAdmin(engine_url) as admin:
        left = await admin.historic_process_instances(processDefinitionKey=PROBE_KEY)
    assert left == [], "the probe deletes its instance and its history"


async def test_an_engine_without_the_settings_is_told_setting_by_setting(
    lacking_engine: str,
) -> None:
    async with CamundaClient(lacking_engine) as client:
        findings = await check_engine(client)
    assert {(f.setting.split(":")[0], f.fatal) for f in findings} == {
        ("history level full", True),
        ("enableExceptionsAfterUnhandledBpmnError", True),
        ("rest-api.fetch-and-lock.unique-worker-request", False),
    }
    assert "its run reads ok" in " ".join(str(f) for f in findings)


@pytest.mark.slow
def test_flowgate_deploy_stops_on_a_lacking_engine_unless_told_to_warn(
    lacking_engine: str, engine_url: str
) -> None:
    def deploy(url: str, check: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "CAMUNDA_BASE_URL": url, "BPMN_DIR": str(BPMN_DIR)}
        return subprocess.run(
            [sys.executable, "-m", "flowgate.shared.deployment"],
            env={**env, "ENGINE_CHECK": check},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    refused = deploy(lacking_engine, "fail")
    assert refused.returncode == 1
    assert "history level full" in refused.stderr
    assert "ENGINE_CHECK=warn deploys anyway" in refused.stderr
    warned = deploy(lacking_engine, "warn")
    assert warned.returncode == 0, warned.stderr
    assert "enableExceptionsAfterUnhandledBpmnError" in warned.stderr
    passed = deploy(engine_url, "fail")
    assert passed.returncode == 0, passed.stderr
    assert "the engine has every setting flowgate checks" in passed.stdout
