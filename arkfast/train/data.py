"""Training data: (prompt, completion) token sequences packed into fixed-length rows.

An :class:`Example` is one sequence ``prompt + completion``. The model learns to predict the
completion only: in next-token form, position ``t`` predicts token ``t + 1``, so its label is
``tokens[t + 1]`` when that token belongs to the completion and ``-100`` (ignored) otherwise, and the
last token of every sequence has no label. Each completion token carries a weight (1 for plain SFT;
a process-reward score for step-weighted distillation), which lands on the position that predicts it::

    tokens    p0   p1   p2   c0   c1   c2
    labels  -100 -100   c0   c1   c2 -100
    weights    0    0   w0   w1   w2    0

:func:`pack_rows` packs examples whole into rows of ``row_tokens`` tokens with the C++
best-fit-decreasing packer (:func:`arkfast.packing.pack`); a :class:`PackedRow` knows its sequence
lengths and builds the varlen attention context (``cu_seqlens``, positions restarting at 0 for each
sequence) the decoder runs on. Rows carry no padding: a row shorter than ``row_tokens`` is simply a
shorter token stream.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from arkfast.models import VarlenContext
from arkfast.packing import pack

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class Example:
    """One training sequence: ``prompt`` and ``completion`` token ids (non-empty completion).

    ``weights`` (optional, one float per completion token) scale each completion token's loss;
    ``None`` means all ones. ``trained`` (optional, one bool per completion token) marks the
    completion tokens that are targets; the others are context only, like the prompt (a multi-turn
    chat trains its assistant turns only; a drill trains only the computed part of each line).
    ``None`` means all of them.
    """

    prompt: tuple[int, ...]
    completion: tuple[int, ...]
    weights: tuple[float, ...] | None = None
    trained: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", tuple(int(t) for t in self.prompt))
        object.__setattr__(self, "completion", tuple(int(t) for t in self.completion))
        if not self.completion:
            raise ValueError("Example.completion is empty: there is nothing to learn from it")
        for name, cast in (("weights", float), ("trained", bool)):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(cast(v) for v in value))
                if len(getattr(self, name)) != len(self.completion):
                    raise ValueError(f"Example.{name} has {len(value)} entries for "
                                     f"{len(self.completion)} completion tokens")

    def __len__(self) -> int:
        return len(self.prompt) + len(self.completion)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids [L] int64, labels [L] int64, weights [L] float32)`` with ``L = len(self)``."""
        tokens = torch.tensor(self.prompt + self.completion, dtype=torch.int64)  # [L]
        n_prompt, L, C = len(self.prompt), len(self), len(self.completion)
        # Per token of the whole sequence: its label if some position predicts it, and that weight.
        target = torch.zeros(L, dtype=torch.bool)
        target[n_prompt:] = True if self.trained is None else torch.tensor(self.trained)
        target[0] = False  # nothing predicts the first token (an empty prompt)
        w = torch.zeros(L, dtype=torch.float32)
        w[n_prompt:] = torch.ones(C) if self.weights is None else torch.tensor(self.weights)
        # position t predicts token t + 1: shift both left by one; the last position predicts nothing.
        labels = torch.full((L,), IGNORE_INDEX, dtype=torch.int64)
        weights = torch.zeros(L, dtype=torch.float32)
        labels[:-1] = torch.where(target[1:], tokens[1:], IGNORE_INDEX)
        weights[:-1] = torch.where(target[1:], w[1:], 0.0)
        return tokens, labels, weights


@dataclasses.dataclass(frozen=True)
class PackedRow:
    """Whole sequences laid end to end: ``input_ids``, ``labels`` (int64) and ``weights`` (float32),
    each ``[T]``, with ``lengths`` (host ints summing to T) telling where each sequence ends."""

    input_ids: torch.Tensor  # [T] int64
    labels: torch.Tensor  # [T] int64
    weights: torch.Tensor  # [T] float32
    lengths: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_targets(self) -> int:
        """How many positions carry a label (host int, from host tensors: no device sync)."""
        return int((self.labels != IGNORE_INDEX).sum())

    def to_device(self, device: torch.device | str):
        """``(input_ids, positions, labels, weights, ctx)`` on ``device``, ready for the decoder."""
        ctx, positions = VarlenContext.from_lengths(self.lengths, device=device)
        return (self.input_ids.to(device), positions, self.labels.to(device), self.weights.to(device), ctx)


def pack_rows(examples: Sequence[Example], row_tokens: int) -> list[PackedRow]:
    """Pack ``examples`` whole into rows of at most ``row_tokens`` tokens (best-fit-decreasing).

    Rows come in the order the packer opened them; within a row, sequences in packing order. Raises
    ``ValueError`` naming the first example longer than ``row_tokens``.
    """
    if not isinstance(row_tokens, int) or row_tokens <= 0:
        raise ValueError(f"row_tokens must be a positive int, got {row_tokens!r}")
    lengths = [len(ex) for ex in examples]
    for i, n in enumerate(lengths):
        if n > row_tokens:
            raise ValueError(f"example {i} has {n} tokens, more than row_tokens={row_tokens}")
    rows = []
    for members in pack(lengths, row_tokens):
        parts = [examples[i].tensors() for i in members]
        rows.append(PackedRow(input_ids=torch.cat([p[0] for p in parts]),
                              labels=torch.cat([p[1] for p in parts]),
                              weights=torch.cat([p[2] for p in parts]),
                              lengths=tuple(lengths[i] for i in members)))
    return rows
