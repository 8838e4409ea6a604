"""Timing that stays honest on a GPU: the functions behind :mod:`benchmarks.harness`'s ``measure``.

* each rep is bracketed by CUDA events (the GPU time of what ``fn`` enqueues; one synchronise after
  all reps); peak memory is ``torch.cuda.max_memory_allocated`` over the timed reps;
* the L2 cache is flushed before every rep (a buffer of twice the L2 size is zeroed, outside the
  events), so an input that fits in L2 is not read from the cache of the previous rep;
* :func:`measure_graph` times the same function replayed from a CUDA graph, so launch overhead is
  visible and separate (:func:`graph_fields` gives the pair of figures);
* :func:`first_call` times the first call with the workload's own shapes (the one that compiles the
  Triton variants or the ``torch.compile`` graph), and :func:`compile_ms` reports it apart;
* on CPU, ``time.perf_counter`` per rep, and :func:`cpu_peak_rss_delta` for memory.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


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
