"""What ``python -m arkfast.prm label|train|score|eval`` do, one function per subcommand (each takes the
parsed flags and returns the summary it printed). The parsers are in :mod:`arkfast.prm.__main__`."""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from arkfast.generate import default_model_path, write_json_atomic
from arkfast.workflow import stage_dir

__all__ = ["default_paths", "default_student", "run_eval", "run_label", "run_score", "run_train"]


def default_student() -> Path:
    """The default backbone of a log-probability PRM: the R-SFT student ``runs/arith-train/distill/rsft/model``,
    distilled first when it is missing (``python -m arkfast.distill --mode rsft``, which makes its
    trajectories first when those are missing)."""
    model = stage_dir("distill") / "rsft" / "model"
    if not (model / "config.json").is_file():
        from arkfast.distill.cli import main as distill_main

        print(f"no R-SFT student at {model}: distilling it first (python -m arkfast.distill --mode rsft)")
        distill_main(["--mode", "rsft"])
        if not (model / "config.json").is_file():
            raise ValueError(f"{model}: python -m arkfast.distill --mode rsft did not write it")
    return model


def default_paths() -> dict[str, Path]:
    """Where the subcommands read and write with no arguments (under ``runs/arith-train/``)."""
    prm = stage_dir("prm")
    return {"trajectories": stage_dir("trajectories") / "pad.jsonl", "labels": prm / "labels.jsonl",
            "label_summary": prm / "labels.summary.json", "model": prm / "model",
            "scored": prm / "scored" / "pad.jsonl", "eval": prm / "eval.json",
            "samples": prm / "eval_samples.jsonl"}


def format_table(rows: list[tuple[str, Any]]) -> str:
    """Two aligned columns; floats with 4 decimals, None as ``n/a``."""
    def cell(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.4f}"
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {cell(v)}" for k, v in rows)


def _load_tokenizer(path: Path):
    from arkfast.models import load_tokenizer

    return load_tokenizer(path)


def _ensure_trajectories(path: Path) -> Path:
    """``path``; when it is the default pad.jsonl and missing, the trajectories stage is run first."""
    if path.is_file():
        return path
    if path.resolve() != default_paths()["trajectories"].resolve():
        raise ValueError(f"{path}: no such trajectory file")
    try:
        from arkfast.trajectories.__main__ import main as trajectories_main
    except ImportError:
        raise ValueError(f"{path}: no such file; run python -m arkfast.trajectories first") from None
    print(f"no trajectories at {path}: building them first (python -m arkfast.trajectories)")
    trajectories_main([])
    if not path.is_file():
        raise ValueError(f"{path}: python -m arkfast.trajectories did not write it")
    return path


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def _engine(args: argparse.Namespace, model: str):
    import arkfast

    options: dict[str, Any] = {}
    if args.max_num_seqs is not None:
        options["max_num_seqs"] = args.max_num_seqs
    if getattr(args, "no_prefix_caching", False):
        options["enable_prefix_caching"] = False
    from arkfast.debate.shards import rank_device

    return arkfast.LLM(model, dtype=args.dtype, device=rank_device(args.device), seed=args.seed, **options)


