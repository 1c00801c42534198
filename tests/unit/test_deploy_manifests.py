"""The deployment files, checked offline: no Docker engine, no cluster.

- deploy/compose/compose.yaml against the Compose Specification schema (vendored in
  deploy/compose/schema/, see its README);
- deploy/k8s (base, dependencies, the example overlay) against the Kubernetes OpenAPI
  schemas of a pinned version (kubernetes-validate, strict: unknown fields fail);
- and what matters beyond the schemas: every load balancer in front of the API waits longer
  than MAX_WAIT_MS, a pod's grace period covers its preStop pause plus SHUTDOWN_GRACE_S,
  probes hit the health endpoints, every setting name exists in shared/settings.py, secrets
  are Secrets.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deploy.local import servers, stack
from flowgate.services.api.metrics import ApiMetrics
from flowgate.shared.settings import Settings
from tests.helpers.manifests import render

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose"
K8S = ROOT / "deploy" / "k8s"
# kubernetes-validate ships the schemas of many releases; pyproject asks for >= 1.31.
K8S_VERSION = "1.31.0"
# preStop `sleep` is beta and on by default from 1.30; older clusters need an exec sleep.
#: The example overlay runs the Dockerfile's `example` target.
EXAMPLE_IMAGE = re.compile(r"^flowgate-example(:|$)")
SETTING_NAMES = {name.upper() for name in Settings.model_fields}
DEFAULTS = Settings.model_fields


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _seconds(value: str) -> float:
    """nginx / annotation durations: "75", "75s", "2m"."""
    match = re.fullmatch(r"(\d+)(ms|s|m)?", value.strip())
    assert match, f"not a duration: {value!r}"
    number, unit = int(match[1]), match[2] or "s"
    return number * {"ms": 0.001, "s": 1, "m": 60}[unit]


def _nginx_directives(conf: str, name: str) -> list[str]:
    return re.findall(rf"^\s*{name}\s+([^;]+);", conf, flags=re.MULTILINE)


# --- docker compose ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((COMPOSE / "schema" / "compose-spec.json").read_text())
    return schema


def test_compose_schema_is_the_vendored_file() -> None:
    """The README names the file's hash; a changed schema is a deliberate update."""
    digest = hashlib.sha256((COMPOSE / "schema" / "compose-spec.json").read_bytes()).hexdigest()
    assert digest in (COMPOSE / "schema" / "README.md").read_text()


@pytest.mark.parametrize("name", ["compose.yaml", "compose.example.yaml", "redis-cluster.yaml"])
def test_compose_files_follow_the_compose_specification(
    name: str, compose_schema: dict[str, Any]
) -> None:
    validator = jsonschema.Draft202012Validator(compose_schema)
    doc = yaml.safe_load((COMPOSE / name).read_text())
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]
    assert errors == []


def test_the_compose_schema_rejects_mistakes(
    compose: dict[str, Any], compose_schema: dict[str, Any]
) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["depends_on"]["redis"]["condition"] = "service_ready"
    broken["services"]["worker"]["helthcheck"] = {}
    validator = jsonschema.Draft202012Validator(compose_schema)
    errors = " ".join(e.message for e in validator.iter_errors(broken))
    assert "service_ready" in errors
    assert "helthcheck" in errors


