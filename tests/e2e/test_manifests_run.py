"""The deployment files, exercised without a container engine: each flowgate container of
the compose file and of the rendered Kubernetes example runs natively, with its own command
and environment (the image's ENV beneath it), and each probe it declares must answer.

Only what cannot be the same outside a container is mapped: service names (``redis``,
``postgres``, ``engine``/``camunda``) to this session's servers, container ports to free
ones, the image's ``/app/bpmn`` to the repository's, and the Redis prefix to a fresh one. A
wrong variable name, port, command or probe path then fails here, not in a deployment.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from deploy.local.servers import free_port
from flowgate.shared.settings import Settings
from tests.helpers.engine import BPMN_DIR
from tests.helpers.manifests import render
from tests.helpers.processes import background, until_ok

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
MakeSettings = Callable[..., Settings]


@dataclass
class Container:
    name: str
    #: The Dockerfile target its image is built from (``flowgate`` or ``example``).
    target: str
    command: list[str]
    env: dict[str, str]
    #: (path, container port) of every HTTP probe the manifest declares.
    probes: list[tuple[str, int]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)


def image_env(target: str) -> dict[str, str]:
    """The ENV a deploy/Dockerfile target's containers start with (its stages' in order)."""
    stages: dict[str, tuple[str, dict[str, str]]] = {}
    for stage in re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.MULTILINE)[1:]:
        base, _, name = stage.split("\n", 1)[0].partition(" AS ")
        lines = stage.replace("\\\n", " ").splitlines()
        words = [w for line in lines if line.startswith("ENV ") for w in shlex.split(line[4:])]
        stages[name.strip()] = (base, dict(w.split("=", 1) for w in words))
    base, env = stages[target]
    return {**(image_env(base) if base in stages else {}), **env}


def target_of(image: str) -> str:
    """The example's images (the compose overlay, the Kubernetes example) are its target."""
    return "example" if image.startswith("flowgate-example") else "flowgate"


def compose_containers(*overlays: str) -> list[Container]:
    files = [COMPOSE / "compose.yaml", *(COMPOSE / o for o in overlays)]
    loaded = [yaml.safe_load(f.read_text()) for f in files]
    found = []
    for name in ("deploy-bpmn", "api", "worker", "flusher"):
        service: dict[str, Any] = {}
        for doc in loaded:  # compose's merge, as far as these keys go
            service |= doc["services"].get(name, {})
        env = {k: _expand(str(v)) for k, v in service["environment"].items()}
        probes = []
        if check := service.get("healthcheck"):
            url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", " ".join(check["test"]))
            assert url, f"{name}: no probe URL in {check['test']}"
            probes.append((url[2], int(url[1])))
        ports = [port for _, port in probes]
        image = _expand(service["image"])
        if build := service.get("build"):
            assert build["target"] == target_of(image), f"{name}: {image} is built from {build}"
        found.append(
            Container(f"compose {name}", target_of(image), service["command"], env, probes, ports)
        )
    return found


def compose_example() -> list[Container]:
    return compose_containers("compose.example.yaml")


def k8s_containers(tree: str = "overlays/example") -> list[Container]:
    docs = render(ROOT / "deploy" / "k8s" / tree)
    maps = {
        (d["kind"], d["metadata"]["name"]): {**d.get("data", {}), **d.get("stringData", {})}
        for d in docs
        if d["kind"] in ("ConfigMap", "Secret")
    }
    found = []
    for doc in docs:
        if doc["kind"] != "Deployment" or not doc["metadata"]["name"].startswith("flowgate"):
            continue
        spec = doc["spec"]["template"]["spec"]
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            env: dict[str, str] = {}
            for source in c.get("envFrom", []):
                kind, ref = next(iter(source.items()))
                # The base names a Secret it does not ship (an overlay brings it).
                env |= maps.get(
                    ("ConfigMap" if kind == "configMapRef" else "Secret", ref["name"]), {}
                )
            env |= {item["name"]: str(item["value"]) for item in c.get("env", [])}
            named = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            probes = [
                (probe["httpGet"]["path"], named.get(probe["httpGet"]["port"], 0))
                for kind in ("startupProbe", "livenessProbe", "readinessProbe")
                if (probe := c.get(kind)) and "httpGet" in probe
            ]
            name = f"k8s {doc['metadata']['name']}/{c['name']}"
            target = target_of(c["image"])
            found.append(Container(name, target, c["command"], env, probes, list(named.values())))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("source", [compose_example, k8s_containers], ids=["compose", "k8s"])
