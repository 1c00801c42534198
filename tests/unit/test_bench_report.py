"""The bench report's merge of a ``--only`` run with the results already in its folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import report, throughput


def meta(date: str, cpu: str = "cpu-1") -> dict[str, Any]:
    machine = {"cpu": cpu}
    return {"profile": "full", "date": date, "commit": "c", "machine": machine, "versions": {}}


def test_a_section_kept_twice_keeps_the_date_of_the_run_that_measured_it(tmp_path: Path) -> None:
    report.write(tmp_path, meta("day-1"), {"a": {}, "b": {}}, {})
    report.write(tmp_path, meta("day-2"), {"b": {}}, {}, merge=True)
    report.write(tmp_path, meta("day-3"), {"c": {}}, {}, merge=True)
    written = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert set(written["results"]) == {"a", "b", "c"}
    assert written["meta"]["kept_from_earlier_run"] == {"a": "day-1", "b": "day-2"}


def test_a_section_kept_from_another_machine_says_which(tmp_path: Path) -> None:
    """The machine line is the last run's; a section measured on another CPU says so."""
    report.write(tmp_path, meta("day-1", cpu="AMD EPYC"), {"a": {}, "b": {}}, {})
    report.write(tmp_path, meta("day-2", cpu="Intel Xeon"), {"b": {}}, {}, merge=True)
    report.write(tmp_path, meta("day-3", cpu="Intel Xeon"), {"c": {}}, {}, merge=True)
    written = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert written["meta"]["kept_cpu"] == {"a": "AMD EPYC", "b": "Intel Xeon"}
    text = (tmp_path / "benchmarks.md").read_text()
    assert "Kept from earlier runs: a (day-1, on AMD EPYC), b (day-2)." in text


def test_the_api_s_rates_are_counted_per_core_it_used() -> None:
    """Starts that left the API's core idle a tenth of the time count as a full core's."""

    def measured(rps: float, api_share: float) -> dict[str, Any]:
        run = {"requests_per_s": rps, "cpu_cores": {"api": api_share, "redis": 0.2}}
        per_core = throughput.per_api_core(run)
        return {"requests_per_s": {"median": rps}, "requests_per_api_core_s": {"median": per_core}}

    results = {
        "throughput": {
            "start_and_wake": measured(900.0, 0.9),
            "status_reads": measured(6_000.0, 1.0),
            "healthz": measured(9_000.0, 1.0),
        }
    }
    (row,) = [r for r in report.cost_bar(results) if r[0].startswith("start-and-wake")]
    assert row[2].startswith("0.111x / 0.67x")
    assert "0.100x" in row[2]
    assert row[3] == "reached"
