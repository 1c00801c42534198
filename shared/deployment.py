"""Deploy every ``*.bpmn`` of ``BPMN_DIR`` (default ``bpmn/``): ``flowgate-deploy``,
``python -m flowgate.shared.deployment`` or ``make deploy-bpmn``.

All files go in one deployment named ``flowgate`` with duplicate filtering and
deploy-changed-only, so running it again (every ``make up``, every replica start) creates
no new versions unless a file changed, and only the changed files get a new version.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from flowgate.shared.camunda import CamundaClient, CamundaError, EngineUnavailable
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


async def _deploy_when_ready(settings: Settings, wait_s: float) -> list[str]:
    """Retry while the engine is unreachable (it may be starting), up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    async with CamundaClient.from_settings(settings) as client:
        while True:
            try:
                return await deploy_directory(client, settings.bpmn_dir)
            except EngineUnavailable:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(_RETRY_INTERVAL_S)


def main() -> None:
    """CLI: deploy to ``CAMUNDA_BASE_URL`` and say what changed."""
    settings = load_settings()
    try:
        created = asyncio.run(_deploy_when_ready(settings, ENGINE_WAIT_S))
    except CamundaError as exc:  # unreachable for ENGINE_WAIT_S, or a file the engine rejects
        sys.exit(f"flowgate-deploy: {settings.camunda_base_url}: {exc}")
    except FileNotFoundError as exc:
        sys.exit(f"flowgate-deploy: BPMN_DIR: {exc}")
    if created:
        print(f"deployed to {settings.camunda_base_url}: {', '.join(created)}")  # noqa: T201
    else:
        print(f"{settings.camunda_base_url}: every process is up to date")  # noqa: T201


if __name__ == "__main__":
    main()
