"""PRM inputs: trajectories as token sequences with their step-end positions, packed into rows.

A trajectory becomes ``prompt ids + response ids`` (the single-agent chat prompt,
:func:`arkfast.trajectories.chat_prompt_ids`, then the response alone,
:func:`arkfast.trajectories.encode_response`) and, per step ``k`` with token range ``[t0, t1)``, the
position ``len(prompt) + t1 - 1`` of its last token, where the PRM reads its score::

    tokens     <prompt ...>  7 ␣+␣ 5 ␣=␣ 1 2 \\n  1 2 ␣-␣ 3 ␣=␣ 9 \\n  Answer: ␣ 9
    step ends                              ^                     ^            ^

:func:`pack_step_rows` lays whole sequences end to end with the C++ best-fit-decreasing packer
(:func:`arkfast.packing.pack`), as :func:`arkfast.train.pack_rows` does for LM training; a row keeps
where each sequence starts so its step positions become row positions.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from arkfast.models import VarlenContext
from arkfast.packing import pack
from arkfast.trajectories import chat_prompt_ids, encode_response

__all__ = ["StepExample", "StepRow", "encode_trajectory", "pack_step_rows", "score_examples"]


@dataclasses.dataclass(frozen=True)
class StepExample:
    """One trajectory as the PRM sees it: ``input_ids`` (prompt + response), ``step_ends`` (the
    position of each step's last token, increasing), optionally ``labels`` (one target in [0, 1]
    per step) and ``response_start`` (the position of the response's first token, the first token of
    step 0; step ``k > 0`` starts after ``step_ends[k - 1]``). A PRM with log-probability
    features (:mod:`arkfast.prm.model`) needs ``response_start``: it reads the backbone's log-probability of
    every step token."""

    input_ids: tuple[int, ...]
    step_ends: tuple[int, ...]
    labels: tuple[float, ...] | None = None
    response_start: int | None = None

    def __post_init__(self) -> None:
        if not self.step_ends:
            raise ValueError("a StepExample needs at least one step")
        if any(not 0 <= e < len(self.input_ids) for e in self.step_ends) or \
                any(b <= a for a, b in zip(self.step_ends, self.step_ends[1:])):
            raise ValueError(f"step_ends {self.step_ends} must increase inside [0, {len(self.input_ids)})")
        if self.labels is not None and len(self.labels) != len(self.step_ends):
            raise ValueError(f"{len(self.labels)} labels for {len(self.step_ends)} steps")
        if self.response_start is not None and not 1 <= self.response_start <= self.step_ends[0]:
            raise ValueError(f"response_start {self.response_start} must be in [1, {self.step_ends[0]}] "
                             f"(after the prompt, at or before the first step's end)")

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_trajectory(tokenizer: Any, record: dict[str, Any], labels: Sequence[float] | None = None,
                      prompt_ids: list[int] | None = None) -> StepExample:
    """The :class:`StepExample` of a trajectory record (``prompt``, ``response``, ``steps``).
    ``prompt_ids`` may be given when already rendered (the same prompt repeats across a problem)."""
    prompt = chat_prompt_ids(tokenizer, record["prompt"]) if prompt_ids is None else prompt_ids
    response, ranges = encode_response(tokenizer, record["response"], record["steps"])
    ends = tuple(len(prompt) + t1 - 1 for _, t1 in ranges)
    return StepExample(tuple(prompt) + tuple(response), ends,
                       None if labels is None else tuple(float(v) for v in labels), response_start=len(prompt))


@dataclasses.dataclass(frozen=True)
class StepRow:
    """Whole sequences laid end to end: ``input_ids [T]`` int64, ``step_index [S]`` int64 (row
    positions of every member's step ends, members in row order), ``labels [S]`` float32 (zeros when
    the examples had none), ``lengths`` (host ints summing to T) and ``members`` (the examples' indices,
    in row order; member ``m`` owns ``num_steps[m]`` consecutive entries of ``step_index``).
    ``token_index [N]`` / ``token_step [N]`` int64: the row positions of the members' step tokens
    (response tokens) and the row step each belongs to; ``None`` when a member has no
    ``response_start``."""

    input_ids: torch.Tensor
    step_index: torch.Tensor
    labels: torch.Tensor
    lengths: tuple[int, ...]
    members: tuple[int, ...]
    num_steps: tuple[int, ...]
    token_index: torch.Tensor | None = None
    token_step: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def total_steps(self) -> int:
        return int(self.step_index.shape[0])

    def to_device(self, device: torch.device | str):
        """``(input_ids, positions, ctx, step_index, labels)`` on ``device``, ready for the PRM."""
        ctx, positions = VarlenContext.from_lengths(self.lengths, device=device)
        return (self.input_ids.to(device), positions, ctx, self.step_index.to(device), self.labels.to(device))

    def step_tokens(self, device: torch.device | str):
        """``(token_index, token_step, num_steps)`` on ``device`` (see the class docstring), the input of
        a PRM's log-probability features; ``None`` when the row has no token index."""
        if self.token_index is None:
            return None
        return self.token_index.to(device), self.token_step.to(device), self.num_steps


