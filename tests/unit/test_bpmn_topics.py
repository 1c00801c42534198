"""Drift check: every camunda:topic in bpmn/ has exactly one handler, and vice versa."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from flowgate.services.worker.handlers import PROCESSES
from flowgate.services.worker.registry import Registry

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
