"""SwiGLU ``silu(gate) * up`` on a fused gate/up output: Triton kernel vs the torch reference.

    python -m benchmarks.bench_swiglu            # on a GPU: 4096 tokens x I in {5632, 14336}, bf16
    python -m benchmarks.bench_swiglu --smoke    # tiny shapes, nothing saved (the default without CUDA)

Providers: ``triton`` (``arkfast.kernels.swiglu.swiglu``, the kernel on CUDA tensors), ``torch`` (the
reference, eager: ``F.silu(gate) * up``) and ``torch.compile`` (the reference compiled;
``--no-compile`` skips it). ``--backward`` also times forward + backward (kernel backward vs autograd
through the reference). A CPU smoke run times the public op (the reference on CPU) and the reference.

Bandwidth counts the bytes the op must move: forward reads ``[T, 2I]`` and writes ``[T, I]``; the
backward re-reads ``gate_up [T, 2I]``, reads the upstream gradient ``[T, I]`` and writes the
``[T, 2I]`` gradient. ``pct_copy`` is that GB/s over the device's
measured copy bandwidth (:func:`benchmarks.harness.copy_bandwidth_gbps`). Each provider's output is
checked against the reference before it is timed; that first call, with the case's own shapes,
compiles (``compile_ms``). Every provider is timed eager and from a CUDA graph (``graph_median_ms``,
``launch_overhead_ms``), the L2 flushed before every rep. Results go to
``benchmarks/results/swiglu.jsonl``, one case at a time.
"""
from __future__ import annotations

import argparse

import torch

from arkfast.kernels.swiglu import swiglu, swiglu_reference

try:
    from benchmarks import harness
except ImportError:  # run as a script: python benchmarks/bench_swiglu.py
    import harness

# python -m benchmarks: budgets and arguments per mode (see benchmarks/suite.py).
SUITE = {"gpu": {"budget_s": 25, "args": ["--backward"]}, "smoke": {"budget_s": 30, "args": ["--backward"]}}
# python -m benchmarks.report: how its records are read (see benchmarks/report.py).
REPORT = {"key": ["pass", "T", "I", "dtype"], "provider": "provider", "metric": "median_ms",
          "baseline": "torch", "headline": "triton", "ceiling": "pct_copy",
          "extra": ["graph_median_ms", "compile_ms"]}


def providers(args: argparse.Namespace) -> dict:
    if args.device.type == "cpu":  # the public op runs the reference on CPU: label it for what it is
        fns = {"public op (reference on CPU)": swiglu, "torch": swiglu_reference}
    else:
        fns = {"triton": swiglu, "torch": swiglu_reference}
    if args.compile and not args.smoke:
        fns["torch.compile"] = torch.compile(swiglu_reference, dynamic=False)
    return fns


def run_case(T: int, I: int, args: argparse.Namespace, copy_gbps: float | None) -> list[dict]:
    gen = torch.Generator(device=args.device).manual_seed(T * 31 + I)
    gate_up = torch.randn(T, 2 * I, device=args.device, dtype=args.dtype, generator=gen)  # [T, 2I]
    grad_out = torch.randn(T, I, device=args.device, dtype=args.dtype, generator=gen)  # [T, I]
    elem = gate_up.element_size()
    passes = [("fwd", 3 * T * I * elem)]
    if args.backward:
        # backward: read gate_up [T, 2I] and grad_out [T, I], write the gradient [T, 2I]
        passes.append(("fwd+bwd", (3 + 5) * T * I * elem))
    expected = swiglu_reference(gate_up)
    rows = []
    for name, fn in providers(args).items():
        for pass_name, nbytes in passes:
            if pass_name == "fwd":
                def step(fn=fn):
                    with torch.no_grad():
                        return fn(gate_up)
                got, first_ms = harness.first_call(step, args.device)
                max_err = (got.float() - expected.float()).abs().max().item()  # once, outside the timing
            else:
                leaf = gate_up.detach().requires_grad_()

                def step(fn=fn, leaf=leaf):
                    leaf.grad = None
                    fn(leaf).backward(grad_out)
                _, first_ms = harness.first_call(step, args.device)
                max_err = None
            stats = harness.measure(step, warmup=args.warmup, reps=args.reps, device=args.device)
            # Forward only in a graph: capturing autograd's backward needs the graph-safe allocator dance
            # the engine never does, and the training step is not graphed.
            graph = harness.graph_fields(step, stats, warmup=args.warmup, reps=args.reps, device=args.device) \
                if pass_name == "fwd" else {}
            rows.append({
                "op": "swiglu", "provider": name, "pass": pass_name, "T": T, "I": I,
                "dtype": str(args.dtype).removeprefix("torch."), **stats.as_dict(),
                "compile_ms": harness.compile_ms(first_ms, stats), **graph,
                **harness.bandwidth_fields(nbytes, stats.median_ms, copy_gbps), "max_abs_err": max_err,
            })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(parser)
    parser.add_argument("--tokens", type=int, default=None, help="rows T (default 4096; 17 with --smoke)")
    parser.add_argument("--intermediate", type=int, nargs="+", default=None,
                        help="intermediate sizes I (default 5632 14336; 64 100 with --smoke)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="activation dtype (default bfloat16 on CUDA, float32 with --smoke)")
    parser.add_argument("--backward", action="store_true", help="also time forward + backward")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile provider (compiling takes a while per shape)")
    args = harness.resolve_common_args(parser.parse_args(argv))
    args.dtype = getattr(torch, args.dtype or ("float32" if args.smoke else "bfloat16"))
    T = args.tokens or (17 if args.smoke else 4096)
    sizes = args.intermediate or ([64, 100] if args.smoke else [5632, 14336])
    copy_gbps = harness.copy_bandwidth_gbps(args.device) if args.device.type == "cuda" else None

    rows = []
    for I in sizes:
        if rows and harness.out_of_time(margin_s=10):
            break
        case = run_case(T, I, args, copy_gbps)
        rows += case
        if args.save:  # case by case: a run cut short keeps what it measured
            harness.save_rows("swiglu", case, device=args.device)
    harness.print_table(rows, columns=["provider", "pass", "T", "I", "dtype", "median_ms", "p20_ms", "p80_ms",
                                       "graph_median_ms", "launch_overhead_ms", "compile_ms",
                                       "peak_mem_bytes", "gbps", "pct_copy", "max_abs_err"])


if __name__ == "__main__":
    main()
