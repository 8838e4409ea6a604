"""Decode attention over a paged KV cache on the CPU: a shared prefix read once per group, in batched
torch matmuls (no Triton kernel).

A step's decode attention on a CPU is a few small matmuls per sequence; what costs is moving K/V and
launching ops. So a *plan*, built once per step on the host (:func:`plan_cpu_decode`), turns the
prefix forest into a few *passes*, and every layer runs the same passes (:func:`cpu_decode_attention`):

* a prefix pass: one item per group of sequences sharing tokens ``[0, prefix_lens[g])``, read through
  its first member's table row; the members' queries are stacked as the rows of the item's matmul, so
  those keys are gathered and multiplied once for the whole group;
* suffix passes: one item per sequence, its tokens ``[start_b, seq_lens[b])`` (``start_b`` its
  group's prefix length, 0 without a group).

Items of a pass are padded to its longest key range (masked); the plan buckets items by length so the
padding stays under half a pass (:data:`PAD_FRACTION`). Per pass and KV head, the keys' flat slots
(computed once in the plan) are gathered with one ``index_select`` into a contiguous ``[N, L, D]`` and
the item's rows (members x the KV head's ``Hq / Hkv`` query heads) meet them in one ``bmm``. Each pass
yields a state ``(o, lse)`` per (item, member); a sequence's prefix and suffix states are merged by
log-sum-exp (natural log, see :mod:`merge_states`): ``lse = log(e^a + e^b)``, ``o = (e^(a - lse) o_a +
e^(b - lse) o_b)``, with an empty state (``lse = -inf``) weighing 0.

Precision: the softmax, the matmuls and the merge run in fp32 (float64 for float64 caches, so a test
can check the maths to float64 accuracy); the output is cast to ``q``'s dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PAD_FRACTION = 0.5  # a pass's items are at least this fraction of its longest (else a new pass)


@dataclass
class CpuDecodePass:
    """``N`` items of at most ``M`` member sequences over at most ``L`` keys each.

    ``rows [N * M]`` int64: member sequence of each (item, member), ``B`` (the zero query row) for
    padding; ``slots [N * L]`` int64: flat cache slots (``block * block_size + offset``) of each item's
    keys, a valid slot on padding; ``bias [N, 1, L]``: 0 on real keys, -inf on padding."""

    num_items: int
    members: int
    length: int
    rows: torch.Tensor
    slots: torch.Tensor
    bias: torch.Tensor


@dataclass
class CpuDecodePlan:
    """The passes of one decode step over ``B`` sequences (see the module docstring), built by
    :func:`plan_cpu_decode`. ``prefix_state [B]`` / ``suffix_state [B]`` int64: each sequence's state
    in the concatenation of every pass's (item, member) states, or the index of a final empty state
    when it has none. ``num_prefix_groups``: items of the prefix passes (0: nothing shared)."""

    batch_size: int
    block_size: int
    passes: list[CpuDecodePass]
    prefix_state: torch.Tensor
    suffix_state: torch.Tensor
    num_prefix_groups: int
    seq_lens: list[int]


def _bucket(order: list[int], lengths: list[int]) -> list[list[int]]:
    """Split ``order`` (indices sorted by ``lengths``, longest first) into runs whose every length is at
    least PAD_FRACTION of the run's first; zero lengths are dropped."""
    runs: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n <= 0:
            break
        if not runs or n < PAD_FRACTION * lengths[runs[-1][0]]:
            runs.append([])
        runs[-1].append(i)
    return runs


