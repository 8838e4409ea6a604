"""The scheduler: continuous batching with chunked prefill and preemption by recompute.

Each step it picks, under a token budget (``max_num_batched_tokens``):

1. every running sequence that has one token left to compute (a *decode*: its last sampled token),
   oldest first. If the KV cache has no room for it, the newest sequence admitted after it and not
   yet scheduled this step is preempted (its blocks freed, itself re-queued at the front to be recomputed later; its full blocks
   usually survive in the prefix cache, so the recompute is mostly cache hits); if there is none, the
   sequence itself is;
2. running sequences still in their prompt (a chunked prefill), oldest first, each as many tokens as
   the budget and the free blocks allow (preempting newer unscheduled sequences only when not even one
   token fits);
3. waiting sequences, first come first served, while there are sequence slots, budget and blocks: each
   takes over its cached prefix (:meth:`BlockManager.match_prefix`) and computes (a chunk of) the rest.

A sequence whose scheduled tokens reach its last token samples its next token at the end of the step.
The scheduler only decides; the engine runs the step and then calls :meth:`Scheduler.finish_step`.
"""
from __future__ import annotations

import collections
import dataclasses
import time

from .block_manager import BlockManager, BlockTables
from .config import EngineConfig
from .sequence import Sequence, SequenceStatus


@dataclasses.dataclass
class ScheduledBatch:
    """One step's work. ``decode``: sequences computing their one remaining token; ``prefill``:
    ``(sequence, num_tokens)`` chunks of longer remainders; ``copy_src`` / ``copy_dst``: slot pairs
    for the model runner to copy after writing the step's K/V (copy-on-write); ``block_tables``: the
    block manager's array of every sequence's block table (read by the runner for this step)."""

    decode: list[Sequence]
    prefill: list[tuple[Sequence, int]]
    copy_src: list[int]
    copy_dst: list[int]
    block_tables: BlockTables

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)

    @property
    def is_empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    """Owns the waiting queue and the running list (in admission order) and the block manager."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_cached_prompt_tokens = 0  # prompt tokens served from the prefix cache at first admission

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        scheduled: set[int] = set()  # id() of sequences scheduled this step
        decode: list[Sequence] = []
        prefill: list[tuple[Sequence, int]] = []

        rest: list[Sequence] = []  # running sequences with more than one token left, in order
        for seq in list(self.running):                                       # 1. decodes
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted by an older sequence this step
                continue
            if len(seq.token_ids) - seq.num_computed_tokens != 1:
                rest.append(seq)
                continue
            if not bm.append_token(seq):  # else its token fits in its own last block: nothing to check
                while not bm.can_allocate(seq, 1):
                    victim = self._newest_unscheduled(scheduled, exclude=seq)
                    self._preempt(victim or seq)
                    if victim is None:
                        break
                if seq.status is not SequenceStatus.RUNNING:
                    continue
                bm.allocate(seq, 1)
            decode.append(seq)
            scheduled.add(id(seq))
            budget -= 1

        # 2. prefill chunks. Preemptions above only took sequences after the one decoding, so `rest`
        # is every running sequence not scheduled yet, in order (or budget is 0 and nothing runs).
        for seq in rest:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            n = self._fit(seq, min(seq.num_tokens - seq.num_computed_tokens, budget))
            while n == 0:
                victim = self._newest_unscheduled(scheduled, exclude=seq)
                if victim is None:
                    break
                self._preempt(victim)
                n = self._fit(seq, min(seq.num_tokens - seq.num_computed_tokens, budget))
            if n:
                bm.allocate(seq, n)
                prefill.append((seq, n))
                scheduled.add(id(seq))
                budget -= n

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:  # 3. admit
            seq = self.waiting[0]
            match = bm.match_prefix(seq)
            n = min(seq.num_tokens - match.num_tokens, budget)
            if not bm.can_allocate(seq, n, match):
                break
            self.waiting.popleft()
            bm.allocate(seq, n, match)
            seq.status = SequenceStatus.RUNNING
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = match.num_tokens
                self.num_cached_prompt_tokens += match.num_tokens
                seq.metrics.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            if n == 1 and seq.num_tokens - seq.num_computed_tokens == 1:  # all but its last token cached
                decode.append(seq)
            else:
                prefill.append((seq, n))
            scheduled.add(id(seq))
            budget -= n

        copy_src, copy_dst = bm.take_copies()
        return ScheduledBatch(decode, prefill, copy_src, copy_dst, bm.tables)

    def finish_step(self, batch: ScheduledBatch) -> None:
        """Advance ``num_computed_tokens`` past what ``batch`` computed."""
        for seq in batch.decode:
            seq.num_computed_tokens += 1
        for seq, n in batch.prefill:
            seq.num_computed_tokens += n

    def rollback(self, batch: ScheduledBatch) -> None:
        """Undo ``batch`` when running it failed (an exception, a Ctrl-C): its sequences are re-queued
        to recompute from their cached prefix, and the blocks it was to write are forgotten, since
        the prefix cache already listed them (see :meth:`BlockManager.allocate`) but nothing was
        computed into them."""
        for seq in [*batch.decode, *(s for s, _ in batch.prefill)][::-1]:  # re-queued oldest first
            if seq.status is SequenceStatus.RUNNING:
                self._preempt(seq, count=False)
        self.block_manager.forget_step_writes()

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a running sequence finished and release its blocks (they stay in the prefix cache)."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        self.running.remove(seq)

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is; returns whether it was found."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "abort"
                return True
        for seq in self.running:
            if seq.request_id == request_id:
                self.finish(seq, "abort")
                return True
        return False

    # ------------------------------------------------------------------------------------------------
    def _fit(self, seq: Sequence, n: int) -> int:
        """The most of ``n`` next tokens of running ``seq`` that the free blocks can hold."""
        bm = self.block_manager
        if bm.can_allocate(seq, n):
            return n
        lo, hi = 0, n  # can_allocate is monotone in n: binary search the largest that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if bm.can_allocate(seq, mid) else (lo, mid - 1)
        return lo

    def _newest_unscheduled(self, scheduled: set[int], exclude: Sequence) -> Sequence | None:
        """The newest running sequence admitted after ``exclude`` and not scheduled this step."""
        for seq in reversed(self.running):
            if seq is exclude:
                return None
            if id(seq) not in scheduled:
                return seq
        return None

    def _preempt(self, seq: Sequence, count: bool = True) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += int(count)
