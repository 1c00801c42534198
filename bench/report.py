"""Write what a run measured: ``bench/results.json``, ``benchmarks.md`` and the PNG plots.
(One module past 400 lines: one section writer per benchmark, alike in shape.)

Everything under ``out`` (docs/ by default): ``out/benchmarks.md``, ``out/bench/results.json``,
``out/bench/*.png``. The markdown is generated from the JSON alone, plus the hand-written
analysis in bench/ANALYSIS.md (kept verbatim, because why a figure is what it is needs a
person), so a rerun always regenerates it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

ANALYSIS = Path(__file__).parent / "ANALYSIS.md"

Row = tuple[str, str, str, str]  # goal, target, measured, verdict
REACHED, MISSED, NOT_RUN = "reached", "**missed**", "not measured"


def write(
    out: Path,
    meta: dict[str, Any],
    results: dict[str, Any],
    errors: dict[str, str],
    *,
    merge: bool = False,
) -> list[Path]:
    """Write everything; with ``merge`` (a ``--only`` run) earlier results of the other
    benchmarks in ``out`` are kept, and the report says which ran when."""
    images = out / "bench"
    images.mkdir(parents=True, exist_ok=True)
    data = images / "results.json"
    document = {"meta": meta, "results": results, "errors": errors}
    earlier = json.loads(data.read_text()) if merge and data.exists() else {}
    if earlier.get("meta", {}).get("profile") == meta.get("profile"):
        kept = {k: v for k, v in earlier.get("results", {}).items() if k not in results}
        document["results"] = {**kept, **results}
        document["errors"] = {
            **{k: v for k, v in earlier.get("errors", {}).items() if k not in results},
            **errors,
        }
        # A section the earlier file kept from a run before it keeps that run's date and CPU.
        dates = earlier["meta"].get("kept_from_earlier_run") or {}
        meta["kept_from_earlier_run"] = {k: dates.get(k, earlier["meta"].get("date")) for k in kept}
        cpus = earlier["meta"].get("kept_cpu") or {}
        meta["kept_cpu"] = {k: cpus.get(k, _get(earlier["meta"], "machine", "cpu")) for k in kept}
        if "engine" not in meta and "engine" in earlier["meta"]:
            meta["engine"] = earlier["meta"]["engine"]
    data.write_text(json.dumps(document, indent=1, default=str) + "\n")
    plots = _plots(document["results"], images)
    markdown = out / "benchmarks.md"
    markdown.write_text(render(document, [p.name for p in plots]))
    return [markdown, data, *plots]


def rerender(out: Path) -> list[Path]:
    """Regenerate benchmarks.md and the plots from ``out/bench/results.json`` (no run)."""
    images = out / "bench"
    document = json.loads((images / "results.json").read_text())
    plots = _plots(document["results"], images)
    markdown = out / "benchmarks.md"
    markdown.write_text(render(document, [p.name for p in plots]))
    return [markdown, *plots]


# --- helpers -------------------------------------------------------------------------------


def _get(obj: Any, *path: Any, default: Any = None) -> Any:
    """``obj[a][b]...``; int keys also match their string form (after a JSON round trip)."""
    for key in path:
        if not isinstance(obj, dict):
            return default
        if key in obj:
            obj = obj[key]
        elif str(key) in obj:
            obj = obj[str(key)]
        else:
            return default
    return obj


def _n(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join(_n(c) if not isinstance(c, str) else c for c in row) + " |"
        for row in rows
    ]
    return "\n".join(lines)


def _verdict(ok: bool | None) -> str:
    return NOT_RUN if ok is None else (REACHED if ok else MISSED)


# --- the bar -------------------------------------------------------------------------------


def cost_bar(results: dict[str, Any]) -> list[Row]:
    """This round's bar: what a run costs, flowgate beside the reference gateway of the
    seed's design on the same engine (section 10), and what it costs as work grows."""
    ratios = _get(results, "cost", "ratios", default={})
    rows: list[Row] = []

    def side_by_side(figure: str, digits: int = 1) -> str:
        sides = ratios.get(figure) or {}
        ours, theirs, ratio = sides.get("flowgate"), sides.get("reference"), sides.get("ratio")
        if ratio is None:
            return "-"
        return f"{ratio:.2f}x ({_n(ours, digits)} vs {_n(theirs, digits)})"

    for goal, figure, target, limit in (
        # A positive limit is a floor, a negative one a ceiling.
        ("completed runs/s at concurrency 16, vs the reference gateway",
         "runs/s at 16", "≥ 1.0x (aim 1.3x)", 1.0),
        ("sync start p50 at concurrency 1, vs the reference gateway",
         "latency p50 at 1 (ms)", "≤ 1.0x", -1.0),
        ("engine + PostgreSQL CPU ms per run, vs the reference gateway",
         "engine + PostgreSQL CPU ms per run", "≤ 1.0x", -1.0),
    ):  # fmt: skip
        ratio = (ratios.get(figure) or {}).get("ratio")
        ok = None if ratio is None else ratio >= limit if limit > 0 else ratio <= -limit
        rows.append((goal, target, side_by_side(figure), _verdict(ok)))
    own = _get(ratios, "own CPU ms per run", "flowgate")
    rows.append(
        (
            "flowgate's own processes CPU ms per run (API, worker, flusher, Redis)",
            "≤ 10",
            f"{_n(own, 1)} ms (the reference: "
            f"{_n(_get(ratios, 'own CPU ms per run', 'reference'), 1)} ms)"
            if own
            else "-",
            _verdict(own <= 10 if own is not None else None),
        )
    )
    handoff = _get(ratios, "hand-off p50 at 1 (ms)", "flowgate")
    rows.append(
        (
            "step hand-off p50 at concurrency 1 (task created → fetched)",
            "≤ 5 ms",
            f"{_n(handoff, 1)} ms (the reference: "
            f"{_n(_get(ratios, 'hand-off p50 at 1 (ms)', 'reference'), 1)} ms)"
            if handoff
            else "-",
            _verdict(handoff <= 5 if handoff is not None else None),
        )
    )
    grown = _get(results, "cost", "history", "worst_change")
    rows.append(
        (
            "any figure above with 100,000 finished runs in history, vs an empty history",
            "within 10 %",
            f"{grown * 100:+.0f} % (worst)" if grown is not None else "-",
            _verdict(abs(grown) <= 0.10 if grown is not None else None),
        )
    )
    memory = _get(results, "cost", "memory", "bytes_per_run")
    rows.append(
        (
            "Redis memory per retained finished run (onboard-user)",
            "≤ 1.5 KB",
            f"{memory / 1024:.2f} KB" if memory else "-",
            _verdict(memory <= 1536 if memory else None),
        )
    )
    thr = results.get("throughput") or {}
    # Per API core: each rate over the share of its core the API used (bench/throughput.py).
    healthz = _get(thr, "healthz", "requests_per_api_core_s", "median")
    starts = _get(thr, "start_and_wake", "requests_per_api_core_s", "median")
    reads = _get(thr, "status_reads", "requests_per_api_core_s", "median")
    if healthz and starts and reads:
        raw = [_get(thr, k, "requests_per_s", "median") for k in ("start_and_wake", "healthz")]
        measured = f"{starts / healthz:.3f}x / {reads / healthz:.2f}x"
        if raw[0] and raw[1]:
            measured += f" (starts at their rate, not per core: {raw[0] / raw[1]:.3f}x)"
        reached = starts / healthz >= 0.11 and reads / healthz >= 0.6
        rows.append(
            (
                "start-and-wake / status reads per API core, as ratio to /healthz",
                "≥ 0.11x / ≥ 0.6x",
                measured,
                _verdict(reached),
            )
        )
    else:
        rows.append(
            (
                "start-and-wake / status reads per API core, as ratio to /healthz",
                "≥ 0.11x / ≥ 0.6x",
                "-",
                NOT_RUN,
            )
        )
    return rows


