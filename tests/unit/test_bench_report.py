"""The bench report's merge of a ``--only`` run with the results already in its folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import report


def meta(date: str) -> dict[str, Any]:
    return {"profile": "full", "date": date, "commit": "c", "machine": {}, "versions": {}}


def test_a_section_kept_twice_keeps_the_date_of_the_run_that_measured_it(tmp_path: Path) -> None:
    report.write(tmp_path, meta("day-1"), {"a": {}, "b": {}}, {})
    report.write(tmp_path, meta("day-2"), {"b": {}}, {}, merge=True)
    report.write(tmp_path, meta("day-3"), {"c": {}}, {}, merge=True)
    written = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert set(written["results"]) == {"a", "b", "c"}
    assert written["meta"]["kept_from_earlier_run"] == {"a": "day-1", "b": "day-2"}
