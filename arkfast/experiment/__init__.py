"""The end-to-end experiment: one student distilled from the committee's debates, against the
committee, self-consistency, the base model, and rejection-sampling fine-tuning at matched cost.

    python -m arkfast.experiment                       # the embedded default -> runs/experiment/
    python -m arkfast.experiment --train-problems 1500 --seeds 5 --output runs/experiment-large

    from arkfast.experiment import ExperimentConfig, run_experiment
    result = run_experiment(ExperimentConfig(output="runs/x", train_problems=100))
    result["rows"], result["comparisons"], result["targets"]

Layout: :mod:`.config` (settings), :mod:`.stages` (finished-stage markers), :mod:`.data` (reused
debates, the token-matched RFT set), :mod:`.jobs` (one student: train + evaluate), :mod:`.run` (the
stages in order), :mod:`.report` (the table), :mod:`.stats` (intervals), :mod:`.cli`. See
``docs/experiment.md``.
"""
from .cli import build_parser, config_from_args, main
from .config import CONTROLS, STUDENTS, ExperimentConfig
from .run import run_experiment
from .stats import mean_std, normal_interval, paired_interval, t_interval, t_quantile, wilson_interval

__all__ = [
    "CONTROLS", "STUDENTS", "ExperimentConfig", "build_parser", "config_from_args", "main", "mean_std",
    "normal_interval", "paired_interval", "run_experiment", "t_interval", "t_quantile", "wilson_interval",
]
