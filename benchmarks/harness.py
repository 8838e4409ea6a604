"""The harness every ``benchmarks/bench_<op>.py`` script shares.

A benchmark script does four things with it::

    parser = argparse.ArgumentParser(description="...")
    harness.add_common_args(parser)                  # --smoke --warmup --reps --no-save --device
    args = harness.resolve_common_args(parser.parse_args())   # smoke is forced on a CPU-only machine
    result, first_ms = harness.first_call(lambda: op(x), device=args.device)  # compiles; check result
    stats = harness.measure(lambda: op(x), warmup=args.warmup, reps=args.reps, device=args.device)
    row = {"shape": ..., **stats.as_dict(), "compile_ms": harness.compile_ms(first_ms, stats), ...}
    harness.print_table([row])                       # for people
    if args.save:
        harness.append_result("op", row, device=args.device)   # one JSON line for scripts

Timing (:mod:`benchmarks.timing`, re-exported here): CUDA events per rep with the L2 flushed before
each, a CUDA-graph twin of an eager figure, and the first (compiling) call timed apart.

On CPU each rep is timed with ``time.perf_counter`` and peak memory is reported as ``None`` (not
measured; :func:`cpu_peak_rss_delta` measures a process's resident-set growth where a CPU figure needs
memory). Results go to ``benchmarks/results/<bench>.jsonl`` (or the folder named by the environment
variable ``ARKFAST_BENCH_RESULTS``, which ``python -m benchmarks --results DIR`` sets), one JSON object
per line, with the device, library versions, git commit and a UTC timestamp.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import functools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
# Set by the suite driver (python -m benchmarks): where records go, and when the whole run must end.
RESULTS_ENV = "ARKFAST_BENCH_RESULTS"
DEADLINE_ENV = "ARKFAST_BENCH_DEADLINE"
RUN_ENV = "ARKFAST_BENCH_RUN"  # the suite run's id, recorded with every record it produced
SMOKE_ENV = "ARKFAST_BENCH_SMOKE"  # set by ``python -m benchmarks --smoke``: smoke records are saved, marked
# One id per benchmark process, recorded with each of its records: the report compares a provider with
# its baseline only within one such run (measured side by side). A constant, fixed at import.
BENCH_RUN = f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%S}-{os.getpid()}"


def default_results_dir() -> Path:
    """Where records are appended: ``$ARKFAST_BENCH_RESULTS`` when set, else ``benchmarks/results``."""
    override = os.environ.get(RESULTS_ENV)
    return Path(override) if override else RESULTS_DIR


def time_left_s() -> float | None:
    """Seconds until the suite's deadline (``$ARKFAST_BENCH_DEADLINE``, a Unix time), or ``None``
    when the benchmark runs on its own. A grid loop checks it to stop starting new points in time
    (what it measured so far is then saved, instead of being lost to the driver's kill)."""
    value = os.environ.get(DEADLINE_ENV)
    if not value:
        return None
    try:
        return float(value) - time.time()
    except ValueError:
        raise ValueError(f"{DEADLINE_ENV} must be a Unix time in seconds, got {value!r}") from None


def out_of_time(margin_s: float) -> bool:
    """True when the suite's deadline is less than ``margin_s`` seconds away (the time one more grid
    point may take); prints why. Call it between points, after the first: a run always measures one."""
    left = time_left_s()
    if left is None or left >= margin_s:
        return False
    print(f"{left:.0f} s left before the suite's deadline (< {margin_s:.0f} s): stopping early",
          file=sys.stderr)
    return True


try:  # the timing half of the harness (benchmarks/timing.py); its names stay reachable as harness.<name>
    from benchmarks import timing as _timing
except ImportError:  # run as a script from benchmarks/: python benchmarks/bench_x.py
    import timing as _timing

Stats = _timing.Stats
_quantile = _timing._quantile
compile_ms = _timing.compile_ms
copy_bandwidth_gbps = _timing.copy_bandwidth_gbps
cpu_peak_rss_delta = _timing.cpu_peak_rss_delta
cuda_graphed = _timing.cuda_graphed
first_call = _timing.first_call
graph_fields = _timing.graph_fields
l2_flush_bytes = _timing.l2_flush_bytes
measure = _timing.measure
measure_graph = _timing.measure_graph
resolve_device = _timing.resolve_device
stats_of = _timing.stats_of


def cpu_model_name() -> str:
    """The CPU model as ``/proc/cpuinfo`` names it (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "--no-optional-locks", *args], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@functools.cache
def _checkout_state() -> tuple[str | None, bool | None]:
    """The commit and dirty flag of the checkout, read once per process: the code a benchmark runs
    is the code it imported, even if the checkout moves on while it runs."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return _git("rev-parse", "HEAD"), None if status is None else bool(status)


def env_record(device: torch.device | str | None = None) -> dict[str, Any]:
    """Where and with what a result was measured: device, versions, git commit, UTC timestamp."""
    device = resolve_device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        extra: dict[str, Any] = {"cuda": torch.version.cuda, "capability": f"{props.major}.{props.minor}",
                                 "host_cpu": cpu_model_name()}
    else:
        name = cpu_model_name()
        # torch's intra-op threads: a CPU figure depends on them (OMP_NUM_THREADS sets them).
        extra = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit, dirty = _checkout_state()
    return {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "device_type": device.type,
        **extra,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": commit,
        "dirty": dirty,
        "bench_run": BENCH_RUN,
        **({"suite_run": os.environ[RUN_ENV]} if os.environ.get(RUN_ENV) else {}),
        **({"suite_smoke": True} if os.environ.get(SMOKE_ENV) == "1" else {}),
    }


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} value {value!r} to JSON")


