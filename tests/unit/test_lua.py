"""Every Lua script reads its KEYS and ARGV by the names its tuples declare (shared/lua.py)."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from flowgate.services.api import limits, messages  # noqa: F401
from flowgate.services.flusher import writebehind  # noqa: F401
from flowgate.services.worker import identity  # noqa: F401
from flowgate.shared import lease  # noqa: F401 - each of these declares its scripts
from flowgate.shared.lua import NoArgs, Script, problems
from flowgate.shared.store import scripts


def test_every_script_is_declared_by_name() -> None:
    store = {
        "claim",
        "sending",
        "attach",
        "step",
        "step_claim",
        "step_release",
        "finish",
        "reopen",
        "cancelling",
        "abandon",
        "look",
        "compact",
    }
    others = {
        "take",
        "page",
        "lease-hold",
        "lease-release",
        "slot-acquire",
        "message-claim",
        "message-renew",
        "count",
        "rate",
        "place",
        "writebehind-ack",
    }
    assert set(Script.declared) == store | others
    assert all(isinstance(getattr(scripts, name.upper()), Script) for name in store)


@pytest.mark.parametrize("name", sorted(Script.declared))
def test_a_script_reads_what_it_declares_and_nothing_by_position(name: str) -> None:
    assert list(problems(Script.declared[name])) == []


class _Keys(NamedTuple):
    state: str
    stream: str


class _Args(NamedTuple):
    status: str
    rest: list[str]


def test_the_header_binds_names_in_the_order_python_passes_them() -> None:
    script = Script("example", _Keys, _Args, "return {K.state, K.stream, A.status, A.rest}")
    assert script.header() == (
        "local K = {state = KEYS[1], stream = KEYS[2]}\n"
        "local A = {status = ARGV[1], rest = {unpack(ARGV, 2)}}\n"
    )
    del Script.declared["example"]


def test_a_script_that_drifts_from_its_tuples_is_named() -> None:
    class Keys(NamedTuple):
        state: str
        unused: str

    drifted = Script("drifted", Keys, NoArgs, "redis.call('GET', K.state, K.other, ARGV[1])")
    del Script.declared["drifted"]
    assert list(problems(drifted)) == [
        "drifted: the body reads KEYS or ARGV by position",
        "drifted: the body reads K.other, which is not declared",
        "drifted: K.unused is declared but never read",
    ]
