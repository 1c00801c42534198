"""Engines for tests: one fake behind a pyreqwest middleware, and builders of tasks and BPMN.

:class:`FakeEngine` answers by the request's last path segment (its *action*:
``fetchAndLock``, ``complete``, ``start``, ...): first any response queued for the action,
then its route, then the default (204). It records every request, so a test asserts on what
went over the wire, while the real :class:`~flowgate.shared.camunda.CamundaClient` runs unchanged.
Requests and answers are httpx's ``Request``/``Response``, used as plain values.
"""

from __future__ import annotations

import contextlib
import inspect
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import orjson
from pyreqwest.middleware import Next
from pyreqwest.middleware.types import Middleware
from pyreqwest.request import Request
from pyreqwest.response import Response, ResponseBuilder

from deploy.local.servers import free_port
from flowgate.services.worker.registry import Process
from flowgate.shared.camunda import CamundaClient, LockedTask
from flowgate.shared.deployment import deploy_directory
from flowgate.shared.settings import Settings
from flowgate.shared.variables import from_camunda, to_camunda

BPMN_DIR = Path(__file__).resolve().parents[2] / "bpmn"
BASE_URL = "http://engine.test/engine-rest"

Route = Callable[[httpx.Request, Any], Awaitable[httpx.Response]]


class FakeEngine:
    def __init__(self, routes: Mapping[str, Route] | None = None) -> None:
        self.routes = dict(routes or {})
        self.requests: list[httpx.Request] = []
        self.default = httpx.Response(204)
        self._queued: dict[str, list[httpx.Response]] = {}

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        action = _action(request)
        if queue := self._queued.get(action):
            return queue.pop(0)
        if route := self.routes.get(action):
            return await route(request, _body(request))
        return self.default

    def answer(self, action: str, *responses: httpx.Response) -> None:
        """Queue ``responses`` for the next calls of ``action``."""
        self._queued.setdefault(action, []).extend(responses)

    def answer_all(self, status_code: int, body: Any = None) -> None:
        """Answer every request without a queued response or route like this."""
        content = b"" if body is None else orjson.dumps(body)
        self.default = httpx.Response(status_code, content=content)

    def actions(self) -> list[str]:
        return [_action(request) for request in self.requests]

    def calls(self) -> list[tuple[str, Any]]:
        """Every request as (action, JSON body)."""
        return [(_action(request), _body(request)) for request in self.requests]

    def bodies(self, action: str) -> list[Any]:
        return [_body(r) for r in self.requests if _action(r) == action]

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    @property
    def last_body(self) -> Any:
        return _body(self.last)

    @contextlib.asynccontextmanager
    async def client(self, timeout_s: float = 3.0) -> AsyncIterator[CamundaClient]:
        """A real CamundaClient whose requests this engine answers."""
        async with CamundaClient(BASE_URL, timeout_s=timeout_s, middleware=answering(self)) as c:
            yield c


Handler = Callable[[httpx.Request], Awaitable[httpx.Response] | httpx.Response]


def answering(handler: Handler) -> Middleware:
    """A pyreqwest middleware that lets ``handler`` answer every request: nothing goes out."""

    async def middleware(request: Request, _next: Next) -> Response:
        body = request.body.copy_bytes() if request.body is not None else None
        sent = httpx.Request(
            request.method, str(request.url), headers=list(request.headers.items()),
            content=bytes(body) if body is not None else b"",
        )  # fmt: skip
        answer = handler(sent)
        if inspect.isawaitable(answer):
            answer = await answer
        return await (
            ResponseBuilder()
            .status(answer.status_code)
            .headers(list(answer.headers.items()))
            .body_bytes(answer.content)
            .build()
        )

    return middleware


def engine_error(status_code: int, message: str, code: int | None = None) -> httpx.Response:
    """An engine error body ``{"type", "message", "code"}``."""
    return httpx.Response(status_code, json={"type": "X", "message": message, "code": code})


def _action(request: httpx.Request) -> str:
    return request.url.path.rsplit("/", 1)[-1]


def _body(request: httpx.Request) -> Any:
    return orjson.loads(request.content) if request.content else None


# --- builders ------------------------------------------------------------------------------------


def task_json(task_id: str = "task-1", topic: str = "p.work", **variables: Any) -> dict[str, Any]:
    """An external task as fetchAndLock answers it (variables typed as the engine does)."""
    return {
        "id": task_id,
        "topicName": topic,
        "workerId": "w1",
        "processInstanceId": "pi-1",
        "processDefinitionKey": topic.partition(".")[0],
        "businessKey": variables.get("correlationId"),
        "activityId": topic.partition(".")[2],
        "retries": None,
        "priority": 0,
        "variables": {
            name: {"type": "String", "value": value} for name, value in variables.items()
        },
    }


