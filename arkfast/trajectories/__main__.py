"""``python -m arkfast.trajectories``: build the R-SFT, DA and PAD training sets from debates.

    python -m arkfast.trajectories                  # debates of the arith train split (generated if missing)
    python -m arkfast.trajectories --debates runs/x/debates.jsonl --output runs/x/trajectories --model DIR

Writes ``rsft.jsonl``, ``da.jsonl``, ``pad.jsonl``, the self-correction records ``correct.jsonl``
(:mod:`.correction`), the interaction graphs ``graphs.jsonl`` (:mod:`.graphs`; each file atomically: a
temp file, fsync, rename) and ``stats.json``, and prints the counts per set, the candidates skipped per
reason and the graph statistics (transitions, majority adoption and flips, metric freedom). The whole build
takes seconds, so a rerun rebuilds from scratch (deterministically: same inputs and flags, same files).
Selection rules: :mod:`arkfast.trajectories.build`; record schema: :mod:`arkfast.trajectories.schema`;
``docs/trajectories.md``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from arkfast.cli import NON_NEGATIVE_INT, POSITIVE_INT, run_cli

from .build import SETS, SKIP_REASONS, BuildConfig, build_sets, load_debates
from .correction import TRANSITION_KINDS, correction_records
from .graphs import build_graphs, format_graph_stats
from .schema import tokenizer_fingerprint, write_trajectories
from .steps import default_step_mode, validate_step_mode

__all__ = ["build_parser", "format_stats", "main"]


def _step_mode(text: str) -> str:
    try:
        validate_step_mode(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m arkfast.trajectories",
        description="Build the R-SFT, DA and PAD training sets from debates.jsonl files: write rsft.jsonl, "
                    "da.jsonl, pad.jsonl (single-agent round-1 prompts, segmented steps), the self-correction "
                    "records correct.jsonl, the interaction graphs graphs.jsonl and stats.json; print the "
                    "transition, majority and metric-freedom (Mantel) statistics.")
    p.add_argument("--debates", nargs="+", metavar="FILE", default=None,
                   help="debates.jsonl files from python -m arkfast.generate, each problem in one of them "
                        "(default: runs/arith-train/debates/debates.jsonl, generated first with "
                        "generate --split train if missing or unfinished)")
    p.add_argument("--output", metavar="DIR", default=None,
                   help="output folder (default: runs/arith-train/trajectories without --debates, else a "
                        "'trajectories' folder beside the first debates file)")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="tokenizer folder the records are made for (default: --model's)")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="checkpoint whose tokenizer to use (default: the embedded tiny model arkfast/zoo/tiny)")
    p.add_argument("--steps", type=_step_mode, metavar="MODE", default=None,
                   help="step segmentation: line, paragraph (blank-line separated) or regex:PATTERN (each "
                        "match separates two steps) (default: per task, line for arith, paragraph otherwise)")
    p.add_argument("--max-per-problem", type=POSITIVE_INT, metavar="N", default=BuildConfig.max_per_problem,
                   help="cap per problem on da.jsonl, and on each of pad.jsonl's correct and incorrect "
                        "trajectories; the most preferred (later round, then seeded agent order) are kept "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, metavar="S", default=0,
                   help="seed of the per-problem agent order that breaks ties, and of the Mantel test's "
                        "permutations (default: %(default)s)")
    p.add_argument("--mantel-permutations", type=NON_NEGATIVE_INT, metavar="K", default=199,
                   help="relabellings per problem in the metric-freedom Mantel test, 0: no test "
                        "(default: %(default)s)")
    return p


def _load_tokenizer(args: argparse.Namespace) -> tuple[Any, str]:
    from transformers import AutoTokenizer

    from arkfast.generate import default_model_path

    path = args.tokenizer or args.model or str(default_model_path())
    if not Path(path).is_dir():
        raise ValueError(f"--{'tokenizer' if args.tokenizer else 'model'} {path}: no such folder")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{path}: the tokenizer is not a fast tokenizer (tokenizer.json); step token "
                         f"spans need its offset mapping")
    return tokenizer, str(path)


def stats_of(counts: Any, sets: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The ``stats.json`` numbers from :func:`build_sets`'s counts and sets."""
    per_set = {}
    for name in SETS:
        records = sets[name]
        per_set[name] = {
            "records": len(records),
            "problems": len({r["problem_id"] for r in records}),
            "correct": sum(r["correct"] for r in records),
            "incorrect": sum(not r["correct"] for r in records),
            "steps_per_record": sum(len(r["steps"]) for r in records) / len(records) if records else 0.0,
            "duplicate": counts[f"{name}.duplicate"],
            "over_cap": counts[f"{name}.over_cap"],
        }
    return {
        "problems": {"total": counts["problems"], "committee_correct": counts["committee_correct"],
                     "committee_wrong": counts["committee_wrong"], "with_error": counts["problems_with_error"],
                     "rsft_no_candidate": counts["rsft_no_candidate"]},
        "candidates": {"total": counts["candidates"], "usable": counts["usable"],
                       "skipped": {reason: counts[f"skipped.{reason}"] for reason in SKIP_REASONS}},
        "sets": per_set,
    }


