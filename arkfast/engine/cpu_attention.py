"""Decode attention on the CPU in C++ (``arkfast._C``): the paged cache read in place, each shared
prefix once per group.

:func:`plan_cpu_paged_decode` turns one step's block tables, lengths and prefix groups into the flat
int32 arrays the C++ op reads (once per step); :func:`paged_decode_attention_cpu` runs one layer on
that plan. Per group and KV head, the members' query rows (up to 16 at a time, one a vector lane) meet
the group's prefix key by key, so a prefix key or value is loaded once for all of them (a debate
group, 5 agents x a few query heads, is one such pass); then each member continues over its own tokens
with the same online-softmax state, so the prefix and the suffix need no log-sum-exp merge. Nothing is
gathered: keys and values are read where the cache holds them.
Float32 and float64 caches (float64 accumulates in float64, so a test can check the maths to float64
accuracy); other dtypes take :func:`arkfast.kernels.cpu_decode_attention`.

The reference is :func:`arkfast.kernels.cascade_decode_attention_reference` (prefix through the first
member's row, then the suffix, merged), and :func:`arkfast.kernels.paged_decode_attention_reference`
without groups.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from arkfast import _C

DTYPES = (torch.float32, torch.float64)
HEAD_DIMS = (16, 32, 64, 128, 256)  # the head dims the kernel is compiled for


@dataclass
class CpuPagedPlan:
    """One decode step's plan for :func:`paged_decode_attention_cpu` (host arrays, int32, contiguous).

    ``block_tables [B, W]``, ``seq_lens [B]``; the groups as CSR: group g's members are
    ``members[offsets[g]:offsets[g + 1]]`` and share tokens ``[0, prefix_lens[g])``, read through the
    first member's table row. ``num_prefix_groups``: groups of two or more with a non-empty prefix."""

    block_tables: np.ndarray
    seq_lens: np.ndarray
    offsets: np.ndarray
    members: np.ndarray
    prefix_lens: np.ndarray
    num_prefix_groups: int

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)


def plan_cpu_paged_decode(block_tables, seq_lens, *, block_size: int, group_ids=None,
                          prefix_lens=None) -> CpuPagedPlan:
    """Plan one decode step (host side, once per step; every layer reuses it).

    ``block_tables [B, W]`` (int tensor, array or list of equal-length lists; entries past a
    sequence's last block are never read), ``seq_lens [B]`` (each ``<= W x block_size``). ``group_ids
    [B]`` (ints in ``[0, G)``) and ``prefix_lens [G]``: group g's members share tokens ``[0,
    prefix_lens[g])`` (at most every member's length), read through its first member's table row
    (members in batch order). Without groups every sequence reads its own tokens.
    """
    tables = np.ascontiguousarray(torch.as_tensor(block_tables).numpy(), dtype=np.int32)
    lens = np.ascontiguousarray(np.asarray(seq_lens), dtype=np.int32)
    B = len(lens)
    if tables.ndim != 2 or tables.shape[0] != B:
        raise ValueError(f"block_tables must be [B={B}, max_blocks], got {tuple(tables.shape)}")
    capacity = tables.shape[1] * block_size
    bad = np.flatnonzero((lens < 0) | (lens > capacity))
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"seq_lens[{b}] = {int(lens[b])} is outside [0, {capacity}] (block table width x block_size)")
    if (group_ids is None) != (prefix_lens is None):
        raise ValueError("group_ids and prefix_lens go together: pass both or neither")
    if group_ids is None:
        offsets, members = np.arange(B + 1, dtype=np.int32), np.arange(B, dtype=np.int32)
        return CpuPagedPlan(tables, lens, offsets, members, np.zeros(B, dtype=np.int32), 0)
    gid = np.asarray(group_ids, dtype=np.int64)
    prefix = np.ascontiguousarray(np.asarray(prefix_lens), dtype=np.int32)
    G = len(prefix)
    if gid.shape != (B,):
        raise ValueError(f"group_ids has {gid.size} entries for {B} sequences")
    bad = np.flatnonzero((gid < 0) | (gid >= G))
    if bad.size:
        raise ValueError(f"group id {int(gid[bad[0]])} (sequence {int(bad[0])}) is outside [0, {G})")
    bad = np.flatnonzero((prefix[gid] < 0) | (prefix[gid] > lens))
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"prefix_lens[{int(gid[b])}] = {int(prefix[gid[b]])} must be in [0, seq_lens[b]] for every "
                         f"member b of its group (sequence {b} has {int(lens[b])})")
    members = np.argsort(gid, kind="stable").astype(np.int32)             # [B] grouped, batch order within
    counts = np.bincount(gid, minlength=G)                                 # [G]
    offsets = np.zeros(G + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    shared = int(np.count_nonzero((counts > 1) & (prefix > 0)))
    return CpuPagedPlan(tables, lens, offsets, members, prefix, shared)


def best_cpu_level() -> int:
    """The x86-64 ISA level the C++ kernel runs on this CPU by default: 4 (AVX-512), 3 (AVX2 + FMA) or 1
    (the baseline, and any CPU that is not x86-64). Every lower level runs too (``level=``)."""
    return _C.best_cpu_level()


def supported(q: torch.Tensor) -> bool:
    """Whether :func:`paged_decode_attention_cpu` takes ``q [B, Hq, D]`` (CPU, float32/float64, D in
    :data:`HEAD_DIMS`)."""
    return q.device.type == "cpu" and q.dtype in DTYPES and q.shape[-1] in HEAD_DIMS


def paged_decode_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: CpuPagedPlan,
                               *, scale: float | None = None, out: torch.Tensor | None = None,
                               return_lse: bool = False, level: int = 0):
    """One layer's decode attention by ``plan``.

    ``q [B, Hq, D]`` (any strides), ``k_cache``/``v_cache [num_blocks, block_size, Hkv, D]``
    contiguous, all float32 or all float64, on the CPU. Returns ``out [B, Hq, D]`` in ``q.dtype``
    (written into ``out`` if given, which must be contiguous), and with ``return_lse`` also ``lse [B,
    Hq]`` (natural log; -inf and ``o = 0`` for a sequence with no keys). ``level``: the x86-64 ISA
    level to run (1, 3 or 4, at most :func:`best_cpu_level`); 0, the default, is the best.
    """
    if not supported(q):
        raise TypeError(f"q must be a CPU float32/float64 tensor with a head dim in {HEAD_DIMS}, got {q.dtype} "
                        f"on {q.device}, head dim {q.shape[-1]}")
    B, Hq, D = q.shape
    if B != plan.batch_size:
        raise ValueError(f"q has {B} sequences, the plan was built for {plan.batch_size}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or cache.shape[3] != D or cache.dtype != q.dtype or not cache.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [num_blocks, block_size, Hkv, D={D}] {q.dtype} tensor, "
                             f"got {tuple(cache.shape)} {cache.dtype}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if Hq % k_cache.shape[2]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({k_cache.shape[2]})")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(q.shape)} {q.dtype} tensor, got {tuple(out.shape)} "
                         f"{out.dtype}")
    lse = torch.empty(B, Hq, dtype=q.dtype) if return_lse else None
    _C.decode_attention_cpu(q.contiguous().numpy(), k_cache.numpy(), v_cache.numpy(), plan.block_tables,
                            plan.seq_lens, plan.offsets, plan.members, plan.prefix_lens,
                            D ** -0.5 if scale is None else float(scale), out.numpy(),
                            None if lse is None else lse.numpy(), level)
    return (out, lse) if return_lse else out
