"""``prm eval``: N sampled single-agent solutions per test problem, scored by the PRM, against the
exact step checker (arith) or held-out Monte-Carlo labels (elsewhere).

Samples. Each test problem's round-1 prompt (the one a debate's agents get, and the one the student
learns to answer alone) is sampled ``n`` times by the engine at the debate default temperature, one
seed per (problem, sample). Every sample becomes a trajectory record (the schema of
:mod:`arkfast.trajectories.schema`, steps segmented with the task's default mode), so it is scored
exactly as training data is encoded.

Numbers (:mod:`arkfast.prm.metrics`): ``best_of_n_accuracy`` keeps per problem the sample with the
highest trajectory score (``score_min`` by default, the Math-Shepherd / Lightman choice; ``score_prod``
is reported too); ``majority_accuracy`` votes the same samples' answers; ``pass_at_n`` is the share of
problems with a right sample. ``step_auroc`` and ``first_error_f1`` compare the step scores with the
exact per-step truth of :mod:`arkfast.prm.arith_steps` on arith; for other tasks with the hard
(>= 1/2) held-out Monte-Carlo labels of a label file, and ``step_truth`` says which was used.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from arkfast.debate.prompts import first_round_text
from arkfast.debate.protocol import request_seed
from arkfast.tasks import Problem, Task
from arkfast.trajectories import default_step_mode, segment_steps, tokenizer_fingerprint

from .arith_steps import check_steps, first_error
from .data import encode_trajectory, score_examples
from .metrics import best_of_n, first_error_f1, majority_of_n, pass_at_n, predicted_first_error, step_auroc

__all__ = ["evaluate_samples", "sample_solutions", "solution_record", "trajectory_scores"]


def solution_record(task: Task, problem: Problem, response: str, *, sample: int, fingerprint: str,
                    step_mode: str | None = None) -> dict[str, Any]:
    """A trajectory record (schema of :mod:`arkfast.trajectories.schema`) for one single-agent
    ``response`` to ``problem``: round 1, agent ``sample``, steps by ``step_mode`` (default: the
    task's)."""
    answer, correct = task.score(response, problem)
    steps = segment_steps(response, step_mode or default_step_mode(task.name))
    return {"id": f"{problem.id}/r1/a{sample}", "problem_id": problem.id, "task": task.name,
            "gold": problem.gold, "answer": answer, "correct": bool(correct),
            "source": {"round": 1, "agent": sample},
            "prompt": [{"role": "user", "content": first_round_text(task, problem)}],
            "response": response, "steps": [list(s) for s in steps], "step_scores": None,
            "tokenizer": fingerprint, "meta": dict(problem.meta)}


def sample_solutions(llm: Any, task: Task, problems: Sequence[Problem], *, n: int = 8,
                     temperature: float = 0.5, max_tokens: int | None = None, seed: int = 0,
                     use_tqdm: bool = True) -> list[dict[str, Any]]:
    """``n`` round-1 samples per problem from ``llm`` as trajectory records, problem by problem.
    Samples with no step (an empty response) are kept, with ``steps == []``."""
    from arkfast import SamplingParams
    from arkfast.debate.prompts import PromptBuilder

    tokenizer = llm.tokenizer
    builder = PromptBuilder(tokenizer, task)
    budget = max_tokens or task.default_max_tokens
    prompts, params = [], []
    for problem in problems:
        ids = builder.first_round(problem)
        for j in range(n):
            prompts.append(ids)
            params.append(SamplingParams(temperature=temperature, max_tokens=budget,
                                         seed=request_seed(seed, problem.id, 0, j)))
    outs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    fingerprint = tokenizer_fingerprint(tokenizer)
    return [solution_record(task, problem, outs[i * n + j].outputs[0].text, sample=j, fingerprint=fingerprint)
            for i, problem in enumerate(problems) for j in range(n)]


def trajectory_scores(step_scores: Sequence[float]) -> tuple[float, float]:
    """``(score_min, score_prod)`` of a trajectory's step scores (both 0 for a trajectory with no
    step: it says nothing)."""
    if not step_scores:
        return 0.0, 0.0
    return min(step_scores), math.prod(step_scores)


def evaluate_samples(prm, tokenizer, samples: Sequence[dict[str, Any]], *, n: int, threshold: float = 0.5,
                     row_tokens: int = 2048, progress=None) -> dict[str, Any]:
    """The eval numbers (module docstring) for ``samples`` (``n`` consecutive records per problem,
    as :func:`sample_solutions` returns them, each with ``meta["solution"]`` on arith)."""
    if len(samples) % n:
        raise ValueError(f"{len(samples)} samples is not a multiple of n={n}")
    scored = [s for s in samples if s["steps"]]
    examples = [encode_trajectory(tokenizer, s) for s in scored]
    step_scores = dict(zip((s["id"] for s in scored), score_examples(prm, examples, row_tokens=row_tokens,
                                                                     progress=progress)))
    flat_scores, flat_right, predicted, actual = [], [], [], []
    arith = all(s["task"] == "arith" for s in samples)
    for s in scored:
        scores = step_scores[s["id"]]
        if arith:
            right = check_steps(s["response"], s["steps"], s["meta"]["solution"])
            flat_scores += scores
            flat_right += right
            predicted.append(predicted_first_error(scores, threshold))
            actual.append(first_error(right))
    groups = [samples[i:i + n] for i in range(0, len(samples), n)]
    by_min = [[trajectory_scores(step_scores.get(s["id"], []))[0] for s in g] for g in groups]
    by_prod = [[trajectory_scores(step_scores.get(s["id"], []))[1] for s in g] for g in groups]
    correct = [[s["correct"] for s in g] for g in groups]
    task_canonical = _canonical(samples[0]["task"]) if samples else (lambda a: a)
    answers = [[task_canonical(s["answer"]) for s in g] for g in groups]
    fe = first_error_f1(predicted, actual) if arith else {"f1": None, "error_accuracy": None,
                                                           "correct_accuracy": None}
    return {
        "problems": len(groups), "n": n, "samples": len(samples),
        "step_truth": "exact arith step checker" if arith else None,
        "steps": len(flat_right), "right_steps": sum(flat_right),
        "step_auroc": step_auroc(flat_scores, flat_right) if arith else None,
        "first_error_f1": fe["f1"], "first_error_accuracy": fe["error_accuracy"],
        "all_correct_accuracy": fe["correct_accuracy"], "threshold": threshold,
        "flawed_solutions": sum(a is not None for a in actual),
        "sample_accuracy": sum(map(sum, correct)) / max(len(samples), 1),
        "best_of_n_accuracy": best_of_n(by_min, correct),
        "best_of_n_accuracy_prod": best_of_n(by_prod, correct),
        "majority_accuracy": majority_of_n(answers, correct),
        "pass_at_n": pass_at_n(correct),
    }


def _canonical(task_name: str):
    from .labels import task_for

    return task_for(task_name).canonical
