"""`make bench-smoke` in the test suite, so the benchmarks never rot.

Seconds-long counts: the figures mean nothing, but every benchmark must run end to end
against the real servers and write its results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.local.servers import ROOT

# Their stack runs its own engine; what they measure is flowgate, so once is enough.
pytestmark = [pytest.mark.engine, pytest.mark.engine_agnostic, pytest.mark.slow]


#: A guard against a hang, not a speed target: about 300 s on a 2-core machine, and the suite's
#: first test, so it also meets a machine still busy with what came before.
SMOKE_TIMEOUT_S = 720


@pytest.mark.timeout(SMOKE_TIMEOUT_S + 30)
def test_every_benchmark_runs_and_reports(tmp_path: Path) -> None:
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=SMOKE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # say which benchmark it was in
        output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"the smoke run took over {SMOKE_TIMEOUT_S} s; it got to:\n{output[-3000:]}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert not results["errors"], results["errors"]
    assert set(results["results"]) == {
        "throughput", "parked", "writebehind", "progress", "clients", "cluster", "http",
        "gateway", "workers", "ends", "cost", "tenants", "conversation", "redis",
    }  # fmt: skip
    skipped = {name: r["skipped"] for name, r in results["results"].items() if "skipped" in r}
    assert not skipped, f"benchmarks that could not run here: {skipped}"
    assert not results["results"]["workers"]["clients_not_run"], "a peer client did not run"
    assert results["results"]["parked"]["wake"], "no wake-latency samples"
    ends = results["results"]["ends"]["by_side"]
    assert [ends[side]["failed"] for side in ("quiet", "busy")] == [0, 0], ends
    cost = results["results"]["cost"]
    assert set(cost["rounds"]) == {"flowgate", "reference", "flowgate, 2 workers"}
    for side, rounds in cost["rounds"].items():
        for measured in rounds:
            failed = [m["failed"] for m in measured["by_concurrency"].values()]
            assert failed, (side, measured)
            assert not any(failed), (side, measured)
    assert cost["ratios"]["runs/s at 16"]["ratio"], cost["ratios"]
    for client, shapes in results["results"]["redis"]["by_client"].items():
        assert set(shapes) == {"read", "step", "read 6"}, (client, shapes)
    assert cost["memory"]["failed"] == 0, cost["memory"]
    assert cost["memory"]["keys_per_run"] < 1.5, cost["memory"]  # steps compacted away
    assert 0 < cost["memory"]["key_bytes_per_run"] < 1_500, cost["memory"]  # a state hash
    assert cost["history"]["finished_runs"] >= 300, cost["history"]
    assert cost["history"]["worst_change"] is not None, cost["history"]
    for side, rounds in results["results"]["cluster"]["rounds"].items():
        for measured in rounds:
            assert measured["wake"]["wrong"] == 0, (side, measured)
            # Every replica received every run's end, once: no loss, no duplicates.
            assert set(measured["messages_per_run"].values()) == {1.0}, (side, measured)
    talk = results["results"]["conversation"]
    assert talk["failed"] == 0, talk
    assert talk["latency_ms"]["flowgate"]["message"]["n"] > 0, talk
    tenants = results["results"]["tenants"]
    for fair in (tenants, tenants["at_replica"]):  # through nginx, then straight in
        assert fair["a_429_without_headers"] == 0, fair
        assert fair["b_refused"] == 0, fair
        assert all(r["burst"]["alpha"]["codes"].get("429") for r in fair["rounds"]), fair
    streams = results["results"]["progress"]["streams_ended"]
    assert streams["ended"] == streams["streams"] > 0, streams
    report = (tmp_path / "benchmarks.md").read_text()
    assert report.startswith("#")
    # The cost tables have a row per process, endpoint and statement kind, for both sides.
    for row in ("| engine |", "| POST /external-task/fetchAndLock |", "| statements |"):
        assert row in report, row
    assert sorted(p.name for p in (tmp_path / "bench").glob("*.png"))
