"""What an operator looks at (deploy/monitoring): the alert rules and the dashboard query
only what flowgate exports, the PrometheusRule is the rules file, and both follow their
schemas."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from flowgate.services.api.metrics import ApiMetrics
from flowgate.services.worker.metrics import WorkerMetrics
from tests.helpers.manifests import render

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
SCHEMAS = ROOT / "deploy" / "k8s" / "schema"
#: Functions and keywords of PromQL that look like metric names to the pattern below.
_METRIC = re.compile(r"\b(flowgate_[a-z_]+)\b")


def exported() -> set[str]:
    """Every series name the API and the worker export (counters with ``_total``,
    histograms with their ``_bucket``/``_sum``/``_count``)."""
    names: set[str] = set()
    for registry in (ApiMetrics().registry, WorkerMetrics().registry):
        for metric in registry.collect():
            names.add(metric.name)
            if metric.type == "counter":
                names.add(f"{metric.name}_total")
            if metric.type == "histogram":
                names.update(f"{metric.name}_{part}" for part in ("bucket", "sum", "count"))
            if metric.type == "info":
                names.add(f"{metric.name}_info")
    return names


def alert_rules() -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return rules


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads((MONITORING / "dashboard.json").read_text())
    return board


def test_every_rule_is_complete_and_queries_what_flowgate_exports() -> None:
    rules = [rule for group in alert_rules()["groups"] for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} >= {
        "FlowgateWriteBehindStalled",
        "FlowgateDependencyFailures",
        "FlowgateEngineUnreachable",
        "FlowgateBacklogAging",
    }
    names = exported()
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        used = set(_METRIC.findall(rule["expr"]))
        assert used, rule["alert"]
        assert used <= names, (rule["alert"], used - names)
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]


def test_the_prometheus_rule_is_the_rules_file_and_follows_its_crd() -> None:
    docs = render(ROOT / "deploy" / "k8s" / "overlays" / "monitoring")
    [rule] = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == alert_rules()["groups"]
    path = SCHEMAS / "prometheusrule-v1.json"
    assert hashlib.sha256(path.read_bytes()).hexdigest() in (SCHEMAS / "README.md").read_text()
    validator = jsonschema.Draft7Validator(json.loads(path.read_text()))
    assert [e.message for e in validator.iter_errors(rule)] == []
    broken = {**rule, "spec": {"groups": [{"name": "g", "rules": [{"alert": "A"}]}]}}
    assert list(validator.iter_errors(broken)), "an alert without expr is refused"


def test_the_dashboard_shows_what_an_operator_looks_at_from_real_series() -> None:
    board = dashboard()
    panels = board["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    titles = " ".join(panel["title"].lower() for panel in panels)
    for subject in ("starts", "wake latency", "parked", "backlog", "slots", "write-behind"):
        assert subject in titles, subject
    names = exported()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            used = set(_METRIC.findall(target["expr"]))
            assert used, panel["title"]
            assert used <= names, (panel["title"], used - names)
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource"]


@pytest.mark.parametrize("name", ["flowgate_api_outcomes_total", "flowgate_writebehind_backlog"])
def test_the_check_knows_real_names_from_made_up_ones(name: str) -> None:
    names = exported()
    assert name in names
    assert f"{name}_made_up" not in names
