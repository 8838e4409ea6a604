"""Distillation: trajectories (R-SFT, DA, PAD) into one student model.

    python -m arkfast.distill --data rsft.jsonl --mode rsft --model DIR --output DIR

    from arkfast.distill import DistillConfig, distill
    result = distill(DistillConfig(data=["pad.jsonl"], mode="pad", pad_weighting="min", output="out"))

Layout: :mod:`.config` (settings), :mod:`.data` (records → examples → packed rows, the row order),
:mod:`.weights` (PAD token weights), :mod:`.loop` (the step-normalised loss, micro-batches, precision,
AdamW), :mod:`.checkpoints` (resumable checkpoints, metrics), :mod:`.evaluate` (the student alone on a
held-out split), :mod:`.run` (a whole run), :mod:`.cli`. The maths is in ``docs/distill.md``.
"""
from .cli import build_parser, config_from_args, main
from .config import MODES, DistillConfig, load_config_file
from .data import RowOrder, concat_rows, end_of_turn_id, load_examples, record_example
from .loop import Optimizer, micro_batch_loss_sum, step_target_count
from .run import NonFiniteLossError, distill, format_summary
from .weights import PAD_WEIGHTINGS, pad_step_weights, problem_baselines, step_weights

__all__ = [
    "MODES", "PAD_WEIGHTINGS", "DistillConfig", "NonFiniteLossError", "Optimizer", "RowOrder", "build_parser",
    "concat_rows", "config_from_args", "distill", "end_of_turn_id", "format_summary", "load_config_file",
    "load_examples", "main", "micro_batch_loss_sum", "pad_step_weights", "problem_baselines", "record_example",
    "step_target_count", "step_weights",
]