def bar(results: dict[str, Any]) -> list[Row]:
    """The earlier rounds' figures beside their targets (kept: none may slip back)."""
    rows: list[Row] = []
    parked, thr, gw, wk, ends, progress = (
        results.get(k) or {}
        for k in ("parked", "throughput", "gateway", "workers", "ends", "progress")
    )

    # Zero lost wake-ups.
    lost: list[int] = []
    if cap := parked.get("capacity"):
        lost += [cap["lost"], cap["wrong"]]
    lost += [level["wrong"] for level in (parked.get("wake") or {}).values()]
    for key in ("start_and_wake",):
        if key in thr:
            lost.append(thr[key]["non_200"])
    for sides in (gw.get("by_concurrency") or {}).values():
        lost.append(sides["gateway"].get("failed", 0))
    measured = f"{sum(lost)} lost or wrong" if lost else "-"
    rows.append(
        (
            "zero lost wake-ups at any load",
            "0",
            measured,
            _verdict(sum(lost) == 0 if lost else None),
        )
    )

    # Wake latency with the most parked.
    wake = parked.get("wake") or {}
    if wake:
        top = max(wake, key=lambda k: int(k))
        w = wake[top]["wake_ms"]
        ok = w.get("p99", 1e9) <= 2
        rows.append(
            (
                f"wake latency with {int(top):,} parked",
                "p99 ≤ 2 ms",
                f"p50 {_n(w.get('median'), 2)} ms, p99 {_n(w.get('p99'), 2)} ms",
                _verdict(ok),
            )
        )
    else:
        rows.append(("wake latency with 10,000 parked", "p99 ≤ 2 ms", "-", NOT_RUN))

    mem = parked.get("memory") or {}
    per = mem.get("per_request_kb")
    rows.append(
        (
            "memory per parked request",
            "≤ 16 KB",
            f"{_n(per)} KB ({_n(mem.get('parked'))} parked)" if per is not None else "-",
            _verdict(per <= 16 if per is not None else None),
        )
    )

    for key, goal, target in (
        ("start_and_wake", "start-and-wake per API core (instant completion)", 1_500),
        ("status_reads", "status reads per API core", 8_000),
    ):
        rps = _get(thr, key, "requests_per_api_core_s", "median")
        rows.append(
            (
                goal,
                f"≥ {target:,}/s",
                f"{_n(rps, 0)}/s" if rps else "-",
                _verdict(rps >= target if rps else None),
            )
        )

    over = _get(gw, "by_concurrency", 16, "gateway", "overhead_ms", "median")
    rows.append(
        (
            "gateway overhead p50 at concurrency 16",
            "≤ 3 ms",
            f"{_n(over, 2)} ms" if over is not None else "-",
            _verdict(over <= 3 if over is not None else None),
        )
    )

    clients = wk.get("clients") or {}

    def rate(name: str) -> float | None:
        value = _get(clients, name, "tasks_per_s", "median")
        return float(value) if value is not None else None

    # Ours: the better single-process configuration (default 10 slots, or 32).
    ours = max((r for r in (rate("ours-1"), rate("ours-1-32")) if r), default=None)
    for goal, other, factor in (
        ("worker throughput vs the Python client", rate("python3-client"), 1.5),
        (
            "worker throughput vs the Node client (best config)",
            max(
                (r for r in (rate("js-client-seed"), rate("js-client-interval0")) if r),
                default=None,
            ),
            1.0,
        ),
        (
            "worker throughput vs the raw loop (engine ceiling)",
            max((rate(n) or 0 for n in clients if n.startswith("raw-")), default=None) or None,
            0.8,
        ),
    ):
        if ours and other:
            rows.append(
                (
                    goal,
                    f"≥ {factor:g}x",
                    f"{ours / other:.2f}x ({ours:,.0f} vs {other:,.0f}/s)",
                    _verdict(ours >= factor * other),
                )
            )
        else:
            rows.append((goal, f"≥ {factor:g}x", "-", NOT_RUN))

    p99s: dict[str, float] = {
        side: float(p)
        for side in ("quiet", "busy")
        if (p := _get(ends, "by_side", side, "latency_ms", "p99")) is not None
    }
    rows.append(
        (
            "end detection p99 (runs the engine ends, no flowgate worker)",
            "≤ 300 ms",
            " / ".join(f"{side} {_n(p, 0)} ms" for side, p in p99s.items()) or "-",
            _verdict(max(p99s.values()) <= 300 if p99s else None),
        )
    )

    targets = progress.get("target_p99_ms") or {"step": 50, "callback": 300}
    for measure, goal in (
        ("step", "live-progress step delivery p99"),
        ("callback", "callback delivery p99"),
    ):
        p99 = _get(progress, "by_side", "streams", measure, "p99")
        opened = progress.get("open_streams")
        rows.append(
            (
                f"{goal} with {_n(opened)} streams open" if opened else goal,
                f"≤ {targets[measure]} ms",
                f"{_n(p99, 1)} ms" if p99 is not None else "-",
                _verdict(p99 <= targets[measure] if p99 is not None else None),
            )
        )
    if ended := progress.get("streams_ended"):
        rows.append(
            (
                "every open stream reads its end",
                f"{ended['streams']}",
                f"{ended['ended']}",
                _verdict(ended["ended"] == ended["streams"]),
            )
        )
    return rows


