"""``python -m benchmarks.report``: ``REPORT.md`` and PNG plots from every record in the results folder(s).

    python -m benchmarks.report                                  # benchmarks/results -> benchmarks/REPORT.md
    python -m benchmarks.report --results /tmp/gpu benchmarks/results --output /tmp/gpu/REPORT.md

For each benchmark, device and shape, the latest run that measured the shape gives one row per
provider: its figure, the ratio to the baseline *measured in the same run* (``x`` faster, or higher
throughput), and its share of the measured ceiling (copy bandwidth, GEMM rate, or a decode step's byte
bound), with the commit, date and versions it came from. Then the history of each benchmark's headline
ratio (geometric mean over the shapes of a run) across commits, the correctness pass of each device,
and the last suite run's steps. Plots go to ``plots/`` beside the report.

How a benchmark is read comes from its ``REPORT`` literal (``benchmarks/bench_<name>.py``, read with
:func:`ast.literal_eval`)::

    REPORT = {"key": ["T", "H"],          # fields that name a shape
              "provider": "provider",     # field naming who computed the figure
              "metric": "median_ms",      # the figure (fallback: "median_ms")
              "higher_is_better": False,
              "baseline": "torch",        # the provider every ratio is taken against
              "headline": "triton",       # the provider whose ratio is tracked across commits
              "ceiling": "pct_copy",      # optional: a field holding a share of a ceiling
              "ceiling_scale": 1,         # optional: multiply the ceiling field by this to get a percent
              "extra": ["extra_mem_gib"]} # optional: more fields to show

A benchmark without one is listed with its latest records only. Smoke records (``"suite_smoke": true``,
or a benchmark's own ``"smoke": true``) are left out unless ``--include-smoke``.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_RESULTS = BENCH_DIR / "results"
ENV_FIELDS = ("timestamp_utc", "device", "device_type", "cuda", "capability", "host_cpu", "cpu_count",
              "torch_threads", "torch",
              "triton", "python", "commit", "dirty", "bench_run", "suite_run", "suite_smoke", "smoke", "bench")
SPEC_FIELDS = {"key", "provider", "metric", "higher_is_better", "baseline", "headline", "ceiling",
               "ceiling_scale", "extra"}


def default_output(results: Path) -> Path:
    """``benchmarks/REPORT.md`` for the project's results folder, ``<results>/REPORT.md`` otherwise."""
    return BENCH_DIR / "REPORT.md" if Path(results).resolve() == DEFAULT_RESULTS else Path(results) / "REPORT.md"


