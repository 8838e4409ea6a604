"""The PRM's evaluation numbers: step AUROC, ProcessBench-style first-error F1, best-of-N, majority
vote and pass@N.

``step_auroc``
    The probability that a right step scores above a wrong one (ties count one half): the
    Mann-Whitney U statistic over ``n_right x n_wrong`` pairs, computed from average ranks,
    ``AUC = (R_right - n_right (n_right + 1) / 2) / (n_right n_wrong)`` with ``R_right`` the sum of the
    right steps' ranks among all steps (1-based, ties given their mean rank).
``first_error_f1``
    ProcessBench (Zheng et al. 2024, arXiv 2412.06559): on *flawed* solutions (some step wrong), the
    accuracy of locating the earliest wrong step; on *correct* ones (every step right), the accuracy of
    flagging no step; F1 is their harmonic mean ``2 a_err a_ok / (a_err + a_ok)``. The PRM flags the
    first step whose score is below a threshold (0.5: P(step is right) < 1/2).
``best_of_n_accuracy`` / ``majority_accuracy`` / ``pass_at_n``
    Over N samples per problem: the sample the PRM scores highest is right; the majority answer is
    right; any sample is right (the bound of any reranker).
"""
from __future__ import annotations

from collections.abc import Sequence

from arkfast.debate.protocol import majority_vote

__all__ = ["best_of_n", "first_error_f1", "majority_of_n", "pass_at_n", "predicted_first_error", "step_auroc"]


def step_auroc(scores: Sequence[float], right: Sequence[bool]) -> float | None:
    """AUROC of ``scores`` separating right (``True``) from wrong steps; ``None`` when either class is
    empty (the number is undefined)."""
    if len(scores) != len(right):
        raise ValueError(f"{len(scores)} scores for {len(right)} labels")
    n_pos = sum(1 for r in right if r)
    n_neg = len(right) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # a run of equal scores shares the mean of its 1-based ranks
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, ok in zip(ranks, right) if ok)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def predicted_first_error(step_scores: Sequence[float], threshold: float = 0.5) -> int | None:
    """The first step scored below ``threshold``, or ``None`` when none is."""
    return next((k for k, s in enumerate(step_scores) if s < threshold), None)


def first_error_f1(predicted: Sequence[int | None], actual: Sequence[int | None]) -> dict[str, float | None]:
    """``{"error_accuracy", "correct_accuracy", "f1"}`` over solutions whose true first error is
    ``actual[i]`` (``None``: an all-correct solution) and predicted one ``predicted[i]``. An accuracy
    over no solutions is ``None``, and so is the F1 then."""
    if len(predicted) != len(actual):
        raise ValueError(f"{len(predicted)} predictions for {len(actual)} solutions")
    flawed = [p == a for p, a in zip(predicted, actual) if a is not None]
    clean = [p is None for p, a in zip(predicted, actual) if a is None]
    acc_err = sum(flawed) / len(flawed) if flawed else None
    acc_ok = sum(clean) / len(clean) if clean else None
    if acc_err is None or acc_ok is None:
        f1 = None
    else:
        f1 = 0.0 if acc_err + acc_ok == 0 else 2 * acc_err * acc_ok / (acc_err + acc_ok)
    return {"error_accuracy": acc_err, "correct_accuracy": acc_ok, "f1": f1}


def best_of_n(scores: Sequence[Sequence[float]], correct: Sequence[Sequence[bool]]) -> float:
    """Accuracy when each problem keeps its highest-scored sample (the first on a tie)."""
    picks = [c[max(range(len(s)), key=lambda i: (s[i], -i))] for s, c in zip(scores, correct, strict=True)]
    return sum(picks) / len(picks) if picks else 0.0


def majority_of_n(answers: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]]) -> float:
    """Accuracy of the majority answer per problem (:func:`arkfast.debate.protocol.majority_vote`: a
    tie goes to the answer seen first). ``answers`` are canonical answers (``None``: no answer, no
    vote); a problem nobody answered is wrong."""
    hits = 0
    for keys, oks in zip(answers, correct, strict=True):
        winner = majority_vote(list(keys), canonical=lambda key: key)
        hits += winner is not None and bool(oks[list(keys).index(winner)])
    return hits / len(answers) if answers else 0.0


def pass_at_n(correct: Sequence[Sequence[bool]]) -> float:
    """Share of problems with at least one right sample."""
    return sum(any(c) for c in correct) / len(correct) if correct else 0.0