def format_stats(stats: dict[str, Any]) -> str:
    """The printed summary: problems, one row per set, one row per skip reason."""
    p, c = stats["problems"], stats["candidates"]
    head = (f"problems {p['total']:,}: committee right {p['committee_correct']:,}, wrong {p['committee_wrong']:,} "
            f"(no R-SFT record), with error {p['with_error']:,}, right but no usable final-round holder "
            f"{p['rsft_no_candidate']:,}")
    columns = (f"{'set':<6}{'records':>9}{'problems':>10}{'correct':>9}{'incorrect':>11}{'steps/rec':>11}"
               f"{'duplicate':>11}{'over cap':>10}")
    lines = [head, "", columns]
    for name, s in stats["sets"].items():
        lines.append(f"{name:<6}{s['records']:>9,}{s['problems']:>10,}{s['correct']:>9,}{s['incorrect']:>11,}"
                     f"{s['steps_per_record']:>11.2f}{s['duplicate']:>11,}{s['over_cap']:>10,}")
    lines += ["", f"{'candidate trajectories':<24}{c['total']:>9,}", f"{'  usable':<24}{c['usable']:>9,}"]
    lines += [f"{'  skipped: ' + reason:<24}{n:>9,}" for reason, n in c["skipped"].items()]
    if stats.get("incomplete_lines"):
        lines.append(f"{'  incomplete last lines':<24}{stats['incomplete_lines']:>9,}  (left out: a generate run cut off)")
    return "\n".join(lines)


def write_jsonl_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    """``records`` as JSON lines, atomically (a temp file in the same folder, fsync'd, renamed)."""
    import json
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the stats it wrote."""
    args = build_parser().parse_args(argv)
    from tqdm.auto import tqdm

    from arkfast import workflow
    from arkfast.generate import write_json_atomic

    config = BuildConfig(max_per_problem=args.max_per_problem, step_mode=args.steps, seed=args.seed)
    tokenizer, tokenizer_path = _load_tokenizer(args)  # before generating debates: fail fast on a bad flag
    if args.debates is None:
        paths = [workflow.ensure_debates()]
        out = Path(args.output) if args.output else workflow.stage_dir("trajectories")
    else:
        paths = [Path(p) for p in args.debates]
        out = Path(args.output) if args.output else paths[0].parent / "trajectories"
    debates, notes = load_debates(paths)
    with tqdm(total=len(debates), unit="problem", desc="trajectories", dynamic_ncols=True) as bar:
        sets, counts = build_sets(debates, tokenizer, config, progress=bar)
    fingerprint, tasks = tokenizer_fingerprint(tokenizer), {}
    corrections = [c for where, record in debates
                   for c in correction_records(record, where, tokenizer, fingerprint, args.steps, counts, tasks)]
    with tqdm(total=len(debates), unit="problem", desc="graphs", dynamic_ncols=True) as bar:
        graphs, graph_stats = build_graphs(debates, permutations=args.mantel_permutations, seed=args.seed,
                                           step_mode=args.steps, progress=bar)

    out.mkdir(parents=True, exist_ok=True)
    for name in SETS:
        write_trajectories(out / f"{name}.jsonl", sets[name])
    write_trajectories(out / "correct.jsonl", corrections)
    write_jsonl_atomic(out / "graphs.jsonl", graphs)
    tasks = sorted({record["task"] for _, record in debates})
    stats = {**stats_of(counts, sets), **notes,
             "debates": [str(p) for p in paths], "output": str(out), "tokenizer": tokenizer_fingerprint(tokenizer),
             "tokenizer_path": tokenizer_path,
             "step_modes": {t: args.steps or default_step_mode(t) for t in tasks},
             "config": {"max_per_problem": config.max_per_problem, "steps": config.step_mode, "seed": config.seed,
                        "mantel_permutations": args.mantel_permutations},
             "correct": {"records": len(corrections), **{k: counts[f"correct.{k}"] for k in TRANSITION_KINDS},
                         "duplicate": counts["correct.duplicate"]},
             "graphs": graph_stats}
    write_json_atomic(out / "stats.json", stats)
    print(format_stats(stats))
    c = stats["correct"]
    print(f"correct  {c['records']:,} self-correction records: corrects {c['corrects']:,}, continues "
          f"{c['continues']:,} (duplicate {c['duplicate']:,})\n")
    print(format_graph_stats(graph_stats))
    names = [*SETS, "correct", "graphs"]
    print(f"wrote {', '.join(str(out / f'{n}.jsonl') for n in names)} and {out / 'stats.json'}")
    return stats


if __name__ == "__main__":
    run_cli(main)