def test_compose_runs_the_whole_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["engine"]["image"] == "camunda/camunda-bpm-platform:run-7.24.0"
    assert services["engine"]["environment"]["DB_DRIVER"] == "org.postgresql.Driver"
    assert {"redis", "postgres", "engine", "deploy-bpmn", "api", "worker", "nginx"} <= set(services)
    # One image, two commands (and the one-shot deployment of bpmn/).
    assert services["api"]["command"] == ["flowgate-api"]
    assert services["worker"]["command"] == ["flowgate-worker"]
    assert services["deploy-bpmn"]["command"] == ["flowgate-deploy"]
    # The base runs the image FLOWGATE_IMAGE names and builds nothing: the example's image
    # comes from its overlay, built from the Dockerfile's `example` target.
    example = yaml.safe_load((COMPOSE / "compose.example.yaml").read_text())["services"]
    for name in ("api", "worker", "deploy-bpmn", "flusher"):
        assert services[name]["image"] == "${FLOWGATE_IMAGE:-flowgate:dev}"
        assert "build" not in services[name]
        build = example[name]["build"]
        assert (build["dockerfile"], build["target"]) == ("deploy/Dockerfile", "example")
        assert (ROOT / build["dockerfile"]).exists()
    assert set(example) == {"api", "worker", "deploy-bpmn", "flusher"}
    assert services["api"]["deploy"]["replicas"] == 2
    assert services["worker"]["deploy"]["replicas"] == 2
    assert "ports" not in services["api"], "the replicas are reached through nginx only"
    # The write-behind runs in its own process, and only there.
    assert services["flusher"]["command"] == ["flowgate-flusher"]
    assert services["api"]["environment"]["WRITEBEHIND_IN_API"] == "false"
    assert "WRITEBEHIND_IN_API" not in services["flusher"]["environment"]
    assert str(DEFAULTS["flusher_health_port"].default) in str(
        services["flusher"]["healthcheck"]["test"]
    )


