"""Cascade (shared-prefix) decode attention over a paged KV cache: the split-KV partial kernel that runs
a work list (:mod:`.work_list`), the public op and the torch reference.

In a debate, P problems x N agents decode together; the N agents of a problem share its question and
transcript (the same physical KV blocks) and each owns a short suffix. Plain paged decode reads each
shared prefix N times a step; here a *group* of sequences sharing ``prefix_lens[g]`` tokens reads them
once: the group's queries (members x query heads of one KV head) are stacked as the rows of one tile,
each sequence's suffix ``[prefix_lens[g], seq_lens[b])`` is read separately, and the partial results
are merged by log-sum-exp in fp32 (see :mod:`merge_states`).

One kernel serves both levels, and plain split-KV decode too: it runs a **work list** (item i: a tile
of query rows of up to ``M`` member sequences, a block-table row, a token range; see
:mod:`.work_list`) and writes one partial ``(o, lse)`` per member and query head into its own slot of
a scratch buffer. Plain decode is the work list with one member per item and one item per (sequence,
KV split); cascade adds prefix items with many members. Launches per call: 2
(this kernel over the whole list, then the merge kernel). The merge is not fused into an epilogue
because a sequence's parts come from different programs (prefix tile, suffix splits) with no order
between them; fusing would need a grid-wide semaphore, while the separate merge reads only
``parts x Hq x (D + 1)`` fp32 numbers, a few percent of the KV bytes.

Log base: partial LSEs are base 2 (``lse2 = log2 sum 2^(x * log2 e)``, scores pre-multiplied by
``scale * log2(e)`` so the softmax uses ``exp2``); the merge converts to the natural log the public
functions return.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import decode_cost
from ._aot import KernelSpec
from ._common import DTYPES, HEAD_DIMS, LN_2, LOG2_E, TRITON_TYPE
from ._dispatch import interpreter_enabled, use_triton
from .merge_states import merge_partials
from .paged_kv import paged_slots_reference
from .work_list import ROWS, DecodePlan, WorkList, check_decode_inputs, check_out, check_plan

# Triton's CPU interpreter multiplies bf16 tiles in tl.dot as their raw uint16 bit patterns; under it
# _dot upcasts to fp32 first (exact: products of bf16/fp16 values are exact in fp32, and the GPU's MMA
# accumulates in fp32 too). Read once at import; the AOT compile runs without the interpreter.
_INTERPRETED = tl.constexpr(interpreter_enabled())


# ---------------------------------------------------------------------------------------------------
# Kernel: one program per (work item, KV head). Online softmax in base 2 (Milakov & Gimelshein 2018;
# FlashAttention, Dao et al. 2022): with x = q.k * scale * log2(e), after each tile of keys
#   m' = max(m, max_j x_j),  l' = l * 2^(m - m') + sum_j 2^(x_j - m'),
#   acc' = acc * 2^(m - m') + sum_j 2^(x_j - m') v_j,
# and at the end o = acc / l, lse2 = m + log2(l). Inside the loop every tile has at least one valid
# key, so m' is finite and 2^(m - m') is 0 on the first tile (m = -inf); padded rows (q = 0) score 0.
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b):
    """``a @ b`` accumulated in fp32. "tf32x3" only matters for fp32 caches (fp32-accurate on tensor
    cores, where plain tf32 keeps 10 mantissa bits); bf16/fp16 operands ignore it."""
    if _INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def _paged_partial_kernel(
    q_ptr,                 # [B, Hq, D] (batch/head strides given, unit last stride)
    k_ptr, v_ptr,          # [num_blocks * page, Hkv, D] contiguous
    tables_ptr,            # [R, W] int32 block tables
    item_table_ptr,        # [I] int32
    item_range_ptr,        # [I, 2] int32
    item_seq_ptr,          # [I, M] int32
    item_part_ptr,         # [I, M] int32
    part_o_ptr,            # [P, Hq, D] fp32
    part_lse_ptr,          # [P, Hq] fp32, base 2
    qk_scale,              # fp32: softmax scale * log2(e)
    gqa, members, page_bits, num_q_heads,
    stride_qb, stride_qh, stride_slot, stride_table,
    D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    item = tl.program_id(0)
    kv_head = tl.program_id(1)
    table_row = tl.load(item_table_ptr + item)
    kv_start = tl.load(item_range_ptr + 2 * item)
    kv_end = tl.load(item_range_ptr + 2 * item + 1)

    # Row r of the tile is query head kv_head * gqa + r % gqa of member r // gqa.
    r = tl.arange(0, ROWS)
    member = r // gqa
    in_tile = member < members
    seq = tl.load(item_seq_ptr + item * members + member, mask=in_tile, other=-1)    # [ROWS]
    part = tl.load(item_part_ptr + item * members + member, mask=in_tile, other=0)   # [ROWS]
    row_ok = seq >= 0
    seq = tl.where(row_ok, seq, 0)
    head = kv_head * gqa + r % gqa                                                   # [ROWS]
    d = tl.arange(0, D)
    q = tl.load(q_ptr + seq.to(tl.int64)[:, None] * stride_qb + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)                                     # [ROWS, D]

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    table = tables_ptr + table_row.to(tl.int64) * stride_table
    page_mask = (1 << page_bits) - 1
    for start in range(kv_start, kv_end, BLOCK_N):
        tok = start + tl.arange(0, BLOCK_N)                                          # [BLOCK_N]
        tok_ok = tok < kv_end
        # Lanes past kv_end never read the table (its entries there may be -1 or past the row): they
        # take block 0 and their K/V loads are masked. int64 slots: block << page_bits times
        # stride_slot passes 2**31 elements at 131072 blocks of 16 x 8 x 128.
        block = tl.load(table + (tok >> page_bits), mask=tok_ok, other=0)
        slot = (block.to(tl.int64) << page_bits) + (tok & page_mask)
        kv_offs = slot[:, None] * stride_slot + kv_head * D + d[None, :]             # [BLOCK_N, D]
        k = tl.load(k_ptr + kv_offs, mask=tok_ok[:, None], other=0.0)
        x = _dot(q, tl.trans(k)) * qk_scale                                          # [ROWS, BLOCK_N]
        x = tl.where(tok_ok[None, :], x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(x - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_offs, mask=tok_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v)    # p rounded to the cache dtype for the MMA
        m_i = m_new

    # An empty range leaves l = 0, m = -inf: write o = 0, lse = -inf (the merge gives it weight 0).
    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse2 = tl.where(nonempty, m_i + tl.log2(l_safe), float("-inf"))
    part64 = part.to(tl.int64)
    tl.store(part_o_ptr + (part64[:, None] * num_q_heads + head[:, None]) * D + d[None, :], o,
             mask=row_ok[:, None])
    tl.store(part_lse_ptr + part64 * num_q_heads + head, lse2, mask=row_ok)


def _block_n(head_dim: int, dtype: torch.dtype) -> int:
    """Keys per tile: 64, or fewer so a [BLOCK_N, D] tile of K (and of V) stays <= 16 KiB."""
    return min(64, 16384 // (head_dim * dtype.itemsize))


def attend_work_list(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, work: WorkList, *, scale: float, out: torch.Tensor,
                     lse_out: torch.Tensor, part_o: torch.Tensor, part_lse: torch.Tensor) -> None:
    """Launch the partial kernel over ``work`` then merge each sequence's parts into ``out [B, Hq, D]``
    and ``lse_out [B, Hq]`` (fp32, natural log). ``part_o [>= P, Hq, D]`` / ``part_lse [>= P, Hq]`` fp32
    are scratch. Two launches, no host sync (every size here is tensor metadata)."""
    _, Hq, Hkv, D, block_size = check_decode_inputs(q, k_cache, v_cache)
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS}, got {D}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32 or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be a row-major [rows, max_blocks] int32 tensor, got "
                         f"{tuple(block_tables.shape)} {block_tables.dtype}")
    # The partial kernel writes the scratch before the merge launcher checks it: check it here.
    if (part_o.shape[0] < work.num_parts or part_o.shape[1:] != (Hq, D) or part_o.dtype != torch.float32
            or not part_o.is_contiguous()):
        raise ValueError(f"part_o {tuple(part_o.shape)} {part_o.dtype} must be a contiguous "
                         f"[>= {work.num_parts}, {Hq}, {D}] float32 tensor")
    if part_lse.shape != part_o.shape[:2] or part_lse.dtype != torch.float32 or not part_lse.is_contiguous():
        raise ValueError(f"part_lse {tuple(part_lse.shape)} {part_lse.dtype} must be a contiguous "
                         f"[{part_o.shape[0]}, {Hq}] float32 tensor")
    for name, t in (("block_tables", block_tables), ("work list", work.table_row), ("part_o", part_o),
                    ("part_lse", part_lse)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if q.stride(-1) != 1:
        q = q.contiguous()  # the kernel addresses head dims with unit stride
    gqa = Hq // Hkv
    members = work.seq.shape[1]
    if work.rows < members * gqa:
        raise ValueError(f"work list tiles hold {work.rows} rows, need {members} x {gqa}")
    if work.num_items > 0:
        _paged_partial_kernel[(work.num_items, Hkv)](
            q, k_cache, v_cache, block_tables,
            work.table_row, work.kv_range, work.seq, work.part, part_o, part_lse,
            float(scale) * LOG2_E, gqa, members, block_size.bit_length() - 1, Hq,
            q.stride(0), q.stride(1), Hkv * D, block_tables.stride(0),
            D=D, ROWS=work.rows, BLOCK_N=_block_n(D, q.dtype), num_warps=4, num_stages=2,
        )
    merge_partials(part_o, part_lse, work.part_ptr, out, lse_out, lse_in_scale=1.0, lse_out_scale=LN_2)


# ---------------------------------------------------------------------------------------------------
# Public op and torch reference.
# ---------------------------------------------------------------------------------------------------
def cascade_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             plan: DecodePlan, *, scale: float | None = None,
                             out: torch.Tensor | None = None, return_lse: bool = False):
    """Shared-prefix decode attention for one layer, on a plan from ``plan_decode(..., group_ids=...,
    prefix_lens=...)``.

    ``q [B, Hq, D]`` (fp32/bf16/fp16), ``k_cache``/``v_cache [num_blocks, block_size, Hkv, D]`` in
    ``q``'s dtype. Group g's members share tokens ``[0, prefix_lens[g])``, read through the table row
    of its first member; each sequence b reads ``[prefix_lens[g], seq_lens[b])`` through its own row.
    Returns ``out [B, Hq, D]`` in ``q.dtype`` (written into ``out`` if given), and with
    ``return_lse`` also ``lse [B, Hq]`` float32 (natural log). Two kernel launches, no host sync.

    Example::

        plan = plan_decode(tables, lens, group_ids=[0, 0, 0, 1], prefix_lens=[300, 40], block_size=16,
                           num_kv_heads=2, num_q_heads=12, head_dim=128, device="cuda")
        o = cascade_decode_attention(q, k_cache, v_cache, plan)    # [4, 12, 128]
    """
    if plan.cascade is None:
        raise ValueError("the plan has no prefix groups: pass group_ids and prefix_lens to plan_decode")
    check_plan(plan, q, k_cache, v_cache)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = check_out(out, q)
    if use_triton(q, k_cache, v_cache):
        lse = torch.empty_like(plan.lse) if return_lse else plan.lse
        attend_work_list(q, k_cache, v_cache, plan.block_tables, plan.cascade, scale=scale, out=out,
                         lse_out=lse, part_o=plan.part_o, part_lse=plan.part_lse)
    else:
        ref, lse = cascade_decode_attention_reference(
            q, k_cache, v_cache, plan.block_tables, plan.seq_lens, plan.group_ids, plan.prefix_lens,
            scale=scale, return_lse=True)
        out.copy_(ref)
    return (out, lse) if return_lse else out


def cascade_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                       block_tables: torch.Tensor, seq_lens, group_ids, prefix_lens,
                                       scale: float | None = None, return_lse: bool = False):
    """Torch reference: keys of sequence b are its group's prefix ``[0, prefix_lens[g])`` gathered
    through the group's first member's table row, then its own tokens ``[prefix_lens[g], seq_lens[b])``
    through its own row; fp32 softmax. ``seq_lens``, ``group_ids`` (``[B]``) and ``prefix_lens``
    (``[G]``) are lists or CPU tensors. ``q [B, Hq, D]`` → ``out [B, Hq, D]`` in ``q.dtype`` (and ``lse
    [B, Hq]`` fp32, natural log). A sequence with no keys gets ``o = 0``, ``lse = -inf``.

    Cascade attention is plain attention over each sequence's whole KV, so this is
    :func:`attend_paged_reference` with the prefix tokens read through the first member's row."""
    # Host lists (a reference: CPU tensors cost nothing here; CUDA ones would be one sync a call).
    lens, groups, prefixes = (torch.as_tensor(x).tolist() for x in (seq_lens, group_ids, prefix_lens))
    B, _, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    device = block_tables.device
    gid = torch.tensor(groups, dtype=torch.long, device=device).reshape(B)            # [B]
    seq = torch.arange(B, device=device)                                              # [B]
    first = torch.full((len(prefixes),), B, dtype=torch.long, device=device)          # [G]
    first.scatter_reduce_(0, gid, seq, reduce="amin")                                 # group's first member
    prefix = torch.minimum(torch.tensor(prefixes, dtype=torch.long, device=device)[gid],
                           torch.tensor(lens, dtype=torch.long, device=device).reshape(B))  # [B]
    out, lse = attend_paged_reference(q, k_cache, v_cache, block_tables, lens, scale,
                                      prefix_rows=first[gid], prefix_lens=prefix)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------------
