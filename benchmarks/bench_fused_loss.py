"""Fused linear + step-weighted cross-entropy: forward + backward time and peak memory against eager
torch, Liger-Kernel's fused linear cross-entropy (when importable) and torch's
``F.linear_cross_entropy`` (when this torch has it).

Every method computes the same thing, ``sum_t w_t * CE(h_t @ W.T, y_t)`` with per-token weights, and
its gradients wrt ``h`` and ``W``:

* ``arkfast``: ``fused_linear_weighted_cross_entropy(h, W, y, w, reduction="sum")``.
* ``eager``: ``(F.cross_entropy((h @ W.T).float(), y, reduction="none") * w).sum()`` (the logits
  upcast as transformers' causal-LM loss does).
* ``liger``: ``LigerFusedLinearCrossEntropyLoss(reduction="none")(W, h, y) * w``, summed: per-token
  weights are only reachable through ``reduction="none"`` there. Its gradients are checked against
  arkfast on a small case (``grad_ok``), since per-token upstream gradients are exactly what a
  grads-in-forward design can get wrong.
* ``torch_lce``: ``F.linear_cross_entropy(h, W, y, reduction="none", options=LinearCrossEntropyOptions())``
  times ``w``, summed (``grad_ok`` checked the same way).

Time is the GPU time of one forward + backward (median, p20/p80); ``extra_mem_gib`` is the peak
memory above the inputs (h, W, y, w and the two gradients), the figure to compare. The roofline is
the time of the three GEMMs every method must run (logits, grad_h, grad_W), measured with torch.mm on
the same shapes: ``gemm_frac`` = that time / the method's time.

    python -m benchmarks.bench_fused_loss              # full grid on CUDA (bf16), results appended
    python -m benchmarks.bench_fused_loss --device cpu # CPU figures (fp32, CPU-sized shapes), appended
    python -m benchmarks.bench_fused_loss --smoke      # tiny shapes, nothing saved

On CPU the public op runs its torch reference (the Triton kernel needs a GPU), so the CPU figures
say what a CPU user gets today; ``extra_mem_gib`` there is the process's peak resident-set growth
during one forward + backward (``/proc/self/status``), not torch's allocator count. The first call
on each shape is timed apart (``compile_ms``); the L2 is flushed before every rep on CUDA.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from arkfast.kernels.fused_linear_weighted_cross_entropy import fused_linear_weighted_cross_entropy

try:
    from benchmarks import harness
except ImportError:  # run as a script: python benchmarks/bench_fused_loss.py
    import harness

VOCABS = [32000, 151936]  # Llama 2 / Mistral, Qwen2
HIDDENS = [1024, 2048, 4096]
TOKENS = [4096, 16384]
SMOKE_SHAPES = [(37, 16, 503), (64, 32, 1000)]  # (N, H, V)
CPU_SHAPES = [(512, 256, 32000), (1024, 256, 32000)]  # logits 66 and 131 MB in fp32
# python -m benchmarks: budgets and arguments per mode (see benchmarks/suite.py). gpu: 4 shapes.
SUITE = {"gpu": {"budget_s": 45, "args": ["--vocab", "32000", "151936", "--hidden", "2048", "4096",
                                          "--tokens", "16384", "--reps", "10", "--warmup", "2"]},
         "cpu": {"budget_s": 400, "args": ["--reps", "5", "--warmup", "1"]},
         "smoke": {"budget_s": 30}}
# python -m benchmarks.report: how its records are read (see benchmarks/report.py).
REPORT = {"key": ["N", "H", "V", "dtype"], "provider": "method", "metric": "median_ms", "baseline": "eager",
          "headline": "arkfast", "ceiling": "gemm_frac", "ceiling_scale": 100,
          "extra": ["extra_mem_gib", "mem_vs_eager", "status"]}
IGNORE = -100


def _liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    module = LigerFusedLinearCrossEntropyLoss(reduction="none", ignore_index=IGNORE)
    return lambda h, W, y, w: (module(W, h, y) * w).sum()


def _torch_lce_loss():
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return None
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda h, W, y, w: (F.linear_cross_entropy(h, W, y, reduction="none", ignore_index=IGNORE,
                                                      options=options) * w).sum()


def methods() -> dict:
    """name -> loss(h [N, H], W [V, H], y [N] int64, w [N] fp32) -> scalar; unavailable ones left out."""
    found = {
        "arkfast": lambda h, W, y, w: fused_linear_weighted_cross_entropy(h, W, y, w, reduction="sum",
                                                                          ignore_index=IGNORE),
        "eager": lambda h, W, y, w: (F.cross_entropy((h @ W.t()).float(), y, reduction="none",
                                                     ignore_index=IGNORE) * w).sum(),
        "liger": _liger_loss(),
        "torch_lce": _torch_lce_loss(),
    }
    return {name: fn for name, fn in found.items() if fn is not None}


def make_inputs(N: int, H: int, V: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """``h [N, H]``, ``W [V, H]`` (dtype, requiring grad), ``y [N]`` int64 with ~20% ignored (prompt
    tokens), ``w [N]`` fp32 step weights in [-0.5, 1.5)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(N, H, generator=g, device=device).to(dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g, device=device) * H ** -0.5).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g, device=device)
    y[torch.rand(N, generator=g, device=device) < 0.2] = IGNORE
    w = torch.rand(N, generator=g, device=device) * 2 - 0.5
    return h, W, y, w


