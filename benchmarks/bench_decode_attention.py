"""Decode attention over a debate's prefix forest: cascade vs plain paged decode vs torch SDPA (and
flash-attn's ``flash_attn_with_kvcache`` when installed).

P problems x N agents decode one token each. A problem's prefix (question + transcript) is stored
once in shared paged blocks; each agent owns a suffix. Every method is timed on the same queries and
KV, and credited only with the bytes it *must* read:

* cascade: the unique K/V bytes, ``(P * prefix + P * N * suffix) * 2 * Hkv * D * 2``;
* plain paged decode, SDPA, flash-attn: every sequence's K/V, ``P * N * (prefix + suffix) * ...``.

Achieved GB/s is printed next to the device's measured copy bandwidth (the roofline), with the
method the plan's cost model picks. Targets on H100/H200: cascade >= 80% of copy bandwidth at
prefix >= 2048, and >= 3x faster than plain decode at 32 x 5 x 2048.

    python -m benchmarks.bench_decode_attention            # full grid on CUDA (results appended)
    python -m benchmarks.bench_decode_attention --smoke    # tiny shapes; the default without CUDA

SDPA and flash-attn read a dense padded copy of the caches ``[B, Hkv, L, D]``; grid points whose copy
would exceed ``--max-dense-gb`` skip them.

Each method is timed eager (``median_ms``) and replayed from a CUDA graph (``graph_median_ms``, as the
engine decodes; ``launch_overhead_ms`` the difference), with the L2 flushed before every rep; the
speedups and GB/s use the graph time where there is one. The first call of each method, on the point's
own shapes, is timed apart (``compile_ms``). Records are appended point by point.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

from arkfast.kernels.cascade_attention import cascade_decode_attention
from arkfast.kernels.decode_attention import paged_decode_attention, plan_decode

try:
    from benchmarks import harness
except ImportError:  # run as a script: python benchmarks/bench_decode_attention.py
    import harness

GRID_PN = [(8, 5), (32, 5), (64, 8)]
GRID_PREFIX = [512, 2048, 8192]
GRID_SUFFIX = [64, 512]
GRID_HEADS = [(12, 2, 128), (32, 8, 128)]   # Hq, Hkv, D
# python -m benchmarks: 3 x 3 points at suffix 64 with 32/8 heads (the 32 x 5 x 2048 target among them).
SUITE = {"gpu": {"budget_s": 55, "args": ["--suffix", "64", "--heads", "32/8/128"]},
         "smoke": {"budget_s": 30}}
# python -m benchmarks.report: how its records are read (see benchmarks/report.py).
REPORT = {"key": ["P", "N", "prefix", "suffix", "heads", "D"], "provider": "method", "metric": "timed_ms",
          "baseline": "plain", "headline": "cascade", "ceiling": "pct_of_copy",
          "extra": ["median_ms", "graph_median_ms", "picked_by_plan"]}


def build_forest(P: int, N: int, prefix: int, suffix: int, Hkv: int, D: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Paged caches for P groups of N sequences: the prefix's full blocks shared, a partial last prefix
    block copied per agent (copy on write), suffix blocks owned. Returns ``k_cache, v_cache,
    block_tables [P*N, W] int32 (host), seq_lens (host list), group_ids, prefix_lens``."""
    full = prefix // block_size
    own = -(-(prefix + suffix - full * block_size) // block_size)
    num_blocks = P * full + P * N * own
    gen = torch.Generator(device=device).manual_seed(seed)
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=gen, device=device, dtype=dtype)
    tables, next_block = [], 0
    for _ in range(P):
        shared = list(range(next_block, next_block + full))
        next_block += full
        for _ in range(N):
            tables.append(shared + list(range(next_block, next_block + own)))
            next_block += own
    if prefix % block_size:  # agents' copies of the partial block hold the same prefix tokens
        for g in range(P):
            first = tables[g * N][full]
            for row in tables[g * N + 1:(g + 1) * N]:
                k_cache[row[full], : prefix % block_size] = k_cache[first, : prefix % block_size]
                v_cache[row[full], : prefix % block_size] = v_cache[first, : prefix % block_size]
    block_tables = torch.tensor(tables, dtype=torch.int32)
    seq_lens = [prefix + suffix] * (P * N)
    group_ids = [b // N for b in range(P * N)]
    return k_cache, v_cache, block_tables, seq_lens, group_ids, [prefix] * P


def dense_copy(cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, Hkv, length, D]`` contiguous copy of every sequence's first ``length`` tokens (all
    sequences here have the same length, so there is no padding to mask)."""
    blocks = block_tables.to(cache.device).long()                         # [B, W]
    B, W = blocks.shape
    dense = cache[blocks].reshape(B, W * cache.shape[1], cache.shape[2], cache.shape[3])[:, :length]
    return dense.transpose(1, 2).contiguous()


def run_point(P, N, prefix, suffix, Hq, Hkv, D, *, args, copy_gbps, dtype, block_size):
    device = args.device
    k_cache, v_cache, tables, seq_lens, group_ids, prefix_lens = build_forest(
        P, N, prefix, suffix, Hkv, D, block_size, dtype, device)
    B = P * N
    q = torch.randn(B, Hq, D, device=device, dtype=dtype)
    plan_kwargs = {"group_ids": group_ids, "prefix_lens": prefix_lens, "block_size": block_size,
                   "num_kv_heads": Hkv, "num_q_heads": Hq, "head_dim": D, "dtype": dtype, "device": device}
    plan = plan_decode(tables, seq_lens, **plan_kwargs)
    plan_stats = harness.measure(lambda: plan_decode(tables, seq_lens, **plan_kwargs),
                                 warmup=1, reps=max(3, args.reps // 10), device="cpu")
    token_bytes = 2 * Hkv * D * dtype.itemsize
    unique_bytes = (P * prefix + B * suffix) * token_bytes
    all_bytes = B * (prefix + suffix) * token_bytes
    out = torch.empty_like(q)
    methods = {
        "cascade": (lambda: cascade_decode_attention(q, k_cache, v_cache, plan, out=out), unique_bytes),
        "plain": (lambda: paged_decode_attention(q, k_cache, v_cache, plan=plan, out=out), all_bytes),
    }
    reference = paged_decode_attention(q, k_cache, v_cache, plan=plan).float()
    if all_bytes / 1e9 <= args.max_dense_gb:  # the dense copy holds exactly all_bytes
        k_dense = dense_copy(k_cache, tables, prefix + suffix)           # [B, Hkv, L, D]
        v_dense = dense_copy(v_cache, tables, prefix + suffix)
        q4 = q[:, :, None, :]                                             # [B, Hq, 1, D]
        methods["sdpa"] = (lambda: F.scaled_dot_product_attention(q4, k_dense, v_dense, enable_gqa=True),
                           all_bytes)
        try:
            from flash_attn import flash_attn_with_kvcache
        except ImportError:
            flash_attn_with_kvcache = None
        if flash_attn_with_kvcache is not None and device.type == "cuda":
            k_fa = k_dense.transpose(1, 2).contiguous()                   # [B, L, Hkv, D]
            v_fa = v_dense.transpose(1, 2).contiguous()
            lens_fa = torch.tensor(seq_lens, dtype=torch.int32, device=device)
            methods["flash_attn"] = (
                lambda: flash_attn_with_kvcache(q[:, None], k_fa, v_fa, cache_seqlens=lens_fa), all_bytes)
    rows, times = [], {}
    for name, (fn, must_read) in methods.items():
        got, first_ms = harness.first_call(fn, device)
        err = (got.float().reshape(B, Hq, D) - reference).abs().max().item()
        stats = harness.measure(fn, warmup=args.warmup, reps=args.reps, device=device)
        graph = harness.graph_fields(fn, stats, warmup=args.warmup, reps=args.reps, device=device) \
            if args.graph else {}
        best_ms = graph.get("graph_median_ms") or stats.median_ms  # what the engine's graphed step sees
        times[name] = best_ms
        gbps = must_read / (best_ms * 1e-3) / 1e9
        rows.append({
            "P": P, "N": N, "prefix": prefix, "suffix": suffix, "heads": f"{Hq}/{Hkv}", "D": D,
            "method": name, "cuda_graph": bool(graph.get("graph_median_ms")), **stats.as_dict(), **graph,
            "compile_ms": harness.compile_ms(first_ms, stats), "timed_ms": best_ms,
            "must_read_bytes": must_read, "gbps": gbps,
            "pct_of_copy": 100 * gbps / copy_gbps, "max_err_vs_plain": err,
            "picked_by_plan": ((name == "cascade") == plan.use_cascade
                               if name in ("cascade", "plain") else None),
            "plan_ms": plan_stats.median_ms,
            "est_bytes_plain": plan.estimated_bytes["plain"],
            "est_bytes_cascade": plan.estimated_bytes["cascade"],
        })
    for row in rows:
        row["speedup_vs_plain"] = times["plain"] / row["timed_ms"]
    return rows


def _ints(text: str, sep: str, flag: str, count: int) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(sep))
    except ValueError:
        values = ()
    if len(values) != count or min(values) <= 0:
        raise SystemExit(f"{flag}: expected {count} positive ints separated by {sep!r}, got {text!r}")
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(parser, warmup=10, reps=50)
    parser.add_argument("--max-dense-gb", type=float, default=24.0,
                        help="skip SDPA/flash-attn where their dense K+V copy exceeds this many GB")
    parser.add_argument("--block-size", type=int, default=16, help="paged KV block size (tokens)")
    parser.add_argument("--no-graph", dest="graph", action="store_false",
                        help="time eager calls only, no CUDA-graph replays (graphs are CUDA only)")
    parser.add_argument("--pn", nargs="+", default=None, metavar="PxN",
                        help="problems x agents points (default " + " ".join(f"{p}x{n}" for p, n in GRID_PN) + ")")
    parser.add_argument("--prefix", type=int, nargs="+", default=None,
                        help=f"shared prefix lengths (default {' '.join(map(str, GRID_PREFIX))})")
    parser.add_argument("--suffix", type=int, nargs="+", default=None,
                        help=f"per-agent suffix lengths (default {' '.join(map(str, GRID_SUFFIX))})")
    parser.add_argument("--heads", nargs="+", default=None, metavar="HQ/HKV/D",
                        help="head layouts (default " + " ".join("/".join(map(str, h)) for h in GRID_HEADS) + ")")
    args = harness.resolve_common_args(parser.parse_args(argv))
    args.graph = args.graph and args.device.type == "cuda"
    dtype = torch.bfloat16
    if args.smoke:  # tiny shapes; on CPU every op runs its torch reference
        grid = [(2, 3, 40, 8, 4, 2, 64)]
        dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    else:
        pn = [_ints(x, "x", "--pn", 2) for x in args.pn] if args.pn else GRID_PN
        heads = [_ints(x, "/", "--heads", 3) for x in args.heads] if args.heads else GRID_HEADS
        grid = [(P, N, prefix, suffix, Hq, Hkv, D) for (P, N), prefix, suffix, (Hq, Hkv, D)
                in itertools.product(pn, args.prefix or GRID_PREFIX, args.suffix or GRID_SUFFIX, heads)]
    copy_gbps = harness.copy_bandwidth_gbps(args.device)
    print(f"device {args.device}: measured copy bandwidth {copy_gbps:.1f} GB/s", file=sys.stderr)
    columns = ["P", "N", "prefix", "suffix", "heads", "method", "median_ms", "graph_median_ms", "compile_ms", "gbps",
               "pct_of_copy", "speedup_vs_plain", "picked_by_plan", "max_err_vs_plain", "plan_ms"]
    all_rows = []
    for point in grid:
        if all_rows and harness.out_of_time(margin_s=15):
            break
        rows = run_point(*point, args=args, copy_gbps=copy_gbps, dtype=dtype, block_size=args.block_size)
        all_rows += rows
        if args.save:
            for row in rows:
                harness.append_result("decode_attention", {**row, "copy_gbps": copy_gbps,
                                                           "dtype": str(dtype)}, device=args.device)
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    harness.print_table(all_rows, columns)
    if args.smoke:
        worst = max(r["max_err_vs_plain"] for r in all_rows)
        if worst > 1e-3:
            print(f"smoke: methods disagree (max error {worst:.3e})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