# The batched torch attention both decode references share (the CPU decode path of the engine).
# ---------------------------------------------------------------------------------------------------
def attend_paged_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: list[int], scale: float, *,
                           prefix_rows: torch.Tensor | None = None, prefix_lens: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per sequence attending to its paged keys, in batched torch (no kernel).

    ``q [B, Hq, D]``; ``k_cache``/``v_cache [num_blocks, block_size, Hkv, D]``; ``block_tables [B, W]``
    int32; ``seq_lens``: B host ints, each at most ``W x block_size``. With ``prefix_rows [B]`` (int64,
    rows of ``block_tables``) and ``prefix_lens [B]``, sequence b's tokens ``j < prefix_lens[b]`` are
    read through row ``prefix_rows[b]`` (a group's shared prefix). Returns float32 ``out [B, Hq, D]``
    and ``lse [B, Hq]`` (natural log); a sequence with no tokens gets 0 and -inf.

    Sequences go longest first in chunks whose gathered fp32 K and V stay within
    ``decode_cost.REFERENCE_GATHER_BYTES`` (read at each call), each padded to its longest sequence; a chunk is one pass of gathers and
    batched matmuls (no per-sequence work).
    """
    B, Hq, D = q.shape
    Hkv, block_size = k_cache.shape[2], k_cache.shape[1]
    device = block_tables.device
    out = torch.zeros(B, Hq, D, dtype=torch.float32, device=q.device)
    lse = torch.full((B, Hq), float("-inf"), dtype=torch.float32, device=q.device)
    # Longest first, so each chunk is padded to its first sequence's length and holds sequences of
    # similar lengths; the chunk boundaries are host arithmetic, one step a chunk.
    order = sorted(range(B), key=seq_lens.__getitem__, reverse=True)
    lens = [seq_lens[b] for b in order]
    order_t = torch.tensor(order, dtype=torch.long, device=device)                  # [B]
    lens_t = torch.tensor(lens, dtype=torch.long, device=device)                    # [B], sorted
    live = sum(n > 0 for n in lens)        # sequences with no tokens (last) keep out = 0, lse = -inf
    per_token = Hkv * D * 4 * 2                                                     # fp32 K and V
    start = 0
    while start < live:
        length = lens[start]
        end = min(live, start + max(1, decode_cost.REFERENCE_GATHER_BYTES // (length * per_token)))
        rows = order_t[start:end]                                                   # [n]
        slots, valid = paged_slots_reference(
            block_tables[rows], lens_t[start:end], length, block_size,
            prefix_tables=None if prefix_rows is None else block_tables[prefix_rows[rows]],
            prefix_lens=None if prefix_lens is None else prefix_lens[rows])        # [n, L] each
        out[rows], lse[rows] = _attend_slots(q[rows], k_cache, v_cache, slots, valid, scale)
        start = end
    return out, lse


def _attend_slots(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                  valid: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [n, Hq, D]`` over the keys at ``slots [n, L]`` where ``valid [n, L]`` → fp32 ``(out [n, Hq, D],
    lse [n, Hq])``. Every sequence has at least one valid key (the caller leaves empty ones out).

    GQA without copying K/V per query head: q is viewed as ``[n, Hkv, G, D]`` and, per KV head, the G
    query heads that read it are the rows of one batched matmul against that head's keys, gathered into
    a contiguous ``[n, L, D]`` (a loop over the few KV heads, not over sequences). Softmax in fp32,
    natural log: with ``s = q.k * scale`` (-inf on padding), ``lse = log sum_j exp(s_j)`` (finite: one
    key is valid) and ``p_j = exp(s_j - lse)``, 0 on padding, so ``out = sum_j p_j v_j``.
    """
    n, length = slots.shape
    _, _, Hkv, D = k_cache.shape
    gqa = q.shape[1] // Hkv
    qh = q.float().reshape(n, Hkv, gqa, D)                          # [n, Hkv, G, D]
    k_rows = k_cache.view(-1, Hkv, D)                               # [num_slots, Hkv, D]
    v_rows = v_cache.view(-1, Hkv, D)
    flat = slots.reshape(-1)                                        # [n * L]
    scores = torch.empty(Hkv, n, gqa, length, dtype=torch.float32, device=q.device)   # [Hkv, n, G, L]
    for h in range(Hkv):
        k = torch.index_select(k_rows[:, h], 0, flat).view(n, length, D).float()      # [n, L, D]
        torch.bmm(qh[:, h], k.transpose(1, 2), out=scores[h])
    scores.mul_(scale).masked_fill_(~valid[None, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                           # [Hkv, n, G]
    p = torch.exp(scores.sub_(lse[..., None]))                                     # [Hkv, n, G, L]
    out = torch.empty(Hkv, n, gqa, D, dtype=torch.float32, device=q.device)         # [Hkv, n, G, D]
    for h in range(Hkv):
        v = torch.index_select(v_rows[:, h], 0, flat).view(n, length, D).float()      # [n, L, D]
        torch.bmm(p[h], v, out=out[h])
    out = out.transpose(0, 1).reshape(n, Hkv * gqa, D)                              # [n, Hq, D]
    return out, lse.transpose(0, 1).reshape(n, Hkv * gqa)


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time configurations: head dims x dtypes x tile heights (BLOCK_N follows from D and dtype).
# ---------------------------------------------------------------------------------------------------
def aot_specs() -> list[KernelSpec]:
    specs = []
    for dtype in DTYPES:
        t = TRITON_TYPE[dtype]
        for D in HEAD_DIMS:
            for rows in ROWS:
                specs.append(KernelSpec(
                    name=f"paged_partial_{t}_d{D}_rows{rows}",
                    fn=_paged_partial_kernel,
                    signature={
                        "q_ptr": f"*{t}", "k_ptr": f"*{t}", "v_ptr": f"*{t}", "tables_ptr": "*i32",
                        "item_table_ptr": "*i32", "item_range_ptr": "*i32", "item_seq_ptr": "*i32",
                        "item_part_ptr": "*i32", "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32",
                        "qk_scale": "fp32", "gqa": "i32", "members": "i32", "page_bits": "i32",
                        "num_q_heads": "i32", "stride_qb": "i32", "stride_qh": "i32",
                        "stride_slot": "i32", "stride_table": "i32",
                        "D": "constexpr", "ROWS": "constexpr", "BLOCK_N": "constexpr",
                    },
                    constexprs={"D": D, "ROWS": rows, "BLOCK_N": _block_n(D, dtype)},
                    num_warps=4, num_stages=2,
                    aligned=("q_ptr", "k_ptr", "v_ptr", "tables_ptr", "item_table_ptr", "item_range_ptr",
                             "item_seq_ptr", "item_part_ptr", "part_o_ptr", "part_lse_ptr",
                             "stride_qb", "stride_qh", "stride_slot"),
                ))
    return specs
