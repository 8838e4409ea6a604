"""Trajectory records → training examples → packed rows, and the seeded order rows are visited in.

Each record becomes one :class:`arkfast.train.Example`, tokenized the way the engine saw it and the
way the embedded tiny model was trained (:mod:`arkfast.zoo.data`)::

    prompt     = chat_prompt_ids(tok, record["prompt"])        # chat template + generation prompt
    completion = encode_response(tok, response, steps)[0] + [end_of_turn]

The end-of-turn token is the tokenizer's ``eos_token`` (``<|im_end|>`` in a ChatML template such as the
tiny model's): the engine stops on it, so the student must learn to emit it. Prompt tokens are
context only; every completion token is a target, weighted by its step's weight (:mod:`.weights`;
1 for ``rsft``/``da``), the end-of-turn token by the last step's.

Rows are packed by :func:`arkfast.train.pack_rows` (the C++ best-fit-decreasing packer: whole
sequences, positions restarting per sequence, causal attention inside each only, nothing predicts a
sequence's first token). :class:`RowOrder` visits them in a fresh seeded permutation per epoch.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from arkfast.train import Example, PackedRow

from .weights import apply_span_weights, step_weights

__all__ = ["DataStats", "RowOrder", "concat_rows", "end_of_turn_id", "load_examples", "record_example",
           "rows_fingerprint"]


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends an assistant turn: the tokenizer's eos (``<|im_end|>`` for ChatML)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: cannot end the assistant turn the student learns")
    return int(eos)


def record_example(tokenizer: Any, record: dict[str, Any], weights: Sequence[float] | None,
                   eos_id: int) -> Example:
    """One record as an :class:`Example` (see the module docstring). ``weights``: one per step of the
    record, or ``None`` for weight 1 everywhere. A self-correction record (``correct.jsonl``, with a
    ``draft``) is prompted with the ids ``generate --protocol self-refine`` gives the revision
    (:func:`arkfast.trajectories.correction.revision_prompt_ids`)."""
    from arkfast.trajectories import chat_prompt_ids, encode_response

    if "draft" in record:  # a self-correction record: the engine's self-refine revision prompt
        from arkfast.trajectories.correction import revision_prompt_ids

        prompt = revision_prompt_ids(tokenizer, record["prompt"])
    else:
        prompt = chat_prompt_ids(tokenizer, record["prompt"])
    ids, ranges = encode_response(tokenizer, record["response"], record["steps"])
    completion = list(ids) + [eos_id]
    token_weights = None
    if weights is not None:
        if len(weights) != len(ranges):
            raise ValueError(f"record {record['id']!r}: {len(weights)} step weights for {len(ranges)} steps")
        token_weights = [0.0] * len(completion)
        for w, (t0, t1) in zip(weights, ranges):
            token_weights[t0:t1] = [w] * (t1 - t0)
        token_weights[-1] = weights[-1]  # the end-of-turn token closes the last step
    return Example(prompt, completion, token_weights)


@dataclasses.dataclass
class DataStats:
    """What the training files held: ``records`` read, ``examples`` kept, ``skipped_long`` (longer than
    a row), ``skipped_no_steps`` (pad records with no scored step: nothing to weight),
    ``skipped_continues`` (``correct`` mode without ``--continues``: right -> right records left out),
    the ``target_tokens`` and ``tokens`` of the kept examples."""

    records: int = 0
    examples: int = 0
    skipped_long: int = 0
    skipped_no_steps: int = 0
    skipped_continues: int = 0
    tokens: int = 0
    target_tokens: int = 0


def read_records(paths: Sequence[str | Path], tokenizer: Any, mode: str, *,
                 continues: bool = False) -> tuple[list[dict[str, Any]], DataStats]:
    """The records of every file (:func:`arkfast.trajectories.read_trajectories`, checked against
    ``tokenizer``; ``pad`` needs ``step_scores``), in file order. ``correct`` keeps the ``corrects``
    self-correction records, the ``continues`` ones only with ``continues``, and every plain
    trajectory record (so ``--data rsft.jsonl correct.jsonl`` trains both); it refuses files without
    any self-correction record."""
    from arkfast.trajectories import read_trajectories

    records = []
    for path in paths:
        records += read_trajectories(path, tokenizer=tokenizer, require_step_scores=mode == "pad")
    stats = DataStats(records=len(records))
    if mode == "correct":
        if not any("transition" in r for r in records):
            raise ValueError(f"{', '.join(map(str, paths))}: --mode correct needs self-correction records "
                             f"(correct.jsonl from python -m arkfast.trajectories); none has a 'transition'")
        kept = [r for r in records if r.get("transition", "corrects") == "corrects" or continues]
        stats.skipped_continues = len(records) - len(kept)
        records = kept
    return records, stats


def load_examples(paths: Sequence[str | Path], tokenizer: Any, mode: str, *, pad_weighting: str = "min",
                  pad_clip: float = 1.0, row_tokens: int | None = None, span_weights: dict[str, float] | None = None,
                  continues: bool = False) -> tuple[list[Example], DataStats]:
    """Read every file (:func:`read_records`) and build the examples, in file order; ``span_weights``
    scale the reasoning and answer spans (:func:`~.weights.apply_span_weights`). Examples longer than
    ``row_tokens`` are skipped and counted. Raises the reader's ``TrajectoryFileError`` (a
    ``ValueError`` naming file, line and field) for a bad file."""
    records, stats = read_records(paths, tokenizer, mode, continues=continues)
    eos = end_of_turn_id(tokenizer)
    examples = []
    for record, weights in zip(records, step_weights(records, mode, pad_weighting, pad_clip)):
        if weights is not None and not weights:
            stats.skipped_no_steps += 1
            continue
        weights = apply_span_weights(weights, len(record["steps"]), span_weights)
        example = record_example(tokenizer, record, weights, eos)
        if row_tokens is not None and len(example) > row_tokens:
            stats.skipped_long += 1
            continue
        examples.append(example)
        stats.tokens += len(example)
        stats.target_tokens += len(example.completion)
    stats.examples = len(examples)
    if not examples:
        raise ValueError(f"{', '.join(map(str, paths))}: no usable trajectory ({stats.records} records, "
                         f"{stats.skipped_long} longer than row_tokens={row_tokens}, "
                         f"{stats.skipped_no_steps} without steps)")
    return examples, stats


def concat_rows(rows: Sequence[PackedRow]) -> PackedRow:
    """Several packed rows as one token stream (their sequences end to end): one forward pass over
    a micro-batch of rows, exactly the mathematics of one pass per row."""
    if len(rows) == 1:
        return rows[0]
    return PackedRow(input_ids=torch.cat([r.input_ids for r in rows]), labels=torch.cat([r.labels for r in rows]),
                     weights=torch.cat([r.weights for r in rows]),
                     lengths=tuple(n for r in rows for n in r.lengths))


def rows_fingerprint(rows: Sequence[PackedRow]) -> str:
    """``sha256`` of every row's tokens, labels and weights: a resumed run must see the same rows."""
    h = hashlib.sha256()
    for r in rows:
        for t in (r.input_ids, r.labels, r.weights):
            h.update(t.numpy().tobytes())
        h.update(repr(r.lengths).encode())
    return "sha256:" + h.hexdigest()


