"""Paged decode attention (split-KV flash-decoding), the per-step decode plan with its cost model, and
:func:`decode_attention`, which runs plain or cascade decode as the plan chose.

Plan once, run per layer (FlashInfer's split): the scheduler's host-side ``block_tables`` and
``seq_lens`` (and, for a debate, which sequences share which prefix) go to :func:`plan_decode` once
per step. It cuts every sequence (or shared prefix) into KV splits, lays them out as the work list
the kernel in :mod:`cascade_attention` runs, uploads all index tensors in one copy, allocates the fp32
scratch for partial results, and decides by a byte count whether cascade pays off. Each layer then
calls ``decode_attention(q, k_cache, v_cache, plan)``: two launches (partials, merge), no host sync.

Split-KV: a program handles one (work item, KV head); all ``Hq / Hkv`` query heads of that KV head are
the rows of its tile, so a key is loaded once for all the heads that read it. Partial ``(o, lse)`` per
split are merged by log-sum-exp (:mod:`merge_states`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._dispatch import use_triton
from .cascade_attention import (
    MAX_ROWS,
    WorkList,
    attend_paged_reference,
    attend_work_list,
    build_work_list,
    cascade_decode_attention,
    check_decode_inputs,
    check_out,
    check_plan,
    tile_rows,
)

PARTIAL_BUDGET = 0.05  # a split's partials (written, then read by the merge) <= 5% of its K/V bytes
CHUNK_ALIGN = 64       # split sizes are multiples of the kernel's key tile
WAVES = 2              # programs per SM the splits aim for (a second resident program hides latency)
DEFAULT_NUM_SMS = 132  # H100 SXM, used when planning for a non-CUDA device


@dataclass(repr=False)
class DecodePlan:
    """Everything one decode step's attention needs besides ``q`` and the caches; built by
    :func:`plan_decode`, reused by every layer. Tensors live on the plan's device.

    ``plain`` / ``cascade``: the work lists of both methods (``cascade`` is None without groups);
    ``use_cascade`` and ``estimated_bytes`` (``{"plain": n, "cascade": n or None}``) are the cost
    model's decision and its inputs. ``part_o [P, Hq, D]``, ``part_lse [P, Hq]`` and ``lse [B, Hq]``
    (fp32) are scratch shared by the runs: run them on one stream, as a model's layers are.
    """

    batch_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    block_tables: torch.Tensor                 # [B, W] int32
    seq_lens: list[int]
    group_ids: list[int] | None
    prefix_lens: list[int] | None
    plain: WorkList
    cascade: WorkList | None
    use_cascade: bool
    estimated_bytes: dict[str, int | None]
    part_o: torch.Tensor                       # [P, Hq, D] fp32
    part_lse: torch.Tensor                     # [P, Hq] fp32
    lse: torch.Tensor                          # [B, Hq] fp32

    def describe(self) -> str:
        lists = {"plain": self.plain, "cascade": self.cascade}
        parts = [f"{name}: {w.num_items} items x {w.rows} rows, {w.num_parts} partials, "
                 f"{self.estimated_bytes[name]:,} B" for name, w in lists.items() if w is not None]
        return (f"DecodePlan(B={self.batch_size}, Hq={self.num_q_heads}, Hkv={self.num_kv_heads}, "
                f"D={self.head_dim}, use_cascade={self.use_cascade}; " + "; ".join(parts) + ")")

    __repr__ = describe


def _units_plain(seq_lens: list[int]) -> list[tuple[int, int, int, list[int]]]:
    return [(b, 0, n, [b]) for b, n in enumerate(seq_lens)]


def _units_cascade(seq_lens: list[int], group_ids: list[int], prefix_lens: list[int], **sizes):
    """Prefix units (one per row tile of a group, read through its first member's table row) and
    suffix units (one per sequence). A group whose prefix pass does not pay (:func:`_prefix_pays`:
    a group of one, an empty or very short prefix) has its sequences read whole, as in plain decode."""
    groups: dict[int, list[int]] = {}
    for b, g in enumerate(group_ids):
        groups.setdefault(g, []).append(b)
    per_tile = max(1, MAX_ROWS // (sizes["num_q_heads"] // sizes["num_kv_heads"]))
    units = []
    for g, seqs in groups.items():
        prefix = prefix_lens[g]
        if not _prefix_pays(len(seqs), prefix, **sizes):
            units += [(b, 0, seq_lens[b], [b]) for b in seqs]
            continue
        tiles = _cdiv(len(seqs), per_tile)
        size = _cdiv(len(seqs), tiles)      # balanced tiles: 9 members at 8 a tile -> 5 + 4
        units += [(seqs[0], 0, prefix, seqs[i:i + size]) for i in range(0, len(seqs), size)]
        units += [(b, prefix, seq_lens[b], [b]) for b in seqs if seq_lens[b] > prefix]
    return units


def _prefix_pays(members: int, prefix: int, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 itemsize: int) -> bool:
    """Whether one pass over a ``prefix`` for ``members`` sequences beats reading it per sequence: it
    saves ``(members - 1) x prefix`` tokens of K/V and costs every member one more partial (``Hq x
    (D + 1)`` fp32, written then read back). Twice the cost must come back, for what this misses
    (padded tile rows, more programs). 5 agents at Hq/Hkv = 12/2, D = 128, bf16: prefix >= 31."""
    saved = (members - 1) * prefix * 2 * num_kv_heads * head_dim * itemsize
    cost = members * num_q_heads * (head_dim + 1) * 4 * 2
    return members > 1 and saved >= 2 * cost


def _cdiv(n: int, d: int) -> int:
    return -(-n // d)  # triton.cdiv is a jit-able function, ~10 us a call: too slow for plan loops


def _round_up(n: int, multiple: int) -> int:
    return _cdiv(n, multiple) * multiple


def _min_chunk(members: int, *, num_q_heads: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Fewest tokens a split of a ``members``-sequence tile may hold: its partials, ``members x Hq``
    rows of ``D + 1`` fp32 numbers written and read back, stay within PARTIAL_BUDGET of the K/V bytes
    it reads (``2 x Hkv x D x itemsize`` a token). About 256 tokens for one bf16 sequence at
    Hq/Hkv = 6, about 1200 for a tile of 5 agents: a shared prefix is worth splitting less finely."""
    partial_bytes = members * num_q_heads * (head_dim + 1) * 4 * 2
    kv_bytes_per_token = 2 * num_kv_heads * head_dim * itemsize
    return _round_up(_cdiv(partial_bytes, int(PARTIAL_BUDGET * kv_bytes_per_token)), CHUNK_ALIGN)


def _chunk_sizes(units, *, num_sms: int, **sizes) -> list[int]:
    """Tokens per split for each unit: the whole list cut into about WAVES programs per SM (each KV
    head is a program too), but no finer than :func:`_min_chunk` allows for the unit's tile."""
    total = sum(end - start for _, start, end, _ in units)
    target_items = max(1, _cdiv(WAVES * num_sms, sizes["num_kv_heads"]))
    even = _round_up(_cdiv(max(total, 1), target_items), CHUNK_ALIGN)
    floor = {m: _min_chunk(m, **sizes) for m in {len(seqs) for _, _, _, seqs in units}}
    return [max(even, floor[len(seqs)]) for _, _, _, seqs in units]


def estimate_bytes(work: WorkList, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                   itemsize: int) -> int:
    """Global-memory bytes one run of ``work`` moves (both launches):

    K and V of every token every item reads (``kv_tokens x 2 x Hkv x D x itemsize``: plain reads each
    sequence whole, cascade a shared prefix once per row tile plus each suffix), the fp32 partials
    (``o`` and ``lse``, written then read back by the merge), the query rows each partial reads, and
    the output. Both methods launch the same two kernels, so launch overhead cancels and bytes decide.
    """
    kv = work.kv_tokens * 2 * num_kv_heads * head_dim * itemsize
    partials = work.num_parts * num_q_heads * (head_dim + 1) * 4 * 2
    queries = work.num_parts * num_q_heads * head_dim * itemsize
    outputs = (work.part_ptr.shape[0] - 1) * num_q_heads * head_dim * itemsize
    return kv + partials + queries + outputs


def plan_decode(block_tables, seq_lens, *, group_ids=None, prefix_lens=None, block_size: int,
                num_kv_heads: int, num_q_heads: int, head_dim: int, dtype: torch.dtype = torch.bfloat16,
                device: torch.device | str | None = None, num_sms: int | None = None,
                kv_chunk_size: int | None = None, mode: str = "auto", min_saving: float = 0.1) -> DecodePlan:
    """Plan one decode step (host side; call once per step, reuse for every layer).

    ``block_tables [B, W]`` int32 (unused entries -1) and ``seq_lens [B]``: tensors or lists, best on
    the host (a CUDA tensor is read back: one sync, here at plan time rather than per layer).
    ``group_ids [B]`` (ints in ``[0, G)``) and ``prefix_lens [G]`` describe the prefix forest: group
    g's members share tokens ``[0, prefix_lens[g])``, read through its first member's table row
    (``prefix_lens[g] <= seq_lens[b]`` for every member b). ``dtype`` is the cache dtype (for the cost
    model); ``device`` where the index tensors and scratch go (default: ``block_tables``'s);
    ``num_sms`` the SM count the splits aim to fill (default: the device's, else 132);
    ``kv_chunk_size`` forces the tokens per split. ``mode``: ``"auto"`` picks cascade when its
    estimated bytes are at least ``min_saving`` (a fraction) below plain decode's, which leaves room for
    what the byte count misses (padded tile rows, more, shorter programs); ``"plain"`` / ``"cascade"``
    force one. The decision is ``plan.use_cascade``, its inputs ``plan.estimated_bytes``.
    """
    if mode not in ("auto", "plain", "cascade"):
        raise ValueError(f"mode must be 'auto', 'plain' or 'cascade', got {mode!r}")
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a positive multiple of num_kv_heads "
                         f"({num_kv_heads})")
    gqa = num_q_heads // num_kv_heads
    if gqa > MAX_ROWS:
        raise ValueError(f"{gqa} query heads per KV head exceed the {MAX_ROWS}-row tile")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if kv_chunk_size is not None and kv_chunk_size <= 0:
        raise ValueError(f"kv_chunk_size must be positive, got {kv_chunk_size}")
    block_tables = torch.as_tensor(block_tables, dtype=torch.int32)
    lens = [int(n) for n in torch.as_tensor(seq_lens).tolist()]   # host values (a sync if on GPU)
    if block_tables.dim() != 2 or block_tables.shape[0] != len(lens):
        raise ValueError(f"block_tables must be [B={len(lens)}, max_blocks], got {tuple(block_tables.shape)}")
    capacity = block_tables.shape[1] * block_size
    for b, n in enumerate(lens):
        if not 0 <= n <= capacity:
            raise ValueError(f"seq_lens[{b}] = {n} is outside [0, {capacity}] "
                             f"(block table width x block_size)")
    device = torch.device(device) if device is not None else block_tables.device
    if not block_tables.is_cuda:  # cheap on the host: every block a sequence uses must be a real block
        used = torch.arange(block_tables.shape[1]) < torch.tensor([_cdiv(n, block_size) for n in lens]
                                                                  ).reshape(-1, 1)
        bad = used & (block_tables < 0)
        if bad.any():
            b, j = bad.nonzero()[0].tolist()
            raise ValueError(f"block_tables[{b}, {j}] = -1 but sequence {b} has {lens[b]} tokens")

    groups = _check_groups(group_ids, prefix_lens, lens)
    if num_sms is None:
        num_sms = (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda"
                   else DEFAULT_NUM_SMS)
    sizes = {"num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
             "itemsize": dtype.itemsize}
    unit_lists = {"plain": _units_plain(lens)}
    if groups is not None:
        unit_lists["cascade"] = _units_cascade(lens, *groups, **sizes)
    works = {}
    for name, units in unit_lists.items():
        chunks = ([kv_chunk_size] * len(units) if kv_chunk_size
                  else _chunk_sizes(units, num_sms=num_sms, **sizes))
        works[name] = build_work_list(units, chunks, len(lens), gqa)
    estimated = {name: estimate_bytes(w, **sizes) for name, w in works.items()}
    estimated.setdefault("cascade", None)
    if mode == "cascade" and groups is None:
        raise ValueError("mode='cascade' needs group_ids and prefix_lens")
    use_cascade = mode == "cascade" or (mode == "auto" and groups is not None
                                        and estimated["cascade"] <= (1 - min_saving) * estimated["plain"])

    # One host-to-device copy for every index tensor of the step (block_tables too, unless it is there).
    on_device = block_tables.device == device or (device.type == "cuda" and block_tables.is_cuda
                                                  and device.index in (None, block_tables.device.index))
    host = [] if on_device else [block_tables]
    host += [t for w in works.values() for t in (w.table_row, w.kv_range, w.seq, w.part, w.part_ptr)]
    # Each segment starts 16-byte aligned (4 int32s), so the kernels get aligned index pointers.
    padded = [_round_up(t.numel(), 4) for t in host]
    flat = torch.zeros(sum(padded), dtype=torch.int32)
    offsets = [sum(padded[:i]) for i in range(len(host))]
    for t, off in zip(host, offsets):
        flat[off:off + t.numel()] = t.reshape(-1)
    flat = flat.to(device, non_blocking=True)
    views = [flat[off:off + t.numel()].view(t.shape) for t, off in zip(host, offsets)]
    block_tables_dev = block_tables.contiguous() if on_device else views.pop(0)
    for w in works.values():
        w.table_row, w.kv_range, w.seq, w.part, w.part_ptr = views[:5]
        views = views[5:]

    num_parts = max(max(w.num_parts for w in works.values()), 1)
    return DecodePlan(
        batch_size=len(lens), num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, block_tables=block_tables_dev, seq_lens=lens,
        group_ids=None if groups is None else groups[0], prefix_lens=None if groups is None else groups[1],
        plain=works["plain"], cascade=works.get("cascade"), use_cascade=use_cascade,
        estimated_bytes=estimated,
        part_o=torch.empty(num_parts, num_q_heads, head_dim, dtype=torch.float32, device=device),
        part_lse=torch.empty(num_parts, num_q_heads, dtype=torch.float32, device=device),
        lse=torch.empty(len(lens), num_q_heads, dtype=torch.float32, device=device),
    )