def grads_of(loss_fn, h, W, y, w):
    h.grad = W.grad = None
    loss = loss_fn(h, W, y, w)
    loss.backward()
    return loss.detach().float(), h.grad.float(), W.grad.float()


def check_against_arkfast(fns: dict, device: torch.device) -> dict[str, bool]:
    """Whether each method's loss and gradients match arkfast's (fp32, a small shape, relative 1e-3)."""
    h, W, y, w = make_inputs(257, 64, 1031, torch.float32, device, seed=1)
    expected = grads_of(fns["arkfast"], h, W, y, w)
    ok = {}
    for name, fn in fns.items():
        try:
            got = grads_of(fn, h, W, y, w)
        except Exception as exc:  # noqa: BLE001 -- report the method as failing, keep the others
            print(f"{name}: check failed to run: {type(exc).__name__}: {exc}", file=sys.stderr)
            ok[name] = False
            continue
        ok[name] = all(torch.allclose(a, e, rtol=1e-3, atol=1e-3 * e.abs().max().item())
                       for a, e in zip(got, expected))
    return ok


def three_gemms_ms(h: torch.Tensor, W: torch.Tensor, args) -> float:
    """The roofline: torch.mm time of the three GEMMs every method runs, [N,H]x[H,V] (logits),
    [N,V]x[V,H] (grad_h) and [V,N]x[N,H] (grad_W)."""
    logits = h @ W.t()  # [N, V]
    gemms = [lambda: h @ W.t(), lambda: logits @ W, lambda: logits.t() @ h]
    return sum(harness.measure(g, warmup=args.warmup, reps=args.reps, device=args.device).median_ms
               for g in gemms)


