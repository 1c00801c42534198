"""The deployment files as a cluster or compose gets them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

KUSTOMIZE_HINT = "go install sigs.k8s.io/kustomize/kustomize/v5@v5.5.0 (`make kustomize` does it)"


def render(directory: Path) -> list[dict[str, Any]]:
    """`kustomize build` (or `kubectl kustomize`): the manifests exactly as a cluster gets them."""
    if shutil.which("kustomize"):
        tool = ["kustomize", "build"]
    elif shutil.which("kubectl"):
        tool = ["kubectl", "kustomize"]
    else:
        pytest.fail(f"neither kustomize nor kubectl is installed: {KUSTOMIZE_HINT}")
    result = subprocess.run([*tool, str(directory)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]
