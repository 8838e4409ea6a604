"""Fixed-capacity storage for decode plans: the same plan every step in the same device memory.

:func:`~.decode_attention.plan_decode` allocates its index tensors and scratch per step, sized to the
step. With ``into=DecodePlanBuffers(...)`` it lays the plan out in buffers allocated once instead:
block tables ``[S, W]``, both work lists padded to a fixed number of items (a padding item has an
empty key range and no member rows, so its programs load nothing, store nothing and exit at once),
each sequence's partial-slot pointers, and the fp32 scratch. Every launch of a plan from these buffers
has the same grid and the same pointers, whatever the step holds (the property a captured CUDA graph
needs); the values change, by one host-to-device copy per step.

A step that does not fit (more sequences, a wider table, more items or partial slots than the
capacity) raises :class:`PlanCapacityError`; the caller plans it the ordinary way instead.
"""
from __future__ import annotations

import torch

from .work_list import MAX_ROWS, DecodePlan, WorkList, tile_rows


class PlanCapacityError(ValueError):
    """A decode step needs more than the buffers hold (the message says which capacity)."""


class DecodePlanBuffers:
    """Device buffers for decode plans of up to ``max_seqs`` sequences of at most ``max_blocks``
    blocks, with at most ``plain_items`` / ``cascade_items`` work items (plain / cascade) and
    ``num_parts`` partial slots. Heads, head dim and block size are fixed, as for the caches.

    All index tensors are views of one int32 device tensor with a pinned host mirror; :meth:`load`
    fills the mirror and copies it in one transfer (the work lists whole, the block tables' rows of
    the step's sequences). One plan is live at a time: loading a new one
    overwrites the last (every layer of a step reads the same plan, so steps are sequential anyway).
    """

    def __init__(self, *, max_seqs: int, max_blocks: int, plain_items: int, cascade_items: int,
                 num_parts: int, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 device: torch.device | str):
        for name, value in (("max_seqs", max_seqs), ("max_blocks", max_blocks), ("plain_items", plain_items),
                            ("cascade_items", cascade_items), ("num_parts", num_parts)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if num_kv_heads <= 0 or num_q_heads % num_kv_heads or num_q_heads // num_kv_heads > MAX_ROWS:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads}), "
                             f"at most {MAX_ROWS} per KV head")
        self.device = torch.device(device)
        self.sizes = (num_q_heads, num_kv_heads, head_dim, block_size)
        self.gqa = num_q_heads // num_kv_heads
        self.members = MAX_ROWS // self.gqa            # the most members a cascade tile can hold
        S, W, Ip, Ic, M = max_seqs, max_blocks, plain_items, cascade_items, self.members
        self.max_seqs, self.max_blocks, self.num_parts = S, W, num_parts
        self.items = {"plain": Ip, "cascade": Ic}
        width = {"plain": 1, "cascade": M}
        shapes = {}
        for name, items in self.items.items():
            shapes |= {f"{name}.table_row": (items,), f"{name}.kv_range": (items, 2),
                       f"{name}.seq": (items, width[name]), f"{name}.part": (items, width[name]),
                       f"{name}.part_ptr": (S + 1,)}
        shapes["block_tables"] = (S, W)   # last: a step copies only the rows of its sequences
        offsets, total = {}, 0
        for name, shape in shapes.items():
            offsets[name] = total
            n = 1
            for d in shape:
                n *= d
            total += -(-n // 4) * 4                     # each view starts 16-byte aligned
        pinned = self.device.type == "cuda"
        self._host = torch.zeros(total, dtype=torch.int32, pin_memory=pinned)
        self._dev = self._host if self.device.type == "cpu" else torch.zeros(total, dtype=torch.int32,
                                                                                device=self.device)
        self._copied = torch.cuda.Event() if pinned else None

        def views(flat):
            out = {}
            for name, shape in shapes.items():
                n = 1
                for d in shape:
                    n *= d
                out[name] = flat[offsets[name]:offsets[name] + n].view(shape)
            return out

        self._host_views, self._dev_views = views(self._host), views(self._dev)
        self._bt_offset = offsets["block_tables"]
        f32 = {"dtype": torch.float32, "device": self.device}
        self.part_o = torch.empty(num_parts, num_q_heads, head_dim, **f32)     # [P, Hq, D]
        self.part_lse = torch.empty(num_parts, num_q_heads, **f32)             # [P, Hq]
        self.lse = torch.empty(max_seqs, num_q_heads, **f32)                   # [S, Hq]

    def _fill(self, name: str, work: WorkList, batch: int) -> None:
        h = self._host_views
        items, members = work.seq.shape
        if items > self.items[name]:
            raise PlanCapacityError(f"the {name} work list has {items} items, the buffers hold "
                                    f"{self.items[name]}")
        if work.num_parts > self.num_parts:
            raise PlanCapacityError(f"the {name} work list has {work.num_parts} partial slots, the "
                                    f"buffers hold {self.num_parts}")
        h[f"{name}.table_row"].zero_()[:items] = work.table_row
        h[f"{name}.kv_range"].zero_()[:items] = work.kv_range       # padding: empty range [0, 0)
        h[f"{name}.seq"].fill_(-1)[:items, :members] = work.seq       # padding: no member rows
        h[f"{name}.part"].fill_(-1)[:items, :members] = work.part
        h[f"{name}.part_ptr"].fill_(work.num_parts)[:batch + 1] = work.part_ptr

    def _view(self, name: str, work: WorkList, batch: int) -> WorkList:
        d = self._dev_views
        members = d[f"{name}.seq"].shape[1]
        return WorkList(table_row=d[f"{name}.table_row"], kv_range=d[f"{name}.kv_range"], seq=d[f"{name}.seq"],
                        part=d[f"{name}.part"], part_ptr=d[f"{name}.part_ptr"][:batch + 1],
                        rows=tile_rows(members, self.gqa), num_parts=work.num_parts, kv_tokens=work.kv_tokens)

    def load(self, block_tables: torch.Tensor, seq_lens: list[int], group_ids: list[int] | None,
             prefix_lens: list[int] | None, works: dict[str, WorkList], use_cascade: bool,
             estimated_bytes: dict[str, int | None], *, num_q_heads: int, num_kv_heads: int, head_dim: int,
             block_size: int) -> DecodePlan:
        """The plan of host work lists ``works`` (``"plain"`` and maybe ``"cascade"``, as
        :func:`~.decode_attention.plan_decode` builds them) over ``block_tables [B, w]`` (host int32),
        laid out in these buffers. Raises :class:`PlanCapacityError` when the step does not fit."""
        if (num_q_heads, num_kv_heads, head_dim, block_size) != self.sizes:
            raise ValueError(f"(Hq, Hkv, D, block_size) = {(num_q_heads, num_kv_heads, head_dim, block_size)}, "
                             f"the buffers were made for {self.sizes}")
        B, w = block_tables.shape
        if B > self.max_seqs:
            raise PlanCapacityError(f"{B} sequences, the buffers hold {self.max_seqs}")
        if w > self.max_blocks:
            # Entries past a sequence's last block are never read: a wider table may still fit.
            used = max((-(-n // block_size) for n in seq_lens), default=0)
            if used > self.max_blocks:
                raise PlanCapacityError(f"a sequence of {used} blocks, the buffers hold {self.max_blocks}")
            block_tables, w = block_tables[:, :self.max_blocks], self.max_blocks
        if self._copied is not None:
            self._copied.synchronize()               # the last step's copy has left the host mirror
        for name, work in works.items():
            self._fill(name, work, B)
        # Only rows of the step's sequences, and in them only a sequence's own blocks, are ever read
        # (a padding sequence has no items): the rest of the table may hold an earlier step's ids.
        h = self._host_views["block_tables"]
        h[:B, w:] = -1
        h[:B, :w] = block_tables
        if self._dev is not self._host:
            end = self._bt_offset + B * self.max_blocks
            self._dev[:end].copy_(self._host[:end], non_blocking=True)
            self._copied.record()
        d = self._dev_views
        lists = {name: self._view(name, work, B) for name, work in works.items()}
        return DecodePlan(
            batch_size=B, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            block_size=block_size, block_tables=d["block_tables"][:B], seq_lens=seq_lens, group_ids=group_ids,
            prefix_lens=prefix_lens, plain=lists["plain"], cascade=lists.get("cascade"), use_cascade=use_cascade,
            estimated_bytes=estimated_bytes, part_o=self.part_o, part_lse=self.part_lse, lse=self.lse[:B],
        )