def test_compose_start_order_waits_for_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        if name != "deploy-bpmn":
            assert "healthcheck" in service, f"{name} has no healthcheck"
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["deploy-bpmn"]["condition"] == "service_completed_successfully"
        for dep in ("redis", "postgres", "engine"):
            assert deps[dep]["condition"] == "service_healthy"
    assert services["deploy-bpmn"]["depends_on"]["engine"]["condition"] == "service_healthy"
    assert services["engine"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["nginx"]["depends_on"]["api"]["condition"] == "service_healthy"


def test_compose_settings_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "build" not in service:
            continue  # third-party images have their own variables
        unknown = set(service.get("environment", {})) - SETTING_NAMES
        assert unknown == set(), f"{name}: not in shared/settings.py: {unknown}"


def _merged(base: Any, override: Any) -> Any:
    """What ``docker compose -f a -f b`` makes of two files: maps merge, the rest is
    replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: _merged(base.get(k), v) for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override
        }
    return override


def test_compose_redis_cluster_variant(
    compose: dict[str, Any], compose_schema: dict[str, Any]
) -> None:
    override = yaml.safe_load((COMPOSE / "redis-cluster.yaml").read_text())
    merged = _merged(compose, override)
    validator = jsonschema.Draft202012Validator(compose_schema)
    assert [f"{e.json_path}: {e.message}" for e in validator.iter_errors(merged)] == []
    services = merged["services"]
    nodes = ["redis", *(f"redis-{n}" for n in range(2, 7))]
    for name in nodes:
        assert "/etc/redis/cluster.conf" in services[name]["command"], name
        assert "healthcheck" in services[name], name
    # Services that wait for `redis` wait for the formed cluster.
    assert "cluster_state:ok" in str(services["redis"]["healthcheck"]["test"])
    create = services["redis-cluster-create"]
    assert set(create["depends_on"]) == set(nodes[1:])
    assert "--cluster-replicas 1" in create["command"][0]
    for name in ("api", "worker", "deploy-bpmn"):
        env = services[name]["environment"]
        assert (env["REDIS_URL"], env["REDIS_CLUSTER"]) == ("redis://redis:6379/0", "true")
        assert set(env) - SETTING_NAMES == set()
    assert "cluster-enabled yes" in (COMPOSE / "redis-cluster.conf").read_text()


def test_compose_nginx_waits_longer_than_max_wait(compose: dict[str, Any]) -> None:
    conf = (COMPOSE / "nginx.conf").read_text()
    env = compose["services"]["api"]["environment"]
    max_wait_s = int(re.sub(r"\$\{MAX_WAIT_MS:-(\d+)\}", r"\1", env["MAX_WAIT_MS"])) / 1000
    keepalive_s = int(re.sub(r"\$\{KEEPALIVE_S:-(\d+)\}", r"\1", env["KEEPALIVE_S"]))
    _check_nginx_conf(conf, max_wait_s, keepalive_s)
    assert "api:8000 resolve" in conf, "re-resolve the replicas as they come and go"


def test_compose_nginx_conf_is_valid_nginx(tmp_path: Path) -> None:
    """`nginx -t` on it (with the Docker-only bits swapped for local stand-ins)."""
    conf = (COMPOSE / "nginx.conf").read_text()
    local = conf.replace(" resolve ", " ").replace("server api:", "server 127.0.0.1:")
    local = local.replace("resolver 127.0.0.11", "resolver 127.0.0.1")
    local = local.replace("pid /tmp/nginx.pid", f"pid {tmp_path}/nginx.pid")
    local = local.replace("user nginx;\n", "user root;\n" if os.geteuid() == 0 else "")
    _nginx_t(local, tmp_path)


def _nginx_t(conf: str, tmp_path: Path) -> None:
    """`nginx -t`, with the http-level temp paths moved under ``tmp_path``."""
    nginx = servers.require("nginx", "apt-get install nginx-light (the local stack needs it)")
    temps = "".join(
        f"    {kind}_temp_path {tmp_path}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    if "client_body_temp_path" not in conf:
        conf = conf.replace("http {\n", "http {\n" + temps, 1)
    path = tmp_path / "nginx.conf"
    path.write_text(conf)
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(path), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _check_nginx_conf(conf: str, max_wait_s: float, keepalive_s: float) -> None:
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        values = [_seconds(v) for v in _nginx_directives(conf, name)]
        assert values, f"{name} is not set (nginx's default 60 s cuts parked requests)"
        assert min(values) > max_wait_s, f"{name} {values} must exceed MAX_WAIT_MS"
    # Resend what is safe to repeat: reads everywhere, and only the POSTs that are
    # idempotent by their id (a start joins its run; a cancel is harmless twice).
    assert _nginx_directives(conf, "proxy_next_upstream")[0] == "error timeout"
    for path in ("= /api/process/start", "/api/process/cancel/"):
        block = re.search(rf"location {re.escape(path)} \{{([^}}]*)\}}", conf)
        assert block, f"no location {path}"
        assert _nginx_directives(block[1], "proxy_next_upstream") == [
            "error timeout non_idempotent"
        ]
    resent = re.findall(r"location ([^{]+)\{[^}]*non_idempotent", conf)
    assert {r.strip() for r in resent} == {"= /api/process/start", "/api/process/cancel/"}
    # HTTP/1.1 keep-alive to the replicas, closed by nginx before the API closes it.
    assert _nginx_directives(conf, "proxy_http_version") == ["1.1"]
    upstream_idle = [_seconds(v) for v in _nginx_directives(conf, "keepalive_timeout")]
    assert min(upstream_idle) < keepalive_s
    # Live progress: no event may wait in a proxy buffer.
    events = re.search(r"location /api/process/events/ \{([^}]*)\}", conf)
    assert events, "no location for /api/process/events/"
    assert "proxy_buffering off;" in events.group(1)


# --- the local stack's nginx (deploy/local/stack.py) ----------------------------------------


@pytest.mark.parametrize("max_wait_ms", [None, "120000"])
def test_local_nginx_waits_longer_than_max_wait(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, max_wait_ms: str | None
) -> None:
    if max_wait_ms:
        monkeypatch.setenv("MAX_WAIT_MS", max_wait_ms)
    else:
        monkeypatch.delenv("MAX_WAIT_MS", raising=False)
    monkeypatch.setenv("STACK_API_PORT", "18000")
    cfg = stack.Config.from_env(tmp_path)
    conf = stack.nginx_conf(cfg)
    wait_s = int(max_wait_ms or DEFAULTS["max_wait_ms"].default) / 1000
    _check_nginx_conf(conf, wait_s, DEFAULTS["keepalive_s"].default)
    assert "server 127.0.0.1:18001" in conf
    assert "server 127.0.0.1:18002" in conf
    assert "listen 127.0.0.1:18000" in conf
    stack.write_nginx_conf(cfg)  # runs `nginx -t` on it


@pytest.mark.parametrize("starts_per_s", ["0", "50"])
def test_local_nginx_limits_starts_per_credential_only_with_a_tenant_limit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, starts_per_s: str
) -> None:
    """With TENANT_STARTS_PER_S, nginx refuses a credential's starts past it (its answer is
    tested end to end in tests/integration/test_tenancy.py); without, nothing is limited."""
    monkeypatch.setenv("TENANT_STARTS_PER_S", starts_per_s)
    cfg = stack.Config.from_env(tmp_path)
    conf = stack.nginx_conf(cfg)
    start = re.search(r"location = /api/process/start \{([^}]*)\}", conf)
    assert start
    if starts_per_s == "0":
        assert "limit_req" not in conf
    else:
        assert "rate=50r/s;" in conf
        # Twice the replicas' burst of a tenth of the limit: nginx refuses only what they would.
        assert _nginx_directives(start[1], "limit_req") == ["zone=starts burst=10 nodelay"]
        assert conf.count("limit_req zone=") == 1, "only starts are limited"
    stack.write_nginx_conf(cfg)  # runs `nginx -t` on it


def test_stack_ports_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STACK_API_PORT", "9000")
    monkeypatch.setenv("STACK_WORKER_HEALTH_PORTS", "9101,9102,9103")
    cfg = stack.Config.from_env(tmp_path)
    names = [c.name for c in stack.components(cfg)]
    assert names[:3] == ["redis", "postgres", "engine"]
    assert names[-1] == "nginx"
    assert {"api-1", "api-2", "worker-1", "worker-2", "worker-3"} <= set(names)
    assert cfg.replica_ports == [9001, 9002]
    monkeypatch.setenv("STACK_API_PORT", "eighty")
    with pytest.raises(servers.ServerError, match="STACK_API_PORT"):
        stack.Config.from_env(tmp_path)


# --- Kubernetes --------------------------------------------------------------------------


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _by_kind(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(K8S / "base")


@pytest.fixture(scope="module")
def example() -> list[dict[str, Any]]:
    return render(K8S / "overlays" / "example")


@pytest.mark.parametrize(
    "directory",
    [
        "base",
        "dependencies",
        "overlays/example",
        "overlays/redis-cluster",
        "overlays/keda",
        "overlays/monitoring",
    ],
)
def test_k8s_manifests_follow_the_kubernetes_schemas(directory: str) -> None:
    docs = render(K8S / directory)
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/")):
            continue  # custom resources: checked against their CRDs' schemas elsewhere
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_keda_scales_the_workers_on_the_backlog_from_zero() -> None:
    docs = render(K8S / "overlays" / "keda")
    scaled = _by_kind(docs, "ScaledObject", "flowgate-worker")
    schema = json.loads((K8S / "schema" / "keda-scaledobject-v1alpha1.json").read_text())
    digest = hashlib.sha256((K8S / "schema" / "keda-scaledobject-v1alpha1.json").read_bytes())
    assert digest.hexdigest() in (K8S / "schema" / "README.md").read_text()
    validator = jsonschema.Draft7Validator(schema)
    assert [e.message for e in validator.iter_errors(scaled)] == []
    broken = copy.deepcopy(scaled)
    broken["spec"]["minReplicaCount"] = "none"
    assert list(validator.iter_errors(broken)), "the schema catches a wrong type"
    # It scales the worker Deployment, alone: no CPU autoscaler is left to fight it.
    assert _by_kind(docs, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"
                and d["metadata"]["name"] == "flowgate-worker"]  # fmt: skip
    assert scaled["spec"]["minReplicaCount"] == 0
    # Its queries name series an API replica really exports.
    exported = {metric.name for metric in ApiMetrics().registry.collect()}
    for trigger in scaled["spec"]["triggers"]:
        [name] = re.findall(r"(flowgate_\w+)", trigger["metadata"]["query"])
        assert name in exported, name


def test_k8s_schema_validation_rejects_mistakes(base: list[dict[str, Any]]) -> None:
    api = copy.deepcopy(_by_kind(base, "Deployment", "flowgate-api"))
    api["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(api, K8S_VERSION, strict=True)


def test_k8s_probes_hit_the_health_endpoints(base: list[dict[str, Any]]) -> None:
    api = _by_kind(base, "Deployment", "flowgate-api")["spec"]["template"]["spec"]
    (container,) = api["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["API_PORT"] == "8000"
    assert env["API_HOST"] == "0.0.0.0"

    worker = _by_kind(base, "Deployment", "flowgate-worker")["spec"]["template"]["spec"]
    (container,) = worker["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"health": 8081}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["WORKER_HEALTH_PORT"] == "8081"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}

    flusher = _by_kind(base, "Deployment", "flowgate-flusher")["spec"]["template"]["spec"]
    (container,) = flusher["containers"]
    assert container["command"] == ["flowgate-flusher"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"health": 8082}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert (env["FLUSHER_HEALTH_PORT"], env["FLUSHER_HEALTH_HOST"]) == ("8082", "0.0.0.0")
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    # The replicas leave the write-behind to it.
    config = _by_kind(base, "ConfigMap", "flowgate-config")["data"]
    assert config["WRITEBEHIND_IN_API"] == "false"


def test_k8s_every_container_has_requests_and_limits(example: list[dict[str, Any]]) -> None:
    for doc in example:
        for container in _containers(doc):
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), (
                    f"{doc['kind']}/{doc['metadata']['name']} {container['name']}: {kind}"
                )


def test_k8s_grace_period_covers_prestop_and_the_drain(base: list[dict[str, Any]]) -> None:
    config = _by_kind(base, "ConfigMap", "flowgate-config")["data"]
    api = _by_kind(base, "Deployment", "flowgate-api")["spec"]["template"]["spec"]
    pre_stop = api["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= 5, "endpoints and the ingress need a few seconds to stop sending"
    drain = int(config["SHUTDOWN_GRACE_S"])
    assert api["terminationGracePeriodSeconds"] > pre_stop + drain

    worker = _by_kind(base, "Deployment", "flowgate-worker")["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] > int(config["WORKER_SHUTDOWN_GRACE_S"])


def test_k8s_autoscalers_and_disruption_budgets(base: list[dict[str, Any]]) -> None:
    for name in ("flowgate-api", "flowgate-worker"):
        deployment = _by_kind(base, "Deployment", name)
        assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
        hpa = _by_kind(base, "HorizontalPodAutoscaler", name)["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                         "name": name}  # fmt: skip
        assert hpa["minReplicas"] >= 2
        pdb = _by_kind(base, "PodDisruptionBudget", name)["spec"]
        assert pdb["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        assert pdb["minAvailable"] < hpa["minReplicas"], "a node drain must be able to proceed"


def test_k8s_ingress_waits_longer_than_max_wait(base: list[dict[str, Any]]) -> None:
    config = _by_kind(base, "ConfigMap", "flowgate-config")["data"]
    max_wait_s = int(config["MAX_WAIT_MS"]) / 1000
    annotations = _by_kind(base, "Ingress", "flowgate")["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        assert _seconds(annotations[prefix + name]) > max_wait_s
    assert annotations[prefix + "proxy-next-upstream"] == "error timeout"
    # The POSTs idempotent by their id are resent when their replica dies; no other.
    idempotent = _by_kind(base, "Ingress", "flowgate-idempotent")
    resent = idempotent["metadata"]["annotations"]
    assert resent[prefix + "proxy-next-upstream"] == "error timeout non_idempotent"
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        assert _seconds(resent[prefix + name]) > max_wait_s
    assert {(p["path"], p["pathType"]) for r in idempotent["spec"]["rules"]
            for p in r["http"]["paths"]} == {
        ("/api/process/start", "Exact"), ("/api/process/cancel", "Prefix")
    }  # fmt: skip
    assert annotations[prefix + "proxy-buffering"] == "off", "live progress must not be buffered"
    # The API keeps idle connections longer than ingress-nginx's upstream keep-alive (60 s).
    assert int(config["KEEPALIVE_S"]) > 60
    service = _by_kind(base, "Service", "flowgate-api")
    paths = {p["path"] for r in _by_kind(base, "Ingress", "flowgate")["spec"]["rules"]
             for p in r["http"]["paths"]}  # fmt: skip
    assert "/api" in paths
    assert not {"/", "/metrics", "/readyz"} & paths
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_k8s_settings_exist_and_secrets_are_secrets(example: list[dict[str, Any]]) -> None:
    config = _by_kind(example, "ConfigMap", "flowgate-config")["data"]
    secret = _by_kind(example, "Secret", "flowgate-secrets")["stringData"]
    assert set(config) - SETTING_NAMES == set()
    assert set(secret) - SETTING_NAMES == set()
    assert {"COMPLETE_TOKEN", "API_KEYS", "DATABASE_URL"} <= set(secret)
    assert not {"COMPLETE_TOKEN", "API_KEYS", "DATABASE_URL"} & set(config)
    for name in ("flowgate-api", "flowgate-worker"):
        for container in _containers(_by_kind(example, "Deployment", name)):
            assert EXAMPLE_IMAGE.match(container["image"]), container["image"]
            assert {e["name"] for e in container.get("env", [])} <= SETTING_NAMES
            refs = {next(iter(ref)): next(iter(ref.values()))["name"]
                    for ref in container["envFrom"]}  # fmt: skip
            assert refs == {"configMapRef": "flowgate-config", "secretRef": "flowgate-secrets"}


def test_k8s_redis_cluster_variant_replaces_the_single_redis() -> None:
    docs = render(K8S / "overlays" / "redis-cluster")
    names = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    assert ("StatefulSet", "redis") not in names
    assert ("Service", "redis") not in names
    nodes = _by_kind(docs, "StatefulSet", "redis-cluster")
    assert nodes["spec"]["replicas"] == 6  # three masters, a replica each
    assert "--cluster-replicas 1" in str(_by_kind(docs, "Job", "redis-cluster-create"))
    conf = _by_kind(docs, "ConfigMap", "redis-cluster")["data"]["redis.conf"]
    assert "cluster-enabled yes" in conf
    config = _by_kind(docs, "ConfigMap", "flowgate-config")["data"]
    assert config["REDIS_CLUSTER"] == "true"
    assert config["REDIS_URL"] == "redis://redis-cluster:6379/0"
    assert set(config) - SETTING_NAMES == set()
    assert {doc["metadata"].get("namespace") for doc in docs if doc["kind"] != "Namespace"} == {
        "flowgate"
    }


def test_k8s_engine_config_matches_compose() -> None:
    docs = _load_all(K8S / "dependencies" / "camunda.yaml")
    config = _by_kind(docs, "ConfigMap", "camunda-config")["data"]["default.yml"]
    assert yaml.safe_load(config) == yaml.safe_load((COMPOSE / "camunda.yml").read_text())


def test_dockerfile_installs_the_scripts_every_manifest_runs() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^USER \d+$", dockerfile, flags=re.MULTILINE), "numeric uid (runAsNonRoot)"
    assert 'CMD ["flowgate-api"]' in dockerfile
    assert "HEALTHCHECK" in dockerfile
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    # Every command the manifests run is a console script the image installs.
    manifests = [COMPOSE / "compose.yaml", *(K8S / "base").glob("*.yaml")]
    commands = [re.findall(r'command: \["(flowgate-[a-z]+)"\]', m.read_text()) for m in manifests]
    assert {c for found in commands for c in found} == set(scripts)
    # What the build copies is what .dockerignore lets through.
    copies = re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, flags=re.MULTILINE)
    ignore = (ROOT / ".dockerignore").read_text()
    for source in (s for line in copies for s in line.split()):
        assert f"!{source.rstrip('/')}" in ignore.replace("/\n", "\n"), source


# --- `make up` where a Docker engine answers ----------------------------------------------


def test_docker_answers_only_when_the_engine_pings_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import socket
    import threading

    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nOK")

        thread = threading.Thread(target=answer)
        thread.start()
        monkeypatch.delenv("FLOWGATE_NO_DOCKER", raising=False)
        monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
        assert servers.docker_answers()
        thread.join()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'nothing.sock'}")
    assert not servers.docker_answers()


@pytest.fixture
def compose_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Where a Docker engine answers: every `docker compose` the stack runs (mode, args)."""
    calls: list[tuple[str, ...]] = []

    def compose(mode: str, *args: str) -> int:
        calls.append((mode, *args))
        return 0

    monkeypatch.setattr(servers, "docker_answers", lambda: True)
    monkeypatch.setattr(stack, "_compose", compose)
    return calls