# ------------------------------------------------------------------------------------------------
# label
# ------------------------------------------------------------------------------------------------
def select_trajectories(records: list[dict[str, Any]], limit: int, seed: int) -> list[dict[str, Any]]:
    """``limit`` records (0: all) in a seeded random order, the same on every run (``--resume``)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    chosen = order if limit == 0 else order[:limit]
    return [records[i] for i in chosen]


_RESUME_KEYS = ("method", "k", "hard", "temperature", "top_p", "max_tokens", "seed", "model", "trajectories",
                "limit")


def run_label(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from arkfast.debate.shards import resolve_shard
    from arkfast.trajectories import read_trajectories

    from .files import read_label_records_for_resume
    from .labels import LabelConfig, LabelStats, label_source, monte_carlo_labels, outcome_labels
    from .shards import label_part, merge_label_parts, parts_finished

    _set_threads(args)
    paths = default_paths()
    trajectories = _ensure_trajectories(Path(args.trajectories or paths["trajectories"]))
    out = Path(args.output or paths["labels"])
    summary_path = out.with_name(out.stem + ".summary.json")
    model = str(args.model or default_model_path())
    cfg = LabelConfig(k=args.k, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                      hard=args.hard, seed=args.seed)
    config = {"method": args.method, "k": args.k, "hard": args.hard, "temperature": args.temperature,
              "top_p": args.top_p, "max_tokens": args.max_tokens, "seed": args.seed, "model": model,
              "trajectories": str(trajectories), "limit": args.limit}
    tokenizer = _load_tokenizer(Path(model))
    records = select_trajectories(read_trajectories(trajectories, tokenizer=tokenizer), args.limit, args.seed)
    shard, under_torchrun = resolve_shard(args.shard)
    final_out, order = out, [r["id"] for r in records]
    if shard is not None:  # this shard's trajectories into its own part (an ordinary, resumable label file)
        if not args.resume and out.exists() and out.stat().st_size > 0:
            raise ValueError(f"{out} already exists; pass --resume to continue it or another --output")
        out = label_part(final_out, shard)
        summary_path = out.with_name(out.stem + ".summary.json")
        records = shard.select(records, key=lambda r: r["id"])
        config["shard"] = str(shard)
    speaks = shard is None or not under_torchrun or shard.index == 0

    if args.resume:
        if summary_path.is_file():
            previous = json.loads(summary_path.read_text()).get("config", {})
            diff = [k for k in _RESUME_KEYS if k in previous and previous[k] != config[k]]
            if diff:
                raise ValueError(f"--resume: {out} was labelled with {diff[0]}={previous[diff[0]]!r}, now "
                                 f"{diff[0]}={config[diff[0]]!r}; use the same settings or another --output")
        done = read_label_records_for_resume(out)
    elif out.exists() and out.stat().st_size > 0:
        raise ValueError(f"{out} already exists; pass --resume to continue it or another --output")
    else:
        done = []
    done_ids = {r["id"] for r in done}
    todo = [r for r in records if r["id"] not in done_ids]
    out.parent.mkdir(parents=True, exist_ok=True)

    stats = LabelStats()
    source = label_source(args.method, args.hard)
    all_labels = [v for r in done for v in r["step_labels"]]

    def write_summary(finished: bool) -> dict[str, Any]:
        summary = {"finished": finished, "labels": str(out), "label_source": source,
                   "trajectories_labelled": len(done), "this_run": stats.as_dict(), "steps": len(all_labels),
                   "mean_label": sum(all_labels) / len(all_labels) if all_labels else None,
                   "steps_label_0": sum(1 for v in all_labels if v == 0.0),
                   "steps_label_1": sum(1 for v in all_labels if v == 1.0), "config": config}
        write_json_atomic(summary_path, summary)
        return summary

    write_summary(finished=not todo)
    if args.method == "outcome":
        stream = outcome_labels(todo)
        llm = None
    else:
        llm = _engine(args, model)
        stream = monte_carlo_labels(llm, todo, cfg, stats)
    bar = tqdm(total=len(todo), unit="traj", desc=f"label ({source})" + (f" {shard}" if shard else ""),
               dynamic_ncols=True, disable=not speaks)
    finished = False
    t0 = time.perf_counter()
    try:
        with open(out, "a", encoding="utf-8") as f:
            for record in stream:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())  # a labelled trajectory survives a crash of the next one
                done.append(record)
                all_labels.extend(record["step_labels"])
                bar.update(1)
                if llm is not None:
                    bar.set_postfix(tok_s=f"{stats.tokens_per_second:.0f}",
                                    cache=f"{stats.prefix_cache_hit_rate:.0%}")
        finished = True
    finally:
        bar.close()
        stats.seconds = stats.seconds or time.perf_counter() - t0
        summary = write_summary(finished)
        if not finished:
            print(f"stopped after {len(done)} of {len(records)} trajectories; continue with the same flags "
                  f"and --resume")
    if shard is not None:
        if under_torchrun and shard.index == 0:
            summary = merge_label_parts(final_out, shard.count, order, wait=True)  # the other ranks' parts
        elif not under_torchrun and parts_finished(final_out, shard.count):
            summary = merge_label_parts(final_out, shard.count, order)  # the last shard to finish merges
        else:
            if speaks:
                print(f"wrote part {shard} in {out}; the last shard to finish merges the parts into {final_out}")
            return summary
        out, summary_path = final_out, final_out.with_name(final_out.stem + ".summary.json")
        stats = LabelStats(**{k: v for k, v in summary["this_run"].items()  # the parts' work added up
                              if k not in ("prefix_cache_hit_rate", "tokens_per_second")})
        labelled = f"{summary['trajectories_labelled']} (in {shard.count} parts)"
    else:
        labelled = f"{len(done)} ({len(todo)})"
    if not speaks:
        return summary
    print(format_table([
        ("label source", source), ("trajectories labelled (this run)", labelled),
        ("steps", summary["steps"]), ("mean step label", summary["mean_label"]),
        ("steps labelled 0 / 1", f"{summary['steps_label_0']} / {summary['steps_label_1']}"),
        ("rollouts (this run)", stats.requests), ("tokens generated", stats.generated_tokens),
        ("tokens/s", stats.tokens_per_second), ("prefix-cache hit rate", stats.prefix_cache_hit_rate),
        ("seconds", stats.seconds)]))
    print(f"wrote {out} and {summary_path}")
    return summary


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------
def _file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _split_by_problem(records: list[dict[str, Any]], fraction: float, seed: int):
    """``(train, held_out)``: whole problems go to the held-out side, a seeded ``fraction`` of them."""
    problems = sorted({r["problem_id"] for r in records})
    random.Random(seed).shuffle(problems)
    n_held = round(fraction * len(problems))
    if fraction > 0 and len(problems) > 1:
        n_held = min(max(n_held, 1), len(problems) - 1)
    held = set(problems[:n_held])
    return [r for r in records if r["problem_id"] not in held], [r for r in records if r["problem_id"] in held]


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from arkfast.distill.ranks import init_ranks
    from arkfast.models import load_model
    from arkfast.trajectories import default_step_mode, tokenizer_fingerprint

    from .data import encode_trajectory, pack_step_rows, score_examples
    from .files import read_labels
    from .metrics import step_auroc
    from .model import PRMConfig, ProcessRewardModel, result_marker_ids
    from .training import (
        HeadFitConfig,
        PRMTrainConfig,
        evaluate_rows,
        fit_head,
        read_trainer_state,
        step_targets,
        train_prm,
    )

    # Under torchrun: DDP over the ranks (gloo on CPU, nccl on CUDA, each rank on its local GPU); rank 0
    # alone labels what is missing, draws the bar, evaluates and writes.
    head_only = args.features != "hidden"  # log-probability features: a frozen backbone, the head fitted alone
    if head_only and (args.resume or os.environ.get("WORLD_SIZE", "1") != "1"):
        raise ValueError(f"--features {args.features} fits the head alone in one process, in seconds: run it without "
                         f"--resume and without torchrun (both are for --features hidden)")
    ranks, device = init_ranks(args.device or "cpu")
    paths = default_paths()
    labels_path = Path(args.labels or paths["labels"])
    if ranks.world > 1 and not labels_path.is_file():
        raise ValueError(f"no labels at {labels_path}; under torchrun label first (python -m arkfast.prm label)")
    if not labels_path.is_file() and labels_path.resolve() == paths["labels"].resolve():
        from .__main__ import main as prm_main

        print(f"no labels at {labels_path}: labelling first (python -m arkfast.prm label)")
        prm_main(["label"])
    base = Path(args.base_model) if args.base_model else (default_student() if head_only else default_model_path())
    out = Path(args.output or paths["model"])
    previous = read_trainer_state(out)
    if previous is not None and not previous.get("finished", True) and not args.resume:
        raise ValueError(f"{out} holds a PRM run stopped at step {previous['step']}; pass --resume to continue it, "
                         f"or another --output")
    tokenizer = _load_tokenizer(base)
    records = read_labels(labels_path, tokenizer=tokenizer)
    train_records, held_records = _split_by_problem(records, args.val_fraction, args.seed)
    encode = [encode_trajectory(tokenizer, r, step_targets(r["step_labels"], args.targets)) for r in records]
    by_id = {r["id"]: ex for r, ex in zip(records, encode)}
    row_tokens = max(args.row_tokens, max(len(ex) for ex in encode))
    train_rows = pack_step_rows([by_id[r["id"]] for r in train_records], row_tokens)
    held_examples = [by_id[r["id"]] for r in held_records]
    held_rows = pack_step_rows(held_examples, row_tokens) if held_examples else []
    cfg = PRMTrainConfig(steps=args.steps, batch_rows=args.batch_rows, lr=args.lr, seed=args.seed,
                         contrastive_weight=args.contrastive_weight,
                         contrastive_temperature=args.contrastive_temperature, output_dir=str(out),
                         num_threads=args.threads, device=device, time_limit_s=args.time_limit,
                         eval_every=args.eval_every, log_every=args.log_every, save_every=args.save_every)
    data = {"labels_sha256": _file_digest(labels_path), "val_fraction": args.val_fraction,
            "row_tokens": row_tokens, "projection_dim": args.projection_dim, "base_model": str(base.resolve())}
    sources = sorted({r["label_source"] for r in records})
    data["features"], data["targets"] = args.features, args.targets
    config = PRMConfig(projection_dim=args.projection_dim, tokenizer=tokenizer_fingerprint(tokenizer),
                       base_model=str(base), label_source=",".join(sources),
                       step_mode=default_step_mode(records[0]["task"]), features=args.features,
                       result_marker_ids=result_marker_ids(tokenizer) if head_only else [], targets=args.targets)
    if head_only and args.projection_dim:
        raise ValueError("--projection-dim (the contrastive term) trains with the backbone: use --features hidden")
    prm = ProcessRewardModel(load_model(base, device=cfg.device), config, seed=args.seed)
    if head_only:
        before = None  # the head starts at zero weights: the held-out BCE before is log 2
        result = fit_head(prm, train_rows, HeadFitConfig(l2=args.head_l2, max_iter=args.head_iterations,
                                                         output_dir=str(out), num_threads=args.threads,
                                                         device=str(cfg.device)),
                          held_rows, tokenizer=tokenizer)
    else:
        before = evaluate_rows(prm, held_rows, cfg.device) if held_rows and ranks.main else None
        resume = bool(args.resume and previous is not None)
        bar = tqdm(total=cfg.steps, initial=previous["step"] if resume else 0, unit="step", desc="train prm",
                   dynamic_ncols=True, disable=not ranks.main)
        result = train_prm(prm, train_rows, cfg, held_rows, tokenizer=tokenizer, log=bar.write,
                           progress=lambda: bar.update(1), resume=resume, data=data, ranks=ranks)
        bar.close()
    if not ranks.main:
        return {"output": str(out), "optimizer_steps": result.steps}
    held_auroc = None
    if held_examples:
        scores = score_examples(prm, held_examples, row_tokens=row_tokens)
        flat = [s for ss in scores for s in ss]
        truth = [v >= 0.5 for r in held_records for v in step_targets(r["step_labels"], args.targets)]
        held_auroc = step_auroc(flat, truth)
    first, last = result.metrics[0], result.metrics[-1]
    summary = {"labels": str(labels_path), "output": str(out), "label_source": config.label_source,
               "features": args.features, "targets": args.targets,
               "train_trajectories": len(train_records), "held_out_trajectories": len(held_records),
               "train_steps_labelled": sum(len(r["steps"]) for r in train_records), "rows": len(train_rows),
               "optimizer_steps": result.steps, "first_bce": first["bce"], "last_bce": last["bce"],
               "held_out_bce_before": before, "held_out_bce_after": result.evals[-1][1] if result.evals else None,
               "held_out_auroc_vs_labels": held_auroc, "seconds": result.seconds,
               "tokens_per_second": last["tokens_per_second"]}
    write_json_atomic(out.parent / f"{out.name}.summary.json", summary)
    print(format_table([
        ("label source", summary["label_source"]), ("features / targets", f"{args.features} / {args.targets}"),
        ("trajectories train / held out", f"{len(train_records)} / {len(held_records)}"),
        ("packed rows", len(train_rows)), ("L-BFGS evaluations" if head_only else "optimizer steps", result.steps),
        ("bce first -> last logged step", f"{first['bce']:.4f} -> {last['bce']:.4f}"),
        ("held-out bce before -> after", "n/a" if before is None else f"{before:.4f} -> {summary['held_out_bce_after']:.4f}"),
        ("held-out step AUROC vs labels >= 0.5", held_auroc),
        ("tokens/s", last["tokens_per_second"]), ("seconds", result.seconds)]))
    print(f"wrote {out}")
    return summary


# ------------------------------------------------------------------------------------------------
# score
# ------------------------------------------------------------------------------------------------
def run_score(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from arkfast.trajectories import read_trajectories, write_trajectories

    from .data import encode_trajectory, score_examples
    from .evaluate import trajectory_scores
    from .metrics import step_auroc
    from .model import load_prm

    paths = default_paths()
    model_dir = Path(args.prm or paths["model"])
    inp = _ensure_trajectories(Path(args.input or paths["trajectories"]))
    out = Path(args.output) if args.output else (paths["scored"] if args.input is None
                                                 else model_dir.parent / "scored" / inp.name)
    prm = load_prm(model_dir, device=args.device)
    tokenizer = _load_tokenizer(model_dir)
    records = read_trajectories(inp, tokenizer=prm.config.tokenizer or tokenizer)
    t0 = time.perf_counter()
    examples = [encode_trajectory(tokenizer, r) for r in records]
    bar = tqdm(total=len(records), unit="traj", desc="score", dynamic_ncols=True)
    scores = score_examples(prm, examples, row_tokens=args.row_tokens, progress=bar.update)
    bar.close()
    scored = []
    for record, steps in zip(records, scores):
        lo, prod = trajectory_scores(steps)
        scored.append({**record, "step_scores": steps, "score_min": lo, "score_prod": prod})
    write_trajectories(out, scored)
    correct = [r["correct"] for r in scored]
    summary = {"input": str(inp), "output": str(out), "prm": str(model_dir), "trajectories": len(scored),
               "steps": sum(len(r["steps"]) for r in scored),
               "mean_score_min_correct": _mean([r["score_min"] for r in scored if r["correct"]]),
               "mean_score_min_incorrect": _mean([r["score_min"] for r in scored if not r["correct"]]),
               "outcome_auroc_score_min": step_auroc([r["score_min"] for r in scored], correct),
               "outcome_auroc_score_prod": step_auroc([r["score_prod"] for r in scored], correct),
               "seconds": time.perf_counter() - t0}
    print(format_table([
        ("trajectories / steps", f"{summary['trajectories']} / {summary['steps']}"),
        ("mean score_min, correct trajectories", summary["mean_score_min_correct"]),
        ("mean score_min, incorrect trajectories", summary["mean_score_min_incorrect"]),
        ("AUROC of score_min for correctness", summary["outcome_auroc_score_min"]),
        ("AUROC of score_prod for correctness", summary["outcome_auroc_score_prod"]),
        ("seconds", summary["seconds"])]))
    print(f"wrote {out}")
    return summary


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------------------------------------------
# eval
# ------------------------------------------------------------------------------------------------
def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from arkfast.tasks import load_problems
    from arkfast.trajectories import read_trajectories, write_trajectories

    from .evaluate import evaluate_samples, sample_solutions
    from .model import load_prm

    _set_threads(args)
    paths = default_paths()
    model_dir = Path(args.prm or paths["model"])
    if not model_dir.exists() and model_dir.resolve() == paths["model"].resolve():
        from .__main__ import main as prm_main

        print(f"no PRM at {model_dir}: training one first (python -m arkfast.prm train)")
        prm_main(["train"])
    out = Path(args.output or paths["eval"])
    samples_path = Path(args.samples) if args.samples else out.with_name(out.stem + "_samples.jsonl")
    prm = load_prm(model_dir, device=args.device)
    tokenizer = _load_tokenizer(model_dir)
    policy = str(args.policy or default_model_path())
    task, problems = load_problems(args.dataset, task=args.task, split=args.split, limit=args.limit)
    if task.name != "arith":
        raise ValueError(f"eval needs per-step ground truth; it has the exact checker for the arith task "
                         f"only, got task {task.name!r}")
    config = {"policy": policy, "dataset": args.dataset or "arith", "split": args.split, "limit": args.limit,
              "n": args.n, "temperature": args.temperature, "seed": args.seed, "max_tokens": args.max_tokens}
    meta_path = samples_path.with_name(samples_path.name + ".config.json")
    t0 = time.perf_counter()
    if samples_path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == config:
        samples = read_trajectories(samples_path, tokenizer=prm.config.tokenizer or tokenizer)
        print(f"reusing {len(samples)} samples from {samples_path} (same policy, problems and sampling)")
    else:
        llm = _engine(args, policy)
        samples = sample_solutions(llm, task, problems, n=args.n, temperature=args.temperature,
                                   max_tokens=args.max_tokens, seed=args.seed)
        write_trajectories(samples_path, samples)
        write_json_atomic(meta_path, config)
    sample_seconds = time.perf_counter() - t0
    bar = tqdm(total=sum(1 for s in samples if s["steps"]), unit="traj", desc="eval", dynamic_ncols=True)
    result = evaluate_samples(prm, tokenizer, samples, n=args.n, threshold=args.threshold, progress=bar.update)
    bar.close()
    result = {**result, "prm": str(model_dir), "label_source": prm.config.label_source, "config": config,
              "seconds_sampling": sample_seconds, "seconds": time.perf_counter() - t0}
    write_json_atomic(out, result)
    n = args.n
    print(format_table([
        ("problems x samples", f"{result['problems']} x {n}"),
        ("step truth", result["step_truth"]), ("PRM trained on", result["label_source"]),
        ("steps (right)", f"{result['steps']} ({result['right_steps']})"),
        ("step_auroc", result["step_auroc"]), ("first_error_f1", result["first_error_f1"]),
        ("  first-error accuracy (flawed)", result["first_error_accuracy"]),
        ("  accept accuracy (all-correct)", result["all_correct_accuracy"]),
        ("single sample accuracy", result["sample_accuracy"]),
        (f"best_of_{n}_accuracy (score_min)", result["best_of_n_accuracy"]),
        (f"best_of_{n}_accuracy (score_prod)", result["best_of_n_accuracy_prod"]),
        (f"majority_of_{n}_accuracy", result["majority_accuracy"]), (f"pass_at_{n}", result["pass_at_n"]),
        ("seconds (sampling)", f"{result['seconds']:.1f} ({sample_seconds:.1f})")]))
    print(f"wrote {out}")
    return result