def pack_step_rows(examples: Sequence[StepExample], row_tokens: int) -> list[StepRow]:
    """Pack ``examples`` whole into rows of at most ``row_tokens`` tokens (best-fit-decreasing).
    ``ValueError`` naming the first example longer than ``row_tokens``."""
    if not isinstance(row_tokens, int) or row_tokens <= 0:
        raise ValueError(f"row_tokens must be a positive int, got {row_tokens!r}")
    lengths = [len(ex) for ex in examples]
    for i, n in enumerate(lengths):
        if n > row_tokens:
            raise ValueError(f"trajectory {i} has {n} tokens, more than row_tokens={row_tokens}")
    with_tokens = all(ex.response_start is not None for ex in examples)
    rows = []
    for members in pack(lengths, row_tokens):
        ids, index, labels, offset = [], [], [], 0
        tok_index, tok_step = [], []
        for i in members:
            ex = examples[i]
            ids.extend(ex.input_ids)
            if with_tokens:
                start = ex.response_start
                for end in ex.step_ends:  # step k's tokens: [previous end + 1, its end]
                    tok_index.extend(range(offset + start, offset + end + 1))
                    tok_step.extend([len(index)] * (end + 1 - start))
                    index.append(offset + end)
                    start = end + 1
            else:
                index.extend(offset + e for e in ex.step_ends)
            labels.extend(ex.labels if ex.labels is not None else [0.0] * len(ex.step_ends))
            offset += len(ex)
        rows.append(StepRow(torch.tensor(ids, dtype=torch.int64), torch.tensor(index, dtype=torch.int64),
                            torch.tensor(labels, dtype=torch.float32), tuple(lengths[i] for i in members),
                            tuple(members), tuple(len(examples[i].step_ends) for i in members),
                            torch.tensor(tok_index, dtype=torch.int64) if with_tokens else None,
                            torch.tensor(tok_step, dtype=torch.int64) if with_tokens else None))
    return rows


@torch.no_grad()
def score_examples(prm, examples: Sequence[StepExample], *, row_tokens: int = 2048,
                   device: torch.device | str | None = None, progress=None) -> list[list[float]]:
    """P(step is right) for every step of every example: one list of floats per example, in order.
    ``prm``: a :class:`~arkfast.prm.model.ProcessRewardModel`; ``progress``: called with the number of
    examples each packed row finished (a progress bar's ``update``). One host copy per row."""
    device = device or prm.head.weight.device
    was_training = prm.training
    prm.eval()
    longest = max((len(ex) for ex in examples), default=1)
    out: list[list[float] | None] = [None] * len(examples)
    for row in pack_step_rows(examples, max(row_tokens, longest)):
        input_ids, positions, ctx, step_index, _ = row.to_device(device)
        probs = torch.sigmoid(prm(input_ids, positions, ctx, step_index,
                                  row.step_tokens(device))).cpu().tolist()  # [S]
        start = 0
        for member, n in zip(row.members, row.num_steps):
            out[member] = probs[start:start + n]
            start += n
        if progress is not None:
            progress(len(row.members))
    prm.train(was_training)
    return out  # type: ignore[return-value]
