"""Schemathesis over /openapi.json with every check, against a real replica."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from flowgate.shared.settings import Settings
from tests.helpers.engine import deploy_bpmn as deploy
from tests.helpers.replica import replica

# The API's answers against its own document: the engine behind it is a backdrop.
pytestmark = [pytest.mark.slow, pytest.mark.engine_agnostic]

MakeSettings = Callable[..., Settings]

# Every check runs; these widen what two checks accept for three operations whose schema
# cannot say everything (the only exceptions, each with its reason).
CONFIG = """
[[operations]]
include-operation-id = "listProcesses"
# `cursor` is opaque: any string is schema-valid, but only a cursor this API issued decodes;
# another one is the caller's mistake (400 naming `cursor`).
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "404", "409", "429"]

[[operations]]
include-operation-id = "startProcess"
# Reusing a correlationId with another processKey or other variables is a conflict the
# contract answers with 422 (as the IETF Idempotency-Key draft does); the schema cannot
# express "not used before with other values". A run the fuzzer itself ended `error`
# through /complete is answered 500, as the seed answers it (documented in the schema).
checks.positive_data_acceptance.expected-statuses = [
  "2xx", "401", "404", "409", "422", "429", "500"
]
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "500"]

[[operations]]
include-operation-id = "processStatus"
# The same: status of a run that ended `error` is 500 by the contract.
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "500"]
"""


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    make_settings: MakeSettings, engine_url: str, tmp_path: Path
) -> None:
    await deploy(engine_url)
    settings = make_settings(camunda_base_url=engine_url, sync_timeout_ms=200)
    st = shutil.which("st")
    assert st, "schemathesis CLI (st) not installed"
    # A worker ends the runs the fuzzer starts within moments, as a live deployment would:
    # an event stream of a run that never ends would only end at the client's timeout.
    async with (
        replica(
            settings,
            tmp_path,
            "fuzzed",
            MAX_WAIT_MS="1000",
            API_KEYS="client-key",
            COMPLETE_TOKEN="internal-token",
            CALLBACK_ALLOWED_HOSTS="*",  # the document's example names example.com
            LOG_LEVEL="WARNING",
        ) as server,
        replica(
            settings,
            tmp_path,
            "worker",
            module="flowgate.services.worker",
            port_setting="WORKER_HEALTH_PORT",
            ready_path="/healthz",
            LOG_LEVEL="WARNING",
        ),
    ):
        config = tmp_path / "schemathesis.toml"
        config.write_text(CONFIG)
        run = await asyncio.create_subprocess_exec(
            st,
            "--config-file",
            str(config),
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            "40",
            # One worker: with threads, hypothesis' lambda descriptions hit a CPython 3.11
            # ast.parse race ("AST constructor recursion depth mismatch").
            "--workers",
            "1",
            "--seed",
            "1",
            "--header",
            "X-API-Key: client-key",
            "--header",
            "Authorization: Bearer internal-token",
            "--request-timeout",
            "10",
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(600):
            output, _ = await run.communicate()
    assert run.returncode == 0, output.decode()[-20_000:]
    # Server errors the two exceptions above could hide would have been logged as bugs.
    log = (tmp_path / "fuzzed.log").read_text()
    assert "unhandled error" not in log
    assert "Traceback" not in log
