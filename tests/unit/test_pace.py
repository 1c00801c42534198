"""Retry-After from the process's recent run times (services/api/pace.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from flowgate.services.api.pace import MAX_RETRY_AFTER_S, MIN_SAMPLES, Pace
from flowgate.shared.state import RunState, Status

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def run(
    key: str, *, took_s: float = 0, status: Status = Status.PENDING, ago_s: float = 0
) -> RunState:
    started = NOW - timedelta(seconds=ago_s)
    return RunState(
        correlation_id=f"c-{key}-{took_s}-{ago_s}",
        status=status,
        process_key=key,
        request_hash=None,
        instance_id=None,
        traceability_id=None,
        batch_id=None,
        application_id=None,
        data=None,
        error=None,
        started_at=started,
        updated_at=started + timedelta(seconds=took_s),
        version=1,
    )


def test_until_a_process_has_samples_it_is_the_configured_constant() -> None:
    pace = Pace(default_s=2)
    for _ in range(MIN_SAMPLES - 1):
        pace.ended(run("slow", took_s=40, status=Status.OK))
    assert pace.retry_after_s(run("slow"), now=NOW) == 2
    pace.ended(run("slow", took_s=40, status=Status.OK))
    assert pace.retry_after_s(run("slow"), now=NOW) == 40


def test_the_median_less_what_the_run_has_taken_then_the_90th_percentile() -> None:
    pace = Pace(default_s=2)
    for took in (10, 20, 30, 40, 200, 20, 30, 25, 35, 15):
        pace.ended(run("p", took_s=took, status=Status.OK))
    assert pace.retry_after_s(run("p", ago_s=5), now=NOW) == 23  # median 27.5 - 5
    assert pace.retry_after_s(run("p", ago_s=50), now=NOW) > 1  # past the median: p90
    assert pace.retry_after_s(run("p", ago_s=10_000), now=NOW) == 2  # past both
    assert pace.retry_after_s(run("other"), now=NOW) == 2  # per process


def test_cancelled_runs_teach_nothing_and_advice_is_bounded() -> None:
    pace = Pace(default_s=2)
    for _ in range(10):
        pace.ended(run("p", took_s=1, status=Status.CANCELLED))
        pace.ended(run("long", took_s=86_400, status=Status.ERROR))
    assert pace.retry_after_s(run("p"), now=NOW) == 2
    assert pace.retry_after_s(run("long"), now=NOW) == MAX_RETRY_AFTER_S