def _check_groups(group_ids, prefix_lens, lens: list[int]):
    """``(group_ids, prefix_lens)`` as validated lists, or None without groups."""
    if group_ids is None and prefix_lens is None:
        return None
    if group_ids is None or prefix_lens is None:
        raise ValueError("group_ids and prefix_lens go together: pass both or neither")
    group_ids = [int(g) for g in torch.as_tensor(group_ids).tolist()]
    prefix_lens = [int(p) for p in torch.as_tensor(prefix_lens).tolist()]
    if len(group_ids) != len(lens):
        raise ValueError(f"group_ids has {len(group_ids)} entries for {len(lens)} sequences")
    for b, g in enumerate(group_ids):
        if not 0 <= g < len(prefix_lens):
            raise ValueError(f"group_ids[{b}] = {g} is outside [0, {len(prefix_lens)})")
        if not 0 <= prefix_lens[g] <= lens[b]:
            raise ValueError(f"prefix_lens[{g}] = {prefix_lens[g]} must be in [0, seq_lens[{b}] = {lens[b]}] "
                             f"(sequence {b} is in group {g})")
    return group_ids, prefix_lens


# ---------------------------------------------------------------------------------------------------
# Without a plan: one item per (sequence, split) sized from the block-table width, built on the device
# so nothing is read back (a sequence's splits past its length are empty and exit at once).
# ---------------------------------------------------------------------------------------------------
def _capacity_work_list(block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, *,
                        num_q_heads: int, num_kv_heads: int, head_dim: int, itemsize: int) -> WorkList:
    B, W = block_tables.shape
    device = block_tables.device
    num_sms = (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda"
               else DEFAULT_NUM_SMS)
    capacity = W * block_size
    per_seq = max(1, _cdiv(WAVES * num_sms, num_kv_heads) // max(B, 1))
    chunk = max(_round_up(_cdiv(max(capacity, 1), per_seq), CHUNK_ALIGN),
                _min_chunk(1, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                           itemsize=itemsize))
    splits = max(_cdiv(capacity, chunk), 1)
    i32 = {"dtype": torch.int32, "device": device}
    seq = torch.arange(B, **i32).repeat_interleave(splits)                        # [B*S]
    start = torch.arange(splits, **i32).repeat(B) * chunk                           # [B*S]
    # Clamped to the table width: a longer seq_lens entry (not checked: that would need a host sync)
    # must not send the kernel past the end of its table row.
    lens = seq_lens.to(device=device, dtype=torch.int32, non_blocking=True).clamp(max=capacity)  # [B]
    end = torch.minimum(lens[seq.long()], start + chunk)
    return WorkList(
        table_row=seq, kv_range=torch.stack((start, torch.maximum(end, start)), 1),  # [B*S, 2]
        seq=seq[:, None], part=torch.arange(B * splits, **i32)[:, None],
        part_ptr=torch.arange(B + 1, **i32) * splits, rows=tile_rows(1, num_q_heads // num_kv_heads),
        num_parts=B * splits, kv_tokens=B * capacity,
    )


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None,
                           scale: float | None = None, plan: DecodePlan | None = None, *,
                           out: torch.Tensor | None = None, return_lse: bool = False):
    """Paged decode attention, one query token per sequence (split-KV flash-decoding).

    ``q [B, Hq, D]`` (fp32/bf16/fp16; any batch/head strides), ``k_cache``/``v_cache [num_blocks,
    block_size, Hkv, D]`` contiguous in ``q``'s dtype, ``block_tables [B, W]`` int32, ``seq_lens [B]``
    int32. Query head h reads KV head ``h // (Hq // Hkv)``; ``scale`` defaults to ``D ** -0.5``.
    Returns ``out [B, Hq, D]`` in ``q.dtype`` (written into ``out`` if given) and, with
    ``return_lse``, ``lse [B, Hq]`` float32 (natural log; -inf for a sequence with no tokens, whose
    output is 0). With a ``plan`` (from :func:`plan_decode`) its tables are used and ``block_tables``
    / ``seq_lens`` may be None; without one, splits are sized from the table width, on the device, and
    a ``seq_lens`` entry past the table's capacity (``W x block_size``) counts as that capacity (it is
    not read back to be checked), so no table row is read past its end.

    Example::

        out = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens)   # [B, Hq, D]
    """
    if plan is not None:
        check_plan(plan, q, k_cache, v_cache)
        block_tables = plan.block_tables
    elif block_tables is None or seq_lens is None:
        raise ValueError("paged_decode_attention needs block_tables and seq_lens, or a plan")
    B, Hq, Hkv, D, block_size = check_decode_inputs(q, k_cache, v_cache)
    if block_tables.shape[0] != B or (plan is None and seq_lens.shape != (B,)):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and seq_lens must have B={B} rows")
    if block_tables.device != q.device:
        raise ValueError(f"block_tables is on {block_tables.device}, q on {q.device}")
    scale = D ** -0.5 if scale is None else scale
    out = check_out(out, q)
    if use_triton(q, k_cache, v_cache, block_tables):
        if plan is not None:
            work, part_o, part_lse = plan.plain, plan.part_o, plan.part_lse
            lse = torch.empty_like(plan.lse) if return_lse else plan.lse
        else:
            work = _capacity_work_list(block_tables, seq_lens, block_size, num_q_heads=Hq, num_kv_heads=Hkv,
                                       head_dim=D, itemsize=q.dtype.itemsize)
            part_o = torch.empty(work.num_parts, Hq, D, dtype=torch.float32, device=q.device)
            part_lse = torch.empty(work.num_parts, Hq, dtype=torch.float32, device=q.device)
            lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
        attend_work_list(q, k_cache, v_cache, block_tables, work, scale=scale, out=out, lse_out=lse,
                         part_o=part_o, part_lse=part_lse)
    else:
        ref, lse = paged_decode_attention_reference(q, k_cache, v_cache, block_tables,
                                                    plan.seq_lens if plan is not None else seq_lens,
                                                    scale=scale, return_lse=True)
        out.copy_(ref)
    return (out, lse) if return_lse else out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: DecodePlan, *,
                     scale: float | None = None, out: torch.Tensor | None = None, return_lse: bool = False):
    """One layer's decode attention by the method the plan picked (``plan.use_cascade``): cascade
    (:func:`cascade_decode_attention`) or plain (:func:`paged_decode_attention`). Shapes as there."""
    if plan.use_cascade:
        return cascade_decode_attention(q, k_cache, v_cache, plan, scale=scale, out=out,
                                        return_lse=return_lse)
    return paged_decode_attention(q, k_cache, v_cache, scale=scale, plan=plan, out=out, return_lse=return_lse)


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, seq_lens, scale: float | None = None,
                                     return_lse: bool = False):
    """Torch reference: each sequence's ``seq_lens[b]`` tokens gathered through its table row, fp32
    softmax, all sequences batched (:func:`attend_paged_reference`). ``q [B, Hq, D]`` → ``out [B, Hq,
    D]`` in ``q.dtype`` (and ``lse [B, Hq]`` fp32, natural log; -inf and ``out = 0`` for a sequence with
    no tokens). ``seq_lens [B]``: a list or tensor; as in the kernel without a plan, an entry past the
    table's capacity (``W x block_size``) counts as that capacity."""
    B, _, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    capacity = block_tables.shape[1] * k_cache.shape[1]
    # Host ints size the gathers (a CPU tensor costs nothing here; a CUDA one is one sync a call).
    lens = [min(int(n), capacity) for n in torch.as_tensor(seq_lens).reshape(B).tolist()]
    out, lse = attend_paged_reference(q, k_cache, v_cache, block_tables, lens, scale)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
