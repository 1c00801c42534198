"""The engine check's reading of answers a real engine here cannot give (Spin missing)."""

from __future__ import annotations

import httpx

from flowgate.shared.engine_check import PROBE_KEY, check_engine
from tests.helpers.engine import FakeEngine, engine_error, task_json

INSTANCE = {"id": "pi-1", "definitionId": f"{PROBE_KEY}:1", "ended": False}


async def test_an_engine_without_spin_json_is_told_and_the_other_checks_still_run() -> None:
    engine = FakeEngine()
    engine.answer("create", httpx.Response(200, json={"id": "d-1"}))
    engine.answer(
        "start",
        engine_error(500, "Cannot find serializer for value 'Untyped value '{\"a\":1}''"),
        httpx.Response(200, json=INSTANCE),
    )
    engine.answer("pi-1", httpx.Response(200, json={"id": "pi-1"}))  # its history record
    engine.answer("detail", httpx.Response(200, json=[{"id": "detail-1"}]))
    engine.answer(
        "fetchAndLock",
        httpx.Response(200, json=[task_json(topic="flowgate.probe")]),
        *[httpx.Response(200, json=[])] * 2,  # the two polls of the unique-worker check
    )
    engine.answer("bpmnError", engine_error(500, "no catching boundary event"))
    async with engine.client() as client:
        findings = await check_engine(client)
    assert [f.setting.split(" ")[0] for f in findings] == ["Spin"]
    assert "Cannot find serializer" in str(findings[0])
    starts = engine.bodies("start")
    assert [sorted(body["variables"]) for body in starts] == [
        ["flowgateProbe", "flowgateProbeJson"],
        ["flowgateProbe"],
    ]
    assert "bpmnError" in engine.actions(), "the BPMN-error check ran after the failed start"
