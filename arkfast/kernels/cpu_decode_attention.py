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
padding stays under half a pass (:data:`PAD_FRACTION`). Per pass, the keys' flat slots (computed once
in the plan) are gathered with one ``index_select`` into a contiguous buffer and the item's query rows
(members x query heads) meet them in one ``bmm``: all KV heads at once up to
:data:`ALL_HEADS_MAX_KV_HEADS` (:func:`_pass_all_heads`), else one gather and ``bmm`` per KV head with
its ``Hq / Hkv`` query heads as the rows. Large scratch comes from a :class:`Workspace` the engine
keeps from step to step. Each pass
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
# Up to this many KV heads a pass multiplies every head in one bmm (:func:`_pass_all_heads`): Hkv
# times the flops of per-head matmuls, but half the gathers and matmul calls of two heads, and each
# slot's K/V row gathered whole. Past it the flops win: one gather and bmm pair per head.
ALL_HEADS_MAX_KV_HEADS = 2


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


class Workspace:
    """Scratch tensors reused by every layer of a step and by later steps: :meth:`get` returns a view
    of the first elements of a flat buffer per name that only grows. Fresh multi-megabyte tensors at
    every op cost page faults (the allocator hands large blocks back to the OS on free), which made
    the gathers several times slower than their copies. Contents are not cleared between uses."""

    def __init__(self):
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(n + n // 4, dtype=dtype)   # headroom: sequences grow a token a step
            self._buffers[(name, dtype)] = buf
        return buf[:n].view(shape)


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
    num_states: int
    workspace: Workspace


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
                    prefix_lens: list[int] | None = None, workspace: Workspace | None = None) -> CpuDecodePlan:
    """Plan one decode step (host side, once per step; every layer reuses it).

    ``block_tables [B, W]`` (int tensor or list of equal-length lists; entries past a sequence's last
    block are never read); ``seq_lens``: B host ints, each ``<= W x block_size``. ``group_ids [B]``
    (ints in ``[0, G)``) and ``prefix_lens [G]``: group g's members share tokens ``[0, prefix_lens[g])``
    (``<= seq_lens`` of every member), read through its first member's table row. A group of one, or
    with an empty prefix, is read as plain sequences. ``workspace``: scratch to reuse (the previous
    step's plan's), else a new one.
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
    return CpuDecodePlan(B, block_size, passes, prefix_state, suffix_state, num_prefix_groups, list(seq_lens),
                         empty + 1, workspace if workspace is not None else Workspace())


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
    ws = plan.workspace
    # Scaled queries plus a zero row for padded members: [B + 1, Hkv, G, D].
    qs = ws.get("q", (B + 1, Hkv, gqa, D), work)
    qs[:B].copy_(q.reshape(B, Hkv, gqa, D)).mul_(scale)                     # exact upcast, then scale
    qs[B].zero_()
    k_rows = k_cache.view(-1, Hkv, D)                                       # [num_slots, Hkv, D]
    v_rows = v_cache.view(-1, Hkv, D)
    # Every pass writes its (item, member) states into one table; the last row is the empty state.
    all_o = ws.get("all_o", (plan.num_states, Hq, D), work)                 # [S + 1, Hq, D]
    all_lse = ws.get("all_lse", (plan.num_states, Hq), work)                # [S + 1, Hq]
    all_o[-1].zero_()
    all_lse[-1].fill_(float("-inf"))
    state = 0
    for p in plan.passes:
        N, M, L = p.num_items, p.members, p.length
        o, lse = all_o[state:state + N * M], all_lse[state:state + N * M]
        state += N * M
        if Hkv <= ALL_HEADS_MAX_KV_HEADS:
            _pass_all_heads(qs, k_rows, v_rows, p, ws, o, lse)
            continue
        rows = qs.index_select(0, p.rows).view(N, M, Hkv, gqa, D)          # [N, M, Hkv, G, D]
        o5, lse4 = o.view(N, M, Hkv, gqa, D), lse.view(N, M, Hkv, gqa)
        o_h = torch.empty(N, M * gqa, D, dtype=work)
        for h in range(Hkv):
            qh = rows[:, :, h].reshape(N, M * gqa, D)                       # [N, M*G, D]
            k = k_rows[:, h].index_select(0, p.slots).view(N, L, D).to(work)  # [N, L, D]
            s = torch.baddbmm(p.bias.to(work), qh, k.transpose(1, 2))       # [N, M*G, L]
            m = s.amax(-1, keepdim=True)                                     # finite: >= 1 real key
            # torch.softmax, not exp: ATen's fused softmax is several times faster than exp_ on rows
            # holding -inf. Its largest probability is exp(m - m) / sum = 1 / sum (one rounding), so
            # lse = m + log(sum) = m - log(max_j p_j), well conditioned since max_j p_j >= 1 / L.
            prob = torch.softmax(s, -1)
            v = v_rows[:, h].index_select(0, p.slots).view(N, L, D).to(work)
            torch.bmm(prob, v, out=o_h)                                      # [N, M*G, D]
            o5[:, :, h] = o_h.view(N, M, gqa, D)
            lse4[:, :, h] = (m - prob.amax(-1, keepdim=True).log_()).view(N, M, gqa)
    o_b = torch.index_select(all_o, 0, plan.suffix_state, out=ws.get("o_b", (B, Hq, D), work))
    if plan.num_prefix_groups == 0:  # one state per sequence: nothing to merge
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype)
        out.copy_(o_b)
        return (out, all_lse[plan.suffix_state]) if return_lse else out
    o_a = torch.index_select(all_o, 0, plan.prefix_state, out=ws.get("o_a", (B, Hq, D), work))
    a, b = all_lse[plan.prefix_state], all_lse[plan.suffix_state]            # [B, Hq]
    # Log-sum-exp merge of the two states (module docstring); m = 0 when both are empty.
    m = torch.maximum(a, b)
    m = torch.where(torch.isneginf(m), 0.0, m)
    wa, wb = torch.exp(a - m), torch.exp(b - m)                              # 0 for an empty state
    total = wa + wb
    inv = 1.0 / torch.where(total > 0, total, 1.0)
    o_a.mul_((wa * inv)[..., None]).add_(o_b.mul_((wb * inv)[..., None]))
    lse = torch.where(total > 0, m + torch.log(total), float("-inf"))
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype)
    out.copy_(o_a)
    return (out, lse) if return_lse else out


def _pass_all_heads(qs: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, p: CpuDecodePass,
                    ws: Workspace, o: torch.Tensor, lse: torch.Tensor) -> None:
    """One pass with every KV head in one ``bmm``: ``qs [B + 1, Hkv, G, D]`` (scaled, the last row
    zero), ``k_rows``/``v_rows [num_slots, Hkv, D]``; writes ``o [N*M, Hq, D]`` and ``lse [N*M, Hq]``.

    Each slot's K row is gathered whole, ``[Hkv * D]``; query row (h, g) is laid out over those
    ``Hkv * D`` columns with zeros outside head h's D (a block-diagonal ``[Hq, Hkv * D]`` per member),
    so its dot with a key row is its dot with head h's key alone (the zeros add exact zeros). Likewise
    ``P @ V`` gives every query row all heads' ``[Hkv, D]`` sums; its own head's block is the output.
    """
    _, Hkv, gqa, D = qs.shape
    N, M, L = p.num_items, p.members, p.length
    R, work = M * Hkv * gqa, qs.dtype                                          # query rows per item
    rows = torch.index_select(qs, 0, p.rows, out=ws.get("rows", (N * M, Hkv, gqa, D), work))
    qbd = ws.get("qbd", (N * M, Hkv, gqa, Hkv, D), work).zero_()
    qbd.diagonal(dim1=1, dim2=3).copy_(rows.permute(0, 2, 3, 1))              # [N*M, G, D, Hkv] view
    kv = ws.get("kv", (N * L, Hkv, D), k_rows.dtype)                         # K, then V, of the slots
    torch.index_select(k_rows, 0, p.slots, out=kv)
    s = torch.baddbmm(p.bias.to(work), qbd.view(N, R, Hkv * D), kv.view(N, L, Hkv * D).to(work).transpose(1, 2),
                      out=ws.get("s", (N, R, L), work))                       # [N, R, L]
    m = torch.amax(s, -1, keepdim=True, out=ws.get("m", (N, R, 1), work))
    prob = torch.softmax(s, -1, out=ws.get("p", (N, R, L), work))            # see the per-head loop
    torch.index_select(v_rows, 0, p.slots, out=kv)
    res = torch.bmm(prob, kv.view(N, L, Hkv * D).to(work), out=ws.get("res", (N, R, Hkv * D), work))
    o.view(N * M, Hkv, gqa, D).copy_(res.view(N * M, Hkv, gqa, Hkv, D).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2))
    pmax = torch.amax(prob, -1, keepdim=True, out=ws.get("pmax", (N, R, 1), work))
    torch.sub(m, pmax.log_(), out=lse.view(N, R, 1))
