"""Process and step declarations: the part of the worker that handler authors touch.

A process declares its ordered steps once, each with the metadata its event-log rows carry
(step number, name, HTTP method and endpoint, the result text for success and for error),
and which step's output is the run's result (``finishes_run``): the framework ends the run
once the engine has accepted that step, so no handler ever touches the run's state.
A handler is an async function decorated with the step it implements; it takes a pydantic
model of its input variables (and optionally the
:class:`~flowgate.services.worker.context.TaskContext`) and returns its output::

    onboard_user = Process(
        "onboard-user",
        [
            Step("validate-user-information",
                 success="User information validated", error="User information validation failed"),
            Step("call-onboarding-api", http_method="POST", endpoint="/onboarding/complete",
                 success="Onboarding API call successful", error="Onboarding API call failed",
                 finishes_run=True),
        ],
        config=OnboardingConfig,  # a pydantic-settings class: read once, at start-up
    )

    @onboard_user.handler("validate-user-information")
    async def validate(data: ValidateIn) -> ValidateOut:
        if "invalid" in data.userId:
            raise BusinessRuleError("VALIDATION_FAILED", f"User {data.userId} failed validation")
        return ValidateOut(validated=True)

Everything is checked when it is declared, so a mistake stops start-up rather than the first
task: a step declared twice, a handler for an undeclared step, a second handler for a step,
an input annotation that is not a pydantic model, and (in :class:`Registry`) a topic that two
processes claim or a declared step without a handler.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from flowgate.shared.camunda import TopicRequest
from flowgate.shared.contract import SystemVariables
from flowgate.shared.settings import settings_error

if TYPE_CHECKING:
    from flowgate.services.worker.context import TaskContext

#: The business ids a task's audit row names in its ``identifiers`` (the seed's list), as
#: the run's variables hold them or the step returns them.
IDENTIFIER_FIELDS = ("customerId", "userId", "orderId", "accountId")
#: What every task is fetched with besides its model's fields: the run's ids (its audit
#: row's columns) and the business ids above. Not the ``identifiers`` variable: it stays the
#: start's ``{applicationId}``, and a Json variable costs the engine a byte array read and a
#: parse on every fetch.
FETCHED_WITH_EVERY_TASK = frozenset(
    {*(name for name in SystemVariables.NAMES if name != "identifiers"), *IDENTIFIER_FIELDS}
)

InT = TypeVar("InT", bound=BaseModel)
OutT = TypeVar("OutT")


class BusinessRuleError(Exception):
    """An expected business outcome: the task throws a BPMN error instead of failing.

    ``code`` becomes the BPMN ``errorCode`` (and the ``errorCode`` variable), ``message`` the
    ``errorMessage``; ``error_type`` fills the ``errorType`` variable as in the seed, and
    ``details`` go into the event log's metadata.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        error_type: str = "BUSINESS_RULE_ERROR",
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.error_type = error_type
        self.details = dict(details or {})


@dataclass(frozen=True, slots=True)
class StepResult(Generic[OutT]):
    """A handler's output with more to say than its variables.

    ``http_status_code`` is what its downstream call answered (event log). ``error``, on a
    step that finishes the run, ends the run as ``error`` with this (any JSON) instead of
    ``ok``; ``data`` is still the task's output and the run's data.
    """

    data: OutT
    http_status_code: int | None = None
    error: Any = None