def bench_shape(fns: dict, N: int, H: int, V: int, dtype: torch.dtype, args, grad_ok: dict) -> list[dict]:
    device = args.device
    h, W, y, w = make_inputs(N, H, V, dtype, device)
    gemm_ms = three_gemms_ms(h.detach(), W.detach(), args)
    flops = 6.0 * N * H * V
    rows = []
    for name, fn in fns.items():
        row = {"method": name, "N": N, "H": H, "V": V, "dtype": str(dtype).removeprefix("torch."),
               "grad_ok": grad_ok.get(name)}

        def step(fn=fn):
            h.grad = W.grad = None
            fn(h, W, y, w).backward()

        try:
            # The first call compiles and allocates the gradients (they count as inputs, not as the
            # method's memory).
            _, first_ms = harness.first_call(step, device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
            stats = harness.measure(step, warmup=args.warmup, reps=args.reps, device=device)
            rss = harness.cpu_peak_rss_delta(step) if device.type == "cpu" else None
        except Exception as exc:  # noqa: BLE001 -- OOM, or a configuration the method rejects
            oom = isinstance(exc, torch.cuda.OutOfMemoryError)
            row["status"] = "oom" if oom else f"error: {type(exc).__name__}"
            if not oom:
                print(f"{name} at N={N} H={H} V={V}: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append(row)
            h.grad = W.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        row.update(stats.as_dict())
        row["compile_ms"] = harness.compile_ms(first_ms, stats)
        row["extra_mem_gib"] = (stats.peak_mem_bytes - base) / 2**30 if base is not None else \
            None if rss is None else rss / 2**30
        row["tflops"] = flops / (stats.median_ms * 1e-3) / 1e12
        row["gemm_frac"] = gemm_ms / stats.median_ms
        row["status"] = "ok"
        rows.append(row)
    eager = next((r for r in rows if r["method"] == "eager" and r["status"] == "ok"), None)
    for r in rows:
        if eager is not None and r["status"] == "ok":
            r["speedup_vs_eager"] = eager["median_ms"] / r["median_ms"]
            if r.get("extra_mem_gib") is not None and eager["extra_mem_gib"]:
                r["mem_vs_eager"] = r["extra_mem_gib"] / eager["extra_mem_gib"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(parser, warmup=3, reps=20)
    grid = " x ".join(" ".join(map(str, g)) for g in (VOCABS, HIDDENS, TOKENS))
    cpu = ", ".join("x".join(map(str, s)) for s in CPU_SHAPES)
    parser.add_argument("--vocab", type=int, nargs="+", default=None,
                        help=f"vocabulary sizes V (with --hidden and --tokens: the grid V x H x N; default "
                             f"{grid} on CUDA, the N x H x V shapes {cpu} on CPU)")
    parser.add_argument("--hidden", type=int, nargs="+", default=None, help="hidden sizes H")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts N")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="subset of arkfast, eager, liger, torch_lce (default: every one available; "
                             "torch_lce is left out of --smoke runs)")
    # CPU runs are real figures (the public op's CPU path against eager), not only smoke tests.
    args = harness.resolve_common_args(parser.parse_args(argv), gpu_benchmark=False)

    fns = methods()
    if args.smoke and not args.methods:
        # torch's linear_cross_entropy compiles on first use (seconds on CPU): smoke runs leave it out.
        fns.pop("torch_lce", None)
    if args.methods:
        unknown = sorted(set(args.methods) - set(fns))
        if unknown:
            parser.error(f"unknown or unavailable methods {unknown}; available: {sorted(fns)}")
        fns = {name: fns[name] for name in fns if name in args.methods or name == "arkfast"}
    if args.smoke:
        # CPU smoke: arkfast dispatches to its torch reference here (no Triton on CPU tensors).
        shapes, dtype = SMOKE_SHAPES, torch.float32
    else:
        if args.device.type == "cpu" and not (args.vocab or args.hidden or args.tokens):
            shapes = CPU_SHAPES
        else:
            shapes = [(N, H, V) for V in args.vocab or VOCABS for H in args.hidden or HIDDENS
                      for N in args.tokens or TOKENS]
        dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    grad_ok = check_against_arkfast(fns, args.device)
    rows = []
    for N, H, V in shapes:
        if rows and harness.out_of_time(margin_s=20):
            break
        shape_rows = bench_shape(fns, N, H, V, dtype, args, grad_ok)
        rows.extend(shape_rows)
        if args.save:
            for row in shape_rows:
                harness.append_result("fused_loss", row, device=args.device)
    if args.device.type == "cpu":
        print(f"device: {harness.cpu_model_name()} ({os.cpu_count()} CPUs); arkfast = the public op's CPU path "
              "(its torch reference)", file=sys.stderr)
    harness.print_table(rows, columns=["method", "N", "H", "V", "status", "grad_ok", "median_ms", "p20_ms",
                                       "p80_ms", "compile_ms", "tflops", "gemm_frac", "extra_mem_gib", "speedup_vs_eager",
                                       "mem_vs_eager"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
