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

The decode plan comes from the engine's planner (:mod:`.planner`): it groups decoding sequences whose
block tables start with the same physical blocks (they share those tokens' K/V, so the plan can read
them once for the group) and decides, by its cost models, whether and how. On CPU every op runs its torch reference, except decode attention, which
takes the CPU path of :mod:`arkfast.kernels.cpu_decode_attention` (each group's prefix gathered and
multiplied once for all its members, scratch reused step after step); inside ``force_reference()`` it
runs the reference too. On CUDA the Triton kernels run, and pure decode steps replay CUDA graphs
(:mod:`.cuda_graphs`) unless ``enforce_eager``.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from arkfast.kernels._common import upload
from arkfast.kernels._dispatch import reference_forced, use_triton
from arkfast.kernels.cpu_decode_attention import CpuDecodePlan, cpu_decode_attention
from arkfast.kernels.decode_attention import DecodePlan, decode_attention
from arkfast.kernels.paged_kv import allocate_kv_cache, write_kv_cache
from arkfast.kernels.prefill_attention import prefill_attention
from arkfast.models import DecoderModel, VarlenContext

from . import cpu_attention
from .config import EngineConfig
from .planner import DecodePlanner, prefix_groups  # noqa: F401  (prefix_groups re-exported: it lived here)
from .sampler import Sampler, SamplingBatch, token_logprobs
from .scheduler import ScheduledBatch
from .sequence import Sequence


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
        self.planner = DecodePlanner(config.block_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, dtype,
                                     device, cascade=config.cascade)
        self.num_cascade_steps = 0
        self.graphs = None
        if device.type == "cuda" and not config.enforce_eager:
            from .cuda_graphs import DecodeGraphs  # CUDA-only machinery, imported only when used

            max_batch = min(config.max_num_seqs, config.max_num_batched_tokens)
            # Graphs read each step's plan from buffers sized once by the scheduler's limits.
            self.planner = self.planner.with_capacity(max_seqs=max_batch, max_blocks=min(
                num_kv_blocks, -(-max_model_len // config.block_size)))
            self.graphs = DecodeGraphs(model, self.kv_caches, self.planner, max_batch, max_model_len)

    # ------------------------------------------------------------------------------------------------
    def _upload(self, host: list[list[int] | np.ndarray], dtype: torch.dtype) -> list[torch.Tensor]:
        """Host int lists / arrays → device tensors, in one host-to-device copy
        (:func:`arkfast.kernels._common.upload`)."""
        return upload(host, dtype, self.device)

    def _cpu_path(self) -> bool:
        """Whether decode attention takes the CPU path (:mod:`arkfast.kernels.cpu_decode_attention`):
        on CPU tensors unless a test forces the kernels (interpreter) or their references."""
        return (self.device.type == "cpu" and not use_triton(self.kv_caches[0][0])
                and not reference_forced())

    def _decode_plan(self, decode: list[Sequence], padded: torch.Tensor
                     ) -> DecodePlan | CpuDecodePlan | cpu_attention.CpuPagedPlan:
        """The decode plan; ``padded [B, W]`` int32: ``decode``'s block tables, ``-1`` after each."""
        return self.planner.plan([seq.block_table for seq in decode],
                                 [seq.num_computed_tokens + 1 for seq in decode], cpu_path=self._cpu_path(),
                                 padded=padded)

    def prepare(self, batch: ScheduledBatch):
        """``(input_ids [T], positions [T], context, logit_rows [N], sampled sequences)`` for ``batch``.

        The step's B sequences (decodes first, then the prefill chunks) compute ``counts[b]`` tokens
        from ``starts[b]`` on. Its T tokens are laid out by array arithmetic, not a loop over tokens:
        token ``t`` belongs to sequence ``row[t]`` at position ``positions[t]``, and its cache slot is
        ``tables[row[t], positions[t] // bs] * bs + positions[t] % bs``, ``tables [B, W]`` being the
        sequences' block tables gathered from the block manager's array in one index."""
        bs, decode, nd = self.block_size, batch.decode, len(batch.decode)
        seqs = decode + [seq for seq, _ in batch.prefill]
        starts = np.array([seq.num_computed_tokens for seq in seqs], dtype=np.int64)            # [B]
        if batch.prefill:
            counts = np.array([1] * nd + [n for _, n in batch.prefill], dtype=np.int64)         # [B]
            ends = np.cumsum(counts)                                                            # [B]
            row = np.repeat(np.arange(len(seqs)), counts)                                       # [T]
            positions = np.arange(int(ends[-1])) + np.repeat(starts - (ends - counts), counts)  # [T]
        else:  # decodes only: token b is sequence b's one token
            row, positions = np.arange(nd), starts
        widths = [len(seq.block_table) for seq in seqs]
        tables = batch.block_tables.gather(seqs, max(widths, default=0))                        # [B, W]
        slots = tables[row, positions // bs].astype(np.int64) * bs + positions % bs            # [T]
        ids = [seq.token_ids[seq.num_computed_tokens] for seq in decode]
        # A sequence samples when its tokens reach its last one (every decode does), from its last row.
        rows, sampled = list(range(nd)), list(decode)
        for b, (seq, n) in enumerate(batch.prefill, nd):
            p = seq.num_computed_tokens
            ids += seq.token_ids[p:p + n]
            if p + n == seq.num_tokens:
                rows.append(int(ends[b]) - 1)
                sampled.append(seq)
        max_seqlen = int(positions.max()) + 1 if seqs else 0
        ids_t, pos_t, slots_t, rows_t, src_t, dst_t = self._upload(
            [ids, positions, slots, rows, batch.copy_src, batch.copy_dst], torch.int64)
        ctx = PagedAttentionContext(self.kv_caches, slots_t, max_seqlen, num_decode=nd)
        if batch.copy_src:
            ctx.copy_src, ctx.copy_dst = src_t, dst_t
        if decode:
            padded = np.ascontiguousarray(tables[:nd, :max(widths[:nd])])                      # [Bd, Wd]
            ctx.plan = self._decode_plan(decode, torch.from_numpy(padded))
            self.num_cascade_steps += int(ctx.plan.use_cascade if isinstance(ctx.plan, DecodePlan)
                                          else ctx.plan.num_prefix_groups > 0)
        if batch.prefill:
            padded = tables[nd:, :max(widths[nd:])]                                              # [Bp, Wp]
            cu = np.concatenate([[0], ends[nd:] - nd])                                           # [Bp + 1]
            ctx.cu_seqlens, ctx.cached_lens, flat_tables = self._upload([cu, starts[nd:], padded.ravel()],
                                                                        torch.int32)
            ctx.block_tables = flat_tables.view(padded.shape)
            ctx.max_new = int(counts[nd:].max())
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
        # A step of decodes only samples every row in order (rows are increasing): no gather then.
        in_order = len(sampled) == hidden.shape[0] and hidden.is_contiguous()
        last = hidden if in_order else hidden.index_select(0, rows)               # [N, H]
        logits = self.model.compute_logits(last)                                  # [N, V]
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