def read_report_spec(path: Path) -> dict[str, Any] | None:
    """The ``REPORT`` literal of a benchmark file, or None; ``ValueError`` naming the file if malformed."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "REPORT" for t in node.targets):
            try:
                spec = ast.literal_eval(node.value)
            except ValueError:
                raise ValueError(f"{path.name}: REPORT must be a literal dict") from None
            missing = {"key", "provider", "baseline"} - set(spec) if isinstance(spec, dict) else {"a dict"}
            if missing or set(spec) - SPEC_FIELDS:
                raise ValueError(f"{path.name}: REPORT needs key, provider and baseline, and only keys among "
                                 f"{sorted(SPEC_FIELDS)}; got {spec!r}")
            return spec
    return None


def load_specs(bench_dir: Path = BENCH_DIR) -> dict[str, dict[str, Any]]:
    specs = {}
    for path in sorted(bench_dir.glob("bench_*.py")):
        spec = read_report_spec(path)
        if spec is not None:
            specs[path.stem.removeprefix("bench_")] = spec
    return specs


def load_records(folders: list[Path], include_smoke: bool = False) -> list[dict[str, Any]]:
    """Every JSON line of every ``*.jsonl`` in ``folders`` (duplicates across folders dropped)."""
    seen, records = set(), []
    for folder in folders:
        for path in sorted(Path(folder).glob("*.jsonl")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
                record.setdefault("bench", path.stem)
                if (record.get("suite_smoke") or record.get("smoke") is True) and not include_smoke:
                    continue
                if line in seen:
                    continue
                seen.add(line)
                records.append(record)
    return records


def _run_of(record: dict[str, Any]) -> str:
    """The benchmark process a record came from (older records: its commit and timestamp)."""
    return record.get("bench_run") or f"{record.get('commit')}@{record.get('timestamp_utc')}"


def _metric(record: dict[str, Any], spec: dict[str, Any]) -> float | None:
    for field in (spec.get("metric", "median_ms"), "median_ms"):
        value = record.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _ratio(value: float | None, base: float | None, higher_is_better: bool) -> float | None:
    if value is None or base is None or value <= 0 or base <= 0:
        return None
    return value / base if higher_is_better else base / value


def latest_rows(records: list[dict[str, Any]], spec: dict[str, Any]) -> list[dict[str, Any]]:
    """For each (device, shape): the providers' figures from the latest run that measured the shape,
    with the ratio to that run's baseline and the share of the ceiling."""
    by_shape: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        shape = (r.get("device"), *(_hashable(r.get(k)) for k in spec["key"]))
        by_shape[shape][_run_of(r)].append(r)
    rows = []
    for shape, runs in by_shape.items():
        run = max(runs.values(), key=lambda rs: max(str(r.get("timestamp_utc")) for r in rs))
        latest: dict[str, dict] = {}
        for r in sorted(run, key=lambda r: str(r.get("timestamp_utc"))):
            latest[str(r.get(spec["provider"]))] = r  # the provider's last record in that run
        base = latest.get(spec["baseline"])
        base_value = _metric(base, spec) if base else None
        for provider, r in latest.items():
            ceiling = r.get(spec["ceiling"]) if spec.get("ceiling") else None
            rows.append({
                "device": r.get("device"), "shape": ", ".join(f"{k}={r.get(k)}" for k in spec["key"]),
                "provider": provider, "value": _metric(r, spec),
                "ratio": _ratio(_metric(r, spec), base_value, spec.get("higher_is_better", False)),
                "pct_ceiling": None if not isinstance(ceiling, (int, float)) else ceiling * spec.get("ceiling_scale", 1),
                **{k: r.get(k) for k in spec.get("extra", [])},
                "commit": (r.get("commit") or "?")[:7] + ("+" if r.get("dirty") else ""),
                "date": str(r.get("timestamp_utc", ""))[:10], "torch": r.get("torch"), "triton": r.get("triton"),
                "threads": r.get("torch_threads"),
                "status": r.get("status"),
            })
    return sorted(rows, key=lambda row: (str(row["device"]), row["shape"], row["provider"]))


