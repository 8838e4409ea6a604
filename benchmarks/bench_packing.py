"""Best-fit-decreasing packing: the C++ packer (``arkfast.packing``) against the plain-Python reference.

    python -m benchmarks.bench_packing            # 1e5 and 1e6 lengths, capacity 8192, saved
    python -m benchmarks.bench_packing --smoke    # tiny sizes, nothing saved

A CPU benchmark: packing runs on the host, so full runs on CPU are real results and are appended to
``benchmarks/results/packing.jsonl``. Inputs: token lengths of reasoning trajectories, long-tailed
(lognormal, median ~665 tokens, clipped to [16, capacity]), and uniform on [16, capacity].

Per case it reports time (median, p20/p80), speedup over the Python reference, nanoseconds per item,
the bins used, the packing efficiency ``tokens / (bins * capacity)`` and ``bound_ratio =
ceil(tokens / capacity) / bins`` (1.0 means provably optimal; no packing can use fewer bins).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from arkfast.packing import pack, pack_bins, pack_reference

try:
    from benchmarks import harness
except ImportError:  # run as a script: python benchmarks/bench_packing.py
    import harness

# The Python reference is O(n * bins) in list moves: at 1e6 items one run takes seconds, so it is
# timed once (no warmup) from this size on.
REFERENCE_SINGLE_RUN_FROM = 1_000_000
# python -m benchmarks: 1e5 lengths only (the reference alone takes minutes at 1e6 uniform lengths).
SUITE = {"gpu": {"budget_s": 20, "args": ["--sizes", "100000"]},
         "cpu": {"budget_s": 90, "args": ["--sizes", "100000", "--ref-reps", "5", "--reps", "15"]},
         "smoke": {"budget_s": 30}}
# python -m benchmarks.report: how its records are read (see benchmarks/report.py).
REPORT = {"key": ["dist", "n", "capacity"], "provider": "impl", "metric": "median_ms",
          "baseline": "python reference", "headline": "pack_bins, ndarray in", "extra": ["efficiency", "bound_ratio"]}


def make_lengths(dist: str, n: int, capacity: int, seed: int) -> np.ndarray:
    """``n`` int64 sequence lengths in [16, capacity] from ``dist`` ("lognormal" or "uniform")."""
    rng = np.random.default_rng(seed)
    if dist == "lognormal":
        values = rng.lognormal(mean=6.5, sigma=1.0, size=n)
    elif dist == "uniform":
        values = rng.uniform(16, capacity + 1, size=n)
    else:
        raise ValueError(f"unknown distribution {dist!r}; expected 'lognormal' or 'uniform'")
    return np.clip(values, 16, capacity).astype(np.int64)


def run_case(dist: str, n: int, args: argparse.Namespace) -> list[dict]:
    lengths = make_lengths(dist, n, args.capacity, seed=args.seed)  # [n] int64
    as_list = lengths.tolist()
    tokens = int(lengths.sum())

    # The timed reference runs double as the correctness check (one run is seconds at 1e6 items).
    reference_out: dict[str, list] = {}

    def run_reference():
        reference_out["bins"] = pack_reference(as_list, args.capacity)

    single = n >= REFERENCE_SINGLE_RUN_FROM
    ref_warmup, ref_reps = (0, 1) if single else (min(args.warmup, 1), args.ref_reps)
    timings = {
        "python reference": harness.measure(run_reference, warmup=ref_warmup, reps=ref_reps, device="cpu"),
        "pack, list in": harness.measure(lambda: pack(as_list, args.capacity),
                                         warmup=args.warmup, reps=args.reps, device="cpu"),
        "pack, ndarray in": harness.measure(lambda: pack(lengths, args.capacity),
                                            warmup=args.warmup, reps=args.reps, device="cpu"),
        "pack_bins, ndarray in": harness.measure(lambda: pack_bins(lengths, args.capacity),
                                                 warmup=args.warmup, reps=args.reps, device="cpu"),
    }
    if pack(lengths, args.capacity) != reference_out["bins"]:
        raise AssertionError(f"C++ packer disagrees with the reference on {dist} n={n}")
    num_bins = len(reference_out["bins"])
    quality = {
        "bins": num_bins,
        "efficiency": tokens / (num_bins * args.capacity),
        "bound_ratio": -(-tokens // args.capacity) / num_bins,
    }
    ref_ms = timings["python reference"].median_ms
    rows = []
    for impl, stats in timings.items():
        rows.append({
            "dist": dist, "n": n, "capacity": args.capacity, "impl": impl,
            "median_ms": stats.median_ms, "p20_ms": stats.p20_ms, "p80_ms": stats.p80_ms, "reps": stats.reps,
            "speedup": ref_ms / stats.median_ms, "ns_per_item": stats.median_ms * 1e6 / n, **quality,
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(parser, warmup=2, reps=10)
    parser.set_defaults(device="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="numbers of lengths to pack (default 100000 1000000; 1000 10000 with --smoke)")
    parser.add_argument("--capacity", type=int, default=8192, help="tokens per packed row (default 8192)")
    parser.add_argument("--dists", nargs="+", default=["lognormal", "uniform"],
                        choices=["lognormal", "uniform"], help="length distributions to run")
    parser.add_argument("--ref-reps", type=int, default=3,
                        help=f"timed runs of the Python reference below {REFERENCE_SINGLE_RUN_FROM:,} "
                             "items (one run from there on)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the generated lengths")
    args = harness.resolve_common_args(parser.parse_args(argv), gpu_benchmark=False)
    if args.device.type != "cpu":
        parser.error(f"packing runs on the host; --device must be cpu, got {args.device}")
    if args.sizes is None:
        args.sizes = [1_000, 10_000] if args.smoke else [100_000, 1_000_000]

    rows = [row for dist in args.dists for n in args.sizes for row in run_case(dist, n, args)]
    print(f"device: {harness.cpu_model_name()}; reference timed once from n = "
          f"{REFERENCE_SINGLE_RUN_FROM:,}", file=sys.stderr)
    harness.print_table(rows, columns=["dist", "n", "impl", "median_ms", "p20_ms", "p80_ms", "reps",
                                       "speedup", "ns_per_item", "bins", "efficiency", "bound_ratio"])
    if args.save:
        harness.save_rows("packing", rows, device="cpu")


if __name__ == "__main__":
    main()
