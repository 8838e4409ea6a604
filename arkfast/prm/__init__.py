"""The process reward model (PRM): step labels, training, scoring and evaluation.

    python -m arkfast.prm label && python -m arkfast.prm train && python -m arkfast.prm eval

    from arkfast.prm import load_prm, encode_trajectory, score_examples
    prm = load_prm("runs/arith-train/prm/model")
    scores = score_examples(prm, [encode_trajectory(tok, record)])   # P(step is right), per step

Modules: :mod:`~arkfast.prm.model` (backbone + head, save/load), :mod:`~arkfast.prm.data` (step-end
positions, packed rows, scoring), :mod:`~arkfast.prm.labels` (Monte-Carlo and outcome labels),
:mod:`~arkfast.prm.training` (the head fit on log-probability features; the BCE + SupCon fine-tuning
loop), :mod:`~arkfast.prm.arith_steps` (the exact arith step checker), :mod:`~arkfast.prm.metrics` and
:mod:`~arkfast.prm.evaluate` (eval numbers). See ``docs/prm.md``.
"""
from .arith_steps import check_steps, first_error
from .data import StepExample, StepRow, encode_trajectory, pack_step_rows, score_examples
from .labels import LabelConfig, LabelStats, monte_carlo_labels, outcome_labels
from .metrics import best_of_n, first_error_f1, majority_of_n, pass_at_n, predicted_first_error, step_auroc
from .model import PRMConfig, ProcessRewardModel, load_prm, save_prm
from .training import HeadFitConfig, PRMTrainConfig, fit_head, train_prm

__all__ = [
    "HeadFitConfig", "LabelConfig", "LabelStats", "PRMConfig", "PRMTrainConfig", "ProcessRewardModel", "StepExample", "StepRow",
    "best_of_n", "check_steps", "encode_trajectory", "first_error", "first_error_f1", "fit_head", "load_prm",
    "majority_of_n", "monte_carlo_labels", "outcome_labels", "pack_step_rows", "pass_at_n",
    "predicted_first_error", "save_prm", "score_examples", "step_auroc", "train_prm",
]
