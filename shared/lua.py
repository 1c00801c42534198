"""Lua scripts called by name: :class:`Script` binds named KEYS and ARGV on both sides.

A script is declared with two ``NamedTuple`` classes, one for its KEYS and one for its ARGV,
and a body that reads them as ``K.<name>`` and ``A.<name>``. The header that binds them
(``local K = {state = KEYS[1], ...}``) is generated from the tuples, as shared/state.py
generates ``state_json`` from the record's fields, so the order in which Python passes them
and the order in which Lua reads them cannot drift apart::

    class FinishKeys(NamedTuple):
        state: str
        stream: str

    FINISH = Script("finish", FinishKeys, FinishArgs, '''
      redis.call('HSET', K.state, 'status', A.status) ...''')

    finish = FINISH.bound(redis)
    await finish(FinishKeys(state=..., stream=...), FinishArgs(status="ok", ...))

An ARGV field named ``rest`` takes a sequence and spreads it over the remaining arguments
(the body reads it as the table ``A.rest``). A script that announces changes declares
``publishes=True`` and calls ``redis.call(PUBLISH, ...)``: the verb is the topology's
(shared/redis_client.py). tests/unit/test_lua.py holds every script to these rules.

Script calls made in the same turn of the event loop go to Redis together, as one
pipeline (:class:`_Turn`): at 16 runs in flight a replica's concurrent starts, or a
worker's concurrent step records, cost one write and one read instead of one each, which
is most of what a call costs the caller and much of what it costs Redis. A call made
alone goes alone, as before, one loop turn later.
"""

from __future__ import annotations

import asyncio
import functools
import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from flowgate.shared.redis_client import RedisClient, publish_verb

K = TypeVar("K", bound=tuple[Any, ...])
A = TypeVar("A", bound=tuple[Any, ...])

#: The ARGV field that spreads over the remaining arguments.
REST = "rest"


class NoKeys(NamedTuple):
    pass


class NoArgs(NamedTuple):
    pass


class Script(Generic[K, A]):
    """One script: its named KEYS and ARGV, its body, and the Lua it needs before it."""

    #: Every script declared, by name (for the drift test).
    declared: ClassVar[dict[str, Script[Any, Any]]] = {}

    def __init__(
        self,
        name: str,
        keys: type[K],
        args: type[A],
        body: str,
        *,
        prelude: str = "",
        publishes: bool = False,
    ) -> None:
        self.name = name
        self.keys = keys
        self.args = args
        self.body = body
        self.prelude = prelude
        self.publishes = publishes
        Script.declared[name] = self

    def source(self, verb: str = "PUBLISH") -> str:
        """The Lua Redis runs: the publish verb, the prelude, the generated header, the body."""
        publish = f"local PUBLISH = '{verb}'\n" if self.publishes else ""
        return publish + self.prelude + self.header() + self.body

    def header(self) -> str:
        keys = ", ".join(f"{name} = KEYS[{i}]" for i, name in enumerate(_fields(self.keys), 1))
        args = ", ".join(
            f"{name} = {{unpack(ARGV, {i})}}" if name == REST else f"{name} = ARGV[{i}]"
            for i, name in enumerate(_fields(self.args), 1)
        )
        return f"local K = {{{keys}}}\nlocal A = {{{args}}}\n"

    def bound(self, redis: RedisClient) -> Bound[K, A]:
        return Bound(self, redis)


class Bound(Generic[K, A]):
    """A script registered with one Redis client: ``await bound(keys, args)``."""

    def __init__(self, script: Script[K, A], redis: RedisClient) -> None:
        self.script = script
        self._registered = redis.register_script(script.source(publish_verb(redis)))
        self._turn = _turn_of(redis)

    async def __call__(self, keys: K, args: A) -> Any:
        values: list[Any] = []
        for name, value in zip(_fields(type(args)), args, strict=True):
            values.extend(value if name == REST else [value])
        return await self._turn.call(self._registered, list(keys), values)


@dataclass(slots=True)
class _Call:
    script: AsyncScript
    keys: list[Any]
    args: list[Any]
    answer: asyncio.Future[Any]


