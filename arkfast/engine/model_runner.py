"""The model runner: one step's attention metadata, built once and shared by every layer, the forward
over the step's packed tokens, and the sampler.

A step packs the decode tokens first (one per decoding sequence), then the prefill chunks. Per layer,
the attention context (:class:`PagedAttentionContext`, the decoder's attention seam):

1. writes every new token's k/v into its cache slot (``write_kv_cache``);
2. performs the step's copy-on-write copies (after the writes: a copy's source may be written in the
   same step);
3. runs decode attention for the decode rows with the step's :class:`DecodePlan` (plain or cascade,
   the plan's cost model decides) and paged-prefix prefill attention for the prefill rows (each chunk
   sees its sequence's cached tokens through its block table, then itself causally).

Cascade groups come from the block manager's physical blocks: decoding sequences whose block tables
start with the same blocks share those tokens' K/V, so the plan can read them once for the group
(:func:`prefix_groups`). On CPU every op runs its torch reference, except decode attention, which
takes the CPU path of :mod:`arkfast.kernels.cpu_decode_attention` (each group's prefix gathered and
multiplied once for all its members, scratch reused step after step); inside ``force_reference()`` it
runs the reference too. On CUDA the Triton kernels run, and pure decode steps replay CUDA graphs
(:mod:`.cuda_graphs`) unless ``enforce_eager``.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools

import torch

from arkfast.kernels._dispatch import reference_forced, use_triton
from arkfast.kernels.cpu_decode_attention import CpuDecodePlan, Workspace, cpu_decode_attention, plan_cpu_decode
from arkfast.kernels.decode_attention import DecodePlan, decode_attention, plan_decode
from arkfast.kernels.paged_kv import allocate_kv_cache, write_kv_cache
from arkfast.kernels.prefill_attention import prefill_attention
from arkfast.models import DecoderModel, VarlenContext

from . import cpu_attention
from .config import EngineConfig
from .sampler import Sampler, SamplingBatch, token_logprobs
from .scheduler import ScheduledBatch
from .sequence import Sequence

_PLAN_MODES = {"auto": "auto", "on": "cascade", "off": "plain"}
# The CPU path's cost rule (cascade="auto"): group only when the groups save at least this many key
# reads per KV head, (members - 1) x prefix tokens summed over groups. A prefix pass and the merge are
# some 35 small ops a layer. Round 1 of the shipped tiny model's debate (32 shared tokens a problem),
# 5 agents, 2-core AMD EPYC, one thread: 8 problems (1,024 keys saved) took 1.16 s grouped, 1.04 s
# not; 40 problems (5,120 saved) 3.21 s and 3.24 s, about break-even (medians of 5 and 3 runs).
CPU_CASCADE_MIN_SAVED_KEYS = 4096


@dataclasses.dataclass
class PagedAttentionContext:
    """Attention over the paged KV cache for one step of ``num_decode`` decode tokens followed by
    prefill chunks. Tensors on the model's device:

    ``slot_mapping [T]`` int64: each new token's cache slot. ``copy_src`` / ``copy_dst [C]`` int64:
    copy-on-write slot pairs (None when there are none). ``plan``: the decode plan (None without decode
    tokens): a :class:`DecodePlan` for the kernels (or their references), a :class:`CpuDecodePlan`
    for the CPU path. ``cu_seqlens [Bp + 1]`` int32 (offsets within the prefill rows), ``block_tables [Bp, W]``
    int32, ``cached_lens [Bp]`` int32 and ``max_new`` (host int): the prefill chunks (None / 0 without).
    ``max_seqlen`` (host int): the longest sequence after this step.
    """

    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    slot_mapping: torch.Tensor
    max_seqlen: int
    num_decode: int = 0
    plan: DecodePlan | CpuDecodePlan | cpu_attention.CpuPagedPlan | None = None
    cu_seqlens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    cached_lens: torch.Tensor | None = None
    max_new: int = 0
    copy_src: torch.Tensor | None = None
    copy_dst: torch.Tensor | None = None

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q [T, Hq, D]``, ``k/v [T, Hkv, D]`` (the step's new tokens) → ``[T, Hq, D]``."""
        k_cache, v_cache = self.kv_caches[layer_idx]
        write_kv_cache(k, v, k_cache, v_cache, self.slot_mapping)
        if self.copy_src is not None:
            for cache in (k_cache, v_cache):
                slots = cache.view(-1, *cache.shape[2:])  # [num_blocks * block_size, Hkv, D]
                slots[self.copy_dst] = slots[self.copy_src]
        nd = self.num_decode
        decode = (cpu_attention.paged_decode_attention_cpu if isinstance(self.plan, cpu_attention.CpuPagedPlan)
                  else cpu_decode_attention if isinstance(self.plan, CpuDecodePlan) else decode_attention)
        if self.cu_seqlens is None:
            return decode(q, k_cache, v_cache, self.plan)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, Hq, D]
        if nd:
            decode(q[:nd], k_cache, v_cache, self.plan, out=out[:nd])
        out[nd:] = prefill_attention(q[nd:], k[nd:], v[nd:], self.cu_seqlens, k_cache, v_cache,
                                     self.block_tables, self.cached_lens, max_seqlen=self.max_new)
        return out


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