# --- markdown ------------------------------------------------------------------------------


def render(document: dict[str, Any], plots: list[str]) -> str:
    meta, results, errors = document["meta"], document["results"], document["errors"]
    machine = meta.get("machine", {})
    parts = [
        "# Benchmarks",
        "",
        f"Generated by `python -m bench` ({meta.get('profile')} run) on {meta.get('date')}, "
        f"commit {meta.get('commit')}, in {_n(meta.get('elapsed_s'))} s. "
        "Do not edit: rerun `make bench` (the analysis section comes from bench/ANALYSIS.md).",
        "",
    ]
    if kept := meta.get("kept_from_earlier_run"):
        cpus = meta.get("kept_cpu") or {}

        def when(section: str) -> str:
            cpu = cpus.get(section)
            elsewhere = f", on {cpu}" if cpu and cpu != machine.get("cpu") else ""
            return f"{section} ({kept[section]}{elsewhere})"

        parts += [f"Kept from earlier runs: {', '.join(when(k) for k in kept)}.", ""]
    if meta.get("profile") != "full":
        parts += [
            "> **Smoke run**: tiny counts that only check the benchmarks still work; "
            "the figures below mean nothing.",
            "",
        ]
    parts += [
        "## Machine",
        "",
        f"{machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('memory_gib')} GiB, "
        f"Linux {machine.get('kernel')}; load average at start "
        f"{machine.get('load_average_at_start')} (at the end "
        f"{machine.get('load_average_at_end')}: other work on the machine shows here); "
        "open-files limit "
        f"{_get(machine, 'fd_limit', 'soft')} (hard {_get(machine, 'fd_limit', 'hard')}). "
        f"Engine: Camunda {_get(meta, 'engine', 'version') or '-'} on PostgreSQL.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()) + ".",
        "",
        "Method: the process under test is pinned to CPU 0, the load generator to CPU 1 "
        "(`taskset`); Redis, PostgreSQL and the engine float. Every comparison alternates its "
        "sides within one run (A B A B). Median and p99 are nearest-rank over all samples.",
        "",
        "## The bar: what a run costs, beside the reference gateway",
        "",
        _table(["goal", "target", "measured", "verdict"], [list(r) for r in cost_bar(results)]),
        "",
        "## The earlier bars",
        "",
        _table(["goal", "target", "measured", "verdict"], [list(r) for r in bar(results)]),
        "",
    ]
    if errors:
        parts += ["## Failed benchmarks", ""]
        parts += [f"- `{name}`: `{text.strip().splitlines()[-1]}`" for name, text in errors.items()]
        parts += [""]
    skipped = {
        k: v["skipped"] for k, v in results.items() if isinstance(v, dict) and "skipped" in v
    }
    if skipped:
        parts += ["## Not run", ""] + [f"- `{k}`: {v}" for k, v in skipped.items()] + [""]
    for name, section in SECTIONS:
        if name in results and "skipped" not in results[name]:
            parts += section(results[name])
    parts += ["## Plots", ""] + [f"![{p}](bench/{p})" for p in plots] + [""]
    if ANALYSIS.exists():
        parts += [ANALYSIS.read_text().strip(), ""]
    return "\n".join(parts)


