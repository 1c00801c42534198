"""Drift checks: every camunda:topic in bpmn/ has exactly one handler, and vice versa; every
process there hands its tasks out in the fair order (shared/contract.py TASK_PRIORITY)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from flowgate.services.worker.handlers import PROCESSES
from flowgate.services.worker.registry import Registry
from flowgate.shared.contract import TASK_PRIORITY

BPMN_DIR = Path(__file__).resolve().parents[2] / "bpmn"
CAMUNDA_TOPIC = "{http://camunda.org/schema/1.0/bpmn}topic"


def bpmn_topics() -> list[str]:
    return [
        element.attrib[CAMUNDA_TOPIC]
        for path in sorted(BPMN_DIR.glob("*.bpmn"))
        for element in ET.parse(path).iter()
        if CAMUNDA_TOPIC in element.attrib
    ]


def test_every_bpmn_topic_has_exactly_one_handler_and_every_handler_a_topic() -> None:
    topics = bpmn_topics()
    assert topics, "no camunda:topic found in bpmn/"
    handled = Counter(handler.topic for handler in Registry.of(PROCESSES))
    assert all(count == 1 for count in handled.values())
    assert set(topics) - set(handled) == set(), "topics without a handler"
    assert set(handled) - set(topics) == set(), "handlers without a topic in bpmn/"


def test_every_bundled_process_fetches_its_tasks_in_the_fair_order() -> None:
    processes = [
        element
        for path in sorted(BPMN_DIR.glob("*.bpmn"))
        for element in ET.parse(path).iter("{http://www.omg.org/spec/BPMN/20100524/MODEL}process")
    ]
    assert processes
    priority = "{http://camunda.org/schema/1.0/bpmn}taskPriority"
    assert {p.attrib["id"]: p.attrib.get(priority) for p in processes} == {
        p.attrib["id"]: TASK_PRIORITY for p in processes
    }
