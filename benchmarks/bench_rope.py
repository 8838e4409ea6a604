"""RoPE on q and k: Triton kernel vs the torch reference.

    python -m benchmarks.bench_rope            # on a GPU: 4096 tokens, 32/8 and 64/8 heads, D = 128, bf16
    python -m benchmarks.bench_rope --smoke    # tiny shapes, nothing saved (the default without CUDA)

q and k are slices of one fused qkv projection output ``[T, (Hq + 2 Hkv) * D]``, as the model feeds
them (non-contiguous views). Providers: ``triton`` (``arkfast.kernels.rope.apply_rope``, the kernel on
CUDA tensors), ``torch`` (the reference, eager) and ``torch.compile`` (the reference compiled;
``--no-compile`` skips it). A CPU smoke run times the public op (the reference on CPU) and the
reference only.

Bandwidth counts the bytes the op must move: read q and k, write the new q and k, read positions and
inv_freq. ``pct_copy`` is that GB/s over the device's measured copy bandwidth
(:func:`benchmarks.harness.copy_bandwidth_gbps`). Each provider's output is checked against the
reference before it is timed; that first call, with the case's own shapes, compiles (``compile_ms``).
Every provider is timed eager and from a CUDA graph (``graph_median_ms``, ``launch_overhead_ms``), the
L2 flushed before every rep. Results go to ``benchmarks/results/rope.jsonl``, one case at a time.
"""
from __future__ import annotations

import argparse

import torch

from arkfast.kernels.rope import apply_rope, apply_rope_reference, rope_inv_freq

try:
    from benchmarks import harness
except ImportError:  # run as a script: python benchmarks/bench_rope.py
    import harness

# python -m benchmarks: budgets and arguments per mode (see benchmarks/suite.py).
SUITE = {"gpu": {"budget_s": 30}, "smoke": {"budget_s": 30}}
# python -m benchmarks.report: how its records are read (see benchmarks/report.py).
REPORT = {"key": ["T", "Hq", "Hkv", "D", "dtype"], "provider": "provider", "metric": "median_ms",
          "baseline": "torch", "headline": "triton", "ceiling": "pct_copy",
          "extra": ["graph_median_ms", "compile_ms"]}
# Llama-3's rope: theta 500000 with llama3 frequency scaling.
LLAMA3_THETA = 500000.0
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def providers(args: argparse.Namespace) -> dict:
    if args.device.type == "cpu":  # the public op runs the reference on CPU: label it for what it is
        fns = {"public op (reference on CPU)": apply_rope, "torch": apply_rope_reference}
    else:
        fns = {"triton": apply_rope, "torch": apply_rope_reference}
    if args.compile and not args.smoke:
        fns["torch.compile"] = torch.compile(apply_rope_reference, dynamic=False)
    return fns


def run_case(T: int, n_q: int, n_kv: int, D: int, args: argparse.Namespace,
             copy_gbps: float | None) -> list[dict]:
    gen = torch.Generator(device=args.device).manual_seed(T * 31 + n_q)
    qkv = torch.randn(T, (n_q + 2 * n_kv) * D, device=args.device, dtype=args.dtype, generator=gen)
    heads = qkv.view(T, n_q + 2 * n_kv, D)
    q, k = heads[:, :n_q], heads[:, n_q:n_q + n_kv]  # [T, Hq, D], [T, Hkv, D] strided views
    positions = torch.arange(T, device=args.device) + 100  # [T] int64
    inv_freq, scale = rope_inv_freq(D, LLAMA3_THETA, LLAMA3_SCALING)
    inv_freq = inv_freq.to(args.device)  # [D/2] fp32
    nbytes = 2 * T * (n_q + n_kv) * D * qkv.element_size() + T * 8 + inv_freq.numel() * 4
    exp_q, exp_k = apply_rope_reference(q, k, positions, inv_freq, scale)
    rows = []
    for name, fn in providers(args).items():
        with torch.no_grad():
            call = lambda fn=fn: fn(q, k, positions, inv_freq, scale)
            (got_q, got_k), first_ms = harness.first_call(call, args.device)
            max_err = max((got_q.float() - exp_q.float()).abs().max().item(),  # once, outside the timing
                          (got_k.float() - exp_k.float()).abs().max().item())
            stats = harness.measure(call, warmup=args.warmup, reps=args.reps, device=args.device)
            graph = harness.graph_fields(call, stats, warmup=args.warmup, reps=args.reps, device=args.device)
        rows.append({
            "op": "rope", "provider": name, "T": T, "Hq": n_q, "Hkv": n_kv, "D": D,
            "dtype": str(args.dtype).removeprefix("torch."), **stats.as_dict(),
            "compile_ms": harness.compile_ms(first_ms, stats), **graph,
            **harness.bandwidth_fields(nbytes, stats.median_ms, copy_gbps), "max_abs_err": max_err,
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(parser)
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help="token counts T (default 4096 256; 17 with --smoke)")
    parser.add_argument("--heads", default=None,
                        help="comma-separated Hq/Hkv pairs (default 32/8,64/8; 8/2 with --smoke)")
    parser.add_argument("--head-dim", type=int, default=None, help="D (default 128; 64 with --smoke)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="activation dtype (default bfloat16 on CUDA, float32 with --smoke)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile provider (compiling takes a while per shape)")
    args = harness.resolve_common_args(parser.parse_args(argv))
    args.dtype = getattr(torch, args.dtype or ("float32" if args.smoke else "bfloat16"))
    tokens = args.tokens or ([17] if args.smoke else [4096, 256])
    heads = [tuple(int(h) for h in pair.split("/")) for pair in
             (args.heads or ("8/2" if args.smoke else "32/8,64/8")).split(",")]
    D = args.head_dim or (64 if args.smoke else 128)
    copy_gbps = harness.copy_bandwidth_gbps(args.device) if args.device.type == "cuda" else None

    rows = []
    for T in tokens:
        for n_q, n_kv in heads:
            if rows and harness.out_of_time(margin_s=10):
                break
            case = run_case(T, n_q, n_kv, D, args, copy_gbps)
            rows += case
            if args.save:  # case by case: a run cut short keeps what it measured
                harness.save_rows("rope", case, device=args.device)
    harness.print_table(rows, columns=["provider", "T", "Hq", "Hkv", "D", "dtype", "median_ms", "p20_ms",
                                       "p80_ms", "graph_median_ms", "launch_overhead_ms", "compile_ms",
                                       "peak_mem_bytes", "gbps", "pct_copy", "max_abs_err"])


if __name__ == "__main__":
    main()
