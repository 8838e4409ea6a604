"""Rewards, step credit and group advantages of online process-aware distillation (``--mode grpo``).

A prompt gets ``G`` samples ``j``. Sample ``j`` has a verifiable outcome ``o_j`` (1 when its answer is
the gold one, else 0) and steps ``k = 0 .. K_j - 1`` with PRM probabilities ``p_jk``; its step
rewards are ``r_jk = p_jk - (1 - p_jk) = 2 p_jk - 1`` in [-1, 1] (p(correct) - p(incorrect), as in
AgentArk's trainer). The return of step ``k`` (what every token of step ``k`` is credited with) is,
by ``credit``:

``min`` (PURE, Cheng et al. 2025, min-form credit assignment)
    ``G_jk = c_prm * sum_{i >= k} softmax_{i >= k}(-r_ji / tau) * r_ji + c_out * o_j``: the softmin
    over the *remaining* steps, which tends to ``min_{i >= k} r_ji`` as ``tau -> 0`` (``tau`` = 0.1 by
    default). A step is worth no more than the weakest step still ahead of it, so the return cannot be
    raised by padding a response with many confident easy steps (the way sum-form returns are gamed).
``sum``
    ``G_jk = c_prm * sum_{i >= k} r_ji + c_out * o_j``: the usual undiscounted return.

The outcome reward sits at the end of the response, after every step, so it enters every step's
return. The sample's score is ``s_j = G_j0``, the return of its first step (the whole response); a
response with no step gets ``s_j = c_out * o_j`` for all its tokens.

Advantages (per step, then per token of the step) subtract a group baseline built from the scores:

``rloo`` (leave-one-out, Kool et al. 2019; AgentArk's default)
    ``A_jk = G_jk - mean_{j' != j} s_j'`` (unbiased: the baseline does not depend on sample ``j``).
``grpo`` (group-normalised, Shao et al. 2024)
    ``A_jk = (G_jk - mean_j' s_j') / (std_j' s_j' + 1e-6)``, ``std`` the sample standard deviation
    (``n - 1``), as DeepSeekMath and TRL compute it.

A group whose scores are all equal (within ``1e-6``) carries no signal about which sample is better:
it is skipped (no tokens in the loss) and counted (:func:`zero_signal`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["ADVANTAGES", "CREDITS", "group_advantages", "prm_step_rewards", "step_returns", "zero_signal"]

CREDITS = ("min", "sum")
ADVANTAGES = ("rloo", "grpo")
_EQUAL = 1e-6


def prm_step_rewards(probabilities: Sequence[float]) -> list[float]:
    """``r_k = 2 p_k - 1``: p(step right) minus p(step wrong), from the PRM's probabilities.

    >>> prm_step_rewards([1.0, 0.5, 0.25])
    [1.0, 0.0, -0.5]
    """
    return [2.0 * float(p) - 1.0 for p in probabilities]


def step_returns(step_rewards: Sequence[float], outcome: float, credit: str = "min", *, temperature: float = 0.1,
                 prm_coef: float = 1.0, outcome_coef: float = 1.0) -> list[float]:
    """``G_k`` for every step (see the module docstring); ``[]`` when there are no steps.

    >>> [round(g, 4) for g in step_returns([0.9, -0.5, 0.8], 1.0, "sum")]
    [2.2, 1.3, 1.8]
    >>> [round(g, 3) for g in step_returns([0.9, -0.5, 0.8], 1.0, "min")]
    [0.5, 0.5, 1.8]
    """
    if credit not in CREDITS:
        raise ValueError(f"credit must be one of {CREDITS}, got {credit!r}")
    if not temperature > 0:
        raise ValueError(f"the softmin temperature must be > 0, got {temperature!r}")
    r = [float(x) for x in step_rewards]
    out = [0.0] * len(r)
    if credit == "sum":
        acc = 0.0
        for k in range(len(r) - 1, -1, -1):
            acc += r[k]
            out[k] = prm_coef * acc + outcome_coef * outcome
        return out
    for k in range(len(r)):
        tail = r[k:]
        # softmin weights exp(-r/tau) / sum exp(-r/tau), shifted by the minimum (so the largest
        # exponent is 0: no overflow at tau = 0.1 whatever the rewards)
        low = min(tail)
        w = [math.exp(-(x - low) / temperature) for x in tail]
        total = sum(w)
        out[k] = prm_coef * sum(wi * x for wi, x in zip(w, tail)) / total + outcome_coef * outcome
    return out


def zero_signal(scores: Sequence[float]) -> bool:
    """Whether a group's scores are all equal (within 1e-6): no sample is better than another."""
    return max(scores) - min(scores) <= _EQUAL


