"""What flowgate needs from its engine (README, "What flowgate needs from your engine"),
checked over REST with one probe run. ``flowgate-deploy`` runs it after deploying.

A setting cannot be read over REST, but its effect can be seen. The probe deploys a
one-task process of its own (``flowgate-engine-probe``), starts it with an object variable
(Spin JSON), reads the history of that start (level ``full`` records each variable
change), takes the task with a business key no worker serves, and throws a BPMN error no
boundary event catches: with ``enableExceptionsAfterUnhandledBpmnError`` the engine refuses
it, without it the instance quietly ends. Two long polls of one worker id show whether a
new poll answers the older one (``unique-worker-request``). The probe's instance and its
history are deleted afterwards.

Each :class:`Finding` names the setting and what breaks without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass

from flowgate.shared.camunda import (
    CamundaClient,
    CamundaError,
    EngineError,
    ProcessInstance,
    TopicRequest,
)

PROBE_KEY = "flowgate-engine-probe"
PROBE_TOPIC = "flowgate.engine-probe"
PROBE_WORKER = "flowgate-engine-probe"
PROBE_BPMN = f"""<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
    xmlns:camunda="http://camunda.org/schema/1.0/bpmn"
    id="{PROBE_KEY}-definitions" targetNamespace="https://flowgate.dev/engine-probe">
  <bpmn:process id="{PROBE_KEY}" name="flowgate engine check" isExecutable="true"
      camunda:historyTimeToLive="P1D">
    <bpmn:startEvent id="start" />
    <bpmn:sequenceFlow id="to-task" sourceRef="start" targetRef="task" />
    <bpmn:serviceTask id="task" camunda:type="external" camunda:topic="{PROBE_TOPIC}" />
    <bpmn:sequenceFlow id="to-end" sourceRef="task" targetRef="end" />
    <bpmn:endEvent id="end" />
  </bpmn:process>
</bpmn:definitions>
""".encode()
#: How long the probe's long polls are held (a fetch of its own task answers at once).
POLL_MS = 3_000


@dataclass(frozen=True, slots=True)
class Finding:
    """A setting the engine lacks. ``fatal``: runs would end wrong, not only late."""

    setting: str
    consequence: str
    fatal: bool = True

    def __str__(self) -> str:
        return f"{self.setting}: {self.consequence}"


async def check_engine(client: CamundaClient) -> list[Finding]:
    """Run the probe; what the engine lacks, or ``[]``. Raises :class:`CamundaError` when
    the engine cannot run the probe at all (unreachable, credentials, a refused deployment)."""
    await client.deploy(PROBE_KEY, {f"{PROBE_KEY}.bpmn": PROBE_BPMN})
    findings: list[Finding] = []
    business_key = f"{PROBE_KEY}-{uuid.uuid4().hex}"
    variables: dict[str, object] = {"flowgateProbe": "history", "flowgateProbeJson": {"a": 1}}
    try:
        instance = await client.start_process(
            PROBE_KEY, business_key=business_key, variables=variables
        )
    except EngineError as exc:
        findings.append(
            Finding(
                "Spin JSON (default-serialization-format: application/json; Operaton: "
                "operaton-spin-dataformat-all)",
                f"a start with an object variable fails: the engine answered {exc}",
            )
        )
        del variables["flowgateProbeJson"]
        instance = await client.start_process(
            PROBE_KEY, business_key=business_key, variables=variables
        )
    try:
        findings += await _history(client, instance)
        findings += await _uncaught_bpmn_error(client, instance, business_key)
        findings += await _unique_worker_request(client)
    finally:
        await _remove(client, instance)
    return findings


async def _history(client: CamundaClient, instance: ProcessInstance) -> list[Finding]:
    if await client.historic_process_instance(instance.id) and await client.variable_updates(
        instance.id, max_results=1
    ):
        return []
    return [
        Finding(
            "history level full",
            "runs that end without a flowgate worker (a script or user task last, a timer, "
            "an incident) stay pending or end without their result, and a start whose "
            "answer was lost cannot be found again",
        )
    ]


async def _uncaught_bpmn_error(
    client: CamundaClient, instance: ProcessInstance, business_key: str
) -> list[Finding]:
    topic = TopicRequest(PROBE_TOPIC, 10_000, variables=[], business_key=business_key)
    tasks = await client.fetch_and_lock(
        PROBE_WORKER, [topic], max_tasks=1, async_response_timeout_ms=POLL_MS
    )
    if not tasks:
        return [Finding("external tasks", f"the probe's task on {PROBE_TOPIC!r} was not fetched")]
    try:
        await client.handle_bpmn_error(
            tasks[0].id, worker_id=PROBE_WORKER, error_code="flowgate-engine-probe"
        )
    except EngineError:
        return []  # refused: an uncaught BPMN error fails its step, as flowgate needs
    if await client.instance_running(instance.id):
        return []
    return [
        Finding(
            "enableExceptionsAfterUnhandledBpmnError: true",
            "an uncaught BPMN error ends the instance normally and its run reads ok",
        )
    ]


async def _unique_worker_request(client: CamundaClient) -> list[Finding]:
    """A second poll of the same worker id answers the first at once when the setting is on;
    without it the first waits out its timeout. Neither poll can lock anything: no task
    has the business key they ask for."""
    topic = TopicRequest(PROBE_TOPIC, 1_000, variables=[], business_key=uuid.uuid4().hex)
    worker = f"{PROBE_WORKER}-{uuid.uuid4().hex[:8]}"

    async def poll(timeout_ms: int) -> float:
        started = time.monotonic()
        # The engine answers a poll it cancels with a bare 503.
        with contextlib.suppress(CamundaError):
            await client.fetch_and_lock(
                worker, [topic], max_tasks=1, async_response_timeout_ms=timeout_ms
            )
        return time.monotonic() - started

    first = asyncio.create_task(poll(POLL_MS))
    await asyncio.sleep(0.3)  # the first poll is held by the engine before the second
    waited_s, _ = await asyncio.gather(first, poll(500))
    if waited_s < POLL_MS / 1000 - 0.5:
        return []
    return [
        Finding(
            "rest-api.fetch-and-lock.unique-worker-request: true",
            "a stopped worker's poll keeps tasks locked to it until the lock expires "
            "(late, not lost)",
            fatal=False,
        )
    ]


async def _remove(client: CamundaClient, instance: ProcessInstance) -> None:
    """Best effort: a probe left behind ends by its history time to live."""
    with contextlib.suppress(CamundaError):
        if await client.instance_running(instance.id):
            await client.delete_process_instance(instance.id)
        await client.delete_history(instance.id)