#: A handler takes its input model (and optionally the context) and returns a pydantic
#: model, a mapping, either wrapped in a StepResult, or None (no output variables). An
#: ``async def`` runs on the worker's loop; a plain ``def`` (blocking code: requests, an
#: SDK, a database driver) in the worker's thread pool.
HandlerFn = Callable[[InT, "TaskContext[Any]"], Any] | Callable[[InT], Any]


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a process: how the event log describes it and how its handler runs.

    Every option but the texts has a default from the process or the worker's settings.
    """

    name: str
    success: str
    error: str
    http_method: str | None = None
    endpoint: str | None = None
    #: The external task's topic in the BPMN (default ``<process key>.<step name>``). Any
    #: string: one an existing model already uses, or one several processes share (the
    #: worker then fetches only the tasks of the processes it serves, and the task's
    #: process tells their handlers apart).
    topic: str | None = None
    #: Overrides the process's (and the worker's) lock duration for this topic.
    lock_duration_ms: int | None = None
    #: The handler is stopped after this long: an async one is cancelled, a synchronous one
    #: abandoned (its thread runs on, its result is dropped). The attempt then fails like
    #: any other (retried, then an incident), or throws the BPMN error ``timeout_error``.
    timeout_ms: int | None = None
    timeout_error: str | None = None
    #: The step is worth running only for a client that still waits for the run (a code
    #: sent by SMS, a quote): ``ctx.deadline`` includes when the starting client stops
    #: waiting (its ``Prefer: wait``), and a task that starts after that fails at once,
    #: throwing ``timeout_error`` when declared (else as a failure without retries).
    with_client_deadline: bool = False
    #: Override WORKER_RETRIES and WORKER_RETRY_TIMEOUT_MS for this step: re-tries after the
    #: first failure (0: an incident at once), and the delay before the first one (doubling
    #: with each failure, with jitter so that a downstream outage is not hit in lockstep).
    retries: int | None = None
    retry_backoff_ms: int | None = None
    #: Its output is the run's result: the run ends (``ok``, or ``error`` with
    #: ``StepResult.error``) as soon as the engine has accepted this step.
    finishes_run: bool = False

    def __post_init__(self) -> None:
        positive = ("lock_duration_ms", "timeout_ms", "retry_backoff_ms")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"step {self.name!r}: {name} must be positive, not {value}")
        if self.retries is not None and self.retries < 0:
            raise ValueError(f"step {self.name!r}: retries must be 0 or more")
        if self.timeout_error is not None and self.timeout_ms is None:
            raise ValueError(f"step {self.name!r}: timeout_error needs a timeout_ms")
        if self.topic is not None and not self.topic.strip():
            raise ValueError(f"step {self.name!r}: topic must not be empty")


@dataclass(frozen=True, slots=True)
class Handler:
    """A step bound to its function: everything the worker needs to run one topic."""

    topic: str
    process: Process
    step: Step
    number: int
    input_model: type[BaseModel]
    fn: Callable[..., Any]
    takes_context: bool
    #: A plain function: it runs in the worker's thread pool (WORKER_THREADS).
    blocking: bool = False

    @property
    def lock_duration_ms(self) -> int | None:
        return self.step.lock_duration_ms or self.process.lock_duration_ms

    @property
    def variables(self) -> list[str] | None:
        """Variable names to fetch: the model's fields and :data:`FETCHED_WITH_EVERY_TASK`.

        ``None`` (all variables) when the model keeps unknown fields, since it then wants
        every variable; otherwise fetching only what is read keeps polls small.
        """
        if self.input_model.model_config.get("extra") == "allow":
            return None
        names = {f.alias or name for name, f in self.input_model.model_fields.items()}
        return sorted(names | FETCHED_WITH_EVERY_TASK)


class Process:
    """A BPMN process's steps, in order, and the handlers bound to them.

    Topics are ``{key}.{step name}`` (as in ``bpmn/``). ``target_system`` and
    ``originating_system`` fill the event-log columns of the same name. ``config`` is the
    process's own settings (a pydantic-settings class, say): the worker builds it once at
    start-up, a bad value stops it there, and handlers reach it as ``ctx.config``.
    """

    def __init__(
        self,
        key: str,
        steps: Sequence[Step],
        *,
        target_system: str = "CamundaEngine",
        originating_system: str = "flowgate",
        lock_duration_ms: int | None = None,
        config: Callable[[], object] | None = None,
    ) -> None:
        names = [step.name for step in steps]
        if duplicated := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"process {key!r} declares step(s) {duplicated} more than once")
        self.key = key
        self.steps = tuple(steps)
        self.target_system = target_system
        self.originating_system = originating_system
        self.lock_duration_ms = lock_duration_ms
        self.config = config
        self._handlers: dict[str, Handler] = {}

    def topic(self, step_name: str) -> str:
        """The step's topic: its own, or ``<key>.<step name>``."""
        step = next((s for s in self.steps if s.name == step_name), None)
        return step.topic if step is not None and step.topic else f"{self.key}.{step_name}"

    def handler(self, step_name: str) -> Callable[[HandlerFn[InT]], HandlerFn[InT]]:
        """Bind the decorated function to ``step_name``; returns the function unchanged."""
        if step_name not in {step.name for step in self.steps}:
            raise ValueError(f"process {self.key!r} has no step {step_name!r}")

        def register(fn: HandlerFn[InT]) -> HandlerFn[InT]:
            self._bind(step_name, fn)
            return fn

        return register

    @property
    def handlers(self) -> tuple[Handler, ...]:
        """The bound handlers, in step order."""
        return tuple(self._handlers[s.name] for s in self.steps if s.name in self._handlers)

    def load_config(self) -> object:
        """The process's config object (None without one); raises a ``SettingsError``
        naming the bad variable when it cannot be built."""
        if self.config is None:
            return None
        try:
            return self.config()
        except ValidationError as exc:
            raise settings_error(exc, f"process {self.key!r}") from exc

    def unhandled_steps(self) -> list[str]:
        return [step.name for step in self.steps if step.name not in self._handlers]

    def _bind(self, step_name: str, fn: Callable[..., Awaitable[Any]]) -> None:
        number, step = next(
            ((i, s) for i, s in enumerate(self.steps, start=1) if s.name == step_name),
            (0, None),
        )
        if step is None:
            raise ValueError(f"process {self.key!r} has no step {step_name!r}")
        if step_name in self._handlers:
            existing = self._handlers[step_name].fn
            raise ValueError(
                f"step {step_name!r} of {self.key!r} already has a handler"
                f" ({existing.__module__}.{existing.__qualname__})"
            )
        model, takes_context = _signature(fn)
        self._handlers[step_name] = Handler(
            topic=self.topic(step_name),
            process=self,
            step=step,
            number=number,
            input_model=model,
            fn=fn,
            takes_context=takes_context,
            blocking=not inspect.iscoroutinefunction(fn),
        )

    def __repr__(self) -> str:
        return f"Process({self.key!r}, steps={[s.name for s in self.steps]})"


