"""RMSNorm (with and without the fused residual add): Triton kernel vs the torch reference.

    python -m benchmarks.bench_rms_norm            # on a GPU: 4096 tokens x H in {2048, 4096, 8192}, bf16
    python -m benchmarks.bench_rms_norm --smoke    # tiny shapes, nothing saved (the default without CUDA)

Providers: ``triton`` (``arkfast.kernels.rms_norm``, which runs the kernel on CUDA tensors), ``torch``
(the reference, eager) and ``torch.compile`` (the reference compiled; ``--no-compile`` skips it). A
CPU smoke run times the public op (the reference on CPU) and the reference only.

Bandwidth counts the bytes the op must move: read x (and the residual), write out (and the new
residual), read the weight. ``pct_copy`` is that GB/s over the device's measured copy bandwidth
(:func:`benchmarks.harness.copy_bandwidth_gbps`), the roofline for a memory-bound op. Each provider's
output is checked against the reference before it is timed. That first call, with the case's own
shapes, compiles (``compile_ms``: its time beyond a steady call). Every provider is timed eager and
replayed from a CUDA graph (``graph_median_ms``; ``launch_overhead_ms`` the difference), with the L2
flushed before every rep. Results go to ``benchmarks/results/rms_norm.jsonl``, one case at a time.
"""
from __future__ import annotations

import argparse

import torch

from arkfast.kernels.rms_norm import rms_norm, rms_norm_reference

try:
    from benchmarks import harness
except ImportError:  # run as a script: python benchmarks/bench_rms_norm.py
    import harness

EPS = 1e-6
# python -m benchmarks: budgets and arguments per mode (see benchmarks/suite.py). gpu: 3 H x 2 forms x
# 3 providers, eager + graph; most of the budget is torch.compile's six compilations.
SUITE = {"gpu": {"budget_s": 35}, "smoke": {"budget_s": 30}}
# python -m benchmarks.report: how its records are read (see benchmarks/report.py).
REPORT = {"key": ["T", "H", "dtype", "residual"], "provider": "provider", "metric": "median_ms",
          "baseline": "torch", "headline": "triton", "ceiling": "pct_copy",
          "extra": ["graph_median_ms", "compile_ms"]}


def providers(args: argparse.Namespace) -> dict:
    fns = {"triton": rms_norm, "torch": rms_norm_reference}
    if args.device.type == "cpu":  # the public op runs the reference on CPU: label it for what it is
        fns = {"public op (reference on CPU)": rms_norm, "torch": rms_norm_reference}
    if args.compile and not args.smoke:
        fns["torch.compile"] = torch.compile(rms_norm_reference, dynamic=False)
    return fns


def run_case(T: int, H: int, residual: bool, args: argparse.Namespace, copy_gbps: float | None) -> list[dict]:
    gen = torch.Generator(device=args.device).manual_seed(T * 31 + H)
    x = torch.randn(T, H, device=args.device, dtype=args.dtype, generator=gen)  # [T, H]
    weight = torch.randn(H, device=args.device, dtype=args.dtype, generator=gen)  # [H]
    res = torch.randn(T, H, device=args.device, dtype=args.dtype, generator=gen) if residual else None
    elem = x.element_size()
    nbytes = (4 if residual else 2) * T * H * elem + H * elem
    expected = rms_norm_reference(x, weight, EPS, res)
    expected = expected[0] if residual else expected
    rows = []
    for name, fn in providers(args).items():
        with torch.no_grad():
            call = lambda fn=fn: fn(x, weight, EPS, res)
            got, first_ms = harness.first_call(call, args.device)
            got = got[0] if residual else got
            max_err = (got.float() - expected.float()).abs().max().item()  # once, outside the timing
            stats = harness.measure(call, warmup=args.warmup, reps=args.reps, device=args.device)
            graph = harness.graph_fields(call, stats, warmup=args.warmup, reps=args.reps, device=args.device)
        rows.append({
            "op": "rms_norm", "provider": name, "T": T, "H": H,
            "dtype": str(args.dtype).removeprefix("torch."), "residual": residual, **stats.as_dict(),
            "compile_ms": harness.compile_ms(first_ms, stats), **graph,
            **harness.bandwidth_fields(nbytes, stats.median_ms, copy_gbps), "max_abs_err": max_err,
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(parser)
    parser.add_argument("--tokens", type=int, default=None, help="rows (default 4096; 17 with --smoke)")
    parser.add_argument("--hidden", type=int, nargs="+", default=None,
                        help="hidden sizes H (default 2048 4096 8192; 64 100 with --smoke)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="activation dtype (default bfloat16 on CUDA, float32 with --smoke)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile provider (compiling takes a while per shape)")
    args = harness.resolve_common_args(parser.parse_args(argv))
    args.dtype = getattr(torch, args.dtype or ("float32" if args.smoke else "bfloat16"))
    T = args.tokens or (17 if args.smoke else 4096)
    hidden = args.hidden or ([64, 100] if args.smoke else [2048, 4096, 8192])
    # The roofline only means something on a GPU; a CPU smoke run reports none.
    copy_gbps = harness.copy_bandwidth_gbps(args.device) if args.device.type == "cuda" else None

    rows = []
    for H in hidden:
        for residual in (False, True):
            if rows and harness.out_of_time(margin_s=10):
                break
            case = run_case(T, H, residual, args, copy_gbps)
            rows += case
            if args.save:  # case by case: a run cut short keeps what it measured
                harness.save_rows("rms_norm", case, device=args.device)
    harness.print_table(rows, columns=["provider", "T", "H", "dtype", "residual", "median_ms", "p20_ms",
                                       "p80_ms", "graph_median_ms", "launch_overhead_ms", "compile_ms",
                                       "peak_mem_bytes", "gbps", "pct_copy", "max_abs_err"])


if __name__ == "__main__":
    main()