def locked_task(retries: int | None = None, **variables: Any) -> LockedTask:
    """A task of process ``p``'s ``work`` step, in run ``cid-1`` started through flowgate."""
    return LockedTask(
        id="task-1",
        topic_name="p.work",
        worker_id="w1",
        process_instance_id="pi-1",
        process_definition_key="p",
        business_key="cid-1",
        activity_id="work",
        activity_instance_id="work:1",
        retries=retries,
        priority=0,
        lock_expiration_time=None,
        variables={
            "correlationId": "cid-1",
            "application_id": "app-1",
            "traceability_id": "trace-1",
            "batch_id": "batch-1",
            "identifiers": {"applicationId": "app-1"},
            **variables,
        },
    )


def one_task_bpmn(key: str, topic: str) -> bytes:
    """A process ``key`` with one external task on ``topic``."""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
    xmlns:camunda="http://camunda.org/schema/1.0/bpmn" id="d_{key}" targetNamespace="test">
  <bpmn:process id="{key}" isExecutable="true" camunda:historyTimeToLive="P1D">
    <bpmn:startEvent id="start"><bpmn:outgoing>f1</bpmn:outgoing></bpmn:startEvent>
    <bpmn:sequenceFlow id="f1" sourceRef="start" targetRef="task" />
    <bpmn:serviceTask id="task" camunda:type="external" camunda:topic="{topic}">
      <bpmn:incoming>f1</bpmn:incoming><bpmn:outgoing>f2</bpmn:outgoing>
    </bpmn:serviceTask>
    <bpmn:sequenceFlow id="f2" sourceRef="task" targetRef="end" />
    <bpmn:endEvent id="end"><bpmn:incoming>f2</bpmn:incoming></bpmn:endEvent>
  </bpmn:process>
</bpmn:definitions>""".encode()


def bpmn(key: str, body: str) -> str:
    """A process ``key``: start -> ``body`` (elements whose first takes flow ``f1`` in and
    whose last sends ``f_end`` out) -> end."""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
    xmlns:camunda="http://camunda.org/schema/1.0/bpmn" id="d_{key}" targetNamespace="test">
  <bpmn:process id="{key}" isExecutable="true" camunda:historyTimeToLive="P1D">
    <bpmn:startEvent id="start"><bpmn:outgoing>f1</bpmn:outgoing></bpmn:startEvent>
    {body}
    <bpmn:endEvent id="end"><bpmn:incoming>f_end</bpmn:incoming></bpmn:endEvent>
  </bpmn:process>
</bpmn:definitions>"""


def single(key: str, element: str) -> str:
    """One activity between start and end: ``element`` holds its opening tag's name and
    attributes, e.g. ``userTask id="approve"``."""
    name = element.split()[0]
    return bpmn(
        key,
        f"""<bpmn:sequenceFlow id="s1" sourceRef="start" targetRef="step" />
    <bpmn:{element}><bpmn:incoming>s1</bpmn:incoming><bpmn:outgoing>f_end</bpmn:outgoing>
    </bpmn:{name}>
    <bpmn:sequenceFlow id="f_end" sourceRef="step" targetRef="end" />""",
    ).replace("<bpmn:outgoing>f1</bpmn:outgoing>", "<bpmn:outgoing>s1</bpmn:outgoing>")


def onboard_user_bpmn(key: str) -> bytes:
    """bpmn/onboard-user.bpmn with its process id and topics renamed to ``key``."""
    text = (BPMN_DIR / "onboard-user.bpmn").read_text()
    return text.replace('"onboard-user"', f'"{key}"').replace('"onboard-user.', f'"{key}.').encode()


def clone(process: Process, key: str) -> Process:
    """``process`` under another key (so other topics), with the same handlers and config."""
    copy = Process(
        key,
        process.steps,
        target_system=process.target_system,
        originating_system=process.originating_system,
        config=process.config,
    )
    for handler in process.handlers:
        copy.handler(handler.step.name)(handler.fn)
    return copy


async def deploy_bpmn(engine_url: str) -> None:
    """Deploy bpmn/ to a real engine (idempotent: unchanged files create no new versions)."""
    async with CamundaClient(engine_url) as camunda:
        await deploy_directory(camunda)


