"""CUDA graphs of the decode forward, one per batch-size bucket (imported only on CUDA devices).

A decode step of B sequences launches a few kernels per layer; at small B the launches, not the GPU,
set the step time. Each bucket's forward is captured once over static input buffers; a step copies its
inputs into the first B rows, pads the rest (slot -1: nothing written; length 0: nothing read) and
replays the smallest bucket that fits. Captured graphs cannot change their launch grids, so they run
plain paged decode sized from the fixed block-table width (``max_model_len / block_size``); steps that
the plan runs as cascade, steps with prefill chunks or copy-on-write copies, and batches larger than
the biggest bucket run eagerly.
"""
from __future__ import annotations

import dataclasses

import torch

from arkfast.kernels.decode_attention import paged_decode_attention
from arkfast.kernels.paged_kv import write_kv_cache
from arkfast.models import DecoderModel


@dataclasses.dataclass
class GraphDecodeContext:
    """Decode attention over static buffers: ``slot_mapping [B]`` int64, ``block_tables [B, W]`` int32,
    ``seq_lens [B]`` int32 (0 for padding rows)."""

    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    max_seqlen: int

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.kv_caches[layer_idx]
        write_kv_cache(k, v, k_cache, v_cache, self.slot_mapping)
        return paged_decode_attention(q, k_cache, v_cache, self.block_tables, self.seq_lens)


class DecodeGraphs:
    """Captures the decode forward for batch sizes 1, 2, 4, 8, 16, 32, ... up to ``max_batch``."""

    def __init__(self, model: DecoderModel, kv_caches, block_size: int, max_model_len: int, max_batch: int):
        device = kv_caches[0][0].device
        width = -(-max_model_len // block_size)
        self.model = model
        self.buckets = sorted({b for b in (1, 2, 4, 8, *range(16, max_batch + 1, 16)) if b <= max_batch}
                              | {max_batch})
        i64 = {"dtype": torch.int64, "device": device}
        self.input_ids = torch.zeros(max_batch, **i64)
        self.positions = torch.zeros(max_batch, **i64)
        self.slot_mapping = torch.full((max_batch,), -1, **i64)
        self.block_tables = torch.full((max_batch, width), -1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = None
        with torch.inference_mode():
            for bs in reversed(self.buckets):  # largest first, so smaller ones reuse its memory pool
                ctx = GraphDecodeContext(kv_caches, self.slot_mapping[:bs], self.block_tables[:bs],
                                         self.seq_lens[:bs], max_model_len)
                model(self.input_ids[:bs], self.positions[:bs], ctx)  # warm-up: compiles, allocates
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bs] = model(self.input_ids[:bs], self.positions[:bs], ctx)  # [bs, H]
                pool = graph.pool() if pool is None else pool
                self.graphs[bs] = graph
        torch.cuda.synchronize(device)

    def can_run(self, ctx) -> bool:
        """Whether a step with this :class:`PagedAttentionContext` can replay a graph."""
        return (ctx.cu_seqlens is None and ctx.copy_src is None and ctx.plan is not None
                and not ctx.plan.use_cascade and ctx.num_decode <= self.buckets[-1])

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        """Replay for ``B = ctx.num_decode`` decode tokens; returns ``hidden [B, H]``."""
        B = ctx.num_decode
        bs = next(b for b in self.buckets if b >= B)
        tables = ctx.plan.block_tables  # [B, w] int32 on the device
        self.input_ids[:B].copy_(input_ids)
        self.positions[:B].copy_(positions)
        self.slot_mapping[:B].copy_(ctx.slot_mapping)
        self.slot_mapping[B:bs].fill_(-1)
        self.block_tables[:bs].fill_(-1)
        self.block_tables[:B, :tables.shape[1]].copy_(tables)
        self.seq_lens[:B].copy_(positions + 1)  # a decode token at position p makes the sequence p + 1 long
        self.seq_lens[B:bs].zero_()
        self.graphs[bs].replay()
        return self.outputs[bs][:B]
