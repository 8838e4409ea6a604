"""Rollouts of online process-aware distillation: prompts from trajectory files, ``G`` samples each
from the arkfast engine (with their log-probabilities), graded by the task, steps scored by the PRM.

The prompts are the distinct problems of the training files (trajectory records: ``problem_id``,
``prompt``, ``gold``, ``task``), in the order they first appear. The ``G`` samples of a prompt go into
the engine together, so they share the prompt's KV blocks (prefix cache) and read them once per decode
step (cascade decode). Each sample has its own seed, a function of ``(run seed, step, problem,
sample)``, so a step's rollouts do not depend on what else is in the batch or on a resume.

Steps of a sampled response are found on its text (the task's segmentation,
:func:`arkfast.trajectories.segment_steps`) and mapped back to the *sampled* token ids (not a
re-tokenisation: the trainer must score exactly the tokens the engine drew): a token belongs to the
step holding its first character, the tokens between two steps to the earlier one, so the ranges tile
the response, as :func:`arkfast.trajectories.encode_response` does for records. The PRM reads each
step's score at its last token (:mod:`arkfast.prm.data`).
"""
from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Prompt", "Rollout", "load_prompts", "rollout_seed", "sample_groups", "score_groups", "step_ranges"]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One training problem: its id, task name, gold answer and the round-1 prompt's token ids."""

    problem_id: str
    task: str
    gold: str
    prompt_ids: tuple[int, ...]


@dataclasses.dataclass
class Rollout:
    """One sample: ``token_ids`` as drawn (the end-of-turn token included when it ended the response),
    the engine's ``logprobs`` of those tokens, the response ``text``, whether it is ``correct``, the
    token ``steps`` (half-open ranges into ``token_ids``, tiling it) and the PRM's probability per step
    (``step_scores``, filled by :func:`score_groups`)."""

    prompt: Prompt
    sample: int
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str | None
    correct: bool = False
    steps: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    step_scores: list[float] | None = None


def load_prompts(paths: Sequence[str | Path], tokenizer: Any) -> list[Prompt]:
    """The distinct problems of the trajectory files (checked against ``tokenizer``), in order of first
    appearance. ``ValueError`` (the reader's, naming file and line) for a bad file."""
    from arkfast.trajectories import chat_prompt_ids, read_trajectories

    seen: dict[str, Prompt] = {}
    for path in paths:
        for record in read_trajectories(path, tokenizer=tokenizer):
            if record["problem_id"] not in seen:
                ids = tuple(chat_prompt_ids(tokenizer, record["prompt"]))
                seen[record["problem_id"]] = Prompt(record["problem_id"], record["task"], str(record["gold"]), ids)
    return list(seen.values())


def rollout_seed(seed: int, step: int, problem: int, sample: int) -> int:
    """The sampling seed of ``sample`` of problem index ``problem`` at ``step`` (a 63-bit hash)."""
    from arkfast.engine.sampler import mix_seed

    return mix_seed(mix_seed(seed, step), problem * 4096 + sample)


def step_ranges(tokenizer: Any, token_ids: Sequence[int], step_mode: str, eos_id: int | None
                ) -> tuple[str, list[tuple[int, int]]]:
    """``(text, ranges)`` of a sampled response: its text (special tokens skipped) and the token range of
    each step (see the module docstring); ``[]`` when the text has no step. A step that owns no token
    (it lies inside a token starting in the step before) is merged into that step."""
    from arkfast.trajectories import segment_steps

    ids = list(token_ids)
    body = ids[:-1] if ids and eos_id is not None and ids[-1] == eos_id else ids
    pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in body]
    text = "".join(pieces)
    if text != tokenizer.decode(body, skip_special_tokens=True):  # pieces that decode differently alone
        pieces = []
        prev = ""
        for i in range(len(body)):
            cur = tokenizer.decode(body[:i + 1], skip_special_tokens=True)
            pieces.append(cur[len(prev):])
            prev = cur
        text = prev
    spans = segment_steps(text, step_mode)
    if not spans or not ids:
        return text, []
    starts = [s for s, _ in spans]
    firsts, at = [], 0
    for piece in pieces:
        firsts.append(at)
        at += len(piece)
    owner = [max(bisect.bisect_right(starts, a) - 1, 0) for a in firsts]
    ranges: list[tuple[int, int]] = []
    for i, k in enumerate(owner):
        if not ranges or k != owner[i - 1]:
            ranges.append((i, i + 1))
        else:
            ranges[-1] = (ranges[-1][0], i + 1)
    if not ranges:
        return text, []
    ranges[-1] = (ranges[-1][0], len(ids))  # the end-of-turn token closes the last step
    return text, ranges


def sample_groups(llm, prompts: Sequence[Prompt], indices: Sequence[int], *, group: int, temperature: float,
                  max_tokens: int, seed: int, step: int, tokenizer: Any, eos_id: int | None) -> list[list[Rollout]]:
    """``group`` samples of each prompt ``prompts[i]`` for ``i`` in ``indices`` (one engine call for all of
    them), graded by their task and split into steps: one list of :class:`Rollout` per prompt."""
    from arkfast.engine import SamplingParams
    from arkfast.tasks import ADAPTERS, ArithTask, Problem
    from arkfast.trajectories import default_step_mode

    requests, params = [], []
    for i in indices:
        for g in range(group):
            requests.append(list(prompts[i].prompt_ids))
            params.append(SamplingParams(temperature=temperature, max_tokens=max_tokens,
                                         seed=rollout_seed(seed, step, i, g), logprobs=0))
    outputs = llm.generate(requests, params)
    tasks: dict[str, Any] = {}
    groups, n = [], 0
    for i in indices:
        p = prompts[i]
        if p.task not in tasks:
            if p.task != "arith" and p.task not in ADAPTERS:
                raise ValueError(f"problem {p.problem_id}: unknown task {p.task!r}")
            tasks[p.task] = ArithTask() if p.task == "arith" else ADAPTERS[p.task]()
        task, problem = tasks[p.task], Problem(p.problem_id, "", p.gold)
        members = []
        for g in range(group):
            out = outputs[n].outputs[0]
            n += 1
            lps = [entry[t].logprob for entry, t in zip(out.logprobs, out.token_ids)]
            text, ranges = step_ranges(tokenizer, out.token_ids, default_step_mode(p.task), eos_id)
            _, correct = task.score(text, problem)
            members.append(Rollout(p, g, list(out.token_ids), lps, text, out.finish_reason, bool(correct), ranges))
        groups.append(members)
    return groups


def score_groups(prm, groups: Sequence[Sequence[Rollout]], *, row_tokens: int = 4096) -> None:
    """Fill ``step_scores`` (P(step is right) per step) of every rollout that has steps, with the PRM
    reading prompt + sampled tokens and each step's last token (one packed pass)."""
    from arkfast.prm import StepExample, score_examples

    todo = [r for members in groups for r in members if r.steps]
    if not todo:
        return
    examples = [StepExample(r.prompt.prompt_ids + tuple(r.token_ids),
                            tuple(len(r.prompt.prompt_ids) + t1 - 1 for _, t1 in r.steps),
                            response_start=len(r.prompt.prompt_ids)) for r in todo]
    for r, scores in zip(todo, score_examples(prm, examples, row_tokens=row_tokens)):
        r.step_scores = scores
