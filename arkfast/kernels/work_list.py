"""The split-KV work list and the decode plan that carries it: the types and host machinery shared by
plain paged decode (:mod:`.decode_attention`) and cascade decode (:mod:`.cascade_attention`).

One kernel (``_paged_partial_kernel`` in :mod:`.cascade_attention`) serves both methods. It runs a
**work list**: item i is a tile of query rows (up to ``M`` member sequences x the ``Hq/Hkv`` query
heads of one KV head, padded to ``ROWS`` = 16 or 64, as ``tl.dot`` on tensor cores needs >= 16), a
block-table row to read keys through, and a token range ``[start, end)``. It writes one partial
``(o, lse)`` per member and query head into its own slot of a scratch buffer; the merge kernel then
combines each sequence's slots. Plain decode is the work list with one member per item and one item
per (sequence, KV split); cascade adds prefix items with many members.

A list is built from *units* ``(table_row, start, end, member_seqs)``: a stretch of keys read once for
the members. :func:`plain_units` and :func:`grouped_units` make them from decided groups;
:func:`build_work_list` cuts each unit into items of a given number of tokens. Which groups share a
prefix pass and how finely to split are decisions of a cost model (:mod:`.decode_cost`, or the
engine's planner), made before any of this runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import DTYPES, cdiv
from .paged_kv import check_cache

MAX_ROWS = 64           # query rows in one tile: members x (Hq / Hkv); larger groups take several tiles
ROWS = (16, MAX_ROWS)   # tile heights (fewer AOT configurations than every power of two)

Unit = tuple[int, int, int, list[int]]   # (table_row, start, end, member_seqs)


@dataclass
class WorkList:
    """The kernel's input: ``I`` work items over a batch of ``B`` sequences (int32 tensors).

    ``table_row [I]``: block-table row the item reads keys through; ``kv_range [I, 2]``: its token
    range ``[start, end)`` (empty is allowed: it writes ``o = 0``, ``lse = -inf``); ``seq [I, M]``:
    the member sequences whose queries form the tile (-1 pads); ``part [I, M]``: each member's
    partial slot; ``part_ptr [B + 1]``: sequence b's slots are ``[part_ptr[b], part_ptr[b + 1])``.
    ``rows`` is the tile height, ``kv_tokens`` the tokens read per KV head (for a cost model).
    """

    table_row: torch.Tensor
    kv_range: torch.Tensor
    seq: torch.Tensor
    part: torch.Tensor
    part_ptr: torch.Tensor
    rows: int
    num_parts: int
    kv_tokens: int

    @property
    def num_items(self) -> int:
        return self.table_row.shape[0]

    def index_tensors(self) -> list[torch.Tensor]:
        return [self.table_row, self.kv_range, self.seq, self.part, self.part_ptr]

    def set_index_tensors(self, tensors: list[torch.Tensor]) -> None:
        self.table_row, self.kv_range, self.seq, self.part, self.part_ptr = tensors


def tile_rows(members: int, gqa: int) -> int:
    """Tile height for ``members`` sequences x ``gqa`` query heads: 16 or ``MAX_ROWS``.

    Decode is bandwidth-bound, so a half-empty 64-row tile costs little next to another compiled
    configuration; 16 is the smallest ``tl.dot`` height on tensor cores."""
    if members * gqa > MAX_ROWS:
        raise ValueError(f"{members} members x {gqa} query heads per KV head exceed {MAX_ROWS} tile rows")
    return 16 if members * gqa <= 16 else MAX_ROWS


def plain_units(seq_lens: list[int]) -> list[Unit]:
    """One unit per sequence, its whole length through its own table row."""
    return [(b, 0, n, [b]) for b, n in enumerate(seq_lens)]


def grouped_units(seq_lens: list[int], group_ids: list[int], prefix_lens: list[int], shared: list[bool],
                  gqa: int) -> list[Unit]:
    """Units of cascade decode. Group g with ``shared[g]`` reads its prefix ``[0, prefix_lens[g])``
    once per row tile of its members, through its first member's table row, and each member's suffix
    through its own; a group without (a group of one, say) has its sequences read whole, as in plain
    decode. A tile holds ``MAX_ROWS // gqa`` members; a larger group is cut into balanced tiles (9
    members at 8 a tile: 5 + 4)."""
    groups: dict[int, list[int]] = {}
    for b, g in enumerate(group_ids):
        groups.setdefault(g, []).append(b)
    per_tile = max(1, MAX_ROWS // gqa)
    units = []
    for g, seqs in groups.items():
        prefix = prefix_lens[g]
        if not shared[g]:
            units += [(b, 0, seq_lens[b], [b]) for b in seqs]
            continue
        size = cdiv(len(seqs), cdiv(len(seqs), per_tile))
        units += [(seqs[0], 0, prefix, seqs[i:i + size]) for i in range(0, len(seqs), size)]
        units += [(b, prefix, seq_lens[b], [b]) for b in seqs if seq_lens[b] > prefix]
    return units


def build_work_list(units: list[Unit], chunks: list[int], batch_size: int, gqa: int) -> WorkList:
    """Split each unit ``(table_row, start, end, member_seqs)`` into items of at most ``chunks[u]``
    tokens and give every (item, member) a partial slot; slots of one sequence are contiguous.
    Host-side, returns CPU tensors."""
    if len(chunks) != len(units) or any(c <= 0 for c in chunks):
        raise ValueError(f"need one positive chunk size per unit, got {chunks} for {len(units)} units")
    members = max([len(u[3]) for u in units], default=1)
    counts = [0] * batch_size
    items = []
    for (table_row, start, end, seqs), chunk in zip(units, chunks):
        for lo in range(start, end, chunk):
            items.append((table_row, lo, min(lo + chunk, end), seqs, [counts[b] for b in seqs]))
            for b in seqs:
                counts[b] += 1
    part_ptr = [0]
    for c in counts:
        part_ptr.append(part_ptr[-1] + c)
    seq_rows = [seqs + [-1] * (members - len(seqs)) for _, _, _, seqs, _ in items]
    part_rows = [[part_ptr[b] + k for b, k in zip(seqs, ks)] + [-1] * (members - len(seqs))
                 for _, _, _, seqs, ks in items]
    i32 = torch.int32
    return WorkList(
        table_row=torch.tensor([it[0] for it in items], dtype=i32),                       # [I]
        kv_range=torch.tensor([[it[1], it[2]] for it in items], dtype=i32).reshape(-1, 2),  # [I, 2]
        seq=torch.tensor(seq_rows, dtype=i32).reshape(-1, members),                        # [I, M]
        part=torch.tensor(part_rows, dtype=i32).reshape(-1, members),                      # [I, M]
        part_ptr=torch.tensor(part_ptr, dtype=i32),                                        # [B + 1]
        rows=tile_rows(members, gqa),
        num_parts=part_ptr[-1],
        kv_tokens=sum(it[2] - it[1] for it in items),
    )


def capacity_work_list(block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, chunk: int,
                       gqa: int) -> WorkList:
    """A plain work list built on the device, nothing read back: one item per (sequence, split of
    ``chunk`` tokens) over the table's whole capacity ``W x block_size``; a sequence's splits past its
    length are empty and exit at once. ``seq_lens [B]`` entries are clamped to the capacity (checking
    them would need a host sync), so no item reads past the end of its table row."""
    B, W = block_tables.shape
    device = block_tables.device
    capacity = W * block_size
    splits = max(cdiv(capacity, chunk), 1)
    i32 = {"dtype": torch.int32, "device": device}
    seq = torch.arange(B, **i32).repeat_interleave(splits)                        # [B*S]
    start = torch.arange(splits, **i32).repeat(B) * chunk                           # [B*S]
    lens = seq_lens.to(device=device, dtype=torch.int32, non_blocking=True).clamp(max=capacity)  # [B]
    end = torch.minimum(lens[seq.long()], start + chunk)
    return WorkList(
        table_row=seq, kv_range=torch.stack((start, torch.maximum(end, start)), 1),  # [B*S, 2]
        seq=seq[:, None], part=torch.arange(B * splits, **i32)[:, None],
        part_ptr=torch.arange(B + 1, **i32) * splits, rows=tile_rows(1, gqa),
        num_parts=B * splits, kv_tokens=B * capacity,
    )


@dataclass(repr=False)
class DecodePlan:
    """Everything one decode step's attention needs besides ``q`` and the caches; built by
    :func:`~.decode_attention.plan_decode`, reused by every layer. Tensors live on the plan's device.

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


