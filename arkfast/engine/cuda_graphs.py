"""CUDA graphs of the decode forward, per batch-size bucket and step kind (imported on CUDA devices,
and by the tests that run its static-buffer forwards without capturing them).

A decode step of B sequences launches a few kernels per layer; at small B the launches, not the GPU,
set the step time. Each bucket's forward is captured once over static buffers: input ids, positions,
cache slots, copy-on-write slot pairs, and the planner's fixed-capacity decode plan
(:mod:`arkfast.kernels.plan_buffers`), whose work lists keep one launch grid and one set of pointers
whatever the step holds. Every layer reads them through the same :class:`~.model_runner.PagedAttentionContext`
an eager step uses. A step copies its inputs into the first B rows and pads the rest (slot -1: nothing
written; a padding sequence has no partial slots: nothing read; padding copy pairs repeat the step's
first pair), then replays the graph of the smallest bucket that fits for its kind: plain or cascade
decode (as the plan chose), with or without copy-on-write copies. Steps with prefill chunks, batches
larger than the biggest bucket, and steps whose plan did not fit the planner's capacity run eagerly.
"""
from __future__ import annotations

import torch

from arkfast.kernels.decode_attention import plan_decode
from arkfast.models import DecoderModel

from .model_runner import PagedAttentionContext
from .planner import DecodePlanner


class DecodeGraphs:
    """The decode forward for batch sizes 1, 2, 4, 8, 16, 32, ... up to ``max_batch`` (at most the
    planner's capacity), each as four graphs: plain or cascade attention, with or without copies.

    ``capture=False`` keeps each forward as a function over the static buffers instead of a graph (no
    CUDA needed): a test runs exactly what would be captured."""

    def __init__(self, model: DecoderModel, kv_caches, planner: DecodePlanner, max_batch: int,
                 max_model_len: int, *, capture: bool = True):
        if planner.buffers is None or planner.capacity.max_seqs < max_batch:
            raise ValueError(f"the planner needs fixed plan buffers for {max_batch} sequences")
        device = kv_caches[0][0].device
        self.model, self.planner, self.capture = model, planner, capture
        self.buckets = sorted({b for b in (1, 2, 4, 8, *range(16, max_batch + 1, 16)) if b <= max_batch}
                              | {max_batch})
        i64 = {"dtype": torch.int64, "device": device}
        self.input_ids = torch.zeros(max_batch, **i64)
        self.positions = torch.zeros(max_batch, **i64)
        self.slot_mapping = torch.full((max_batch,), -1, **i64)
        # A decode token appends to one block: at most one block of copy-on-write slots a sequence.
        self.max_copies = max_batch * planner.block_size
        self.copy_src = torch.zeros(self.max_copies, **i64)
        self.copy_dst = torch.zeros(self.max_copies, **i64)
        self.graphs: dict[tuple[int, bool, bool], object] = {}
        self.outputs: dict[tuple[int, bool, bool], torch.Tensor] = {}
        pool = None
        with torch.inference_mode():
            for bs in reversed(self.buckets):  # largest first, so smaller ones reuse its memory pool
                for cascade in (False, True):
                    plan = self._empty_plan(bs, cascade)   # every sequence empty: nothing read
                    for copies in (False, True):
                        ctx = PagedAttentionContext(
                            kv_caches, self.slot_mapping[:bs], max_model_len, num_decode=bs, plan=plan,
                            copy_src=self.copy_src[:bs * planner.block_size] if copies else None,
                            copy_dst=self.copy_dst[:bs * planner.block_size] if copies else None)
                        key = (bs, cascade, copies)
                        if not capture:
                            self.graphs[key] = self._forward(bs, ctx)
                            continue
                        model(self.input_ids[:bs], self.positions[:bs], ctx)  # warm-up: compiles, allocates
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph, pool=pool):
                            self.outputs[key] = model(self.input_ids[:bs], self.positions[:bs], ctx)  # [bs, H]
                        pool = graph.pool() if pool is None else pool
                        self.graphs[key] = graph
        if capture:
            torch.cuda.synchronize(device)

    def _empty_plan(self, bs: int, cascade: bool):
        """A plan of ``bs`` empty sequences laid out in the planner's buffers (one group of them with
        an empty prefix for the cascade graphs): the views the graphs read, with nothing to attend."""
        p = self.planner
        return plan_decode(torch.full((bs, 1), -1, dtype=torch.int32), [0] * bs,
                           group_ids=[0] * bs if cascade else None, prefix_lens=[0] if cascade else None,
                           block_size=p.block_size, num_kv_heads=p.num_kv_heads, num_q_heads=p.num_q_heads,
                           head_dim=p.head_dim, dtype=p.dtype, mode="cascade" if cascade else "plain",
                           cost_model=p.cost_model, into=p.buffers)

    def _forward(self, bs: int, ctx: PagedAttentionContext):
        return lambda: self.model(self.input_ids[:bs], self.positions[:bs], ctx)

    def can_run(self, ctx) -> bool:
        """Whether a step with this :class:`PagedAttentionContext` can replay a graph: decode only, at
        most the biggest bucket, its plan laid out in the planner's buffers."""
        plan = ctx.plan
        return (ctx.cu_seqlens is None and plan is not None and ctx.num_decode <= self.buckets[-1]
                and getattr(plan, "part_o", None) is self.planner.buffers.part_o
                and (ctx.copy_src is None or ctx.copy_src.numel() <= ctx.num_decode * self.planner.block_size))

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        """Replay for ``B = ctx.num_decode`` decode tokens; returns ``hidden [B, H]``."""
        B = ctx.num_decode
        bs = next(b for b in self.buckets if b >= B)
        self.input_ids[:B].copy_(input_ids)
        self.positions[:B].copy_(positions)
        self.slot_mapping[:B].copy_(ctx.slot_mapping)
        self.slot_mapping[B:bs].fill_(-1)
        copies = ctx.copy_src is not None
        if copies:
            n, room = ctx.copy_src.numel(), bs * self.planner.block_size
            for static, pairs in ((self.copy_src, ctx.copy_src), (self.copy_dst, ctx.copy_dst)):
                static[:n].copy_(pairs)
                static[n:room].copy_(pairs[:1].expand(room - n))   # repeats of the first pair: no-ops
        key = (bs, bool(ctx.plan.use_cascade), copies)
        if not self.capture:
            return self.graphs[key]()[:B]
        self.graphs[key].replay()
        return self.outputs[key][:B]
