"""Paged decode attention (split-KV flash-decoding), the per-step decode plan, and
:func:`decode_attention`, which runs plain or cascade decode as the plan chose.

Plan once, run per layer (FlashInfer's split): the scheduler's host-side ``block_tables`` and
``seq_lens`` (and, for a debate, which sequences share which prefix) go to :func:`plan_decode` once
per step. It cuts every sequence (or shared prefix) into KV splits, lays them out as the work lists
(:mod:`.work_list`) the kernel in :mod:`.cascade_attention` runs, uploads all index tensors in one
copy, and allocates the fp32 scratch for partial results. Which groups read their prefix once, the
tokens per split and whether cascade pays are a cost model's decisions (:mod:`.decode_cost`; the
engine passes its planner's). Each layer then calls ``decode_attention(q, k_cache, v_cache, plan)``:
two launches (partials, merge), no host sync.

Split-KV: a program handles one (work item, KV head); all ``Hq / Hkv`` query heads of that KV head are
the rows of its tile, so a key is loaded once for all the heads that read it. Partial ``(o, lse)`` per
split are merged by log-sum-exp (:mod:`.merge_states`).
"""
from __future__ import annotations

import dataclasses

import torch

from ._common import cdiv, upload
from ._dispatch import use_triton
from .cascade_attention import attend_paged_reference, attend_work_list, cascade_decode_attention
from .decode_cost import DecodeCostModel
from .plan_buffers import DecodePlanBuffers
from .work_list import (
    MAX_ROWS,
    DecodePlan,
    build_work_list,
    capacity_work_list,
    check_decode_inputs,
    check_out,
    check_plan,
    grouped_units,
    plain_units,
)


def plan_decode(block_tables, seq_lens, *, group_ids=None, prefix_lens=None, block_size: int,
                num_kv_heads: int, num_q_heads: int, head_dim: int, dtype: torch.dtype = torch.bfloat16,
                device: torch.device | str | None = None, num_sms: int | None = None,
                kv_chunk_size: int | None = None, mode: str = "auto", min_saving: float | None = None,
                cost_model: DecodeCostModel | None = None, into: DecodePlanBuffers | None = None) -> DecodePlan:
    """Plan one decode step (host side; call once per step, reuse for every layer).

    ``block_tables [B, W]`` int32 (unused entries -1) and ``seq_lens [B]``: tensors or lists, best on
    the host (a CUDA tensor is read back: one sync, here at plan time rather than per layer).
    ``group_ids [B]`` (ints in ``[0, G)``) and ``prefix_lens [G]`` describe the prefix forest: group
    g's members share tokens ``[0, prefix_lens[g])``, read through its first member's table row
    (``prefix_lens[g] <= seq_lens[b]`` for every member b). ``dtype`` is the cache dtype (for the cost
    model); ``device`` where the index tensors and scratch go (default: ``block_tables``'s);
    ``num_sms`` the SM count the splits aim to fill (default: the device's, else 132);
    ``kv_chunk_size`` forces the tokens per split. ``mode``: ``"auto"`` picks cascade when its
    estimated bytes are at least ``min_saving`` (a fraction, default 0.1) below plain decode's, which
    leaves room for what the byte count misses (padded tile rows, more, shorter programs); ``"plain"`` /
    ``"cascade"`` force one. The decision is ``plan.use_cascade``, its inputs ``plan.estimated_bytes``.

    The decisions (which groups read their prefix once, tokens per split, ``"auto"``'s choice, the
    default SM count) come from ``cost_model`` (:class:`~.decode_cost.DecodeCostModel`, the default
    one when None); ``min_saving``, when given, replaces the model's.

    ``into``: lay the plan out in these fixed-capacity buffers (:mod:`.plan_buffers`) instead of
    tensors allocated for this step, on the buffers' device (``device`` is then ignored); raises
    :class:`~.plan_buffers.PlanCapacityError` when the step does not fit them.
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
    if into is not None:
        device = into.device
    device = torch.device(device) if device is not None else block_tables.device
    if not block_tables.is_cuda:  # cheap on the host: every block a sequence uses must be a real block
        used = torch.arange(block_tables.shape[1]) < torch.tensor([cdiv(n, block_size) for n in lens]
                                                                  ).reshape(-1, 1)
        bad = used & (block_tables < 0)
        if bad.any():
            b, j = bad.nonzero()[0].tolist()
            raise ValueError(f"block_tables[{b}, {j}] = -1 but sequence {b} has {lens[b]} tokens")

    groups = _check_groups(group_ids, prefix_lens, lens)
    if mode == "cascade" and groups is None:
        raise ValueError("mode='cascade' needs group_ids and prefix_lens")
    cost = cost_model if cost_model is not None else DecodeCostModel()
    if min_saving is not None:
        cost = dataclasses.replace(cost, min_saving=min_saving)
    if num_sms is None:
        num_sms = cost.num_sms(device)
    sizes = {"num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
             "itemsize": dtype.itemsize}
    unit_lists = {"plain": plain_units(lens)}
    if groups is not None:
        unit_lists["cascade"] = grouped_units(lens, *groups, cost.shared_groups(*groups, **sizes), gqa)
    works = {}
    for name, units in unit_lists.items():
        chunks = ([kv_chunk_size] * len(units) if kv_chunk_size
                  else cost.chunk_sizes(units, num_sms=num_sms, **sizes))
        works[name] = build_work_list(units, chunks, len(lens), gqa)
    estimated = {name: cost.estimate_bytes(w, **sizes) for name, w in works.items()}
    estimated.setdefault("cascade", None)
    use_cascade = mode == "cascade" or (mode == "auto" and groups is not None
                                        and cost.use_cascade(estimated["plain"], estimated["cascade"]))

    if into is not None:
        return into.load(block_tables.cpu(), lens, *(groups or (None, None)), works, use_cascade, estimated,
                         num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         block_size=block_size)

    # One host-to-device copy for every index tensor of the step (block_tables too, unless it is there).
    on_device = block_tables.device == device or (device.type == "cuda" and block_tables.is_cuda
                                                  and device.index in (None, block_tables.device.index))
    host = [] if on_device else [block_tables]
    host += [t for w in works.values() for t in w.index_tensors()]
    views = upload(host, torch.int32, device)
    block_tables_dev = block_tables.contiguous() if on_device else views.pop(0)
    for w in works.values():
        w.set_index_tensors(views[:5])
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
            # Without a plan: splits sized from the table width by the default cost model, the list
            # built on the device so nothing is read back.
            cost = DecodeCostModel()
            chunk = cost.capacity_chunk(B, block_tables.shape[1] * block_size, num_sms=cost.num_sms(q.device),
                                        num_q_heads=Hq, num_kv_heads=Hkv, head_dim=D,
                                        itemsize=q.dtype.itemsize)
            work = capacity_work_list(block_tables, seq_lens, block_size, chunk, Hq // Hkv)
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