def group_advantages(returns: Sequence[Sequence[float]], scores: Sequence[float], estimator: str = "rloo"
                     ) -> list[list[float]]:
    """Per sample ``j`` and step ``k``, ``A_jk`` from the step returns ``returns[j][k]`` and the group's
    scores ``scores[j]`` (``s_j``) by ``estimator`` (see the module docstring). A sample with no step
    gets one entry: its score's advantage (``returns[j]`` may then be ``[]``).

    >>> group_advantages([[1.0], [0.0], [0.0], [1.0]], [1.0, 0.0, 0.0, 1.0], "rloo")
    [[0.6666666666666667], [-0.6666666666666667], [-0.6666666666666667], [0.6666666666666667]]
    """
    if estimator not in ADVANTAGES:
        raise ValueError(f"advantage estimator must be one of {ADVANTAGES}, got {estimator!r}")
    n = len(scores)
    if n < 2:
        raise ValueError(f"a group needs at least 2 samples for a baseline, got {n}")
    total = sum(scores)
    if estimator == "rloo":
        baselines = [(total - s) / (n - 1) for s in scores]
        scale = 1.0
    else:
        mean = total / n
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1))
        baselines = [mean] * n
        scale = 1.0 / (std + 1e-6)
    return [[(g - b) * scale for g in (rets if len(rets) else [s])]
            for rets, s, b in zip(returns, scores, baselines)]


def check_grpo_settings(cfg) -> None:
    """``ValueError`` naming the first bad ``grpo_*`` setting of a :class:`~.config.DistillConfig` (checked
    for every mode: a config file's typo surfaces whatever the mode)."""
    def number(name: str, low: float, high: float = math.inf, *, low_open: bool = False) -> None:
        v = getattr(cfg, name)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= high \
            and (v > low if low_open else v >= low)
        if not ok:
            raise ValueError(f"{name} must be a number {'>' if low_open else '>='} {low}"
                             f"{'' if high == math.inf else f' and <= {high}'}, got {v!r}")

    for name, low in (("grpo_group", 2), ("grpo_prompts", 1), ("grpo_updates", 1), ("grpo_max_tokens", 1)):
        v = getattr(cfg, name)
        if v is None and name == "grpo_max_tokens":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if cfg.grpo_updates > cfg.grpo_prompts:
        raise ValueError(f"grpo_updates ({cfg.grpo_updates}) must be <= grpo_prompts ({cfg.grpo_prompts}): each "
                         f"update trains a share of the step's prompt groups")
    if cfg.grpo_credit not in CREDITS:
        raise ValueError(f"grpo_credit must be one of {CREDITS}, got {cfg.grpo_credit!r}")
    if cfg.grpo_advantage not in ADVANTAGES:
        raise ValueError(f"grpo_advantage must be one of {ADVANTAGES}, got {cfg.grpo_advantage!r}")
    number("grpo_temperature", 0.0, low_open=True)
    number("grpo_softmin_temperature", 0.0, low_open=True)
    number("grpo_clip", 0.0, 1.0, low_open=True)
    number("grpo_kl", 0.0)
    number("grpo_prm_coef", 0.0)
    number("grpo_outcome_coef", 0.0)
    if cfg.grpo_prm_coef == 0 and cfg.grpo_outcome_coef == 0:
        raise ValueError("grpo_prm_coef and grpo_outcome_coef are both 0: there is no reward")
    if cfg.prm is not None and not isinstance(cfg.prm, str):
        raise ValueError(f"prm must be a PRM folder or 'none', got {cfg.prm!r}")
