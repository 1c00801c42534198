"""A process declares a step's stall threshold in its BPMN (services/background/stalls.py)."""

from __future__ import annotations

from flowgate.services.background.stalls import thresholds
from tests.helpers.engine import bpmn


def test_thresholds_are_read_from_each_activitys_extension_properties() -> None:
    def declared(value: str) -> str:
        return f"""<bpmn:extensionElements><camunda:properties>
          <camunda:property name="other" value="x" />
          <camunda:property name="flowgate:stallAfter" value="{value}" />
        </camunda:properties></bpmn:extensionElements>"""

    xml = bpmn(
        "p",
        f"""<bpmn:userTask id="review">{declared("PT4H")}</bpmn:userTask>
        <bpmn:receiveTask id="wait">{declared("90")}</bpmn:receiveTask>
        <bpmn:serviceTask id="call">{declared("soon")}</bpmn:serviceTask>
        <bpmn:serviceTask id="plain" />""",
    )
    assert thresholds(xml) == {"review": 4 * 3600.0, "wait": 90.0}