class RowOrder:
    """The row indices optimiser steps take: epoch ``e`` is a permutation of ``range(num_rows)`` drawn
    from a generator seeded with ``(seed, e)``, epochs laid end to end; step ``s`` takes stream
    positions ``[s * batch_rows, (s + 1) * batch_rows)``. A pure function of ``(seed, step)``: a
    resumed run restores its data position from the step alone."""

    def __init__(self, num_rows: int, batch_rows: int, seed: int):
        if num_rows <= 0:
            raise ValueError("no rows to train on")
        self.num_rows, self.batch_rows, self.seed = num_rows, batch_rows, seed
        self._epoch: tuple[int, list[int]] | None = None  # the last epoch's permutation

    def permutation(self, epoch: int) -> list[int]:
        if self._epoch is None or self._epoch[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch = (epoch, torch.randperm(self.num_rows, generator=gen).tolist())
        return self._epoch[1]

    def step_rows(self, step: int) -> list[int]:
        """Row indices of optimiser step ``step`` (0-based)."""
        out = []
        for pos in range(step * self.batch_rows, (step + 1) * self.batch_rows):
            epoch, i = divmod(pos, self.num_rows)
            out.append(self.permutation(epoch)[i])
        return out

    def epoch_of(self, step: int) -> float:
        """Epochs completed after ``step`` steps."""
        return step * self.batch_rows / self.num_rows

