"""``python -m arkfast.distill``: distill trajectories into one student model.

    python -m arkfast.distill                              # tiny model, rsft on runs/arith-train (made if missing)
    python -m arkfast.distill --mode da --data runs/x/trajectories/da.jsonl --output runs/x/distill/da
    python -m arkfast.distill --mode pad --pad-weighting advantage --eval-every 50
    python -m arkfast.distill --mode graph                 # right answers + margin/correctness on pooled states
    python -m arkfast.distill --mode correct --data rsft.jsonl correct.jsonl --span-weights steps=1,answer=2
    python -m arkfast.distill --config distill.yaml --lr 1e-4   # flags override the file's keys
    python -m arkfast.distill --output runs/x/distill/rsft --resume   # continue a killed run

``main(argv)`` returns the result dict (also in ``<output>/summary.json``), so a driver can call it.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from .config import MODES, PRECISIONS, DistillConfig, load_config_file, parse_span_weights
from .weights import PAD_WEIGHTINGS

__all__ = ["build_parser", "config_from_args", "main"]


def _span_weights(text: str) -> dict[str, float]:
    try:
        return parse_span_weights(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    S = argparse.SUPPRESS  # a flag not given leaves the config file's value (or the default) alone
    d = DistillConfig()  # the defaults the help text quotes
    p = argparse.ArgumentParser(
        prog="python -m arkfast.distill",
        description="Distill R-SFT / DA / PAD trajectories into a single student model: packed rows, the "
                    "fused token-weighted loss, AdamW; writes a Hugging Face checkpoint, metrics.jsonl, "
                    "loss.png and resumable checkpoints.")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="JSON or YAML (PyYAML) file whose keys are these flags' names (row_tokens or "
                        "row-tokens); flags on the command line override it")
    g = p.add_argument_group("data and model")
    g.add_argument("--data", metavar="FILE", nargs="+", default=S,
                   help="trajectory .jsonl files (default: runs/arith-train/trajectories/<mode>.jsonl, made "
                        "first when missing; for pad runs/arith-train/prm/scored/pad.jsonl, for graph "
                        "runs/arith-train/trajectories/pad.jsonl)")
    g.add_argument("--mode", choices=MODES, default=S,
                   help=f"rsft / da: every response token weight 1; pad: weights from the step scores; "
                        f"correct: self-correction records (correct.jsonl: own draft -> corrected solution), "
                        f"with any plain records also given; graph: next-token loss on a problem's right "
                        f"answers + margin ranking and a correctness head on the pooled states of its right "
                        f"and wrong ones; grpo: online RL on engine rollouts with PRM step rewards "
                        f"(default: {d.mode})")
    g.add_argument("--pad-weighting", choices=PAD_WEIGHTINGS, default=S,
                   help="pad: score = the step's score; advantage = step score minus the problem's mean "
                        "trajectory score (min over steps), clipped to [-pad-clip, pad-clip]; min = the "
                        f"minimum score of the steps so far (PURE) (default: {d.pad_weighting})")
    g.add_argument("--pad-clip", type=float, metavar="C", default=S,
                   help=f"bound of the advantage weights (default: {d.pad_clip})")
    g.add_argument("--span-weights", type=_span_weights, metavar="steps=W1,answer=W2", default=S,
                   help="any mode: multiply the token weights of the reasoning steps by W1 and of the answer "
                        "span (the last step, with the end-of-turn token) by W2; a part left out is 1 "
                        "(default: off, every span 1)")
    g.add_argument("--continues", action="store_true", default=S,
                   help="correct: also train the right -> right (continues) self-correction records, not only "
                        "the wrong -> right (corrects) ones (default: off)")
    g.add_argument("--graph-margin-weight", type=float, metavar="BETA", default=S,
                   help="graph: weight of the margin ranking between the pooled states of a problem's right "
                        f"and wrong answers (default: {d.graph_margin_weight})")
    g.add_argument("--graph-margin", type=float, metavar="M", default=S,
                   help=f"graph: the margin m of max(0, m - (s_right - s_wrong)) (default: {d.graph_margin})")
    g.add_argument("--graph-node-weight", type=float, metavar="ALPHA", default=S,
                   help="graph: weight of the node-correctness head on the same pooled states, 0: off "
                        f"(default: {d.graph_node_weight})")
    g.add_argument("--model", metavar="DIR", default=S,
                   help="base Hugging Face checkpoint (default: the embedded tiny model arkfast/zoo/tiny)")
    g.add_argument("--output", metavar="DIR", default=S,
                   help="output folder (default: runs/arith-train/distill/<mode>)")
    g.add_argument("--resume", action="store_true", default=S,
                   help="continue the run in --output from its newest checkpoint (model, optimiser, "
                        "schedule, data position, RNG); a finished run is reused (default: off; on when "
                        "--output is not given, so the default folder is continued or reused)")

    g = p.add_argument_group("schedule and optimisation")
    g.add_argument("--epochs", type=float, metavar="E", default=S,
                   help=f"passes over the packed rows; sets the step count (default: {d.epochs})")
    g.add_argument("--steps", type=int, metavar="N", default=S,
                   help="optimiser steps of the schedule, instead of --epochs")
    g.add_argument("--stop-after", type=int, metavar="N", default=S,
                   help="end after the first N steps of the schedule (saved, resumable: the rest of the "
                        "same run follows with --resume)")
    g.add_argument("--row-tokens", type=int, metavar="T", default=S,
                   help=f"tokens per packed row (default: {d.row_tokens})")
    g.add_argument("--batch-rows", type=int, metavar="R", default=S,
                   help=f"packed rows per optimiser step (default: {d.batch_rows})")
    g.add_argument("--micro-batch-rows", type=int, metavar="R", default=S,
                   help="rows per forward/backward; batch-rows / micro-batch-rows micro-batches are "
                        f"accumulated, the loss normalised over the whole step (default: {d.micro_batch_rows})")
    g.add_argument("--lr", type=float, default=S, help=f"peak learning rate (default: {d.lr})")
    g.add_argument("--min-lr-ratio", type=float, default=S,
                   help=f"cosine floor as a fraction of --lr (default: {d.min_lr_ratio})")
    g.add_argument("--warmup-ratio", type=float, default=S,
                   help=f"linear warm-up over this fraction of the steps (default: {d.warmup_ratio})")
    g.add_argument("--weight-decay", type=float, default=S,
                   help=f"AdamW weight decay on matrices (default: {d.weight_decay})")
    g.add_argument("--betas", type=float, nargs=2, metavar=("B1", "B2"), default=S,
                   help=f"AdamW betas (default: {d.betas[0]} {d.betas[1]})")
    g.add_argument("--eps", type=float, default=S, help=f"AdamW epsilon (default: {d.eps})")
    g.add_argument("--grad-clip", type=float, default=S,
                   help=f"clip the global gradient norm to this, 0: off (default: {d.grad_clip})")
    g.add_argument("--seed", type=int, default=S, help=f"seed of the row order (default: {d.seed})")
    g.add_argument("--precision", choices=PRECISIONS, default=S,
                   help="fp32, or bf16 weights with fp32 master weights (default: bf16 on CUDA, else fp32)")
    g.add_argument("--gradient-checkpointing", action="store_true", default=S,
                   help="recompute each layer's activations in the backward (less memory; default: off)")
    g.add_argument("--device", default=S, help="cuda, cuda:1, cpu (default: cuda when present)")
    g.add_argument("--fsdp", action="store_true", default=S,
                   help="under torchrun, shard parameters, gradients and optimiser state over the ranks "
                        "(FSDP2; bf16 is its mixed-precision policy) instead of DDP's whole copy per rank "
                        "(default: off)")
    g.add_argument("--fsdp-cpu-offload", action="store_true", default=S,
                   help="with --fsdp on GPUs, keep the shards and the optimiser state in CPU memory (default: off)")
    g.add_argument("--threads", type=int, default=S,
                   help="torch CPU threads for the run (default: 1 on CPU, where runs are bit-reproducible "
                        "for a given thread count; torch's on CUDA)")

    g = p.add_argument_group("checkpoints, eval and logs")
    g.add_argument("--save-every", type=int, metavar="N", default=S,
                   help=f"steps between resumable checkpoints, 0: only at the end (default: {d.save_every})")
    g.add_argument("--keep-checkpoints", type=int, metavar="K", default=S,
                   help=f"newest checkpoints kept (default: {d.keep_checkpoints})")
    g.add_argument("--eval-every", type=int, metavar="N", default=S,
                   help="steps between evaluations of the student alone on the held-out split, 0: only at "
                        f"the end (default: {d.eval_every})")
    g.add_argument("--eval-limit", type=int, metavar="N", default=S,
                   help=f"held-out problems per evaluation, 0: no evaluation (default: {d.eval_limit})")
    g.add_argument("--eval-at-start", action="store_true", default=S,
                   help="also evaluate the base model before the first step")
    g.add_argument("--eval-temperature", type=float, metavar="T", default=S,
                   help=f"sampling temperature of the evaluation, 0: greedy (default: {d.eval_temperature}, "
                        "generate's)")
    g.add_argument("--eval-seed", type=int, default=S, help=f"sampling seed of the evaluation (default: {d.eval_seed})")
    g.add_argument("--eval-dataset", metavar="PATH_OR_NAME", default=S,
                   help="held-out dataset as generate's --dataset (default: the built-in arith task)")
    g.add_argument("--eval-split", default=S, help=f"held-out split (default: {d.eval_split})")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=S,
                   help="no TensorBoard events (default: written when tensorboard is installed)")
    g.add_argument("--no-plot", dest="plot", action="store_false", default=S,
                   help="no loss.png (default: drawn when matplotlib is installed)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S,
                   help="no progress bar")
    _add_grpo_arguments(p, d, S)
    return p


def _add_grpo_arguments(p: argparse.ArgumentParser, d: DistillConfig, S: str) -> None:
    from .rewards import ADVANTAGES, CREDITS

    g = p.add_argument_group(
        "online RL (--mode grpo)",
        "engine rollouts of the training files' problems, the outcome reward plus PRM step rewards, "
        "PPO-clipped updates with a k3 KL to the starting model; --steps defaults to 100, --epochs is unused")
    g.add_argument("--prm", metavar="DIR", default=S,
                   help="PRM folder (python -m arkfast.prm train) scoring the sampled steps, or none for the "
                        "outcome reward alone (default: runs/arith-train/prm/model)")
    g.add_argument("--grpo-group", type=int, metavar="G", default=S,
                   help=f"samples per prompt (default: {d.grpo_group})")
    g.add_argument("--grpo-prompts", type=int, metavar="P", default=S,
                   help=f"prompts per step (default: {d.grpo_prompts})")
    g.add_argument("--grpo-updates", type=int, metavar="U", default=S,
                   help=f"optimiser steps per rollout batch, each on a share of its groups (default: {d.grpo_updates})")
    g.add_argument("--grpo-temperature", type=float, metavar="T", default=S,
                   help="rollout temperature, applied identically to the trainer's log-probabilities; no "
                        f"top-k/top-p (default: {d.grpo_temperature})")
    g.add_argument("--grpo-max-tokens", type=int, metavar="N", default=S,
                   help="tokens per sampled response (default: the task's budget, 96 for arith)")
    g.add_argument("--grpo-credit", choices=CREDITS, default=S,
                   help="step credit: min = softmin over the remaining steps' rewards (PURE), sum = their "
                        f"sum (default: {d.grpo_credit})")
    g.add_argument("--grpo-softmin-temperature", type=float, metavar="TAU", default=S,
                   help=f"temperature of the min-form softmin (default: {d.grpo_softmin_temperature})")
    g.add_argument("--grpo-advantage", choices=ADVANTAGES, default=S,
                   help=f"rloo = leave-one-out baseline, grpo = group mean and std (default: {d.grpo_advantage})")
    g.add_argument("--grpo-clip", type=float, metavar="EPS", default=S,
                   help=f"PPO ratio clip (default: {d.grpo_clip})")
    g.add_argument("--grpo-kl", type=float, metavar="BETA", default=S,
                   help=f"k3 KL coefficient to the starting model, 0: no reference (default: {d.grpo_kl})")
    g.add_argument("--grpo-prm-coef", type=float, metavar="C", default=S,
                   help=f"weight of the PRM step rewards (default: {d.grpo_prm_coef})")
    g.add_argument("--grpo-outcome-coef", type=float, metavar="C", default=S,
                   help=f"weight of the verifiable outcome reward (default: {d.grpo_outcome_coef})")


def config_from_args(argv: list[str] | None = None) -> DistillConfig:
    """The :class:`DistillConfig` of ``argv``: the ``--config`` file's settings, then the flags given."""
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config")
    settings: dict[str, Any] = load_config_file(path) if path is not None else {}
    settings.update(args)  # only flags actually given are in args (default=SUPPRESS)
    try:
        return DistillConfig(**settings)
    except TypeError as e:  # a config-file value of the wrong kind reaching a comparison
        raise ValueError(f"{path or 'flags'}: {e}") from None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the result dict."""
    from .run import distill, format_summary

    config = config_from_args(argv)
    result = distill(config)
    if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 speaks for the run
        print(format_summary(result))
        print(f"wrote {result['output']} (student: {result['model']})")
    return result


def run_cli() -> None:
    from arkfast import cli

    from .run import NonFiniteLossError

    cli.run_cli(main, interrupted="interrupted; continue with the same flags and --resume",
                failures=(NonFiniteLossError,))

