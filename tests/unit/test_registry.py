"""Process/step declarations: everything wrong fails at declaration, not at the first task."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from pydantic import BaseModel, ConfigDict

from flowgate.services.worker.context import TaskContext
from flowgate.services.worker.handlers import PROCESSES
from flowgate.services.worker.registry import IDENTIFIER_FIELDS, Process, Registry, Step
from flowgate.shared.contract import SystemVariables


class In(BaseModel):
    userId: str


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Other(BaseModel):
    orderId: str


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
    # The model's field, the run's ids and the business ids an audit row names; never the
    # `identifiers` Json variable, which the engine would read from a byte array each time.
    assert handler.variables == sorted(
        {
            "userId",
            *(name for name in SystemVariables.NAMES if name != "identifiers"),
            *IDENTIFIER_FIELDS,
        }
    )


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
    with pytest.raises(ValueError, match=r"'p\.a' is registered twice for process 'p'"):
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

    with pytest.raises(TypeError, match="not a generator"):

        @process.handler("a")
        async def generator(data: In) -> AsyncIterator[None]:
            yield None

    with pytest.raises(ValueError, match=r"step\(s\) \['a', 'b'\] have no handler"):
        Registry.of([process])


def test_the_production_registry_builds() -> None:
    registry = Registry.of(PROCESSES)
    assert "onboard-user.validate-user-information" in registry.topics
    assert "benchmark.noop" in registry.topics


def test_a_plain_function_is_a_blocking_handler() -> None:
    process = Process("p", steps("a", "b"))

    @process.handler("a")
    def blocking(data: In) -> dict[str, str]:
        return {"seen": data.userId}

    @process.handler("b")
    async def non_blocking(data: In) -> None: ...

    assert [h.blocking for h in process.handlers] == [True, False]


def test_steps_of_several_processes_share_a_topic_and_are_told_apart_by_process() -> None:
    """An existing model's topic, served for two processes: one fetch topic that locks only
    those processes' tasks, with the longer lock and every variable either reads."""
    invoices = Process("invoices", [Step("notify", "ok", "failed", topic="notify-customer")])
    orders = Process(
        "orders", [Step("notify", "ok", "failed", topic="notify-customer", lock_duration_ms=60_000)]
    )

    @invoices.handler("notify")
    async def notify_invoice(data: In) -> None: ...

    @orders.handler("notify")
    async def notify_order(data: Other) -> None: ...

    registry = Registry.of([invoices, orders])
    [topic] = registry.fetch_topics(default_lock_ms=20_000)
    assert topic.topic_name == "notify-customer"
    assert topic.process_definition_keys == ["invoices", "orders"]
    assert topic.lock_duration_ms == 60_000
    assert topic.variables is not None
    assert {"userId", "orderId"} <= set(topic.variables)
    found = registry.get("notify-customer", "orders")
    assert found is not None
    assert found.fn is notify_order
    assert registry.get("notify-customer", "billing") is None  # not served here
    # A default topic needs no filter: its name carries the process key.
    plain = Process("p", steps("a"))
    plain.handler("a")(notify_invoice)
    [default] = Registry.of([plain]).fetch_topics(default_lock_ms=20_000)
    assert (default.topic_name, default.process_definition_keys) == ("p.a", None)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"timeout_ms": 0}, "timeout_ms must be positive"),
        ({"retries": -1}, "retries must be 0 or more"),
        ({"retry_backoff_ms": -5}, "retry_backoff_ms must be positive"),
        ({"timeout_error": "SLOW"}, "timeout_error needs a timeout_ms"),
        ({"topic": " "}, "topic must not be empty"),
    ],
)
def test_step_options_are_checked_when_declared(options: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Step("a", "ok", "failed", **options)  # type: ignore[arg-type]
