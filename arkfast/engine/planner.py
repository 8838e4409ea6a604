"""The engine's decode planner: the one place the engine decides what to group, when a shared prefix
pays and how finely to split. The kernels receive those decisions in a plan and run it.

Per decode step, :meth:`DecodePlanner.plan` takes the decoding sequences' block tables and lengths and

1. groups them (:func:`prefix_groups`): sequences whose block tables start with the same physical
   blocks share those tokens' K/V, so a group's prefix can be read once for all its members;
2. on the kernels' path (CUDA, or the Triton interpreter in tests), hands the groups to
   :func:`~arkfast.kernels.plan_decode` with the planner's :class:`~arkfast.kernels.decode_cost.DecodeCostModel`
   (which groups read their prefix once, tokens per KV split for the device's SM count, read once
   at construction, and whether cascade beats plain decode by bytes moved); ``cascade="on"`` /
   ``"off"`` force one method;
3. on the CPU path, float32/float64 caches: the C++ kernel (:mod:`.cpu_attention`), which reads a
   shared prefix once per group at no extra cost (no gather, no merge), so it takes every group;
   other dtypes (:mod:`arkfast.kernels.cpu_decode_attention`) keep the groups only when they save
   enough key reads to pay for the prefix passes (:func:`cpu_grouping_pays`).

With a :class:`PlanCapacity`, kernel-path plans are laid out in fixed-capacity device buffers
(:mod:`arkfast.kernels.plan_buffers`) allocated once: the same pointers and launch grids every step,
whatever it holds. The capacity follows from the scheduler's limits (sequences a step may decode,
blocks a table may hold) and the cost model's split target, not from the longest sequence the model
allows; a step that exceeds it is planned the ordinary way (``num_capacity_fallbacks`` counts them).
"""
from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field

import torch

from arkfast.kernels._common import cdiv
from arkfast.kernels.cpu_decode_attention import CpuDecodePlan, Workspace, plan_cpu_decode
from arkfast.kernels.decode_attention import DecodePlan, plan_decode
from arkfast.kernels.decode_cost import DecodeCostModel
from arkfast.kernels.plan_buffers import DecodePlanBuffers, PlanCapacityError
from arkfast.kernels.work_list import MAX_ROWS

from . import cpu_attention
from .cpu_attention import CpuPagedPlan

# The CPU path's cost rule (cascade="auto"): group only when the groups save at least this many key
# reads per KV head, (members - 1) x prefix tokens summed over groups. A prefix pass and the merge are
# some 35 small ops a layer. Round 1 of the shipped tiny model's debate (32 shared tokens a problem),
# 5 agents, 2-core AMD EPYC, one thread: 8 problems (1,024 keys saved) took 1.16 s grouped, 1.04 s
# not; 40 problems (5,120 saved) 3.21 s and 3.24 s, about break-even (medians of 5 and 3 runs).
CPU_CASCADE_MIN_SAVED_KEYS = 4096

_PLAN_MODES = {"auto": "auto", "on": "cascade", "off": "plain"}