def append_result(bench_name: str, record: dict[str, Any], *, device: torch.device | str | None = None,
                  results_dir: Path | str | None = None) -> Path:
    """Append ``record`` plus :func:`env_record` as one JSON line to ``<results_dir>/<bench_name>.jsonl``.

    The line is written with a single ``write`` on an ``O_APPEND`` file, so concurrent writers never
    interleave partial lines. Returns the file's path. ``record`` keys may not shadow the env keys.
    """
    env = env_record(device)
    clash = sorted(set(env) & set(record))
    if clash:
        raise ValueError(f"record keys {clash} clash with the environment fields {sorted(env)}")
    line = json.dumps({"bench": bench_name, **env, **record}, default=_to_json, sort_keys=False) + "\n"
    folder = Path(results_dir) if results_dir is not None else default_results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{bench_name}.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)
    return path


def save_rows(bench_name: str, rows: Sequence[dict[str, Any]], *,
              device: torch.device | str | None = None) -> Path | None:
    """:func:`append_result` for every row, then one line on stderr saying where they went."""
    path = None
    for row in rows:
        path = append_result(bench_name, row, device=device)
    if path is not None:
        print(f"appended {len(rows)} records to {path}", file=sys.stderr)
    return path


def bandwidth_fields(nbytes: float, median_ms: float, copy_gbps: float | None) -> dict[str, Any]:
    """``gbps`` achieved moving ``nbytes`` in ``median_ms``, and ``pct_copy``: that over the measured
    device-to-device copy bandwidth (the roofline of a memory-bound op; None when not measured)."""
    gbps = nbytes / median_ms / 1e6
    return {"gbps": gbps, "pct_copy": None if copy_gbps is None else 100 * gbps / copy_gbps,
            "copy_gbps": copy_gbps}


def hf_generate_batch(model: Any, prompts: Sequence[Sequence[int]], device: torch.device | str, *,
                      pad: int = 0, **generate_kwargs: Any) -> torch.Tensor:
    """The transformers baseline of the engine benchmarks: ``model.generate`` on ``prompts`` as one
    left-padded batch (``pad`` ids, attention mask 0 there). Returns the generated ids ``[B, new]``."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # [B, W]
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **generate_kwargs)
    return out[:, width:]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3e}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None, file=None) -> None:
    """Print ``rows`` as a fixed-width table; columns default to every key, in first-seen order.

    Numbers are right-aligned (floats to 4 significant digits), text left-aligned, missing cells ``-``.
    """
    file = sys.stdout if file is None else file
    if not rows:
        print("(no rows)", file=file)
        return
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_fmt(row.get(col)) for col in columns] for row in rows]
    numeric = [all(isinstance(row.get(col), (int, float)) or row.get(col) is None for row in rows)
               for col in columns]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric))

    print(line(columns), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for r in cells:
        print(line(r), file=file)


def add_common_args(parser: argparse.ArgumentParser, *, warmup: int = 5, reps: int = 50) -> None:
    """Add ``--smoke --warmup --reps --no-save --device`` (defaults for the full run given here)."""
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, few reps, nothing saved (the default on a machine without CUDA)")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed calls before timing (default {warmup}; 1 with --smoke)")
    parser.add_argument("--reps", type=int, default=None,
                        help=f"timed calls per measurement (default {reps}; 3 with --smoke)")
    parser.add_argument("--no-save", action="store_true",
                        help="do not append results to <results>/<bench>.jsonl (benchmarks/results, or "
                             f"${RESULTS_ENV} when set)")
    parser.add_argument("--device", default=None,
                        help="torch device to run on (default: cuda if available, else cpu)")
    parser.set_defaults(_default_warmup=warmup, _default_reps=reps)


def resolve_common_args(args: argparse.Namespace, *, gpu_benchmark: bool = True) -> argparse.Namespace:
    """Fill in the common args: ``device`` becomes a ``torch.device``, ``save`` a bool.

    For a GPU benchmark (``gpu_benchmark=True``) on a CPU device, ``smoke`` is forced on: CPU runs are
    smoke tests only and never saved. A smoke run is never saved either, except inside the suite's
    smoke run (``$ARKFAST_BENCH_SMOKE=1``), which saves its records, marked ``"suite_smoke": true``, in its
    own results folder so that its report is built from real records.
    """
    args.device = resolve_device(args.device)
    if gpu_benchmark and args.device.type != "cuda" and not args.smoke:
        print(f"no CUDA device ({args.device}): running as --smoke, nothing saved", file=sys.stderr)
        args.smoke = True
    if args.warmup is None:
        args.warmup = 1 if args.smoke else args._default_warmup
    if args.reps is None:
        args.reps = 3 if args.smoke else args._default_reps
    args.save = not args.no_save and (not args.smoke or os.environ.get(SMOKE_ENV) == "1")
    return args