def _gateway(r: dict[str, Any]) -> list[str]:
    rows = []
    for c, sides in sorted(r["by_concurrency"].items(), key=lambda kv: int(kv[0])):
        for side, label in (
            ("gateway", "flowgate (sync start)"),
            ("engine_only", "engine REST + history poll"),
        ):
            s = sides[side]
            rows.append(
                [
                    str(c),
                    label,
                    _n(s["latency_ms"].get("median"), 2),
                    _n(s["latency_ms"].get("p99"), 2),
                    _n(s["engine_ms"].get("median"), 1),
                    _n(s["engine_ms"].get("p99"), 1),
                    _n(s["overhead_ms"].get("median"), 2),
                    _n(s["overhead_ms"].get("p99"), 2),
                    _n(s["requests_per_s"].get("median"), 0),
                    _n(s["latency_ms"].get("n")),
                    _n(s.get("failed", 0)),
                ]
            )
    return [
        "## 1. Gateway overhead (real engine)",
        "",
        _table(
            [
                "concurrency",
                "path",
                "latency p50 ms",
                "p99",
                "engine-intrinsic p50 ms",
                "p99",
                "overhead p50 ms",
                "p99",
                "req/s",
                "n",
                "failed",
            ],
            rows,
        ),
        "",
        "Engine-intrinsic = the engine's `durationInMillis` of the same instance (includes the "
        "worker's fetch and complete); overhead = client latency - engine-intrinsic, per request. "
        f"The engine-only client polls history every {_n(r.get('poll_interval_ms'))} ms.",
        "",
    ]


def _parked(r: dict[str, Any]) -> list[str]:
    wake_rows = [
        [
            _n(int(level)),
            _n(w["wake_ms"].get("median"), 3),
            _n(w["wake_ms"].get("p99"), 3),
            _n(_get(w, "wake_from_call_start_ms", "median"), 3),
            _n(_get(w, "wake_from_call_start_ms", "p99"), 3),
            _n(w["complete_call_ms"].get("median"), 3),
            _n(w["wake_ms"].get("n")),
            _n(w["wrong"]),
        ]
        for level, w in sorted(r["wake"].items(), key=lambda kv: int(kv[0]))
    ]
    mem = r["memory"]
    mem_rows = [
        [_n(int(k)), _n(v / 1024, 1)]
        for k, v in sorted(mem["rss_kb_by_parked"].items(), key=lambda kv: int(kv[0]))
    ]
    cap = r["capacity"]
    return [
        "## 2. Wake latency (stand-in engine)",
        "",
        _table(
            [
                "parked",
                "wake p50 ms",
                "wake p99 ms",
                "from call start p50 ms",
                "p99",
                "complete() call p50 ms",
                "probes",
                "wrong",
            ],
            wake_rows,
        ),
        "",
        "Wake = `RunStore.complete` (state write + PUBLISH, one Lua script) has returned "
        "-> the response headers at the client. `From call start` adds the completer's own "
        "Redis round trip (an upper bound).",
        "",
        "## 3. Parked capacity (stand-in engine)",
        "",
        _table(["parked", "API RSS MiB"], mem_rows),
        "",
        f"Per parked request: **{_n(mem['per_request_kb'], 2)} KB** of RSS "
        f"(({_n(cap.get('rss_kb_at_top'))} - {_n(mem['baseline_kb'])}) KiB / {_n(mem['parked'])}); "
        "kernel socket buffers are not included.",
        "",
        f"All {_n(cap['parked'])} completed within {_n(cap['completion_spread_s'], 3)} s: "
        f"{_n(cap['answered_ok'])} answered 200 with their own result, {_n(cap['wrong'])} wrong, "
        f"{_n(cap['lost'])} lost; the last answer arrived {_n(cap['last_answer_after_s'], 3)} s "
        f"after the first completion; wake p50 {_n(cap['wake_ms'].get('median'), 2)} ms, "
        f"p99 {_n(cap['wake_ms'].get('p99'), 2)} ms under that burst "
        f"(CPU cores used meanwhile: {cap.get('cpu_cores')}).",
        "",
    ]


def _throughput(r: dict[str, Any]) -> list[str]:
    rows = []
    for key, label in (
        ("start_and_wake", "start-and-wake (POST start, wait; completed at once)"),
        ("start_and_wake_flusher_inside", "start-and-wake, the flusher inside the API process"),
        ("start_and_wake_traced", "start-and-wake, every request traced (OTLP, 100 %)"),
        ("start_and_wake_without_sdk", "start-and-wake, opentelemetry not installed"),
        ("status_reads", "status reads"),
        ("healthz", "GET /healthz (HTTP ceiling)"),
    ):
        if key not in r:  # (reports from before the flusher could run apart)
            continue
        s = r[key]
        cpu = s["runs"][-1].get("cpu_cores", {}) if s["runs"] else {}
        rows.append(
            [
                label,
                _n(s["requests_per_s"].get("median"), 0),
                " / ".join(_n(x["requests_per_s"], 0) for x in s["runs"]),
                _n(_get(s, "requests_per_api_core_s", "median"), 0),
                _n(s["latency_p50_ms"].get("median"), 2),
                _n(s["latency_p99_ms"].get("median"), 2),
                _n(s["non_200"]),
                ", ".join(f"{k} {v}" for k, v in cpu.items()),
            ]
        )
    parts = [
        "## 4. Throughput per API process (stand-in engine)",
        "",
        _table(
            [
                "load",
                "req/s (median)",
                "rounds",
                "per API core",
                "p50 ms",
                "p99 ms",
                "non-200",
                "CPU cores used (last round)",
            ],
            rows,
        ),
        "",
        f"wrk, 1 thread, {r['connections']} connections, {r['seconds_per_run']} s per run. "
        "The API leaves the write-behind to a flowgate-flusher process (floating), as "
        "`make up`, compose and Kubernetes run it; the second row's API runs the flusher "
        "inside (WRITEBEHIND_IN_API=true), in the same rounds. Per API core: the rate over "
        "the share of its core the API used (the bar's measure; starts leave it idle while "
        "the other core, with wrk, the stand-in, Redis and the flusher, is the limit). "
        f"How the parked starts ended: {r.get('waits')} (woken = by a message; settled = the "
        "state was already final when the request looked).",
        "",
    ]
    if cost := r.get("tracing_cost"):
        parts += [
            f"Tracing: off {_n(cost['off_rps'], 0)} starts/s (no OTEL_* exporter: the SDK is "
            f"not imported), not installed {_n(cost.get('not_installed_rps'), 0)}/s: off is "
            f"{_n(cost.get('off_vs_not_installed'))}x of not installed (target >= 0.98); on at "
            f"100 % sampling {_n(cost['on_100pct_rps'], 0)}/s: {_n(cost['on_vs_off'])}x of off.",
            "",
        ]
    for name, prof in (r.get("profile") or {}).items():
        parts += _profile(name, prof)
    return parts