def check_decode_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
                        ) -> tuple[int, int, int, int, int]:
    """Validate ``q [B, Hq, D]`` and the caches ``[num_blocks, block_size, Hkv, D]``; returns
    ``(B, Hq, Hkv, D, block_size)``."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    if q.dtype not in DTYPES:
        raise TypeError(f"q dtype must be one of {DTYPES}, got {q.dtype}")
    B, Hq, D = q.shape
    block_size, Hkv = check_cache(k_cache, v_cache, head_dim=D, dtype=q.dtype, device=q.device,
                                  contiguous=False)
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    return B, Hq, Hkv, D, block_size


def check_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """``out`` if it fits ``q`` (shape, dtype, device, unit last stride), a new buffer if None."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if out.stride(-1) != 1:
        raise ValueError(f"out needs a unit last-dim stride, got strides {out.stride()}")
    return out


def check_plan(plan: DecodePlan, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The run-time inputs match the shapes the plan was built for (metadata only, no sync)."""
    B, Hq, Hkv, D, block_size = check_decode_inputs(q, k_cache, v_cache)
    got = (B, Hq, Hkv, D, block_size)
    want = (plan.batch_size, plan.num_q_heads, plan.num_kv_heads, plan.head_dim, plan.block_size)
    if got != want:
        raise ValueError(f"inputs have (B, Hq, Hkv, D, block_size) = {got}, the plan was built for {want}")
    if plan.block_tables.device != q.device:
        raise ValueError(f"plan lives on {plan.block_tables.device}, q on {q.device}")