def _make_pass(tables: torch.Tensor, table_rows: list[int], starts: list[int], lengths: list[int],
               members: list[list[int]], block_size: int, pad_row: int) -> CpuDecodePass:
    """One pass: item i reads tokens ``[starts[i], starts[i] + lengths[i])`` through table row
    ``table_rows[i]`` for the query rows of ``members[i]``."""
    n, length = len(table_rows), max(lengths)
    width = max(len(m) for m in members)
    rows = torch.tensor([x for m in members for x in m + [pad_row] * (width - len(m))],
                        dtype=torch.long)                                         # [N * M]
    start = torch.tensor(starts, dtype=torch.long)                                # [N]
    lens = torch.tensor(lengths, dtype=torch.long)                                # [N]
    j = torch.arange(length)                                                      # [L]
    valid = j[None, :] < lens[:, None]                                            # [N, L]
    # Padding reads the item's first key (always valid: every item has >= 1 key).
    pos = start[:, None] + torch.where(valid, j[None, :], 0)                      # [N, L]
    blocks = tables[torch.tensor(table_rows, dtype=torch.long)].gather(1, pos // block_size)  # [N, L]
    slots = blocks * block_size + pos % block_size
    bias = torch.zeros(n, 1, length).masked_fill_(~valid[:, None, :], float("-inf"))
    return CpuDecodePass(n, width, length, rows, slots.reshape(-1), bias)


def plan_cpu_decode(block_tables, seq_lens: list[int], *, block_size: int, group_ids: list[int] | None = None,
                    prefix_lens: list[int] | None = None) -> CpuDecodePlan:
    """Plan one decode step (host side, once per step; every layer reuses it).

    ``block_tables [B, W]`` (int tensor or list of equal-length lists; entries past a sequence's last
    block are never read); ``seq_lens``: B host ints, each ``<= W x block_size``. ``group_ids [B]``
    (ints in ``[0, G)``) and ``prefix_lens [G]``: group g's members share tokens ``[0, prefix_lens[g])``
    (``<= seq_lens`` of every member), read through its first member's table row. A group of one, or
    with an empty prefix, is read as plain sequences.
    """
    tables = torch.as_tensor(block_tables, dtype=torch.long)
    B = len(seq_lens)
    if tables.dim() != 2 or tables.shape[0] != B:
        raise ValueError(f"block_tables must be [B={B}, max_blocks], got {tuple(tables.shape)}")
    capacity = tables.shape[1] * block_size
    for b, n in enumerate(seq_lens):
        if not 0 <= n <= capacity:
            raise ValueError(f"seq_lens[{b}] = {n} is outside [0, {capacity}] (block table width x block_size)")
    if (group_ids is None) != (prefix_lens is None):
        raise ValueError("group_ids and prefix_lens go together: pass both or neither")
    groups: dict[int, list[int]] = {}
    for b, g in enumerate(group_ids or ()):
        groups.setdefault(g, []).append(b)
    if group_ids is not None and len(group_ids) != B:
        raise ValueError(f"group_ids has {len(group_ids)} entries for {B} sequences")
    start = [0] * B
    shared = []                                     # groups read once: (first member, prefix, members)
    for g, members in groups.items():
        if not 0 <= g < len(prefix_lens):
            raise ValueError(f"group id {g} is outside [0, {len(prefix_lens)})")
        prefix = prefix_lens[g]
        if any(not 0 <= prefix <= seq_lens[b] for b in members):
            raise ValueError(f"prefix_lens[{g}] = {prefix} must be in [0, seq_lens[b]] for every member b of "
                             f"group {g} ({members})")
        if len(members) > 1 and prefix > 0:
            shared.append((members[0], prefix, members))
            for b in members:
                start[b] = prefix

    passes, pad_row = [], B
    state = 0
    prefix_state = torch.full((B,), -1, dtype=torch.long)
    shared.sort(key=lambda s: -s[1])
    for run in _bucket(list(range(len(shared))), [s[1] for s in shared]):
        items = [shared[i] for i in run]
        p = _make_pass(tables, [s[0] for s in items], [0] * len(items), [s[1] for s in items],
                       [s[2] for s in items], block_size, pad_row)
        for i, (_, _, members) in enumerate(items):
            prefix_state[torch.tensor(members)] = state + i * p.members + torch.arange(len(members))
        state += p.num_items * p.members
        passes.append(p)
    num_prefix_groups = len(shared)

    suffix_state = torch.full((B,), -1, dtype=torch.long)
    rest = [seq_lens[b] - start[b] for b in range(B)]
    order = sorted(range(B), key=rest.__getitem__, reverse=True)
    for run in _bucket(order, rest):
        p = _make_pass(tables, run, [start[b] for b in run], [rest[b] for b in run], [[b] for b in run],
                       block_size, pad_row)
        suffix_state[torch.tensor(run)] = state + torch.arange(len(run))
        state += p.num_items
        passes.append(p)
    empty = state  # the index of the empty state every sequence without a prefix (suffix) part points to
    prefix_state[prefix_state < 0] = empty
    suffix_state[suffix_state < 0] = empty
    return CpuDecodePlan(B, block_size, passes, prefix_state, suffix_state, num_prefix_groups, list(seq_lens))


def cpu_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: CpuDecodePlan,
                         *, scale: float | None = None, out: torch.Tensor | None = None,
                         return_lse: bool = False):
    """One layer's decode attention by ``plan`` (from :func:`plan_cpu_decode`).

    ``q [B, Hq, D]``, ``k_cache``/``v_cache [num_blocks, block_size, Hkv, D]`` contiguous, in ``q``'s
    dtype (fp32/bf16/fp16/float64), on the CPU. Returns ``out [B, Hq, D]`` in ``q.dtype`` (written into
    ``out`` if given), and with ``return_lse`` also ``lse [B, Hq]`` (natural log; -inf and ``o = 0``
    for a sequence with no keys) in the compute dtype (fp32, or float64 for float64 inputs).
    """
    B, Hq, D = q.shape
    if B != plan.batch_size:
        raise ValueError(f"q has {B} sequences, the plan was built for {plan.batch_size}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[3] != D:
        raise ValueError(f"k_cache/v_cache must both be [num_blocks, block_size, Hkv, D={D}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.shape[1] != plan.block_size:
        raise ValueError(f"the caches have blocks of {k_cache.shape[1]} tokens, the plan {plan.block_size}")
    Hkv = k_cache.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    gqa = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Scaled queries plus a zero row for padded members: [B + 1, Hkv, G, D].
    qs = torch.zeros(B + 1, Hkv, gqa, D, dtype=work)
    qs[:B] = q.reshape(B, Hkv, gqa, D)                                      # exact upcast
    qs.mul_(scale)
    k_rows = k_cache.view(-1, Hkv, D)                                       # [num_slots, Hkv, D]
    v_rows = v_cache.view(-1, Hkv, D)
    outs, lses = [], []
    for p in plan.passes:
        N, M, L = p.num_items, p.members, p.length
        rows = qs.index_select(0, p.rows).view(N, M, Hkv, gqa, D)          # [N, M, Hkv, G, D]
        o = torch.empty(N, M, Hkv, gqa, D, dtype=work)
        lse = torch.empty(N, M, Hkv, gqa, dtype=work)
        for h in range(Hkv):
            qh = rows[:, :, h].reshape(N, M * gqa, D)                       # [N, M*G, D]
            k = k_rows[:, h].index_select(0, p.slots).view(N, L, D).to(work)  # [N, L, D]
            s = torch.baddbmm(p.bias.to(work), qh, k.transpose(1, 2))       # [N, M*G, L]
            m = s.amax(-1, keepdim=True)                                     # finite: >= 1 real key
            s.sub_(m).exp_()
            total = s.sum(-1, keepdim=True)                                  # [N, M*G, 1], >= 1
            v = v_rows[:, h].index_select(0, p.slots).view(N, L, D).to(work)
            oh = torch.bmm(s, v).div_(total)                                 # [N, M*G, D]
            o[:, :, h] = oh.view(N, M, gqa, D)
            lse[:, :, h] = (m + total.log()).view(N, M, gqa)
        outs.append(o.view(N * M, Hq, D))
        lses.append(lse.view(N * M, Hq))
    outs.append(torch.zeros(1, Hq, D, dtype=work))                           # the empty state
    lses.append(torch.full((1, Hq), float("-inf"), dtype=work))
    all_o, all_lse = torch.cat(outs), torch.cat(lses)                        # [S + 1, Hq, D], [S + 1, Hq]
    o_a, o_b = all_o[plan.prefix_state], all_o[plan.suffix_state]            # [B, Hq, D]
    a, b = all_lse[plan.prefix_state], all_lse[plan.suffix_state]            # [B, Hq]
    # Log-sum-exp merge of the two states (module docstring); m = 0 when both are empty.
    m = torch.maximum(a, b)
    m = torch.where(torch.isneginf(m), 0.0, m)
    wa, wb = torch.exp(a - m), torch.exp(b - m)                              # 0 for an empty state
    total = wa + wb
    merged = (wa[..., None] * o_a + wb[..., None] * o_b) / torch.where(total > 0, total, 1.0)[..., None]
    lse = torch.where(total > 0, m + torch.log(total), float("-inf"))
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype)
    out.copy_(merged)
    return (out, lse) if return_lse else out

