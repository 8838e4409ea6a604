"""Token weights of process-aware distillation (``--mode pad``): from step scores to per-token weights.

A trajectory ``j`` of problem ``p`` has steps ``k = 0 .. K_j - 1`` with process-reward scores
``s_jk`` in [0, 1] (``step_scores``, written by ``python -m arkfast.prm score``). Every response token
belongs to exactly one step (:func:`arkfast.trajectories.encode_response`: the ranges tile the
response) and takes that step's weight ``w_jk``; the end-of-turn token closing the response takes the
last step's. The loss of a token is ``w_t * CE_t`` (:func:`arkfast.kernels.fused_linear_weighted_cross_entropy`),
so ``w > 0`` raises the probability of the step's tokens, ``w = 0`` ignores them and ``w < 0`` lowers it
(unlikelihood on a step the PRM rejects). The rules (``--pad-weighting``):

``score``
    ``w_jk = s_jk``: each step is imitated in proportion to the PRM's belief that it is right. Never
    negative: a wrong step is merely not learned.
``advantage``
    ``w_jk = clip(s_jk - b_p, -c, c)`` with the problem's baseline
    ``b_p = mean_{j' of p} v_j'`` and ``v_j = min_k s_jk`` the trajectory's score (the weakest step;
    the ``score_min`` that ``prm score`` writes). A step better than the problem's typical trajectory
    is pushed up, a worse one pushed down (negative weight), with ``c`` = ``--pad-clip`` bounding how
    hard. The mean is over the trajectories of ``p`` in the training files (all files together). Unlike
    a group-relative advantage it keeps a signal when a problem has one trajectory: ``s_jk - v_j >= 0``
    (a weak step gets weight 0, the others what they exceed it by).
``min``
    ``w_jk = min_{i <= k} s_ji`` (PURE, Cheng et al. 2025, min-form credit assignment): a step is worth
    no more than the weakest step it builds on, so everything after the first doubtful step is
    down-weighted, while the steps before it keep their own scores.

**Span weights** (``--span-weights steps=W1,answer=W2``, any mode; SAD, arXiv 2505.13820, weights
reasoning and answer spans apart): the *answer span* is the record's last step (every task's prompt
asks for the answer at the end: arith's ``Answer: N`` line, a ``\boxed{}`` or ``(X)`` last paragraph),
the *reasoning spans* every step before it; a record of one step is all answer. Each step's weight (1,
or the PAD rule's) is multiplied by ``W2`` for the answer span and by ``W1`` for the others, and the
end-of-turn token, which closes the last step, takes the answer's. Under the step -> token rule a
token straddling the boundary belongs to the step it starts in: with the tiny model's tokenizer the
one token ``"\nAnswer: "`` starts after the last equation, so the answer span is the answer's digits
and the end-of-turn token.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

__all__ = ["PAD_WEIGHTINGS", "apply_span_weights", "pad_step_weights", "problem_baselines", "step_weights"]

PAD_WEIGHTINGS = ("score", "advantage", "min")


def problem_baselines(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``problem_id -> b_p``: the mean over the problem's trajectories of ``min_k s_jk`` (a trajectory
    without steps is left out; a problem with none gets no entry)."""
    scores: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r["step_scores"]:
            scores[r["problem_id"]].append(min(r["step_scores"]))
    return {p: sum(v) / len(v) for p, v in scores.items()}


def pad_step_weights(step_scores: Sequence[float], rule: str, *, baseline: float | None = None,
                     clip: float = 1.0) -> list[float]:
    """The weight of each step of one trajectory under ``rule`` (see the module docstring).

    >>> pad_step_weights([0.9, 0.2, 0.8], "min")
    [0.9, 0.2, 0.2]
    >>> pad_step_weights([0.9, 0.2, 0.8], "advantage", baseline=0.5, clip=0.25)
    [0.25, -0.25, 0.25]
    """
    if rule not in PAD_WEIGHTINGS:
        raise ValueError(f"pad weighting must be one of {PAD_WEIGHTINGS}, got {rule!r}")
    scores = [float(s) for s in step_scores]
    if rule == "score" or not scores:
        return scores
    if rule == "min":
        out, low = [], float("inf")
        for s in scores:
            low = min(low, s)
            out.append(low)
        return out
    if baseline is None:
        raise ValueError("the advantage rule needs the problem's baseline")
    if not clip > 0:
        raise ValueError(f"clip must be positive, got {clip}")
    return [min(max(s - baseline, -clip), clip) for s in scores]


def step_weights(records: Sequence[dict[str, Any]], mode: str, rule: str = "score",
                 clip: float = 1.0) -> list[list[float] | None]:
    """Per record, the weight of each of its steps: ``None`` (every token weight 1) for ``rsft``/``da``;
    for ``pad`` the rule's weights (the records must carry ``step_scores``)."""
    if mode != "pad":
        return [None] * len(records)
    baselines = problem_baselines(records) if rule == "advantage" else {}
    return [pad_step_weights(r["step_scores"], rule, baseline=baselines.get(r["problem_id"]), clip=clip)
            for r in records]


def apply_span_weights(weights: list[float] | None, num_steps: int,
                       span_weights: dict[str, float] | None) -> list[float] | None:
    """Per-step ``weights`` (``None``: all 1) times the span weights (see the module docstring):
    ``span_weights["answer"]`` on the last step, ``span_weights["steps"]`` on the others. ``None``
    ``span_weights`` returns ``weights`` unchanged.

    >>> apply_span_weights(None, 3, {"steps": 0.5, "answer": 2.0})
    [0.5, 0.5, 2.0]
    """
    if span_weights is None or num_steps == 0:
        return weights
    base = [1.0] * num_steps if weights is None else list(weights)
    return [w * span_weights["steps"] for w in base[:-1]] + [base[-1] * span_weights["answer"]]