class EngineAdmin:
    """What tests ask a real engine and flowgate never does (plain REST, for assertions
    and clean-up): ``async with EngineAdmin(engine_url) as admin:``."""

    def __init__(self, base_url: str) -> None:
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=30)

    async def __aenter__(self) -> EngineAdmin:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def process_instance(self, instance_id: str) -> dict[str, Any] | None:
        """The running instance, or None once it has ended (or never existed)."""
        return await self._one(f"/process-instance/{instance_id}")

    async def historic_process_instance(self, instance_id: str) -> dict[str, Any] | None:
        return await self._one(f"/history/process-instance/{instance_id}")

    async def historic_process_instances(self, **filters: str | int | bool) -> list[Any]:
        return await self._list("/history/process-instance", filters)

    async def process_variables(self, instance_id: str) -> dict[str, Any]:
        variables = await self._get(
            f"/process-instance/{instance_id}/variables", {"deserializeValues": False}
        )
        return from_camunda(variables)

    async def historic_variables(self, instance_id: str) -> dict[str, Any]:
        found = await self._list(
            "/history/variable-instance",
            {"processInstanceId": instance_id, "deserializeValues": False},
        )
        return from_camunda({variable["name"]: variable for variable in found})

    async def historic_activities(self, process_instance_id: str, **filters: str) -> list[Any]:
        return await self._list(
            "/history/activity-instance", {"processInstanceId": process_instance_id, **filters}
        )

    async def external_tasks(self, process_instance_id: str) -> list[Any]:
        return await self._list("/external-task", {"processInstanceId": process_instance_id})

    async def incidents(self, process_instance_id: str) -> list[Any]:
        return await self._list("/incident", {"processInstanceId": process_instance_id})

    async def process_definitions(self, key: str) -> list[Any]:
        return await self._list("/process-definition", {"key": key})

    async def set_retries(self, task_id: str, retries: int) -> None:
        response = await self._http.put(
            f"/external-task/{task_id}/retries", json={"retries": retries}
        )
        response.raise_for_status()

    async def delete_process_instance(self, instance_id: str) -> None:
        response = await self._http.delete(f"/process-instance/{instance_id}")
        if response.status_code != 404:
            response.raise_for_status()

    async def user_tasks(self, process_instance_id: str) -> list[Any]:
        return await self._list("/task", {"processInstanceId": process_instance_id})

    async def complete_user_task(self, task_id: str, variables: dict[str, Any]) -> None:
        response = await self._http.post(
            f"/task/{task_id}/complete", json={"variables": to_camunda(variables)}
        )
        response.raise_for_status()

    async def _one(self, path: str) -> dict[str, Any] | None:
        response = await self._http.get(path)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        found: dict[str, Any] = response.json()
        return found

    async def _list(self, path: str, params: Mapping[str, str | int | bool]) -> list[Any]:
        found: list[Any] = await self._get(path, params)
        return found

    async def _get(self, path: str, params: Mapping[str, str | int | bool]) -> Any:
        query = {k: str(v).lower() if isinstance(v, bool) else v for k, v in params.items()}
        response = await self._http.get(path, params=query)
        response.raise_for_status()
        return response.json()


def team_package(root: Path, name: str, key: str) -> Path:
    """A package outside the repository with one process and its BPMN, as a team has it."""
    source = root / name
    source.mkdir(parents=True)
    (source / "__init__.py").write_text(
        textwrap.dedent(f'''
        from pydantic import BaseModel

        from flowgate.handlers import Process, Step

        process = Process(
            "{key}", [Step("greet", success="greeted", error="no greeting", finishes_run=True)]
        )


        class Name(BaseModel):
            name: str


        @process.handler("greet")
        async def greet(data: Name) -> dict[str, str]:
            return {{"greeting": f"hello, {{data.name}}"}}
        ''')
    )
    bpmn_dir = root / "bpmn"
    bpmn_dir.mkdir()
    (bpmn_dir / f"{key}.bpmn").write_text(
        single(key, f'serviceTask id="step" camunda:type="external" camunda:topic="{key}.greet"')
    )
    return bpmn_dir


def team_env(settings: Settings, *, name: str, bpmn_dir: Path) -> dict[str, str]:
    """The environment a team's deploy step and worker run :func:`team_package`'s process
    with, against this test's servers (``settings``)."""
    return {
        "REDIS_URL": settings.redis_url,
        "REDIS_CLUSTER": str(settings.redis_cluster).lower(),
        "DATABASE_URL": settings.database_url,
        "REDIS_PREFIX": settings.redis_prefix,
        "CAMUNDA_BASE_URL": settings.camunda_base_url,
        "BPMN_DIR": str(bpmn_dir),
        "WORKER_PROCESSES": f"{name}:process",
        "WORKER_HEALTH_PORT": str(free_port()),
        "CAMUNDA_ASYNC_RESPONSE_TIMEOUT_MS": "1000",
    }