def _profile(name: str, prof: dict[str, Any]) -> list[str]:
    if "error" in prof:
        return [f"Profile of {name}: {prof['error']}", ""]
    rows = [[p["frame"], _n(p["pct"])] for p in prof.get("self_top", [])]
    inclusive = ", ".join(f"{k} {v} %" for k, v in prof.get("inclusive_by_package", {}).items())
    return [
        f"### Where the API's CPU goes (py-spy, {prof.get('during')}, "
        f"{_n(prof.get('samples'))} samples)",
        "",
        f"Share of samples with the package anywhere on the stack: {inclusive}.",
        "",
        _table(["function (self time)", "% of samples"], rows),
        "",
    ]


def _writebehind(r: dict[str, Any]) -> list[str]:
    lag, out = r["lag"], r["outage"]
    return [
        "## 6. Write-behind (stand-in engine)",
        "",
        f"Under {_n(lag['load_starts_per_s'], 0)} starts/s (item 4's load): lag from the final "
        f"state in Redis to its committed row, over {_n(lag['rows'])} rows "
        f"(of {_n(lag['finished_by_load'])} finished): "
        f"p50 **{_n(lag['lag_ms'].get('median'), 2)} ms**, "
        f"p99 {_n(lag['lag_ms'].get('p99'), 2)} ms, max {_n(lag['lag_ms'].get('max'), 2)} ms "
        "(the flusher in a process of its own, as `make up` runs it).",
        "",
        *(
            [
                f"With the flusher inside the API process instead: "
                f"{_n(inside['load_starts_per_s'], 0)} starts/s, lag p50 "
                f"{_n(inside['lag_ms'].get('median'), 2)} ms, p99 "
                f"{_n(inside['lag_ms'].get('p99'), 2)} ms over {_n(inside['rows'])} rows.",
                "",
            ]
            if (inside := r.get("lag_flusher_inside"))
            else []
        ),
        f"Postgres outage: {_n(out['finished_by_load'])} processes finished while it was down "
        f"({_n(out['backlog_entries'])} stream entries backlogged). After the restart "
        f"({_n(out['postgres_restart_s'], 2)} s) the first write came "
        f"{_n(out['first_write_after_ready_s'], 2)} s after it was ready, "
        f"and the backlog was empty {_n(out['drain_s'], 2)} s after it was ready: "
        f"**{_n(out['drain_entries_per_s'], 0)} entries/s** including that wait "
        f"({_n(out.get('drain_after_first_write_s'), 2)} s from the first write to empty: "
        f"{_n(out.get('drain_entries_per_s_after_first_write'), 0)} entries/s); "
        f"rows afterwards: {_n(out['rows_after_drain'])} (drained: {out['drained']}).",
        "",
    ]


def _workers(r: dict[str, Any]) -> list[str]:
    rows = []
    for c in r["clients"].values():
        runs = c["runs"]
        rows.append(
            [
                c["label"],
                _n(c["tasks_per_s"].get("median"), 0),
                " / ".join(_n(x["tasks_per_s"], 0) for x in runs),
                " / ".join(f"{x['completed_by_client']}/{x['instances']}" for x in runs),
                " / ".join(_n(x["drain_s"], 1) for x in runs),
            ]
        )
    parts = [
        "## 5. Worker throughput (real engine)",
        "",
        _table(
            ["client", "tasks/s (median)", "rounds", "done by the client", "drain s (from spawn)"],
            rows,
        ),
        "",
        f"{_n(r['instances_per_run'])} pre-created `benchmark` instances per run, maxTasks "
        f"{r['max_tasks']} for every client; tasks/s from the engine's history end times "
        "(first to last completion by the client). A client that had not finished by the "
        "deadline is stopped (`done by the client` < instances).",
        "",
    ]
    if r.get("clients_not_run"):
        parts += [f"Not run: {r['clients_not_run']}", ""]
    return parts


def _ends(r: dict[str, Any]) -> list[str]:
    rows = [
        [
            side,
            _n(s["latency_ms"].get("median"), 1),
            _n(s["latency_ms"].get("p90"), 1),
            _n(s["latency_ms"].get("p99"), 1),
            _n(s["latency_ms"].get("max"), 1),
            " / ".join(_n(m, 1) for m in s["round_medians_ms"]),
            _n(s["other_ends_per_s"].get("median"), 0),
            _n(s["latency_ms"].get("n")),
            _n(s["failed"]),
        ]
        for side, s in r["by_side"].items()
    ]
    return [
        "## 7. End detection (real engine, no flowgate worker)",
        "",
        _table(
            [
                "engine",
                "p50 ms",
                "p90",
                "p99",
                "max",
                "round medians",
                "other ends/s",
                "n",
                "failed",
            ],
            rows,
        ),
        "",
        "From the engine's `endTime` of a `bench-approval` instance (its user task completed "
        "through the engine's REST API) to the client's 200 on a parked long-poll; the API's "
        "watcher reads the history every 100 ms. Busy: "
        f"{_n(r['background_clients'])} other clients end runs as fast as they can meanwhile.",
        "",
    ]