def test_make_up_uses_compose_where_docker_answers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, compose_calls: list[tuple[str, ...]]
) -> None:
    calls = compose_calls
    monkeypatch.delenv("REDIS_CLUSTER", raising=False)
    run_dir = ["--run-dir", str(tmp_path)]
    assert stack.main([*run_dir, "up"]) == 0
    assert calls[-1] == ("compose", "up", "-d", "--build", "--wait")
    calls.clear()
    # `down` follows what `up` did, even if the engine stopped answering meanwhile.
    monkeypatch.setattr(servers, "docker_answers", lambda: False)
    assert stack.main([*run_dir, "down"]) == 0
    assert calls == [("compose", "down")]
    assert not (tmp_path / "stack.json").exists()


def test_compose_honours_a_redis_cluster_and_refuses_another_engine_by_name(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    compose_calls: list[tuple[str, ...]],
) -> None:
    calls = compose_calls
    monkeypatch.setenv("REDIS_CLUSTER", "true")
    assert stack.main(["--run-dir", str(tmp_path / "a"), "up"]) == 0
    assert calls[-1][0] == "compose-cluster"
    files = stack.compose_files("compose-cluster")
    assert [f.name for f in files] == ["compose.yaml", "compose.example.yaml", "redis-cluster.yaml"]
    assert all(f.exists() for f in files)

    monkeypatch.setenv("REDIS_CLUSTER", "false")
    monkeypatch.setattr(servers, "ENGINE", "operaton")
    calls.clear()
    assert stack.main(["--run-dir", str(tmp_path / "b"), "up"]) == 1
    assert calls == []
    assert "FLOWGATE_ENGINE=operaton" in capsys.readouterr().err


def test_every_redis_keeps_a_finished_runs_hash_a_listpack() -> None:
    """The one Redis setting flowgate's memory per run depends on, in every Redis its
    deployments start (native, compose, compose cluster, Kubernetes, Kubernetes cluster)."""
    value = servers.HASH_MAX_LISTPACK_VALUE
    texts = {
        "compose": (COMPOSE / "compose.yaml").read_text(),
        "compose cluster": (COMPOSE / "redis-cluster.conf").read_text(),
        "k8s": (K8S / "dependencies" / "redis.yaml").read_text(),
        "k8s cluster": (K8S / "overlays" / "redis-cluster" / "redis-cluster.yaml").read_text(),
    }
    for name, text in texts.items():
        found = re.findall(r'hash-max-listpack-value"?,?\s+"?(\d+)', text)
        assert found == [value], (name, found)
