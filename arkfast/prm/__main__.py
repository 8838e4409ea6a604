"""``python -m arkfast.prm label|train|score|eval``: the process reward model's command line.

    python -m arkfast.prm label      # Monte-Carlo step labels for runs/arith-train/trajectories/pad.jsonl
    python -m arkfast.prm train      # the PRM on those labels -> runs/arith-train/prm/model/
    python -m arkfast.prm score      # step_scores, score_min, score_prod -> runs/arith-train/prm/scored/pad.jsonl
    python -m arkfast.prm eval       # best-of-8 / majority-of-8 / pass@8, step AUROC, first-error F1 -> eval.json

Run one after another with no arguments in the same folder, each finds the previous one's output under
``runs/arith-train/`` (and makes a missing one first: ``train`` labels, ``label`` builds the
trajectories, which generate the debates).
"""
from __future__ import annotations

import argparse

from arkfast.cli import number, run_cli
from arkfast.debate.shards import Shard

__all__ = ["build_parser", "main"]

_POSITIVE = number(int, low=1, what="an integer >= 1")
_NON_NEGATIVE = number(int, low=0, what="an integer >= 0")
_NON_NEGATIVE_FLOAT = number(float, low=0.0, what="a number >= 0")
_POSITIVE_FLOAT = number(float, low=0.0, low_open=True, what="a number > 0")
_PROBABILITY = number(float, low=0.0, low_open=True, high=1.0, what="a number in (0, 1]")
_FRACTION = number(float, low=0.0, high=0.9, what="a number in [0, 0.9]")


def _engine_flags(p: argparse.ArgumentParser, *, prefix_caching: bool) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if present, else cpu)")
    g.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on a GPU, else float32)")
    g.add_argument("--max-num-seqs", type=_POSITIVE, metavar="N", default=None,
                   help="sequences in flight in the engine (default: engine's, 256)")
    g.add_argument("--threads", type=_POSITIVE, metavar="N", default=None,
                   help="torch CPU threads (default: torch's, one per core; on a CPU shared with other jobs "
                        "1 is much faster)")
    if prefix_caching:
        g.add_argument("--no-prefix-caching", action="store_true",
                       help="turn the engine's prefix cache off (default: on; the rollouts of a trajectory "
                            "share its prefixes through it)")


