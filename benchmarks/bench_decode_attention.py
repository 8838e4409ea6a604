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


def cuda_graphed(fn):
    """``fn`` captured in a CUDA graph; returns its replay. Decode runs under CUDA graphs in the engine,
    and without one a ~20 us kernel is timed mostly by Python launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


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
        got = fn().float().reshape(B, Hq, D)
        err = (got - reference).abs().max().item()
        timed = cuda_graphed(fn) if args.graph else fn
        stats = harness.measure(timed, warmup=args.warmup, reps=args.reps, device=device)
        times[name] = stats.median_ms
        gbps = must_read / (stats.median_ms * 1e-3) / 1e9
        rows.append({
            "P": P, "N": N, "prefix": prefix, "suffix": suffix, "heads": f"{Hq}/{Hkv}", "D": D,
            "method": name, "cuda_graph": args.graph, **stats.as_dict(),
            "must_read_bytes": must_read, "gbps": gbps,
            "pct_of_copy": 100 * gbps / copy_gbps, "max_err_vs_plain": err,
            "picked_by_plan": ((name == "cascade") == plan.use_cascade
                               if name in ("cascade", "plain") else None),
            "plan_ms": plan_stats.median_ms,
            "est_bytes_plain": plan.estimated_bytes["plain"],
            "est_bytes_cascade": plan.estimated_bytes["cascade"],
        })
    for row in rows:
        row["speedup_vs_plain"] = times["plain"] / row["median_ms"]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(parser, warmup=10, reps=50)
    parser.add_argument("--max-dense-gb", type=float, default=24.0,
                        help="skip SDPA/flash-attn where their dense K+V copy exceeds this many GB")
    parser.add_argument("--block-size", type=int, default=16, help="paged KV block size (tokens)")
    parser.add_argument("--no-graph", dest="graph", action="store_false",
                        help="time plain calls instead of CUDA-graph replays (graphs are CUDA only)")
    args = harness.resolve_common_args(parser.parse_args(argv))
    args.graph = args.graph and args.device.type == "cuda"
    dtype = torch.bfloat16
    if args.smoke:  # tiny shapes; on CPU every op runs its torch reference
        grid = [(2, 3, 40, 8, 4, 2, 64)]
        dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    else:
        grid = [(P, N, prefix, suffix, Hq, Hkv, D) for (P, N), prefix, suffix, (Hq, Hkv, D)
                in itertools.product(GRID_PN, GRID_PREFIX, GRID_SUFFIX, GRID_HEADS)]
    copy_gbps = harness.copy_bandwidth_gbps(args.device)
    print(f"device {args.device}: measured copy bandwidth {copy_gbps:.1f} GB/s", file=sys.stderr)
    columns = ["P", "N", "prefix", "suffix", "heads", "method", "median_ms", "p20_ms", "p80_ms", "gbps",
               "pct_of_copy", "speedup_vs_plain", "picked_by_plan", "max_err_vs_plain", "plan_ms"]
    all_rows = []
    for point in grid:
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
