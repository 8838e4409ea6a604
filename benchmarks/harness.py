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

Timing, made honest on CUDA:

* each rep is bracketed by CUDA events (the GPU time of what ``fn`` enqueues; one synchronise after
  all reps); peak memory is ``torch.cuda.max_memory_allocated`` over the timed reps;
* the L2 cache is flushed before every rep (a buffer of twice the L2 size is zeroed, outside the
  events), so an input that fits in L2 is not read from the cache of the previous rep;
* :func:`measure_graph` times the same function replayed from a CUDA graph, so launch overhead is
  visible and separate (``graph_fields`` gives the pair of figures);
* :func:`first_call` times the first call with the workload's own shapes (the one that compiles the
  Triton variants or the ``torch.compile`` graph), and :func:`compile_ms` reports it apart.

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
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
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


@dataclasses.dataclass(frozen=True)
class Stats:
    """Per-call wall (CPU) or GPU (CUDA) time of a measured function, in milliseconds.

    ``l2_flushed``: whether the L2 cache was flushed before every timed rep (CUDA only).
    ``peak_mem_bytes``: torch's peak allocation during the timed reps, the flush buffer excluded
    (``None`` on CPU: not measured).
    """

    median_ms: float
    p20_ms: float
    p80_ms: float
    mean_ms: float
    reps: int
    peak_mem_bytes: int | None
    l2_flushed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` means the current CUDA device if any, else CPU."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values (numpy's default rule)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def l2_flush_bytes(device: torch.device) -> int:
    """Size of the buffer zeroed between reps: twice the device's L2 (256 MiB if it is not reported)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
    return 2 * l2 if l2 > 0 else 256 << 20


def stats_of(times_ms: Sequence[float], peak_mem_bytes: int | None = None, l2_flushed: bool = False) -> Stats:
    """Median, p20/p80 and mean of per-rep times (ms)."""
    if not times_ms:
        raise ValueError("stats_of needs at least one time")
    ordered = sorted(times_ms)
    return Stats(median_ms=statistics.median(ordered), p20_ms=_quantile(ordered, 0.2),
                 p80_ms=_quantile(ordered, 0.8), mean_ms=statistics.fmean(ordered), reps=len(ordered),
                 peak_mem_bytes=peak_mem_bytes, l2_flushed=l2_flushed)


def measure(fn: Callable[[], Any], *, warmup: int = 5, reps: int = 50,
            device: torch.device | str | None = None, flush_l2: bool = True) -> Stats:
    """Time ``fn()`` (no arguments) ``reps`` times after ``warmup`` untimed calls.

    ``device`` picks the clock: CUDA events on a CUDA device, ``time.perf_counter`` on CPU (pass
    ``device="cpu"`` for host-side work even when a GPU is present). ``None`` = :func:`resolve_device`.
    On CUDA with ``flush_l2`` (the default), a buffer of twice the L2 size is zeroed before every rep,
    outside the timed region, so each rep reads its inputs from device memory as a real step would;
    pass ``flush_l2=False`` for work whose inputs stay hot in a real run. ``peak_mem_bytes`` is the
    peak memory allocated by torch during the timed reps, tensors already alive (the inputs) included
    and the flush buffer excluded.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    device = resolve_device(device)
    if device.type != "cuda":
        for _ in range(warmup):
            fn()
        times_ms = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times_ms.append((time.perf_counter() - t0) * 1e3)
        return stats_of(times_ms)
    with torch.cuda.device(device):
        for _ in range(warmup):
            fn()
        flush_bytes = l2_flush_bytes(device) if flush_l2 else 0
        flush = torch.empty(flush_bytes, dtype=torch.uint8, device=device) if flush_l2 else None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends):
            if flush is not None:
                flush.zero_()  # evicts fn's inputs from L2; enqueued before the start event
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times_ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        peak = torch.cuda.max_memory_allocated() - flush_bytes
        del flush
    return stats_of(times_ms, peak, l2_flushed=flush_l2)


def first_call(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[Any, float]:
    """Run ``fn()`` once, synchronised; returns its result and the wall time in ms. Called first with
    the workload's own shapes, this is the call that compiles (Triton variants, ``torch.compile``
    graphs, cuBLAS handles): :func:`compile_ms` reports it apart from the timed reps."""
    device = resolve_device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, (time.perf_counter() - t0) * 1e3


def compile_ms(first_ms: float, stats: Stats) -> float:
    """The first call's time beyond a steady-state call: compilation and first-use set-up."""
    return max(0.0, first_ms - stats.median_ms)


def cuda_graphed(fn: Callable[[], Any]) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (after one call on a side stream, as capture requires); returns
    the graph's replay. The engine decodes under CUDA graphs; timed without one, a ~20 us kernel is
    timed mostly by the Python launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure_graph(fn: Callable[[], Any], *, warmup: int = 5, reps: int = 50,
                  device: torch.device | str | None = None, flush_l2: bool = True) -> Stats:
    """:func:`measure` of ``fn`` replayed from a CUDA graph (CUDA only; ``ValueError`` elsewhere)."""
    device = resolve_device(device)
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
    with torch.cuda.device(device):
        replay = cuda_graphed(fn)
    return measure(replay, warmup=warmup, reps=reps, device=device, flush_l2=flush_l2)


def graph_fields(fn: Callable[[], Any], eager: Stats, *, warmup: int, reps: int,
                 device: torch.device | str | None = None) -> dict[str, Any]:
    """The CUDA-graph twin of an eager measurement: ``graph_median_ms``, ``graph_p20_ms``,
    ``graph_p80_ms`` and ``launch_overhead_ms`` (eager median minus graph median). On CPU, or when
    ``fn`` cannot be captured (a host sync inside, say), the figures are ``None`` and
    ``graph_error`` says why; the eager figures stand either way."""
    device = resolve_device(device)
    empty = {"graph_median_ms": None, "graph_p20_ms": None, "graph_p80_ms": None, "launch_overhead_ms": None}
    if device.type != "cuda":
        return empty
    try:
        graphed = measure_graph(fn, warmup=warmup, reps=reps, device=device, flush_l2=eager.l2_flushed)
    except Exception as exc:  # noqa: BLE001 -- a capture failure is a figure we report, not a crash
        return {**empty, "graph_error": f"{type(exc).__name__}: {exc}"[:200]}
    return {"graph_median_ms": graphed.median_ms, "graph_p20_ms": graphed.p20_ms,
            "graph_p80_ms": graphed.p80_ms, "launch_overhead_ms": eager.median_ms - graphed.median_ms}


def cpu_peak_rss_delta(fn: Callable[[], Any]) -> int | None:
    """Peak resident-set growth (bytes) of this process while ``fn()`` runs, read from Linux's
    ``/proc/self/status`` (``VmHWM``, reset through ``/proc/self/clear_refs``); ``None`` where that
    is not available. Allocations over 64 KiB are mmapped and returned on free (see
    :func:`_fixed_mmap_threshold`), so what ``fn`` allocates shows up whatever ran before it. Coarse
    (pages), but real: the CPU figure for memory."""
    _fixed_mmap_threshold()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        before = _proc_status_kib("VmRSS")
        fn()
        peak = _proc_status_kib("VmHWM")
    except OSError:
        return None
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


def _fixed_mmap_threshold(nbytes: int = 1 << 16) -> None:
    """Make glibc serve every allocation over ``nbytes`` with its own mmap, returned to the system when
    freed. By default the threshold grows after each large free (up to 32 MiB), so memory a previous
    method freed stays in the heap and the next method's RSS does not grow: its peak would read 0.
    A no-op where glibc is absent."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD; setting it also turns its dynamic growth off
    except (OSError, AttributeError):
        return


def _proc_status_kib(field: str) -> int | None:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def copy_bandwidth_gbps(device: torch.device | str | None = None, nbytes: int | None = None,
                        *, warmup: int = 3, reps: int = 20) -> float:
    """Measured copy bandwidth of ``device`` in GB/s (1e9 bytes/s), the roofline ceiling to quote.

    Copies one buffer of ``nbytes`` into another on the same device (default 1 GiB on CUDA, 64 MiB
    on CPU) and counts read + write bytes, ``2 * nbytes / median time``.
    """
    device = resolve_device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    stats = measure(lambda: dst.copy_(src), warmup=warmup, reps=reps, device=device)
    return 2 * nbytes / (stats.median_ms * 1e-3) / 1e9


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