def _signature(fn: Callable[..., Any]) -> tuple[type[BaseModel], bool]:
    """The input model (the first parameter's annotation) and whether ``ctx`` is taken."""
    where = f"{fn.__module__}.{fn.__qualname__}"
    if not callable(fn) or inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
        raise TypeError(f"handler {where} must be a function (async or not), not a generator")
    params = list(inspect.signature(fn).parameters.values())
    if len(params) not in (1, 2):
        raise TypeError(f"handler {where} must take (data) or (data, ctx), got {len(params)}")
    try:
        hints = typing.get_type_hints(fn)
    except NameError as exc:  # an annotation only imported under TYPE_CHECKING
        raise TypeError(f"handler {where}: cannot resolve its annotations ({exc})") from exc
    model = hints.get(params[0].name)
    if not (inspect.isclass(model) and issubclass(model, BaseModel)):
        raise TypeError(
            f"handler {where}: its first parameter must be annotated with a pydantic model"
        )
    return model, len(params) == 2


@dataclass(slots=True)
class Registry:
    """Every handler the worker runs, by topic and process: a topic is served once per
    process (several processes may share one); a second claim fails when it is added."""

    _handlers: dict[tuple[str, str], Handler] = field(default_factory=dict)

    @classmethod
    def of(cls, processes: Iterable[Process]) -> Registry:
        registry = cls()
        for process in processes:
            registry.add(process)
        return registry

    def add(self, process: Process) -> None:
        if missing := process.unhandled_steps():
            raise ValueError(f"process {process.key!r}: step(s) {missing} have no handler")
        for handler in process.handlers:
            if (handler.topic, process.key) in self._handlers:
                raise ValueError(
                    f"topic {handler.topic!r} is registered twice for process {process.key!r}"
                )
        for handler in process.handlers:
            self._handlers[handler.topic, process.key] = handler

    def get(self, topic: str, process_key: str | None = None) -> Handler | None:
        """The handler of ``topic`` for the task's process; a topic served for one process
        only is that process's handler whatever the task says (an old engine's task may
        lack its definition key)."""
        if (found := self._handlers.get((topic, process_key or ""))) is not None:
            return found
        serving = [h for (t, _), h in self._handlers.items() if t == topic]
        return serving[0] if len(serving) == 1 and not serving[0].step.topic else None

    def fetch_topics(self, default_lock_ms: int) -> list[TopicRequest]:
        """One fetchAndLock topic per topic served: the longest lock its handlers ask for,
        every variable any of them reads, and for a step's own topic only the tasks of the
        processes served here (another team's process may use the same topic)."""
        by_topic: dict[str, list[Handler]] = {}
        for handler in self._handlers.values():
            by_topic.setdefault(handler.topic, []).append(handler)
        requests = []
        for topic, handlers in by_topic.items():
            reads = [h.variables for h in handlers]
            variables = None if None in reads else sorted({n for r in reads for n in r or ()})
            own = any(h.step.topic for h in handlers)
            requests.append(
                TopicRequest(
                    topic,
                    max(h.lock_duration_ms or default_lock_ms for h in handlers),
                    variables,
                    process_definition_keys=sorted(h.process.key for h in handlers)
                    if own
                    else None,
                )
            )
        return requests

    @property
    def topics(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(topic for topic, _ in self._handlers))

    @property
    def processes(self) -> tuple[Process, ...]:
        return tuple({h.process.key: h.process for h in self._handlers.values()}.values())

    def configs(self) -> dict[str, object]:
        """Every process's config object by process key (built now, once)."""
        return {process.key: process.load_config() for process in self.processes}

    def __iter__(self) -> Iterator[Handler]:
        return iter(self._handlers.values())

    def __len__(self) -> int:
        return len(self._handlers)