def _progress(r: dict[str, Any]) -> list[str]:
    rows = [
        [
            f"{side} ({_n(r['open_streams']) if side == 'streams' else 0} other streams)",
            measure,
            _n(s[measure].get("median"), 1),
            _n(s[measure].get("p90"), 1),
            _n(s[measure].get("p99"), 1),
            _n(s[measure].get("max"), 1),
            _n(s[measure].get("n")),
        ]
        for side, s in r["by_side"].items()
        for measure in ("step", "end", "callback")
    ]
    ended = r["streams_ended"]
    return [
        "## 8. Live progress and callbacks (stand-in engine)",
        "",
        _table(["side", "delivery", "p50 ms", "p90", "p99", "max", "n"], rows),
        "",
        "step: from `RunStore.record_step` returning (the worker's call) to the client "
        "reading `event: step` on its open stream; end: from `RunStore.finish` returning "
        "to `event: end`; callback: from the same `finish` to the POST arriving at a loopback "
        "receiver (replicas look for due callbacks every 100 ms). "
        f"{ended['ended']} of {ended['streams']} background streams read their end.",
        "",
    ]


def _clients(r: dict[str, Any]) -> list[str]:
    rows = [
        [
            name,
            _n(s["cpu_us"].get("median"), 1),
            f"{_n(s['cpu_us'].get('min'), 1)} / {_n(s['cpu_us'].get('max'), 1)}",
            _n(s["calls_per_s"].get("median"), 0),
        ]
        for name, s in r["by_client"].items()
    ]
    return [
        "## 9. The engine call's HTTP client (stand-in engine)",
        "",
        _table(["client", "CPU µs per call (median of rounds)", "min / max", "calls/s"], rows),
        "",
        f"{_n(r['calls_per_round'])} calls per round, {r['concurrency']} in flight, kept-alive "
        "connections; the body a start sends (orjson), its JSON answer decoded. CPU is the "
        "whole client process, every thread.",
        "",
    ]


def _cost(r: dict[str, Any]) -> list[str]:
    lines = ["## 10. Cost per run, beside the reference gateway (real engine)", ""]
    lines += _cost_rounds(r["rounds"])
    lines += [
        "flowgate ran as deployed (an API replica, a flusher process, a worker, Redis; "
        '"2 workers": two worker processes, as make up runs them); the '
        "reference is bench/node/gateway.mjs. Only one side ran at a time, each started "
        "fresh for its round and warmed up, after the engine itself was warmed up. Each run "
        "is onboard-user, four external tasks.",
        "",
    ]
    if memory := r.get("memory"):
        lines += [
            "### Redis memory per retained finished run",
            "",
            _table(
                [
                    "runs",
                    "bytes per run",
                    "keys per run",
                    "of which flowgate's keys",
                    "of which Redis's keyspace tables",
                    "engine event stream, bytes per run",
                ],
                [
                    [
                        _n(memory["runs"]),
                        _n(memory["bytes_per_run"]),
                        _n(memory["keys_per_run"], 2),
                        _n(memory.get("key_bytes_per_run")),
                        _n(memory.get("keyspace_tables_bytes_per_run")),
                        _n(memory["engine_events_bytes_per_run"]),
                    ]
                ],
            ),
            "",
            "Once a run has ended, Postgres has its write-behind and its steps have left "
            "Redis: its final state stays for RESULT_TTL_S. Bytes per run is what Redis's "
            "memory grew by; flowgate's keys, what MEMORY USAGE counts for every key under its "
            "prefix (state hashes, the partitions' indexes and streams); the "
            "keyspace tables (MEMORY STATS) double in one step when the keys cross a power "
            "of two, on whichever batch that happens. The engine's event stream is "
            "bounded by the plugin's max length (100,000 events by default), not by the "
            "retention.",
            "",
        ]
    if grown := r.get("history"):
        lines += [
            f"### With work already done: {_n(grown['finished_runs'])} finished runs in the "
            "engine's history and in each gateway's store",
            "",
            *_cost_rounds(grown["rounds"]),
            "Change beside the empty history (each side's mean of its rounds):",
            "",
            _table(
                ["figure", *SIDE_NAMES],
                [
                    [figure, *(_pct(by_side.get(name)) for name in SIDE_NAMES)]
                    for figure, by_side in grown["changes"].items()
                ],
            ),
            "",
            "The watcher's history read (history mode: three queries from a watermark), ms:",
            "",
            _table(
                ["history", "p50", "p99"],
                [
                    [size, _n(at.get("median"), 2), _n(at.get("p99"), 2)]
                    for size, at in grown["watcher_pass_ms"].items()
                ],
            ),
            "",
        ]
    return lines


SIDE_NAMES = ("flowgate", "reference")


def _pct(change: float | None) -> str:
    return "-" if change is None else f"{change * 100:+.0f} %"


