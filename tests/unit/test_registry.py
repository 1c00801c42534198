"""Process/step declarations: everything wrong fails at declaration, not at the first task."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict

from flowgate.services.worker.context import TaskContext
from flowgate.services.worker.handlers import PROCESSES
from flowgate.services.worker.registry import Process, Registry, Step
from flowgate.shared.contract import SystemVariables


class In(BaseModel):
    userId: str


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


def steps(*names: str) -> list[Step]:
    return [Step(name, success=f"{name} ok", error=f"{name} failed") for name in names]


def test_a_handler_binds_to_its_step_with_number_topic_and_input_model() -> None:
    process = Process("p", steps("first", "second"), lock_duration_ms=7_000)

    @process.handler("second")
    async def second(data: In, ctx: TaskContext[None]) -> None: ...

    @process.handler("first")
    async def first(data: In) -> None: ...

    by_topic = {h.topic: h for h in Registry.of([process])}
    assert list(by_topic) == ["p.first", "p.second"]  # step order, not declaration order
    handler = by_topic["p.second"]
    assert (handler.number, handler.input_model, handler.takes_context) == (2, In, True)
    assert by_topic["p.first"].takes_context is False
    assert handler.lock_duration_ms == 7_000
    assert handler.variables == sorted({"userId", *SystemVariables.NAMES})


def test_a_model_that_keeps_unknown_fields_fetches_every_variable() -> None:
    process = Process("p", steps("only"))

    @process.handler("only")
    async def only(data: Open) -> None: ...

    assert process.handlers[0].variables is None


def test_registering_a_topic_twice_fails() -> None:
    first, second = Process("p", steps("a")), Process("p", steps("a"))
    for process in (first, second):

        @process.handler("a")
        async def a(data: In) -> None: ...

    registry = Registry.of([first])
    with pytest.raises(ValueError, match=r"'p\.a' is registered twice"):
        registry.add(second)


def test_a_second_handler_for_one_step_fails() -> None:
    process = Process("p", steps("a"))

    @process.handler("a")
    async def a(data: In) -> None: ...

    with pytest.raises(ValueError, match="already has a handler"):

        @process.handler("a")
        async def again(data: In) -> None: ...


def test_declaration_mistakes_fail_loudly() -> None:
    with pytest.raises(ValueError, match="more than once"):
        Process("p", steps("a", "a"))
    process = Process("p", steps("a", "b"))
    with pytest.raises(ValueError, match="no step 'zzz'"):
        process.handler("zzz")
    with pytest.raises(TypeError, match="pydantic model"):

        @process.handler("a")  # type: ignore[type-var]
        async def untyped(data: dict) -> None: ...  # type: ignore[type-arg]

    with pytest.raises(TypeError, match="async"):

        @process.handler("a")  # type: ignore[arg-type]
        def sync(data: In) -> None: ...

    with pytest.raises(ValueError, match=r"step\(s\) \['a', 'b'\] have no handler"):
        Registry.of([process])


def test_the_production_registry_builds() -> None:
    registry = Registry.of(PROCESSES)
    assert "onboard-user.validate-user-information" in registry.topics
    assert "benchmark.noop" in registry.topics
