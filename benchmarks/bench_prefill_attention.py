"""Prefill attention: the varlen Triton kernel vs torch SDPA (padded batch, per sequence) and flash-attn.

    python -m benchmarks.bench_prefill_attention             # GPU: packed batches, 32/8 heads, D 128, bf16
    python -m benchmarks.bench_prefill_attention --backward  # forward + backward instead
    python -m benchmarks.bench_prefill_attention --smoke     # tiny, nothing saved (the default without CUDA)

Providers, all causal over the same packed batch (``q [T, Hq, D]``, ``k/v [T, Hkv, D]``, ``cu_seqlens``):

* ``triton``: ``arkfast.kernels.prefill_attention.varlen_attention`` (the kernel on CUDA tensors; on CPU
  the public op runs the torch reference and is labelled so);
* ``triton_paged``: ``prefill_attention`` where the first half of every sequence is already in a paged
  KV cache (block size 16, shuffled blocks) and only the second half is new (forward only);
* ``sdpa_padded``: ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` on a right-padded
  ``[B, H, max_len, D]`` batch (padding built outside the timing, so it is SDPA's best case);
* ``sdpa_per_seq``: the same SDPA call once per sequence, in a Python loop;
* ``flash_attn``: ``flash_attn_varlen_func`` when flash-attn is installed.

FLOPs count only the causal (visible) score entries: ``4 * D * Hq * sum_b L_b (L_b + 1) / 2`` for the
forward (QK^T and PV, 2 FLOPs per multiply-add), with the cached keys added for ``triton_paged``; the
backward counts 2.5 times the forward. ``pct_mm`` is TFLOP/s over a measured dense bf16/fp16 GEMM
(8192^3) on the same device, the compute roofline. Each provider's output is checked against
``sdpa_per_seq`` before it is timed. The first timed-step call, on the case's own shapes, is timed
apart (``compile_ms``); forward passes are also timed replayed from a CUDA graph (``graph_median_ms``,
``launch_overhead_ms``); the L2 is flushed before every rep. Results go to
``benchmarks/results/prefill_attention.jsonl``, one batch at a time.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from arkfast.kernels.paged_kv import write_kv_cache_reference
from arkfast.kernels.prefill_attention import prefill_attention, varlen_attention

try:
    from benchmarks import harness
except ImportError:  # run as a script: python benchmarks/bench_prefill_attention.py
    import harness

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

PAGE = 16
# python -m benchmarks: forward, four packed batches (see benchmarks/suite.py).
SUITE = {"gpu": {"budget_s": 40}, "smoke": {"budget_s": 30}}
# python -m benchmarks.report: how its records are read (see benchmarks/report.py).
REPORT = {"key": ["batch", "T", "Hq", "Hkv", "D", "dtype", "backward"], "provider": "provider",
          "metric": "median_ms", "baseline": "sdpa_padded", "headline": "triton", "ceiling": "pct_mm",
          "extra": ["graph_median_ms", "compile_ms"]}


def batch_lengths(name: str, smoke: bool) -> list[int]:
    """Sequence lengths of a named packed batch."""
    if smoke:
        return {"mixed": [5, 17, 1, 40], "uniform": [24, 24]}[name]
    gen = torch.Generator().manual_seed(0)
    return {
        "16x1024": [1024] * 16,
        "4x4096": [4096] * 4,
        "64x256": [256] * 64,
        "mixed": torch.randint(64, 2048, (16,), generator=gen).tolist(),  # ragged, ~16k tokens
    }[name]


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Measured dense GEMM TFLOP/s (the compute ceiling quoted next to each result)."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    stats = harness.measure(lambda: a @ b, warmup=3, reps=20, device=device)
    return 2 * n ** 3 / (stats.median_ms * 1e-3) / 1e12


def _padded(x: torch.Tensor, lengths: list[int], bounds: list[int]) -> torch.Tensor:
    """[T, H, D] packed -> [B, H, max_len, D] right-padded with zeros."""
    out = x.new_zeros(len(lengths), max(lengths), *x.shape[1:])
    for b, (s, e) in enumerate(itertools.pairwise(bounds)):
        out[b, : e - s] = x[s:e]
    return out.transpose(1, 2)


def _paged_setup(k, v, lengths, bounds):
    """Put the first half of every sequence into a paged cache; returns the prefill_attention args."""
    cached = [L // 2 for L in lengths]
    new = [L - c for L, c in zip(lengths, cached)]
    Hkv, D = k.shape[1:]
    max_blocks = max(-(-c // PAGE) for c in cached) or 1
    num_blocks = len(lengths) * max_blocks
    k_cache = k.new_zeros(num_blocks, PAGE, Hkv, D)
    v_cache = torch.zeros_like(k_cache)
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1)).to(k.device)
    tables = torch.full((len(lengths), max_blocks), -1, dtype=torch.int32, device=k.device)
    keep = []
    for b, (s, c) in enumerate(zip(bounds[:-1], cached)):
        used = -(-c // PAGE)
        tables[b, :used] = perm[b * max_blocks: b * max_blocks + used].int()
        pos = torch.arange(c, device=k.device)
        slots = tables[b, pos // PAGE].long() * PAGE + pos % PAGE
        write_kv_cache_reference(k[s:s + c], v[s:s + c], k_cache, v_cache, slots)
        keep.append(torch.arange(s + c, s + lengths[b], device=k.device))
    keep = torch.cat(keep)
    cu_new = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32, device=k.device)
    cached_lens = torch.tensor(cached, dtype=torch.int32, device=k.device)
    return keep, cu_new, max(new), (k_cache, v_cache, tables, cached_lens), cached, new


def run_case(batch: str, args: argparse.Namespace, ceiling: float | None) -> list[dict]:
    lengths = batch_lengths(batch, args.smoke)
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    T, Hq, Hkv, D = bounds[-1], args.heads, args.kv_heads, args.head_dim
    gen = torch.Generator(device=args.device).manual_seed(T * 31 + Hq)
    q = torch.randn(T, Hq, D, device=args.device, dtype=args.dtype, generator=gen)   # [T, Hq, D]
    k = torch.randn(T, Hkv, D, device=args.device, dtype=args.dtype, generator=gen)  # [T, Hkv, D]
    v = torch.randn(T, Hkv, D, device=args.device, dtype=args.dtype, generator=gen)
    cu = torch.tensor(bounds, dtype=torch.int32, device=args.device)
    max_len = max(lengths)
    fwd_flops = 4 * D * Hq * sum(L * (L + 1) // 2 for L in lengths)

    qp, kp, vp = (_padded(x, lengths, bounds) for x in (q, k, v))  # [B, H, max_len, D]

    def sdpa_padded(q_, k_, v_):
        out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
        return out  # padded layout: compared row by row below

    def sdpa_per_seq(q_, k_, v_):
        outs = [F.scaled_dot_product_attention(q_[s:e].transpose(0, 1)[None], k_[s:e].transpose(0, 1)[None],
                                               v_[s:e].transpose(0, 1)[None], is_causal=True,
                                               enable_gqa=True)[0].transpose(0, 1)
                for s, e in itertools.pairwise(bounds)]
        return torch.cat(outs)

    def unpad(out):  # [B, Hq, max_len, D] -> [T, Hq, D]
        return torch.cat([out[b, :, :L].transpose(0, 1) for b, L in enumerate(lengths)])

    fns = {("public op (reference on CPU)" if args.device.type == "cpu" else "triton"):
           lambda q_, k_, v_: varlen_attention(q_, k_, v_, cu, max_seqlen=max_len)}
    fns["sdpa_padded"] = sdpa_padded
    fns["sdpa_per_seq"] = sdpa_per_seq
    if flash_attn_varlen_func is not None and args.device.type == "cuda":
        fns["flash_attn"] = lambda q_, k_, v_: flash_attn_varlen_func(q_, k_, v_, cu, cu, max_len, max_len,
                                                                      causal=True)
    expected = sdpa_per_seq(q, k, v)
    rows = []
    for name, fn in fns.items():
        inputs = [q, k, v]
        if args.backward:
            if name == "sdpa_padded":  # its inputs are the padded copies
                qp.requires_grad_(), kp.requires_grad_(), vp.requires_grad_()
            inputs = [x.detach().requires_grad_() for x in inputs]
            dout = torch.randn_like(qp if name == "sdpa_padded" else q)

            def step(fn=fn, inputs=inputs, dout=dout):
                fn(*inputs).backward(dout)
        else:
            def step(fn=fn, inputs=inputs):
                with torch.no_grad():
                    fn(*inputs)
        with torch.no_grad():
            got = fn(q, k, v)
            got = unpad(got) if name == "sdpa_padded" else got
            max_err = (got.float() - expected.float()).abs().max().item()  # once, outside the timing
        _, first_ms = harness.first_call(step, args.device)
        stats = harness.measure(step, warmup=args.warmup, reps=args.reps, device=args.device)
        graph = {} if args.backward else \
            harness.graph_fields(step, stats, warmup=args.warmup, reps=args.reps, device=args.device)
        flops = fwd_flops * (3.5 if args.backward else 1.0)
        rows.append({**_row(name, batch, lengths, args, stats, flops, ceiling, max_err), **graph,
                     "compile_ms": harness.compile_ms(first_ms, stats)})
        qp.requires_grad_(False), kp.requires_grad_(False), vp.requires_grad_(False)

    if not args.backward:  # the paged-prefix form: second half of each sequence new, first half cached
        keep, cu_new, max_new, cache, cached, new = _paged_setup(k, v, lengths, bounds)
        qn, kn, vn = q[keep], k[keep], v[keep]
        paged = lambda: prefill_attention(qn, kn, vn, cu_new, *cache, max_seqlen=max_new)
        with torch.no_grad():
            got, first_ms = harness.first_call(paged, args.device)
            max_err = (got.float() - expected[keep].float()).abs().max().item()
            stats = harness.measure(paged, warmup=args.warmup, reps=args.reps, device=args.device)
            graph = harness.graph_fields(paged, stats, warmup=args.warmup, reps=args.reps, device=args.device)
        flops = 4 * D * Hq * sum(n * c + n * (n + 1) // 2 for c, n in zip(cached, new))
        name = "public op, paged (reference on CPU)" if args.device.type == "cpu" else "triton_paged"
        rows.append({**_row(name, batch, lengths, args, stats, flops, ceiling, max_err), **graph,
                     "compile_ms": harness.compile_ms(first_ms, stats)})
    return rows


def _row(name, batch, lengths, args, stats, flops, ceiling, max_err) -> dict:
    tflops = flops / (stats.median_ms * 1e-3) / 1e12
    return {
        "op": "prefill_attention", "provider": name, "batch": batch, "B": len(lengths), "T": sum(lengths),
        "Hq": args.heads, "Hkv": args.kv_heads, "D": args.head_dim,
        "dtype": str(args.dtype).removeprefix("torch."), "backward": args.backward, **stats.as_dict(),
        "tflops": tflops, "pct_mm": None if ceiling is None else 100 * tflops / ceiling,
        "mm_tflops": ceiling, "max_abs_err": max_err,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(parser, warmup=5, reps=30)
    parser.add_argument("--batches", nargs="+", default=None,
                        choices=["16x1024", "4x4096", "64x256", "mixed", "uniform"],
                        help="packed batches (default 16x1024 4x4096 64x256 mixed; "
                             "mixed uniform with --smoke)")
    parser.add_argument("--heads", type=int, default=None, help="query heads (default 32; 4 with --smoke)")
    parser.add_argument("--kv-heads", type=int, default=None, help="KV heads (default 8; 2 with --smoke)")
    parser.add_argument("--head-dim", type=int, default=None, help="head dim (default 128; 64 with --smoke)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="dtype (default bfloat16 on CUDA, float32 with --smoke)")
    parser.add_argument("--backward", action="store_true", help="time forward + backward (training)")
    args = harness.resolve_common_args(parser.parse_args(argv))
    args.dtype = getattr(torch, args.dtype or ("float32" if args.smoke else "bfloat16"))
    args.heads = args.heads or (4 if args.smoke else 32)
    args.kv_heads = args.kv_heads or (2 if args.smoke else 8)
    args.head_dim = args.head_dim or (64 if args.smoke else 128)
    default_batches = ["mixed", "uniform"] if args.smoke else ["16x1024", "4x4096", "64x256", "mixed"]
    batches = args.batches or default_batches
    ceiling = matmul_tflops(args.device, args.dtype) if args.dtype != torch.float32 else None

    rows = []
    for batch in batches:
        if rows and harness.out_of_time(margin_s=10):
            break
        case = run_case(batch, args, ceiling)
        rows += case
        if args.save:  # batch by batch: a run cut short keeps what it measured
            harness.save_rows("prefill_attention", case, device=args.device)
    harness.print_table(rows, columns=["provider", "batch", "T", "Hq", "Hkv", "D", "dtype", "backward",
                                       "median_ms", "p20_ms", "p80_ms", "graph_median_ms", "compile_ms",
                                       "peak_mem_bytes", "tflops", "pct_mm", "max_abs_err"])


if __name__ == "__main__":
    main()
