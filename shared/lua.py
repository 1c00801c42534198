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
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

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

    async def __call__(self, keys: K, args: A) -> Any:
        values: list[Any] = []
        for name, value in zip(_fields(type(args)), args, strict=True):
            values.extend(value if name == REST else [value])
        return await self._registered(keys=list(keys), args=values)


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