def test_every_container_runs_as_its_manifest_says_and_its_probes_answer(
    source: Callable[[], list[Container]],
    make_settings: MakeSettings,
    engine_url: str,
    tmp_path: Path,
) -> None:
    settings = make_settings(camunda_base_url=engine_url)
    containers = source()
    assert {c.command[0] for c in containers} >= {"flowgate-api", "flowgate-worker"}
    ports = {port: free_port() for c in containers for port in c.ports}
    prefix = f"mf{uuid.uuid4().hex[:6]}"
    native = functools.partial(_native, settings=settings, engine_url=engine_url)
    one_shots = [c for c in containers if not c.probes]
    assert one_shots, "the deploy step runs once, before the services"
    for container in one_shots:
        env = native(container, ports=ports, prefix=prefix, empty_dir=tmp_path)
        done = subprocess.run(
            container.command, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, f"{container.name}: {done.stdout}{done.stderr}"
    services = [c for c in containers if c.probes]
    commands = {
        c.name: (c.command, native(c, ports=ports, prefix=prefix, empty_dir=tmp_path))
        for c in services
    }
    with background(commands, tmp_path):
        for container in services:
            for path, port in container.probes:
                assert port in ports, f"{container.name}: probe port {port} is no port it opens"
                until_ok(f"http://127.0.0.1:{ports[port]}{path}", container.name)


@pytest.mark.parametrize(
    "source", [compose_containers, lambda: k8s_containers("base")], ids=["compose", "k8s"]
)
def test_the_base_deploys_and_serves_only_what_a_teams_image_names(
    source: Callable[[], list[Container]], make_settings: MakeSettings, tmp_path: Path
) -> None:
    """Without the example overlay, the base's image has no processes: its deploy step and
    workers refuse to start, naming the two settings a team's image sets."""
    settings = make_settings()
    containers = {c.command[0]: c for c in source()}
    assert {c.target for c in containers.values()} == {"flowgate"}
    for script, setting in (
        ("flowgate-deploy", "BPMN_DIR"),
        ("flowgate-worker", "WORKER_PROCESSES"),
    ):
        env = _native(
            containers[script],
            settings=settings,
            engine_url="http://127.0.0.1:9/engine-rest",
            ports={},
            prefix="unused",
            empty_dir=tmp_path,
        )
        done = subprocess.run(
            [script], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode != 0, f"{script} started without processes: {done.stdout}"
        assert setting in done.stderr, done.stderr


def _native(
    container: Container,
    *,
    settings: Settings,
    engine_url: str,
    ports: dict[int, int],
    prefix: str,
    empty_dir: Path,
) -> dict[str, str]:
    """The container's environment, its service names and ports mapped to this machine."""
    engine = urlsplit(engine_url).netloc
    hosts = {
        "redis:6379": urlsplit(settings.redis_url).netloc,
        "engine:8080": engine,
        "camunda:8080": engine,
    }
    env = {**image_env(container.target), **container.env}
    for name, value in env.items():
        for host, here in hosts.items():
            value = value.replace(f"//{host}/", f"//{here}/")
        if urlsplit(value).hostname == "postgres":
            value = settings.database_url  # this server's credentials, not the example's
        if name.endswith("_PORT") and value.isdigit() and int(value) in ports:
            value = str(ports[int(value)])
        env[name] = value
    if env.get("BPMN_DIR") == "/app/bpmn":  # the example's, or the empty folder of the base
        env["BPMN_DIR"] = str(BPMN_DIR if container.target == "example" else empty_dir)
    unmapped = [v for v in env.values() if re.search(r"//(redis|postgres|engine|camunda)[:/]", v)]
    assert not unmapped, f"{container.name}: a service this test does not know: {unmapped}"
    return {
        **env,
        "REDIS_PREFIX": prefix,
        "REDIS_CLUSTER": str(settings.redis_cluster).lower(),
        "PATH": os.environ["PATH"],
    }


def _expand(value: str) -> str:
    """Compose's ``${NAME:-default}`` as compose reads it with NAME unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
