"""Parked requests hold sockets: the wait room never parks more than the process can open."""

from __future__ import annotations

import resource

import pytest

from flowgate.services.api import deps
from flowgate.shared.settings import Settings


def test_max_parked_is_kept_when_the_open_files_limit_allows_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1_048_576, 1_048_576))
    assert deps._parking_places(Settings(max_parked=20_000)) == 20_000


def test_max_parked_is_lowered_to_fit_the_open_files_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (20_000, 20_000))
    assert deps._parking_places(Settings(max_parked=20_000)) == 20_000 - deps._FD_RESERVE