def prefix_groups(block_tables: list[list[int]], seq_lens: list[int], block_size: int
                  ) -> tuple[list[int], list[int]] | None:
    """Cascade groups for decoding sequences: ``(group_ids [B], prefix_lens [G])``, or None when no
    two sequences share a block.

    Only full blocks before each sequence's new token can be shared. The sequences form a trie over
    their block ids; grouping the members of a trie node at depth ``d`` blocks saves ``(members - 1)
    x d`` block reads, and splitting it into its children saves what the children save. Each node takes
    the better of the two, so a debate's problems (a long transcript shared by each problem's agents)
    are not merged into one group through a short system prompt common to all of them.
    """
    eligible = [(n - 1) // block_size for n in seq_lens]  # full blocks before the new token

    def best(members: list[int], depth: int) -> tuple[int, list[tuple[list[int], int]]]:
        """(saved block reads, groups as (members, prefix blocks)) for ``members`` sharing ``depth``
        blocks."""
        while True:  # walk down while every member continues with the same block
            nxt = {block_tables[m][depth] if eligible[m] > depth else None for m in members}
            if len(nxt) != 1 or None in nxt:
                break
            depth += 1
        here = ((len(members) - 1) * depth, [(members, depth)])
        children: dict[int, list[int]] = {}
        for m in members:
            if eligible[m] > depth:
                children.setdefault(block_tables[m][depth], []).append(m)
        saved, groups = 0, []
        for child in children.values():
            if len(child) > 1:
                s, g = best(child, depth + 1)
                saved, groups = saved + s, groups + g
        return (saved, groups) if saved > here[0] else here

    roots: dict[int, list[int]] = {}
    for b, table in enumerate(block_tables):
        if eligible[b] > 0:
            roots.setdefault(table[0], []).append(b)
    groups = [g for members in roots.values() if len(members) > 1 for g in best(members, 1)[1]]
    groups = [(members, depth) for members, depth in groups if len(members) > 1 and depth > 0]
    if not groups:
        return None
    group_ids = [-1] * len(block_tables)
    prefix_lens = []
    for g, (members, depth) in enumerate(groups):
        prefix_lens.append(depth * block_size)
        for m in members:
            group_ids[m] = g
    for b in range(len(block_tables)):  # everyone else: a group of one with no shared prefix
        if group_ids[b] < 0:
            group_ids[b] = len(prefix_lens)
            prefix_lens.append(0)
    return group_ids, prefix_lens


def cpu_grouping_pays(group_ids: list[int], prefix_lens: list[int],
                      min_saved_keys: int = CPU_CASCADE_MIN_SAVED_KEYS) -> bool:
    """Whether the CPU path should read the groups' prefixes once: they save ``(members - 1) x
    prefix`` key reads per KV head summed over groups, at least ``min_saved_keys``."""
    members = collections.Counter(group_ids)
    return sum((n - 1) * prefix_lens[g] for g, n in members.items()) >= min_saved_keys


@dataclass(frozen=True)
class PlanCapacity:
    """What fixed-capacity plan buffers hold: ``max_seqs`` decoding sequences of at most
    ``max_blocks`` blocks, ``plain_items`` / ``cascade_items`` work items and ``num_parts`` partial
    slots."""

    max_seqs: int
    max_blocks: int
    plain_items: int
    cascade_items: int
    num_parts: int

    @classmethod
    def from_limits(cls, *, max_seqs: int, max_blocks: int, num_q_heads: int, num_kv_heads: int, num_sms: int,
                    cost_model: DecodeCostModel) -> PlanCapacity:
        """The capacity for steps of at most ``max_seqs`` sequences (the scheduler's limit) planned
        by ``cost_model`` for ``num_sms`` SMs.

        The model's splits are at least ``even = total tokens / T`` long, ``T = cdiv(waves x SMs,
        Hkv)``, so a unit of ``n`` tokens takes at most ``n / even + 1`` items: plain decode (one unit
        a sequence) at most ``T + S`` items, cascade (a suffix a sequence, a prefix tile per member at
        most) ``T + 2S``. Partial slots: one per suffix item, and a prefix item of ``m`` members takes
        ``m``; a tile's prefix is at most ``total`` tokens, so its items hold at most ``M x T + S``
        slots in all (``M = MAX_ROWS / (Hq / Hkv)`` members a tile), ``(M + 1) x T + 3S`` with the
        suffixes. A forced split size (``kv_chunk_size``) can exceed these; it falls back."""
        target = cdiv(cost_model.waves * num_sms, num_kv_heads)
        members = MAX_ROWS // (num_q_heads // num_kv_heads)
        return cls(max_seqs=max_seqs, max_blocks=max_blocks, plain_items=target + max_seqs,
                   cascade_items=target + 2 * max_seqs, num_parts=(members + 1) * target + 3 * max_seqs)


@dataclass
class DecodePlanner:
    """Builds each decode step's attention plan for one model and cache layout.

    ``cascade``: ``"auto"`` (the cost models decide), ``"on"`` (always group what shares blocks) or
    ``"off"`` (plain decode). ``cost_model`` decides the kernels' path; ``cpu_min_saved_keys`` the CPU
    path's (:func:`cpu_grouping_pays`). ``workspace``: the CPU path's scratch, reused step after step.
    ``capacity``: lay kernel-path plans out in fixed buffers of this capacity (None: per-step tensors).
    """

    block_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    cascade: str = "auto"
    cost_model: DecodeCostModel = field(default_factory=DecodeCostModel)
    cpu_min_saved_keys: int = CPU_CASCADE_MIN_SAVED_KEYS
    workspace: Workspace = field(default_factory=Workspace)
    capacity: PlanCapacity | None = None

    def __post_init__(self):
        if self.cascade not in _PLAN_MODES:
            raise ValueError(f"cascade must be one of {tuple(_PLAN_MODES)}, got {self.cascade!r}")
        self.device = torch.device(self.device)
        self.num_sms = self.cost_model.num_sms(self.device)  # one device query, not one a step
        self.buffers = None if self.capacity is None else DecodePlanBuffers(
            max_seqs=self.capacity.max_seqs, max_blocks=self.capacity.max_blocks,
            plain_items=self.capacity.plain_items, cascade_items=self.capacity.cascade_items,
            num_parts=self.capacity.num_parts, num_q_heads=self.num_q_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, block_size=self.block_size, device=self.device)
        self.num_capacity_fallbacks = 0

    def with_capacity(self, *, max_seqs: int, max_blocks: int) -> DecodePlanner:
        """This planner with fixed plan buffers for steps of ``max_seqs`` sequences of at most
        ``max_blocks`` blocks (:meth:`PlanCapacity.from_limits`)."""
        capacity = PlanCapacity.from_limits(max_seqs=max_seqs, max_blocks=max_blocks, num_q_heads=self.num_q_heads,
                                            num_kv_heads=self.num_kv_heads, num_sms=self.num_sms,
                                            cost_model=self.cost_model)
        return dataclasses.replace(self, capacity=capacity)

    def plan(self, block_tables: list[list[int]], seq_lens: list[int], *, cpu_path: bool,
             padded: torch.Tensor | None = None) -> DecodePlan | CpuDecodePlan | CpuPagedPlan:
        """The plan of one decode step over sequences with these block tables (host lists of block
        ids) and lengths (tokens after this step's, host ints): on the CPU path when ``cpu_path``, a
        :class:`~.cpu_attention.CpuPagedPlan` (float32/float64) or a :class:`CpuDecodePlan`, else a
        :class:`DecodePlan` for the kernels (or their references). ``padded [B, W]`` int32: the same
        tables padded with -1, when the caller has them (else built here)."""
        if padded is None:
            width = max(len(t) for t in block_tables)
            padded = torch.tensor([t + [-1] * (width - len(t)) for t in block_tables], dtype=torch.int32)  # [B, W]
        groups = prefix_groups(block_tables, seq_lens, self.block_size) if self.cascade != "off" else None
        if cpu_path and self.dtype in cpu_attention.DTYPES and self.head_dim in cpu_attention.HEAD_DIMS:
            return cpu_attention.plan_cpu_paged_decode(padded, seq_lens, block_size=self.block_size,
                                                       group_ids=groups and groups[0],
                                                       prefix_lens=groups and groups[1])
        if cpu_path:
            if groups is not None and self.cascade == "auto" and not cpu_grouping_pays(
                    *groups, min_saved_keys=self.cpu_min_saved_keys):
                groups = None
            return plan_cpu_decode(padded, seq_lens, block_size=self.block_size,
                                   group_ids=groups and groups[0], prefix_lens=groups and groups[1],
                                   workspace=self.workspace)
        mode = _PLAN_MODES[self.cascade] if groups is not None else "plain"
        args = {"group_ids": groups and groups[0], "prefix_lens": groups and groups[1],
                "block_size": self.block_size, "num_kv_heads": self.num_kv_heads, "num_q_heads": self.num_q_heads,
                "head_dim": self.head_dim, "dtype": self.dtype, "device": self.device, "num_sms": self.num_sms,
                "mode": mode, "cost_model": self.cost_model}
        if self.buffers is not None:
            try:
                return plan_decode(padded, seq_lens, into=self.buffers, **args)
            except PlanCapacityError:
                self.num_capacity_fallbacks += 1    # this step does not fit: tensors of its own
        return plan_decode(padded, seq_lens, **args)