def build_parser() -> argparse.ArgumentParser:
    from .labels import LABEL_METHODS
    from .model import FEATURE_SETS
    from .training import TARGETS

    p = argparse.ArgumentParser(prog="python -m arkfast.prm",
                                description="Process reward model: label steps, train, score trajectories, "
                                            "evaluate. Every subcommand works with no arguments on the "
                                            "default run folder runs/arith-train/.")
    sub = p.add_subparsers(dest="command", metavar="{label,train,score,eval}", required=True)

    s = sub.add_parser("label", help="step labels by Monte-Carlo rollouts (or the outcome) -> labels.jsonl",
                       description="Label every step of some trajectories: monte-carlo samples K completions "
                                   "from each step prefix with the engine and keeps the fraction that reach "
                                   "the gold answer; outcome copies the trajectory's correctness to its "
                                   "steps. Appends one record per trajectory, fsync'd.")
    s.add_argument("--trajectories", metavar="FILE", default=None,
                   help="trajectory file (default: runs/arith-train/trajectories/pad.jsonl, built first "
                        "when missing)")
    s.add_argument("--output", metavar="FILE", default=None,
                   help="label file to write (default: runs/arith-train/prm/labels.jsonl; a summary goes to "
                        "<name>.summary.json beside it)")
    s.add_argument("--method", choices=LABEL_METHODS, default="monte-carlo", help="label source (default: %(default)s)")
    s.add_argument("--k", type=_POSITIVE, metavar="K", default=8,
                   help="completions per step prefix (default: %(default)s)")
    s.add_argument("--hard", action="store_true",
                   help="label 1 when any completion reaches the gold answer, else 0 (default: the fraction)")
    s.add_argument("--temperature", type=_NON_NEGATIVE_FLOAT, metavar="T", default=0.7,
                   help="rollout sampling temperature (default: %(default)s)")
    s.add_argument("--top-p", type=_PROBABILITY, metavar="P", default=1.0, help="rollout nucleus threshold (default: %(default)s)")
    s.add_argument("--max-tokens", type=_POSITIVE, metavar="N", default=None,
                   help="tokens per rollout (default: the task's completion budget, 96 for arith)")
    s.add_argument("--limit", type=_NON_NEGATIVE, metavar="N", default=400,
                   help="label N trajectories drawn in a seeded random order, 0: all (default: %(default)s)")
    s.add_argument("--model", metavar="DIR", default=None,
                   help="rollout model, the policy that wrote the trajectories (default: the embedded tiny model)")
    s.add_argument("--seed", type=int, metavar="S", default=0,
                   help="seed of the trajectory order and of every rollout (default: %(default)s)")
    s.add_argument("--resume", action="store_true",
                   help="continue --output: skip trajectories already in it, cut a truncated last line "
                        "(default: off; an existing non-empty output is an error)")
    s.add_argument("--shard", type=Shard.flag, metavar="I/N", default=None,
                   help="label only shard I of N (0-based; a trajectory's shard is a hash of its id) into "
                        "<output>.parts/, for launches without torchrun such as array jobs; the last shard to "
                        "finish merges the parts into --output (default: all, or the rank's under torchrun)")
    _engine_flags(s, prefix_caching=True)

    t = sub.add_parser("train", help="train the PRM on a label file -> a PRM folder",
                       description="Train a scalar head read at step-end tokens with binary cross-entropy on "
                                   "the step labels. By default (--features logprobs) the backbone is frozen "
                                   "and the head reads features of the backbone's log-probabilities of the "
                                   "trajectory's tokens, fitted by full-batch L-BFGS in seconds; the backbone "
                                   "is then by default the R-SFT student (python -m arkfast.distill --mode "
                                   "rsft, run first when missing). With --features hidden the head "
                                   "reads the hidden state and the backbone is fine-tuned with it (optionally "
                                   "+ a supervised contrastive term) over packed rows, AdamW with a cosine "
                                   "schedule, seeded, resumable. Saved atomically.")
    t.add_argument("--labels", metavar="FILE", default=None,
                   help="label file (default: runs/arith-train/prm/labels.jsonl, made first when missing)")
    t.add_argument("--output", metavar="DIR", default=None, help="PRM folder (default: runs/arith-train/prm/model)")
    t.add_argument("--base-model", metavar="DIR", default=None,
                   help="backbone (default: with --features hidden the embedded tiny model; otherwise the "
                        "R-SFT student runs/arith-train/distill/rsft/model, distilled first when missing)")
    t.add_argument("--features", choices=FEATURE_SETS, default="logprobs",
                   help="the head's input: logprobs (13 statistics of the frozen backbone's log-probabilities of "
                        "the step's tokens and of the response so far), hidden (the hidden state, backbone "
                        "fine-tuned) or hidden+logprobs (both, backbone frozen) (default: %(default)s)")
    t.add_argument("--targets", choices=TARGETS, default="hard",
                   help="soft: train on the Monte-Carlo fractions; hard: 1 when any rollout from the step reached "
                        "the gold answer, else 0 (outcome labels are the same either way) (default: %(default)s)")
    t.add_argument("--head-l2", type=_NON_NEGATIVE_FLOAT, metavar="C", default=1e-3,
                   help="with logprobs features: the L2 penalty C * |w|^2 on the head's weights (default: %(default)s)")
    t.add_argument("--head-iterations", type=_POSITIVE, metavar="N", default=300,
                   help="with logprobs features: L-BFGS iterations of the head fit (default: %(default)s)")
    t.add_argument("--steps", type=_POSITIVE, metavar="N", default=200,
                   help="optimizer steps; this and the flags below up to --resume are for --features hidden "
                        "(default: %(default)s)")
    t.add_argument("--batch-rows", type=_POSITIVE, metavar="N", default=2,
                   help="packed rows per optimizer step (default: %(default)s)")
    t.add_argument("--row-tokens", type=_POSITIVE, metavar="N", default=1024,
                   help="tokens per packed row (default: %(default)s; raised to the longest trajectory)")
    t.add_argument("--lr", type=_POSITIVE_FLOAT, metavar="LR", default=3e-4, help="peak learning rate (default: %(default)s)")
    t.add_argument("--projection-dim", type=_NON_NEGATIVE, metavar="P", default=0,
                   help="size of the contrastive projection head, 0: none (default: %(default)s)")
    t.add_argument("--contrastive-weight", type=_NON_NEGATIVE_FLOAT, metavar="W", default=0.0,
                   help="weight of the supervised contrastive term; > 0 needs --projection-dim (default: %(default)s)")
    t.add_argument("--contrastive-temperature", type=_POSITIVE_FLOAT, metavar="T", default=0.1,
                   help="SupCon temperature (default: %(default)s)")
    t.add_argument("--val-fraction", type=_FRACTION, metavar="F", default=0.1,
                   help="share of problems held out for the held-out loss and AUROC (default: %(default)s)")
    t.add_argument("--eval-every", type=_NON_NEGATIVE, metavar="N", default=100,
                   help="held-out loss every N steps, 0: only at the end (default: %(default)s)")
    t.add_argument("--log-every", type=_POSITIVE, metavar="N", default=25, help="log a line every N steps (default: %(default)s)")
    t.add_argument("--time-limit", type=_POSITIVE_FLOAT, metavar="S", default=None,
                   help="stop (and save) after S seconds of training (default: none)")
    t.add_argument("--save-every", type=_NON_NEGATIVE, metavar="N", default=50,
                   help="save the PRM and its trainer state every N steps, 0: only at the end (default: %(default)s)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run saved in --output (same settings and labels): the same loss curve "
                        "as a run never stopped")
    t.add_argument("--seed", type=int, metavar="S", default=0,
                   help="seed of the head initialisation, the held-out split and the row order (default: %(default)s)")
    t.add_argument("--threads", type=_POSITIVE, metavar="N", default=None, help="torch CPU threads (default: torch's)")
    t.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cpu)")

    c = sub.add_parser("score", help="write step_scores, score_min, score_prod into a new trajectory file",
                       description="Score every step of a trajectory file with a PRM and write a new file "
                                   "(atomically) with step_scores and the trajectory scores score_min and "
                                   "score_prod.")
    c.add_argument("--input", metavar="FILE", default=None,
                   help="trajectory file (default: runs/arith-train/trajectories/pad.jsonl)")
    c.add_argument("--prm", metavar="DIR", default=None, help="PRM folder (default: runs/arith-train/prm/model)")
    c.add_argument("--output", metavar="FILE", default=None,
                   help="scored file (default: runs/arith-train/prm/scored/<input name>)")
    c.add_argument("--row-tokens", type=_POSITIVE, metavar="N", default=2048,
                   help="tokens per packed scoring row (default: %(default)s)")
    c.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cpu)")

    e = sub.add_parser("eval", help="best-of-N vs majority vs pass@N, step AUROC, first-error F1 -> eval.json",
                       description="Sample N single-agent solutions per test problem with the engine, score "
                                   "them with the PRM and compare with the exact arith step checker. The "
                                   "samples are kept beside the output and reused when the settings match.")
    e.add_argument("--prm", metavar="DIR", default=None,
                   help="PRM folder (default: runs/arith-train/prm/model, trained first when missing)")
    e.add_argument("--policy", metavar="DIR", default=None, help="model that samples the solutions (default: the embedded tiny model)")
    e.add_argument("--dataset", default=None, help="dataset (default: the built-in arith task; only arith has the exact checker)")
    e.add_argument("--task", default=None, help="dataset adapter (default: detected)")
    e.add_argument("--split", default="test", help="split (default: %(default)s)")
    e.add_argument("--limit", type=_POSITIVE, metavar="N", default=200, help="test problems (default: %(default)s)")
    e.add_argument("--n", type=_POSITIVE, metavar="N", default=8, help="samples per problem (default: %(default)s)")
    e.add_argument("--temperature", type=_NON_NEGATIVE_FLOAT, metavar="T", default=0.5,
                   help="sampling temperature, the debate default (default: %(default)s)")
    e.add_argument("--max-tokens", type=_POSITIVE, metavar="N", default=None,
                   help="tokens per sample (default: the task's, 96 for arith)")
    e.add_argument("--threshold", type=_PROBABILITY, metavar="P", default=0.5,
                   help="a step scored below P is flagged wrong, for first_error_f1 (default: %(default)s)")
    e.add_argument("--seed", type=int, metavar="S", default=0, help="sampling seed (default: %(default)s)")
    e.add_argument("--output", metavar="FILE", default=None, help="eval file (default: runs/arith-train/prm/eval.json)")
    e.add_argument("--samples", metavar="FILE", default=None,
                   help="where the samples are kept (default: <output stem>_samples.jsonl beside the output)")
    _engine_flags(e, prefix_caching=False)
    return p


def main(argv: list[str] | None = None) -> dict:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the subcommand's summary."""
    args = build_parser().parse_args(argv)
    from . import commands

    return {"label": commands.run_label, "train": commands.run_train, "score": commands.run_score,
            "eval": commands.run_eval}[args.command](args)


if __name__ == "__main__":
    run_cli(main)