def _cost_rounds(rounds: dict[str, Any]) -> list[str]:
    """Each side's rounds: speed by concurrency, then the cost window's figures."""
    sides = list(rounds)
    rows = []
    for name in sides:
        for number, measured in enumerate(rounds[name], 1):
            for c, m in measured["by_concurrency"].items():
                lat = m["latency_ms"]
                speed = [_n(m["runs_per_s"], 1), _n(lat.get("median"), 1), _n(lat.get("p99"), 1)]
                rows.append([f"{name} {number}", str(c), *speed, _n(m["failed"])])
    lines = [
        _table(["side, round", "in flight", "runs/s", "p50 ms", "p99 ms", "not ok"], rows),
        "",
    ]
    costs = {
        name: [cost for m in measured if (cost := _get(m, "by_concurrency", COST_AT, "cost"))]
        for name, measured in rounds.items()
    }
    for title, key, digits in (
        ("CPU ms per run, by process", "cpu_ms_per_run", 2),
        ("the engine's REST calls per run, by endpoint", "engine_calls_per_run", 2),
        ("the engine's database per run: statements and rows written", "engine_sql_per_run", 1),
    ):
        # Figures every side has at zero (a table the engine never wrote to) say nothing.
        names = list(dict.fromkeys(
            k for side in costs.values() for c in side for k, v in c[key].items() if v
        ))  # fmt: skip
        table = [
            [
                name,
                *(
                    _n(_mean([c[key][name] for c in costs[side] if name in c[key]]), digits)
                    for side in sides
                ),
            ]
            for name in names
        ]
        lines += [f"At {COST_AT} in flight, {title} (mean of the rounds):", "",
                  _table(["", *sides], table), ""]  # fmt: skip
    handoffs = []
    for name in sides:
        for c in (1, COST_AT):
            found = [_get(m, "by_concurrency", c, "handoff_ms", default={}) for m in rounds[name]]
            quantiles = [_n(_mean([h.get(q, 0) for h in found]), 1) for q in ("median", "p99")]
            handoffs.append([f"{name}, {c} in flight", *quantiles])
    lines += [
        "Step hand-off (a task's creation in the engine to its fetch by a worker), ms:",
        "",
        _table(["", "p50", "p99"], handoffs),
        "",
    ]
    return lines


COST_AT = 16


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _cluster(r: dict[str, Any]) -> list[str]:
    rows = []
    for side, rounds in r["rounds"].items():
        for number, measured in enumerate(rounds, 1):
            wake = measured["wake"]["wake_ms"]
            load = measured["messages_per_run"]
            rows.append([
                side, number, _n(measured["start_and_wake"]["rps"], 0),
                _n(wake.get("median"), 2), _n(wake.get("p99"), 2), measured["wake"]["wrong"],
                " / ".join(f"{_n(load[k], 2)}" for k in sorted(load, key=int)),
            ])  # fmt: skip
    parked = r["rounds"]["single"][0]["wake"]["parked"] if r["rounds"]["single"] else "-"
    header = [
        "Redis", "round", "start-and-wake/s (1 API core)", f"wake p50 ms ({parked} parked)",
        "wake p99 ms", "wrong", "messages per run per replica (1 / 2 / 3 replicas)",
    ]  # fmt: skip
    return [
        "## 11. Redis Cluster beside a single Redis (stand-in engine)",
        "",
        _table(header, rows),
        "",
        f"The cluster: {r['masters']} masters with a replica each, native processes on this "
        "machine. Every replica receives each run's end once on either Redis, so the "
        "messages per run and replica stay at 1 as replicas are added; on the cluster each "
        "master delivers only its partitions' channels.",
        "",
    ]


def _http(r: dict[str, Any]) -> list[str]:
    measured = r["servers"]
    rate = {s: {k: _get(m, k, "requests_per_s", "median") for k in ("start", "status", "plain")}
            for s, m in measured.items()}  # fmt: skip

    def cell(server: str, kind: str) -> str:
        rounds = " / ".join(_n(x["requests_per_s"], 0) for x in measured[server][kind]["runs"])
        return f"{_n(rate[server][kind], 0)} ({rounds})"

    rows = [
        [server, *(cell(server, kind) for kind in ("start", "status", "plain")),
         _n(m["rss_kib"] / 1024, 1), m["processes"]]
        for server, m in measured.items()
    ]  # fmt: skip
    ratios = ", ".join(
        f"{kind} {_n(rate['granian'][kind] / rate['uvicorn'][kind], 2)}x"
        for kind in ("start", "status", "plain")
        if rate["granian"][kind] and rate["uvicorn"][kind]
    )
    header = ["server", "start-and-wake/s (rounds)", "status reads/s", "GET /healthz/s",
              "RSS MiB after", "processes"]  # fmt: skip
    return [
        "## 12. The HTTP server: uvicorn beside granian (stand-in engine)",
        "",
        _table(header, rows),
        "",
        f"granian / uvicorn: {ratios}. The same app on CPU 0, A B A B; the default changes "
        "only at 1.3x or more on starts and status reads without more memory.",
        "",
    ]


def _tenants(r: dict[str, Any]) -> list[str]:
    ways = [("through nginx", r)]
    if "at_replica" in r:  # runs before nginx was put in front measured the replica only
        ways.append(("at the replica", r["at_replica"]))
    rows = [
        [
            way,
            number,
            _n(measured["solo"]["p99_ms"], 2),
            _n(measured["burst"]["beta"]["p99_ms"], 2),
            measured["burst"]["alpha"]["codes"],
            measured.get("cpu", {}),
        ]
        for way, figures in ways
        for number, measured in enumerate(figures["rounds"])
    ]
    lines = [
        "## 13. Fair limits: one tenant's burst beside another's starts (stand-in engine)",
        "",
        _table(
            [
                "way in",
                "round",
                "B p99 ms alone",
                "B p99 ms under A's burst",
                "A's answers",
                "CPU share",
            ],
            rows,
        ),
        "",
        f"Limit {r['limit_per_s']} starts/s per tenant; B starts {r['b_rate_per_s']}/s, A sends "
        f"{r['a_rate_per_s']}/s.",
    ]
    for way, figures in ways:
        target = f" (target at most {r['target_ratio']}x)" if figures is r else ""
        lines.append(
            f"{way.capitalize()}: B's p99 over every round, alone "
            f"{_n(figures['b_p99_solo_ms'], 2)} ms, under the burst "
            f"{_n(figures['b_p99_burst_ms'], 2)} ms: {_n(figures['ratio'], 2)}x{target}; B "
            f"refused {figures['b_refused']} times; 429s without the three headers: "
            f"{figures['a_429_without_headers']}."
        )
    return [*lines, ""]


