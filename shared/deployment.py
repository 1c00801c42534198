"""Deploy every ``*.bpmn`` of ``BPMN_DIR`` (default ``bpmn/``): ``flowgate-deploy``,
``python -m flowgate.shared.deployment`` or ``make deploy-bpmn``.

All files go in one deployment named ``flowgate`` with duplicate filtering and
deploy-changed-only, so running it again (every ``make up``, every replica start) creates
no new versions unless a file changed, and only the changed files get a new version.
Then it checks the engine has what flowgate needs (:mod:`flowgate.shared.engine_check`),
as ``ENGINE_CHECK`` says.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from flowgate.shared.camunda import CamundaClient, CamundaError, EngineUnavailable
from flowgate.shared.engine_check import Finding, check_engine
from flowgate.shared.settings import BUNDLED_BPMN, Settings, load_settings

DEPLOYMENT_NAME = "flowgate"
#: How long main() waits for the engine to answer (it may still be starting).
ENGINE_WAIT_S = 60.0
_RETRY_INTERVAL_S = 1.0


async def deploy_directory(client: CamundaClient, directory: Path = BUNDLED_BPMN) -> list[str]:
    """Deploy ``directory/*.bpmn``; return the definitions created, as ``key:version``.

    An empty list means the engine already had every file unchanged.
    """
    files = await asyncio.to_thread(_read_bpmn, directory)
    deployment = await client.deploy(DEPLOYMENT_NAME, files)
    return [f"{d.key}:{d.version}" for d in deployment.process_definitions]


def _read_bpmn(directory: Path) -> dict[str, bytes]:
    """Resource name (the file name, which the engine keeps) -> content."""
    files = {path.name: path.read_bytes() for path in sorted(directory.glob("*.bpmn"))}
    if not files:
        # An installed flowgate has no bpmn/ of its own: the default names the checkout's.
        raise FileNotFoundError(
            f"no *.bpmn files in {directory}: set BPMN_DIR to the folder holding yours"
        )
    return files


async def _deploy_when_ready(settings: Settings, wait_s: float) -> tuple[list[str], list[Finding]]:
    """Retry while the engine is unreachable (it may be starting), up to ``wait_s``; then
    check the engine (unless ``ENGINE_CHECK=off``)."""
    deadline = time.monotonic() + wait_s
    async with CamundaClient.from_settings(settings) as client:
        while True:
            try:
                created = await deploy_directory(client, settings.bpmn_dir)
                break
            except EngineUnavailable:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(_RETRY_INTERVAL_S)
        findings = [] if settings.engine_check == "off" else await check_engine(client)
    return created, findings


def main() -> None:
    """CLI: deploy to ``CAMUNDA_BASE_URL``, say what changed and what the engine lacks.

    It leaves without finalizing the interpreter: pyreqwest's native runtime may still be
    closing its connections, and finalizing meanwhile now and then aborted the process
    ("Fatal Python error: PyGILState_Release") after the work was done."""
    try:
        _deploy_and_check()
        code = 0
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)  # noqa: T201
        code = exit_.code if isinstance(exit_.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _deploy_and_check() -> None:
    settings = load_settings()
    engine = settings.camunda_base_url
    try:
        created, findings = asyncio.run(_deploy_when_ready(settings, ENGINE_WAIT_S))
    except CamundaError as exc:  # unreachable for ENGINE_WAIT_S, or a file the engine rejects
        sys.exit(f"flowgate-deploy: {engine}: {exc}")
    except FileNotFoundError as exc:
        sys.exit(f"flowgate-deploy: BPMN_DIR: {exc}")
    if created:
        print(f"deployed to {engine}: {', '.join(created)}")  # noqa: T201
    else:
        print(f"{engine}: every process is up to date")  # noqa: T201
    if not findings:
        if settings.engine_check != "off":
            print(f"{engine}: the engine has every setting flowgate checks")  # noqa: T201
        return
    lines = "\n".join(f"  - {finding}" for finding in findings)
    report = (
        f"flowgate-deploy: the engine at {engine} lacks what flowgate needs (README, "
        f'"What flowgate needs from your engine"):\n{lines}'
    )
    if settings.engine_check == "fail" and any(finding.fatal for finding in findings):
        sys.exit(f"{report}\nENGINE_CHECK=warn deploys anyway.")
    print(report, file=sys.stderr)  # noqa: T201


if __name__ == "__main__":
    main()