class RegistryError(SystemExit):
    """``WORKER_PROCESSES`` names what cannot be served: the message says what and why.

    A ``SystemExit`` with a text: left uncaught, Python prints it and exits with 1.
    """


def load_registry(spec: str) -> Registry:
    """The processes ``spec`` names, as one registry: comma-separated ``module:attribute``
    names of a :class:`Process`, a :class:`Registry`, or a sequence of processes.

    A module that cannot be imported, a name it lacks, something else than processes, a
    topic served twice or a step without a handler raise :class:`RegistryError`.
    """
    processes: list[Process] = []
    for name in (part.strip() for part in spec.split(",") if part.strip()):
        module_name, _, attribute = name.partition(":")
        if not attribute:
            raise RegistryError(f"WORKER_PROCESSES: {name!r} is not module:attribute")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise RegistryError(
                f"WORKER_PROCESSES: cannot import {module_name!r}: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            found = getattr(module, attribute)
        except AttributeError as exc:
            raise RegistryError(
                f"WORKER_PROCESSES: module {module_name!r} has no {attribute!r}"
            ) from exc
        processes.extend(_processes(name, found))
    if not processes:
        raise RegistryError(
            "WORKER_PROCESSES names no process: set it to your processes' module:attribute "
            "(the flowgate image serves none of its own; docs/running.md)"
        )
    try:
        return Registry.of(processes)
    except ValueError as exc:
        raise RegistryError(f"WORKER_PROCESSES: {exc}") from exc


def _processes(name: str, found: object) -> list[Process]:
    if isinstance(found, Process):
        return [found]
    if isinstance(found, Registry):
        return list(found.processes)
    if isinstance(found, Iterable) and not isinstance(found, str | bytes):
        items = list(found)
        if all(isinstance(item, Process) for item in items):
            return items
    raise RegistryError(
        f"WORKER_PROCESSES: {name!r} is a {type(found).__name__}, not a Process, a Registry "
        "or a sequence of processes"
    )