def kv_block_bytes(model: DecoderModel, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block over all layers (K and V)."""
    cfg = model.config
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


class ModelRunner:
    """Runs scheduled steps: ``runner.run(batch) -> (sequences that sampled, their new token ids, their
    log-probabilities)`` (the last ``None`` when no request of the step asked for them)."""

    def __init__(self, model: DecoderModel, config: EngineConfig, num_kv_blocks: int, max_model_len: int,
                 device: torch.device, dtype: torch.dtype, seed: int = 0):
        self.model = model
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        cfg = model.config
        self.kv_caches = allocate_kv_cache(cfg.num_layers, num_kv_blocks, config.block_size, cfg.num_kv_heads,
                                           cfg.head_dim, dtype, device)
        self.sampler = Sampler(device, seed)
        self.cpu_workspace = Workspace()  # the CPU decode path's scratch, reused step after step
        self.num_cascade_steps = 0
        self.graphs = None
        if device.type == "cuda" and not config.enforce_eager:
            from .cuda_graphs import DecodeGraphs  # CUDA-only machinery, imported only when used

            self.graphs = DecodeGraphs(model, self.kv_caches, config.block_size, max_model_len,
                                       max_batch=min(config.max_num_seqs, config.max_num_batched_tokens))

    # ------------------------------------------------------------------------------------------------
    def _upload(self, host: list[list[int]], dtype: torch.dtype) -> list[torch.Tensor]:
        """Host int lists → device tensors, in one host-to-device copy."""
        flat = torch.tensor(list(itertools.chain.from_iterable(host)), dtype=dtype)
        if self.device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(self.device, non_blocking=True)
        return list(torch.split(flat, [len(part) for part in host]))

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Cache slots of ``seq``'s tokens ``[start, end)``: each block's slots as a range (the loop
        is per block, the tokens are expanded in C), then cut to the tokens asked for."""
        bs, table = self.block_size, seq.block_table
        first = start // bs
        blocks = table[first:-(-end // bs)]
        slots = list(itertools.chain.from_iterable(range(b * bs, b * bs + bs) for b in blocks))
        return slots[start - first * bs:end - first * bs]

    def _cpu_path(self) -> bool:
        """Whether decode attention takes the CPU path (:mod:`arkfast.kernels.cpu_decode_attention`):
        on CPU tensors unless a test forces the kernels (interpreter) or their references."""
        return (self.device.type == "cpu" and not use_triton(self.kv_caches[0][0])
                and not reference_forced())

    def _decode_plan(self, decode: list[Sequence]) -> DecodePlan | CpuDecodePlan | cpu_attention.CpuPagedPlan:
        cfg = self.model.config
        tables = [seq.block_table for seq in decode]
        lens = [seq.num_computed_tokens + 1 for seq in decode]
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)  # [B, W]
        groups = prefix_groups(tables, lens, self.block_size) if self.config.cascade != "off" else None
        if self._cpu_path() and self.dtype in cpu_attention.DTYPES:
            # The C++ path reads a shared prefix once per group at no extra cost (no merge, no
            # gather), so it groups whenever blocks are shared: "auto" is "on" there.
            return cpu_attention.plan_cpu_paged_decode(padded, lens, block_size=self.block_size,
                                                       group_ids=groups and groups[0],
                                                       prefix_lens=groups and groups[1])
        if self._cpu_path():
            if groups is not None and self.config.cascade == "auto":
                members = collections.Counter(groups[0])
                saved = sum((n - 1) * groups[1][g] for g, n in members.items())
                groups = groups if saved >= CPU_CASCADE_MIN_SAVED_KEYS else None
            return plan_cpu_decode(padded, lens, block_size=self.block_size, group_ids=groups and groups[0],
                                   prefix_lens=groups and groups[1], workspace=self.cpu_workspace)
        mode = _PLAN_MODES[self.config.cascade] if groups is not None else "plain"
        return plan_decode(padded, lens, group_ids=groups and groups[0], prefix_lens=groups and groups[1],
                           block_size=self.block_size, num_kv_heads=cfg.num_kv_heads,
                           num_q_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=self.dtype,
                           device=self.device, mode=mode)

    def prepare(self, batch: ScheduledBatch):
        """``(input_ids [T], positions [T], context, logit_rows [N], sampled sequences)`` for ``batch``."""
        bs, decode = self.block_size, batch.decode
        positions = [seq.num_computed_tokens for seq in decode]
        ids = [seq.token_ids[p] for seq, p in zip(decode, positions)]
        slots = [seq.block_table[p // bs] * bs + p % bs for seq, p in zip(decode, positions)]
        rows, sampled = list(range(len(decode))), list(decode)
        cu, cached, tables, max_new = [0], [], [], 0
        max_seqlen = max(positions, default=-1) + 1
        for seq, n in batch.prefill:
            p = seq.num_computed_tokens
            ids += seq.token_ids[p:p + n]
            positions += range(p, p + n)
            slots += self._slots(seq, p, p + n)
            cu.append(cu[-1] + n)
            cached.append(p)
            tables.append(seq.block_table)
            max_new = max(max_new, n)
            max_seqlen = max(max_seqlen, p + n)
            if p + n == seq.num_tokens:  # the chunk reaches the last token: sample from it
                rows.append(len(decode) + cu[-1] - 1)
                sampled.append(seq)
        ids_t, pos_t, slots_t, rows_t, src_t, dst_t = self._upload(
            [ids, positions, slots, rows, batch.copy_src, batch.copy_dst], torch.int64)
        ctx = PagedAttentionContext(self.kv_caches, slots_t, max_seqlen, num_decode=len(decode))
        if batch.copy_src:
            ctx.copy_src, ctx.copy_dst = src_t, dst_t
        if decode:
            ctx.plan = self._decode_plan(decode)
            self.num_cascade_steps += int(ctx.plan.use_cascade if isinstance(ctx.plan, DecodePlan)
                                          else ctx.plan.num_prefix_groups > 0)
        if batch.prefill:
            width = max(len(t) for t in tables)
            padded = list(itertools.chain.from_iterable(t + [-1] * (width - len(t)) for t in tables))
            ctx.cu_seqlens, ctx.cached_lens, flat_tables = self._upload([cu, cached, padded], torch.int32)
            ctx.block_tables = flat_tables.view(len(tables), width)
            ctx.max_new = max_new
        return ids_t, pos_t, ctx, rows_t, sampled

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], list[int], list[dict | None] | None]:
        """Compute ``batch`` and sample; returns the sequences that drew a token, the tokens and, when
        some of them asked for logprobs, one ``{token_id: (logprob, rank)}`` per sequence (``None`` for
        those that did not; :func:`~.sampler.token_logprobs`)."""
        input_ids, positions, ctx, rows, sampled = self.prepare(batch)
        if self.graphs is not None and self.graphs.can_run(ctx):
            hidden = self.graphs.run(input_ids, positions, ctx)
        else:
            hidden = self.model(input_ids, positions, ctx)                        # [T, H]
        if not sampled:
            return [], [], None
        logits = self.model.compute_logits(hidden[rows])                          # [N, V]
        params = SamplingBatch([s.params for s in sampled], [s.num_tokens for s in sampled])
        tokens = self.sampler(logits, params)
        # The one device-to-host copy a step needs: the new tokens decide what runs next.
        host = tokens.tolist()
        want = [i for i, s in enumerate(sampled) if s.params.logprobs is not None]
        if not want:
            return sampled, host, None
        logprobs: list[dict | None] = [None] * len(sampled)
        for i, entry in zip(want, token_logprobs(logits, params, tokens, want)):
            logprobs[i] = entry
        return sampled, host, logprobs


def choose_num_kv_blocks(config: EngineConfig, model: DecoderModel, dtype: torch.dtype, device: torch.device,
                         max_model_len: int) -> int:
    """The KV cache size in blocks (see :class:`EngineConfig`); at least one longest sequence plus one
    block for a copy-on-write."""
    bs = config.block_size
    minimum = -(-max_model_len // bs) + 1
    per_block = kv_block_bytes(model, bs, dtype)
    if config.num_kv_blocks is not None:
        blocks = config.num_kv_blocks
    elif config.kv_cache_memory is not None:
        blocks = config.kv_cache_memory // per_block
    elif device.type == "cuda":
        blocks = _gpu_free_bytes_for_cache(config, model, device, max_model_len) // per_block
    else:
        wanted = config.max_num_seqs * -(-max_model_len // bs)
        blocks = min(wanted, config.cpu_kv_cache_memory // per_block)
        blocks = max(blocks, minimum)
    if blocks < minimum:
        raise ValueError(f"the KV cache holds {blocks} blocks of {bs} tokens; one sequence of max_model_len="
                         f"{max_model_len} tokens needs {minimum} (raise num_kv_blocks / kv_cache_memory / "
                         f"gpu_memory_utilization, or lower max_model_len)")
    return blocks


@torch.inference_mode()
def _gpu_free_bytes_for_cache(config: EngineConfig, model: DecoderModel, device: torch.device,
                              max_model_len: int) -> int:
    """``gpu_memory_utilization`` x device memory, minus what is in use (weights, other processes) and
    the activation peak of a full-budget prefill forward."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    tokens = config.max_num_batched_tokens
    lengths = [max_model_len] * (tokens // max_model_len) + ([tokens % max_model_len] if tokens % max_model_len
                                                             else [])
    ctx, positions = VarlenContext.from_lengths(lengths, device)
    hidden = model(torch.zeros(tokens, dtype=torch.long, device=device), positions, ctx)
    model.compute_logits(hidden[-min(tokens, config.max_num_seqs):])
    del hidden, ctx, positions
    torch.cuda.synchronize(device)
    activations = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()  # so that mem_get_info's "used" is weights, context and other processes
    free, total = torch.cuda.mem_get_info(device)
    return int(config.gpu_memory_utilization * total - (total - free) - activations)
