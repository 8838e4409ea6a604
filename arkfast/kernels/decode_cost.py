"""The default cost model of split-KV and cascade decode: which groups read their prefix once, how
finely to split, and whether cascade pays. Plain host arithmetic, no kernel.

:func:`~.decode_attention.plan_decode` takes its decisions from a :class:`DecodeCostModel` (this one
unless another is passed), so the kernels package works on its own. The engine builds its plans in
:mod:`arkfast.engine.planner`, which holds the model its decisions come from and passes it in.

Every rule counts global-memory bytes; decode is bandwidth-bound. ``sizes`` below are the keyword
arguments ``num_q_heads``, ``num_kv_heads``, ``head_dim`` and ``itemsize`` (of the cache dtype).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import cdiv, round_up
from .work_list import Unit, WorkList

# fp32 K and V bytes one chunk of sequences gathers in the decode references (a sequence longer than
# that goes alone, one KV head at a time). Small enough that a chunk's gathered K/V is still in the
# last-level cache when the matmuls read it: on a 2-core EPYC (32 MiB L3), 8 MiB chunks ran the decode
# reference 2-3x faster than one 256 MiB pass at B = 100 sequences of 250-800 tokens. Read at call
# time (:func:`~.cascade_attention.attend_paged_reference`), so a caller may set another.
REFERENCE_GATHER_BYTES = 8 << 20


@dataclass(frozen=True)
class DecodeCostModel:
    """The decode plan's cost model.

    ``waves``: programs per SM the splits aim for (a second resident program hides latency);
    ``default_num_sms``: the SM count assumed when planning for a non-CUDA device (H100 SXM: 132);
    ``partial_budget``: a split's partials (written, then read by the merge) stay within this fraction
    of its K/V bytes; ``chunk_align``: split sizes are multiples of the kernel's key tile;
    ``min_saving``: cascade runs when its estimated bytes are at least this fraction below plain
    decode's (room for what the byte count misses: padded tile rows, more, shorter programs);
    ``prefix_payback``: a group's prefix pass must save this many times the partials it adds.
    """

    waves: int = 2
    default_num_sms: int = 132
    partial_budget: float = 0.05
    chunk_align: int = 64
    min_saving: float = 0.1
    prefix_payback: float = 2.0

    def __post_init__(self):
        if self.waves < 1 or self.default_num_sms < 1 or self.chunk_align < 1:
            raise ValueError(f"waves, default_num_sms and chunk_align must be positive: {self}")
        if not 0 < self.partial_budget <= 1 or not 0 <= self.min_saving < 1 or self.prefix_payback < 0:
            raise ValueError(f"partial_budget must be in (0, 1], min_saving in [0, 1), prefix_payback "
                             f">= 0: {self}")

    def num_sms(self, device: torch.device) -> int:
        """The SM count the splits aim to fill: the device's, else ``default_num_sms``."""
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).multi_processor_count
        return self.default_num_sms

    def prefix_pays(self, members: int, prefix: int, *, num_q_heads: int, num_kv_heads: int,
                    head_dim: int, itemsize: int) -> bool:
        """Whether one pass over a ``prefix`` for ``members`` sequences beats reading it per sequence:
        it saves ``(members - 1) x prefix`` tokens of K/V and costs every member one more partial
        (``Hq x (D + 1)`` fp32, written then read back). ``prefix_payback`` times the cost must come
        back, for what this misses (padded tile rows, more programs). 5 agents at Hq/Hkv = 12/2,
        D = 128, bf16: prefix >= 31."""
        saved = (members - 1) * prefix * 2 * num_kv_heads * head_dim * itemsize
        cost = members * num_q_heads * (head_dim + 1) * 4 * 2
        return members > 1 and saved >= self.prefix_payback * cost

    def shared_groups(self, group_ids: list[int], prefix_lens: list[int], **sizes) -> list[bool]:
        """For each group, whether its prefix is read once for its members (:meth:`prefix_pays`)."""
        members = [0] * len(prefix_lens)
        for g in group_ids:
            members[g] += 1
        return [self.prefix_pays(m, p, **sizes) for m, p in zip(members, prefix_lens)]

    def min_chunk(self, members: int, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                  itemsize: int) -> int:
        """Fewest tokens a split of a ``members``-sequence tile may hold: its partials, ``members x
        Hq`` rows of ``D + 1`` fp32 numbers written and read back, stay within ``partial_budget`` of
        the K/V bytes it reads (``2 x Hkv x D x itemsize`` a token). About 256 tokens for one bf16
        sequence at Hq/Hkv = 6, about 1200 for a tile of 5 agents: a shared prefix is worth
        splitting less finely."""
        partial_bytes = members * num_q_heads * (head_dim + 1) * 4 * 2
        kv_bytes_per_token = 2 * num_kv_heads * head_dim * itemsize
        return round_up(cdiv(partial_bytes, int(self.partial_budget * kv_bytes_per_token)), self.chunk_align)

    def chunk_sizes(self, units: list[Unit], *, num_sms: int, **sizes) -> list[int]:
        """Tokens per split for each unit: the whole list cut into about ``waves`` programs per SM
        (each KV head is a program too), but no finer than :meth:`min_chunk` allows for the unit's
        tile."""
        total = sum(end - start for _, start, end, _ in units)
        target_items = max(1, cdiv(self.waves * num_sms, sizes["num_kv_heads"]))
        even = round_up(cdiv(max(total, 1), target_items), self.chunk_align)
        floor = {m: self.min_chunk(m, **sizes) for m in {len(seqs) for _, _, _, seqs in units}}
        return [max(even, floor[len(seqs)]) for _, _, _, seqs in units]

    def capacity_chunk(self, batch_size: int, capacity: int, *, num_sms: int, **sizes) -> int:
        """Tokens per split when every one of ``batch_size`` sequences is split over the table's whole
        ``capacity`` (the plan-free path: lengths are not read back): ``waves`` programs per SM
        spread over the batch, no finer than :meth:`min_chunk` of one sequence."""
        per_seq = max(1, cdiv(self.waves * num_sms, sizes["num_kv_heads"]) // max(batch_size, 1))
        return max(round_up(cdiv(max(capacity, 1), per_seq), self.chunk_align), self.min_chunk(1, **sizes))

    def estimate_bytes(self, work: WorkList, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                       itemsize: int) -> int:
        """Global-memory bytes one run of ``work`` moves (both launches):

        K and V of every token every item reads (``kv_tokens x 2 x Hkv x D x itemsize``: plain reads
        each sequence whole, cascade a shared prefix once per row tile plus each suffix), the fp32
        partials (``o`` and ``lse``, written then read back by the merge), the query rows each partial
        reads, and the output. Both methods launch the same two kernels, so launch overhead cancels
        and bytes decide.
        """
        kv = work.kv_tokens * 2 * num_kv_heads * head_dim * itemsize
        partials = work.num_parts * num_q_heads * (head_dim + 1) * 4 * 2
        queries = work.num_parts * num_q_heads * head_dim * itemsize
        outputs = (work.part_ptr.shape[0] - 1) * num_q_heads * head_dim * itemsize
        return kv + partials + queries + outputs

    def use_cascade(self, plain_bytes: int, cascade_bytes: int) -> bool:
        """Cascade when its bytes are at least ``min_saving`` below plain decode's."""
        return cascade_bytes <= (1 - self.min_saving) * plain_bytes
