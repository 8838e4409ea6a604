"""``python -m arkfast.experiment``: the whole pipeline on one task, against its controls, in one table.

    python -m arkfast.experiment                                 # embedded default -> runs/experiment/
    python -m arkfast.experiment --train-problems 1500 --epochs 3 --seeds 5 --output runs/exp-large
    python -m arkfast.experiment --systems rsft,rft-tokens       # some rows only

Rerun the same command to continue an interrupted experiment: finished stages are reused, unfinished
ones continue (``generate``/``distill``/``prm label`` resume). ``main(argv)`` returns the
``experiment.json`` dict.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from arkfast import cli
from arkfast.cli import number

from .config import STUDENTS, ExperimentConfig

__all__ = ["build_parser", "config_from_args", "main"]

_D = ExperimentConfig()
_POSITIVE = number(int, low=1, what="an integer >= 1")
_POSITIVE_FLOAT = number(float, low=0.0, low_open=True, what="a number > 0")
_TEMPERATURE = number(float, low=0.0, what="a number >= 0")


def _systems(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in STUDENTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(STUDENTS)}, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    from arkfast.distill import PAD_WEIGHTINGS

    p = argparse.ArgumentParser(
        prog="python -m arkfast.experiment",
        description="Debates on the arith train split -> trajectories -> PRM -> students (R-SFT, DA, PAD) and "
                    "rejection-sampling controls, each student evaluated alone on the test split against the "
                    "base model, self-consistency and the debate; writes experiment.json and experiment.md. "
                    "Every stage is resumable and reused when finished.",
        epilog="systems: " + "; ".join(f"{k}: {v[1]}" for k, v in STUDENTS.items()))
    g = p.add_argument_group("model, data and output")
    g.add_argument("--model", metavar="DIR", default=None,
                   help="base Hugging Face checkpoint (default: the embedded tiny model arkfast/zoo/tiny)")
    g.add_argument("--output", metavar="DIR", default=_D.output, help="experiment folder (default: %(default)s)")
    g.add_argument("--train-problems", type=_POSITIVE, metavar="N", default=_D.train_problems,
                   help="first N problems of the arith train split to debate and distill (default: %(default)s)")
    g.add_argument("--test-problems", type=_POSITIVE, metavar="N", default=_D.test_problems,
                   help="first N problems of the test split every system is evaluated on (default: %(default)s)")
    g.add_argument("--reuse-debates", metavar="FILE", default=None,
                   help="a debates.jsonl of the same generate settings whose train records are copied instead "
                        "of generated (default: runs/arith-train/debates/debates.jsonl, when present)")

    g = p.add_argument_group("committee and controls")
    g.add_argument("--agents", type=_POSITIVE, metavar="N", default=_D.agents, help="debate agents (default: %(default)s)")
    g.add_argument("--rounds", type=_POSITIVE, metavar="R", default=_D.rounds, help="debate rounds (default: %(default)s)")
    g.add_argument("--sc-agents", type=_POSITIVE, metavar="N", default=_D.sc_agents,
                   help="samples of the self-consistency baseline (default: %(default)s)")
    g.add_argument("--rft-samples", type=_POSITIVE, metavar="N", default=None,
                   help="single-agent samples per train problem for the RFT controls, the debate's model calls "
                        "(default: agents x rounds)")
    g.add_argument("--temperature", type=_TEMPERATURE, metavar="T", default=_D.temperature,
                   help="sampling temperature of every generation and evaluation, generate's (default: %(default)s)")
    g.add_argument("--max-per-problem", type=_POSITIVE, metavar="N", default=_D.max_per_problem,
                   help="cap on distinct trajectories per problem for DA, PAD and the compute-matched RFT "
                        "(default: %(default)s)")

    g = p.add_argument_group("students")
    g.add_argument("--systems", type=_systems, metavar="LIST", default=_D.systems,
                   help=f"students to train, comma-separated (default: {','.join(_D.systems)})")
    g.add_argument("--seeds", type=_POSITIVE, metavar="K", default=_D.seeds,
                   help="training seeds per student, 0..K-1 (default: %(default)s)")
    g.add_argument("--eval-seeds", type=_POSITIVE, metavar="K", default=_D.eval_seeds,
                   help="sampling seeds of each evaluation on the test split, 0..K-1 (default: %(default)s)")
    g.add_argument("--epochs", type=_POSITIVE_FLOAT, metavar="E", default=_D.epochs,
                   help="passes over each student's packed rows (default: %(default)s)")
    g.add_argument("--lr", type=_POSITIVE_FLOAT, default=_D.lr, help="peak learning rate (default: %(default)s)")
    g.add_argument("--row-tokens", type=_POSITIVE, metavar="T", default=_D.row_tokens,
                   help="tokens per packed training row (default: %(default)s)")
    g.add_argument("--pad-weighting", choices=PAD_WEIGHTINGS, default=_D.pad_weighting,
                   help="PAD token weights from step scores, as distill's flag (default: %(default)s)")

    g = p.add_argument_group("process reward model (PAD)")
    g.add_argument("--prm-label-limit", type=_POSITIVE, metavar="N", default=_D.prm_label_limit,
                   help="PAD trajectories labelled by Monte-Carlo rollouts (default: %(default)s)")
    g.add_argument("--prm-k", type=_POSITIVE, metavar="K", default=_D.prm_k,
                   help="rollouts per step prefix (default: %(default)s)")
    g.add_argument("--prm-steps", type=_POSITIVE, metavar="N", default=_D.prm_steps,
                   help="PRM training steps (default: %(default)s)")

    g.add_argument("--online-steps", type=_POSITIVE, metavar="N", default=_D.online_steps,
                   help="RL steps of online PAD (8 prompts x 8 samples each) on top of the DA student "
                        "(default: %(default)s)")
    g.add_argument("--online-lr", type=_POSITIVE_FLOAT, metavar="LR", default=_D.online_lr,
                   help="peak learning rate of online PAD (default: %(default)s)")
    g.add_argument("--online-prm-coef", type=_POSITIVE_FLOAT, metavar="C", default=_D.online_prm_coef,
                   help="weight of the PRM step rewards next to the outcome reward in online PAD "
                        "(default: %(default)s)")

    g = p.add_argument_group("machine")
    g.add_argument("--jobs", type=_POSITIVE, metavar="N", default=_D.jobs,
                   help="students trained and evaluated at once, each in its own process (default: %(default)s)")
    g.add_argument("--threads", type=_POSITIVE, metavar="N", default=None,
                   help="torch CPU threads per job (default: the cores divided by --jobs)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def config_from_args(argv: list[str] | None = None) -> ExperimentConfig:
    """The :class:`ExperimentConfig` of ``argv``."""
    args = build_parser().parse_args(argv)
    return ExperimentConfig(**vars(args))


def format_table(result: dict[str, Any]) -> str:
    """The printed summary: one line per row, then the targets."""
    lines = [f"{'system':<34}{'accuracy %':>18}{'95% interval':>16}{'calls':>7}{'tokens':>8}"]
    for r in result["rows"]:
        name = r["label"]
        acc = f"{100 * r['accuracy']:.1f}" + (f" ± {100 * r['accuracy_std']:.1f}" if r["kind"] == "student" else "")
        iv = r["interval"]
        iv_text = "—" if iv is None else f"[{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]"
        lines.append(f"{name:<34}{acc:>18}{iv_text:>16}{r['calls_per_problem']:>7.0f}{r['tokens_per_problem']:>8.1f}")
    return "\n".join(lines + [""] + result["targets"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the ``experiment.json`` dict."""
    from pathlib import Path

    from .run import run_experiment

    argv = list(sys.argv[1:] if argv is None else argv)
    config = config_from_args(argv)
    result = run_experiment(config, argv)
    print(format_table(result))
    out = Path(config.output)
    print(f"wrote {out / 'experiment.json'} and {out / 'experiment.md'}")
    return result


def run_cli() -> None:
    cli.run_cli(main, interrupted="interrupted; run the same command again to continue")