def _conversation(r: dict[str, Any]) -> list[str]:
    measured = r["latency_ms"]
    calls = r.get("engine_calls") or {}  # runs before it was counted have none

    def called(side: str, what: str) -> str:
        return _n((calls.get(side) or {}).get(what), 1)

    rows = [
        [
            label,
            _n(measured["flowgate"][what].get("median"), 1),
            _n(measured["flowgate"][what].get("p99"), 1),
            called("flowgate", what),
            _n(measured["engine"][what].get("median"), 1),
            _n(measured["engine"][what].get("p99"), 1),
            called("engine", what),
        ]
        for what, label in (
            ("task", "complete a user task, answered with the next"),
            ("message", "send a message, answered once the engine took it"),
        )
    ]
    return [
        "## 14. Talking to a running process (real engine)",
        "",
        _table(
            [
                "action",
                "flowgate p50 ms",
                "p99",
                "engine calls",
                "engine alone p50 ms",
                "p99",
                "engine calls",
            ],
            rows,
        ),
        "",
        f"With {r['runs_waiting']} other runs waiting at a user task; failed probes: "
        f"{r['failed']}. The engine-alone figures are its REST calls for the same step "
        "(complete + the query that shows the next task; the message correlation). Engine "
        "calls: per action, mean, from the engine's access log (the workers' own left out).",
        "",
    ]


def _redis_clients(r: dict[str, Any]) -> list[str]:
    shapes = list(next(iter(r["by_client"].values()), {}))
    rows = [
        [name, *(_n(by_shape[shape]["cpu_us"].get("median"), 1) for shape in shapes)]
        for name, by_shape in r["by_client"].items()
    ]
    return [
        "## 15. The Redis client",
        "",
        _table(["client", *(f"{shape}: CPU µs per call" for shape in shapes)], rows),
        "",
        f"Median of the rounds; {_n(r['calls_per_round'])} calls per shape and round, "
        f"{r['concurrency']} in flight, on uvloop. read: HGETALL of a run's state; step: the "
        "store's STEP script recording a new step (EVALSHA); read 6: six states in one "
        "pipeline. CPU is the whole client process, every thread.",
        "",
    ]


SECTIONS: list[tuple[str, Callable[[dict[str, Any]], list[str]]]] = [
    ("gateway", _gateway),
    ("parked", _parked),
    ("throughput", _throughput),
    ("workers", _workers),
    ("writebehind", _writebehind),
    ("ends", _ends),
    ("progress", _progress),
    ("clients", _clients),
    ("cost", _cost),
    ("cluster", _cluster),
    ("http", _http),
    ("tenants", _tenants),
    ("conversation", _conversation),
    ("redis", _redis_clients),
]


# --- plots ---------------------------------------------------------------------------------


def _plots(results: dict[str, Any], images: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    gw = _get(results, "gateway", "by_concurrency")
    if gw:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        cs = sorted(gw, key=int)
        x = [int(c) for c in cs]
        for side, label, color in (
            ("gateway", "flowgate sync start", "tab:blue"),
            ("engine_only", "engine REST + history poll", "tab:orange"),
        ):
            ax.plot(
                x,
                [gw[c][side]["latency_ms"]["median"] for c in cs],
                "o-",
                color=color,
                label=f"{label} p50",
            )
            ax.plot(
                x,
                [gw[c][side]["latency_ms"]["p99"] for c in cs],
                "o--",
                color=color,
                label=f"{label} p99",
            )
        ax.plot(
            x,
            [gw[c]["gateway"]["engine_ms"]["median"] for c in cs],
            "s:",
            color="gray",
            label="engine-intrinsic p50",
        )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="concurrent requests",
            ylabel="latency (ms)",
            title="Synchronous start of the one-task process",
        )
        ax.set_xticks(x, [str(v) for v in x])
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        written.append(_save(fig, images / "latency-vs-concurrency.png"))
    mem = _get(results, "parked", "memory", "rss_kb_by_parked")
    if mem:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ks = sorted(mem, key=int)
        ax.plot([int(k) for k in ks], [mem[k] / 1024 for k in ks], "o-", label="API RSS")
        ax.set(xlabel="parked requests", ylabel="RSS (MiB)", title="API memory vs parked requests")
        wake = _get(results, "parked", "wake") or {}
        if wake:
            ax2 = ax.twinx()
            ws = sorted(wake, key=int)
            ax2.plot(
                [int(k) for k in ws],
                [wake[k]["wake_ms"]["p99"] for k in ws],
                "s--",
                color="tab:red",
                label="wake p99 (ms)",
            )
            ax2.set_ylabel("wake latency p99 (ms)")
            ax2.legend(loc="lower right", fontsize=8)
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(True, alpha=0.3)
        written.append(_save(fig, images / "memory-vs-parked.png"))
    clients = _get(results, "workers", "clients")
    if clients:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        names = list(clients)
        ax.barh(
            names, [clients[n]["tasks_per_s"].get("median", 0) for n in names], color="tab:green"
        )
        ax.set(
            xlabel="tasks/s (median of rounds)", title="Draining one-task instances from the engine"
        )
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
        written.append(_save(fig, images / "worker-throughput.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