@dataclass(eq=False, slots=True)
class _Turn:
    """The script calls of one Redis client made in the current turn of the loop. The first
    call of a turn starts a task that yields once, so that every call made in that turn
    joins it, then sends them all; each caller gets its own answer or its own error."""

    redis: RedisClient
    #: The calls of the turn still gathering (None: no turn is).
    gathering: list[_Call] | None = None
    #: The turns being sent (a strong reference: a task nobody awaits must not be collected).
    sending: set[asyncio.Task[None]] = field(default_factory=set)

    async def call(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        call = _Call(script, keys, args, asyncio.get_running_loop().create_future())
        if self.gathering is not None:
            self.gathering.append(call)
        else:
            # A task of its own: a cancelled first caller must not leave the others unsent.
            calls = self.gathering = [call]
            turn = asyncio.ensure_future(self._send(calls))
            self.sending.add(turn)
            turn.add_done_callback(functools.partial(self._ended, calls))
        # A caller cancelled here cancels its answer, which the turn then leaves alone.
        return await call.answer

    def _ended(self, calls: list[_Call], turn: asyncio.Task[None]) -> None:
        """A turn that ended unsent (its task cancelled, as at the loop's end) neither
        strands its callers nor keeps later calls gathering behind it."""
        self.sending.discard(turn)
        if self.gathering is calls:
            self.gathering = None
        for call in calls:
            _settle(call, error=ConnectionError("the call's turn ended before it was sent"))

    async def _send(self, calls: list[_Call]) -> None:
        await asyncio.sleep(0)  # the other calls of this turn join
        self.gathering = None
        if len(calls) == 1:
            await self._alone(calls[0])
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for call in calls:
                    pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
                answers = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # noqa: BLE001 - each caller's, to raise there
            for call in calls:
                _settle(call, error=exc)
            return
        except BaseException:
            for call in calls:
                call.answer.cancel()
            raise
        for call, answer in zip(calls, answers, strict=True):
            if isinstance(answer, NoScriptError):  # Redis lost its scripts: loaded alone
                await self._alone(call)
            elif isinstance(answer, Exception):
                _settle(call, error=answer)
            else:
                _settle(call, answer=answer)

    @staticmethod
    async def _alone(call: _Call) -> None:
        try:
            answer = await call.script(keys=call.keys, args=call.args)
        except Exception as exc:  # noqa: BLE001 - it is the caller's, to raise there
            _settle(call, error=exc)
        except BaseException:
            call.answer.cancel()
            raise
        else:
            _settle(call, answer=answer)


def _settle(call: _Call, *, answer: Any = None, error: Exception | None = None) -> None:
    """Answer ``call`` unless its caller stopped waiting (the future is then cancelled)."""
    if call.answer.done():
        return
    if error is not None:
        call.answer.set_exception(error)
    else:
        call.answer.set_result(answer)


_turns: weakref.WeakKeyDictionary[RedisClient, _Turn] = weakref.WeakKeyDictionary()


def _turn_of(redis: RedisClient) -> _Turn:
    """The one queue of ``redis``'s script calls, shared by every script bound to it."""
    turn = _turns.get(redis)
    if turn is None:
        turn = _turns[redis] = _Turn(redis)
    return turn


def _fields(record: type[tuple[Any, ...]]) -> Sequence[str]:
    fields: Sequence[str] = getattr(record, "_fields", ())
    return fields


#: What a body may not do: read KEYS or ARGV by position (the header names them).
_POSITIONAL = re.compile(r"\b(KEYS|ARGV)\s*\[")
_NAMED = re.compile(r"\b([KA])\.([A-Za-z_][A-Za-z0-9_]*)")


def problems(script: Script[Any, Any]) -> Iterable[str]:
    """How a script breaks the rules above (nothing when it keeps them)."""
    if _POSITIONAL.search(script.body):
        yield f"{script.name}: the body reads KEYS or ARGV by position"
    used = {(kind, name) for kind, name in _NAMED.findall(script.body)}
    declared = {("K", name) for name in _fields(script.keys)}
    declared |= {("A", name) for name in _fields(script.args)}
    for kind, name in sorted(used - declared):
        yield f"{script.name}: the body reads {kind}.{name}, which is not declared"
    for kind, name in sorted(declared - used):
        yield f"{script.name}: {kind}.{name} is declared but never read"
    if script.publishes != ("PUBLISH" in script.body or "PUBLISH" in script.prelude):
        yield f"{script.name}: publishes={script.publishes} disagrees with its body"