def _hashable(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def headline_history(records: list[dict[str, Any]], spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (device, run): the geometric mean over shapes of the headline provider's ratio to the
    baseline in that run; runs in time order."""
    headline = spec.get("headline")
    if headline is None:
        return []
    runs: dict[tuple, list] = defaultdict(list)
    for r in records:
        runs[(r.get("device"), _run_of(r))].append(r)
    points = []
    for (device, _), run in runs.items():
        shapes: dict[tuple, dict[str, dict]] = defaultdict(dict)
        for r in run:
            shapes[tuple(_hashable(r.get(k)) for k in spec["key"])][str(r.get(spec["provider"]))] = r
        ratios = []
        for providers in shapes.values():
            if headline in providers and spec["baseline"] in providers:
                ratio = _ratio(_metric(providers[headline], spec), _metric(providers[spec["baseline"]], spec),
                               spec.get("higher_is_better", False))
                if ratio is not None:
                    ratios.append(ratio)
        if ratios:
            first = min(run, key=lambda r: str(r.get("timestamp_utc")))
            points.append({"device": device, "date": str(first.get("timestamp_utc", ""))[:16],
                           "commit": (first.get("commit") or "?")[:7] + ("+" if first.get("dirty") else ""),
                           "ratio": math.exp(sum(map(math.log, ratios)) / len(ratios)), "shapes": len(ratios)})
    return sorted(points, key=lambda p: p["date"])


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if 1e3 <= abs(value) < 1e7:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 1e7 else f"{value:.3e}"
    return str(value).replace("|", "/")


def _md_table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def _plot_latest(bench: str, rows: list[dict[str, Any]], spec: dict[str, Any], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["ratio"] is not None and r["provider"] != spec["baseline"]]
    if not rows:
        return False
    import textwrap

    several = len({x["device"] for x in rows}) > 1
    labels = [textwrap.fill(f"{r['provider']}: {r['shape']}" + (f" ({r['device']})" if several else ""), 60)
              for r in rows]
    lines = sum(label.count("\n") + 1 for label in labels)
    fig, ax = plt.subplots(figsize=(11, 0.22 * lines + 0.2 * len(rows) + 1.6))
    colors = ["tab:green" if r["ratio"] >= 1 else "tab:red" for r in rows]
    ratios = [r["ratio"] for r in rows]
    # Bars grow from 1 (the baseline) to the ratio, right when faster, left when slower.
    ax.barh(range(len(rows)), [x - 1 for x in ratios], left=1.0, color=colors)
    for y, x in enumerate(ratios):
        ax.annotate(f"{x:.3g}x", (x, y), xytext=(3 if x >= 1 else -3, 0), textcoords="offset points",
                    ha="left" if x >= 1 else "right", va="center", fontsize=7)
    ax.set_xlim(min(min(ratios), 1.0) / 1.6, max(max(ratios), 1.0) * 1.6)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(f"ratio to {spec['baseline']} in the same run ({'higher' if spec.get('higher_is_better') else 'lower'}"
                  f" {spec.get('metric', 'median_ms')} is better; > 1: faster)")
    devices = ", ".join(sorted({str(r["device"]) for r in rows}))
    ax.set_title(f"{bench}: latest figures on {devices}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _plot_history(history: dict[str, list[dict[str, Any]]], specs: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {(bench, p["device"]): [] for bench, points in history.items() for p in points}
    for bench, points in history.items():
        for p in points:
            series[(bench, p["device"])].append(p)
    if not series:
        return False
    import datetime as dt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for (bench, device), points in sorted(series.items()):
        when = [dt.datetime.fromisoformat(p["date"]) for p in points]
        ax.plot(when, [p["ratio"] for p in points], marker="o",
                label=f"{bench}: {specs[bench]['headline']} / {specs[bench]['baseline']} ({device})")
        for x, p in zip(when, points):
            ax.annotate(p["commit"], (x, p["ratio"]), fontsize=6, xytext=(2, 3), textcoords="offset points")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    dates = [dt.datetime.fromisoformat(p["date"]) for points in series.values() for p in points]
    if max(dates) - min(dates) < dt.timedelta(days=1):  # one day of runs: an axis of hours, not years
        ax.set_xlim(min(dates) - dt.timedelta(hours=6), max(dates) + dt.timedelta(hours=6))
    ax.set_xlabel("date of the run (UTC; commit annotated)")
    fig.autofmt_xdate()
    ax.set_ylabel("headline ratio (geometric mean over shapes)")
    ax.set_title("headline ratios across commits", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _correctness(records: list[dict[str, Any]]) -> list[str]:
    checks = [r for r in records if r.get("bench") == "gpu_check"]
    if not checks:
        return ["No correctness records (`python -m benchmarks.gpu_check` on a GPU writes them)."]
    lines = []
    by_device: dict[str, list] = defaultdict(list)
    for r in checks:
        by_device[str(r.get("device"))].append(r)
    for device, rs in sorted(by_device.items()):
        last = max(rs, key=lambda r: str(r.get("timestamp_utc")))
        run = [r for r in rs if _run_of(r) == _run_of(last)]
        failed = [r for r in run if not r.get("ok")]
        lines.append(f"- **{device}** ({(last.get('commit') or '?')[:7]}, {str(last.get('timestamp_utc'))[:10]}, "
                     f"torch {last.get('torch')}, triton {last.get('triton')}): {len(run) - len(failed)}/{len(run)} "
                     f"checks passed" + ("." if not failed else "; **failed**: " + ", ".join(
                         f"{r['kernel']} {r.get('case')} {r.get('dtype')} (rel err {_fmt(r.get('rel_err'))}"
                         f" > {_fmt(r.get('tol'))})" for r in failed)))
    return lines


def write_report(folders: list[Path], output: Path, *, include_smoke: bool = False,
                 bench_dir: Path = BENCH_DIR) -> dict[str, Any]:
    """Write the report and its plots; returns what it wrote (``{"benches": [...], "plots": [...]}``)."""
    output = Path(output)
    records = load_records(folders, include_smoke=include_smoke)
    specs = load_specs(bench_dir)
    plots_dir = output.parent / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    can_plot = importlib.util.find_spec("matplotlib") is not None
    by_bench: dict[str, list] = defaultdict(list)
    for r in records:
        by_bench[r["bench"]].append(r)
    lines = ["# Benchmark report", "",
             f"Generated by `python -m benchmarks.report` from {len(records)} records in "
             + ", ".join(f"`{_rel(f, output.parent)}`" for f in folders)
             + (" (smoke records included: tiny shapes, not figures to quote)" if include_smoke else "")
             + ". Ratios compare a provider with the baseline measured in the same run; figures from "
               "different devices are never compared. Do not edit by hand: rerun the command.", ""]
    if not can_plot:
        lines += ["(No plots: matplotlib is not installed; `pip install matplotlib`, or the `viz` extra.)", ""]
    lines += ["## Correctness on the device", ""] + _correctness(records) + [""]
    written, history = [], {}
    for bench in sorted(b for b in by_bench if b != "gpu_check"):
        spec = specs.get(bench)
        lines += [f"## {bench}", ""]
        if spec is None:
            recent = sorted(by_bench[bench], key=lambda r: str(r.get("timestamp_utc")))[-10:]
            cols = [c for c in dict.fromkeys(k for r in recent for k in r) if c not in ENV_FIELDS][:10]
            lines += ["No `REPORT` spec in its benchmark file: its latest records as they are.", ""]
            lines += _md_table([{**r, "device": r.get("device")} for r in recent], ["device", *cols]) + [""]
            continue
        rows = latest_rows(by_bench[bench], spec)
        metric = spec.get("metric", "median_ms")
        better = "higher" if spec.get("higher_is_better") else "lower"
        lines += [f"Figure: `{metric}` ({better} is better); ratio: against `{spec['baseline']}` in the same run"
                  + (f"; ceiling: `{spec['ceiling']}` as a percent" if spec.get("ceiling") else "") + ".", ""]
        columns = ["device", "shape", "provider", "value", "ratio", "pct_ceiling", *spec.get("extra", []),
                   "commit", "date", "torch", "triton", "threads"]
        lines += _md_table(rows, columns) + [""]
        plot = plots_dir / f"{bench}.png"
        if can_plot and _plot_latest(bench, rows, spec, plot):
            written.append(plot)
            lines += [f"![{bench}]({_rel(plot, output.parent)})", ""]
        history[bench] = headline_history(by_bench[bench], spec)
    lines += ["## History of the headline ratios", ""]
    points = [{"bench": b, "headline": f"{specs[b]['headline']} / {specs[b]['baseline']}", **p}
              for b, ps in history.items() for p in ps]
    if points:
        lines += _md_table(points, ["bench", "headline", "device", "commit", "date", "ratio", "shapes"]) + [""]
        plot = plots_dir / "history.png"
        if can_plot and _plot_history({b: ps for b, ps in history.items() if ps}, specs, plot):
            written.append(plot)
            lines += [f"![history]({_rel(plot, output.parent)})", ""]
    else:
        lines += ["No run has both a headline provider and its baseline yet.", ""]
    lines += _last_suite(folders)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, output)  # a report is never half-written
    return {"output": output, "benches": sorted(by_bench), "plots": written, "records": len(records)}


def _last_suite(folders: list[Path]) -> list[str]:
    summaries = [json.loads(p.read_text(encoding="utf-8")) for f in folders
                 for p in [Path(f) / "summary.json"] if p.is_file()]
    if not summaries:
        return []
    summary = max(summaries, key=lambda s: s.get("run", ""))
    rows = [{k: step.get(k) for k in ("step", "status", "seconds", "budget_s", "records", "note")}
            for step in summary.get("steps", [])]
    title = (f"## Last suite run ({summary.get('run')}, {summary.get('mode')} on {summary.get('device')}, "
             f"commit {(summary.get('commit') or '?')[:7]})")
    return ([title, ""]
            + _md_table(rows, ["step", "status", "seconds", "budget_s", "records", "note"]) + [""])


def _rel(path: Path, start: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(start).resolve()))
    except ValueError:
        try:
            import os

            return os.path.relpath(Path(path).resolve(), Path(start).resolve())
        except ValueError:
            return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, nargs="+", default=[DEFAULT_RESULTS],
                        help="folders of *.jsonl records (default benchmarks/results)")
    parser.add_argument("--output", type=Path, default=None,
                        help="the report to write, plots in plots/ beside it (default benchmarks/REPORT.md for "
                             "benchmarks/results, else <first results folder>/REPORT.md)")
    parser.add_argument("--include-smoke", action="store_true", help="keep records marked smoke")
    args = parser.parse_args(argv)
    for folder in args.results:
        if not folder.is_dir():
            parser.error(f"--results {folder}: not a folder")
    output = args.output or default_output(args.results[0])
    try:
        done = write_report(args.results, output, include_smoke=args.include_smoke)
    except ValueError as exc:
        parser.error(str(exc))
    from benchmarks.harness import print_table

    print_table([{"benchmark": b, "records": sum(1 for r in load_records(args.results, args.include_smoke)
                                                 if r["bench"] == b)} for b in done["benches"]])
    print(f"wrote {output} ({done['records']} records) and {len(done['plots'])} plots in {output.parent / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
