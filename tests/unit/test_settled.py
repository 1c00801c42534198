"""The replica's cache of ended runs: only ends, only while their record can live, bounded
by memory."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from flowgate.services.api.settled import CLOCK_MARGIN_S, Settled, weight
from flowgate.shared.state import RunState, Status
from tests.unit.test_state import STATE


def hearing(*, result_ttl_s: float = 3600, max_bytes: int = 2**20) -> Settled:
    """A cache as a wait room with its subscriptions up holds it."""
    settled = Settled(result_ttl_s=result_ttl_s, max_bytes=max_bytes)
    settled.hearing(True)
    return settled


def ended(
    cid: str, status: Status = Status.OK, *, ago_s: float = 0, data: object = None
) -> RunState:
    at = datetime.now(UTC) - timedelta(seconds=ago_s)
    return dataclasses.replace(
        STATE, correlation_id=cid, status=status, updated_at=at, data=data or STATE.data
    )


@pytest.mark.parametrize("status", [Status.OK, Status.ERROR, Status.CANCELLED])
def test_an_end_is_kept(status: Status) -> None:
    settled = hearing()
    settled.keep(ended("c-1", status))
    found = settled.get("c-1")
    assert found is not None
    assert found.status is status


@pytest.mark.parametrize("status", [Status.PENDING, Status.ABANDONED])
def test_what_may_still_change_is_not_kept(status: Status) -> None:
    settled = hearing()
    settled.keep(ended("c-1", status))
    assert settled.get("c-1") is None
    assert len(settled) == 0


def test_an_end_is_kept_no_longer_than_its_record_lives() -> None:
    """Once the record may have expired, the id may name a new run: read the store."""
    settled = hearing()
    settled.keep(ended("old", ago_s=3600 - CLOCK_MARGIN_S + 1))  # a reread from Postgres
    settled.keep(ended("young", ago_s=3600 - CLOCK_MARGIN_S - 30))
    assert settled.get("old") is None
    assert settled.get("young") is not None


def test_an_entry_expires_while_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    settled = hearing(result_ttl_s=600)
    settled.keep(ended("c-1"))
    later = datetime.now(UTC).timestamp() + 600
    monkeypatch.setattr("flowgate.services.api.settled.time.time", lambda: later)
    assert settled.get("c-1") is None
    assert len(settled) == 0


def test_the_least_recently_read_goes_first() -> None:
    settled = hearing(max_bytes=2 * weight(ended("a")))
    settled.keep(ended("a"))
    settled.keep(ended("b"))
    assert settled.get("a") is not None  # a is now the more recent
    settled.keep(ended("c"))
    assert [cid for cid in "abc" if settled.get(cid)] == ["a", "c"]


def test_a_large_result_takes_the_room_of_many_small_ones() -> None:
    """Bounded by what the states take, not by their number."""
    small = weight(ended("s"))
    settled = hearing(max_bytes=4 * small)
    for cid in "abcd":
        settled.keep(ended(cid))
    large = ended("large", data={"rows": ["x" * 100] * 4})
    assert 2 * small < weight(large) < 3 * small
    assert settled.keep(large)
    assert [cid for cid in "abcd" if settled.get(cid)] == ["d"]
    assert settled.get("large") is not None
    assert settled.bytes == small + weight(large) <= 4 * small


def test_a_state_larger_than_the_whole_room_is_not_kept_and_evicts_nothing() -> None:
    settled = hearing(max_bytes=3 * weight(ended("a")))
    settled.keep(ended("a"))
    assert not settled.keep(ended("huge", data={"blob": "x" * 4 * weight(ended("a"))}))
    assert settled.get("huge") is None
    assert settled.get("a") is not None


def test_what_goes_gives_its_room_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Expired, forgotten (reopened) or dropped with the subscriptions: counted out."""
    settled = hearing(result_ttl_s=600)
    for cid in ("expires", "reopened", "kept"):
        settled.keep(ended(cid))
    settled.forget("reopened")
    assert settled.bytes == 2 * weight(ended("kept"))
    later = datetime.now(UTC).timestamp() + 600
    monkeypatch.setattr("flowgate.services.api.settled.time.time", lambda: later)
    assert settled.get("expires") is None
    assert settled.bytes == weight(ended("kept"))
    settled.hearing(False)
    assert settled.bytes == 0


def test_nothing_is_kept_or_served_while_run_channels_may_go_unheard() -> None:
    """A reopen's message may be lost, or Redis may have lost the records, while the wait
    room's subscriptions are down: what was kept goes, and nothing is kept until they hold."""
    settled = hearing()
    settled.keep(ended("before"))
    settled.hearing(False)
    assert settled.get("before") is None
    assert not settled.keep(ended("meanwhile"))
    settled.hearing(True)
    assert settled.get("before") is None
    assert settled.get("meanwhile") is None
    assert settled.keep(ended("after"))
    assert settled.get("after") is not None


def test_a_reopened_runs_error_end_read_late_is_not_kept_but_its_next_end_is() -> None:
    """The reopen's message may come before a read Redis answered before the reopen."""
    settled = hearing()
    settled.keep(ended("kept", Status.ERROR))
    for cid in ("kept", "unseen"):
        settled.forget(cid)
        assert settled.get(cid) is None
        assert not settled.keep(ended(cid, Status.ERROR))  # the old end, or another: unknown
        assert settled.get(cid) is None
        assert settled.keep(ended(cid, Status.OK))  # only ever after the reopen
        assert settled.get(cid) is not None
