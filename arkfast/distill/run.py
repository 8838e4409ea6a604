"""A whole distillation run: trajectories → packed rows → optimiser steps → checkpoints, logs, evals.

    from arkfast.distill import DistillConfig, distill
    result = distill(DistillConfig(data=["rsft.jsonl"], mode="rsft", output="runs/x/distill/rsft"))
    result["model"], result["final_loss"], result["evals"]

Output folder::

    model/                     the student: HF checkpoint (config, safetensors, tokenizer), loadable by
                               transformers and arkfast.LLM
    checkpoints/step-NNNNNN/   resumable checkpoints (HF + trainer_state.pt/json), the newest kept
    metrics.jsonl              one line per optimiser step
    eval.jsonl                 one line per evaluation (student alone on the held-out split)
    summary.json               the result dict, written at the end
    loss.png                   the curves (matplotlib); tensorboard/  (TensorBoard, when installed)

The schedule spans ``steps`` optimiser steps (default ``ceil(epochs * rows / batch_rows)``); warm-up
and cosine decay come from :func:`arkfast.train.learning_rate`. Seeded and single-threaded where asked,
a run is bit-reproducible on CPU, and a run resumed from a checkpoint continues the same curve.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from arkfast.generate import write_json_atomic
from arkfast.train import TrainConfig, learning_rate, pack_rows

from .checkpoints import RunLog, latest_checkpoint, load_state, load_weights, read_jsonl, save_state
from .config import DistillConfig, default_data
from .data import RowOrder, concat_rows, load_examples, rows_fingerprint
from .evaluate import step_evaluator
from .loop import step_target_count
from .parallel import Gathered, train_step, wrap
from .plot import plot_curves
from .ranks import Ranks, init_ranks

__all__ = ["NonFiniteLossError", "distill", "format_summary"]

# Files of the base checkpoint copied into every saved student, as text (the tokenizer exactly as the
# base model ships it, chat template included).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt")


class NonFiniteLossError(ValueError):
    """A step's loss or gradient norm is NaN or infinite; the run stopped before applying that step."""


def _ensure_default_data(cfg: DistillConfig, given: bool, log: Callable[[str], None]) -> None:
    """With no ``--data``, make the default trajectories when they are missing (rsft/da: ``python -m
    arkfast.trajectories``, which itself makes the debates first)."""
    path = default_data(cfg.mode)
    if given or path.is_file():
        return
    if cfg.mode == "pad":
        raise ValueError(f"no scored PAD trajectories at {path}; make them with python -m arkfast.prm "
                         f"label / train / score, or pass --data FILE")
    from arkfast.trajectories.__main__ import main as make_trajectories

    log(f"no trajectories at {path}: making them first (python -m arkfast.trajectories)")
    make_trajectories([])
    if not path.is_file():
        raise ValueError(f"python -m arkfast.trajectories did not write {path}")


def _base_files(model_dir: Path) -> dict[str, str]:
    return {name: (model_dir / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES
            if (model_dir / name).is_file()}


def _check_resume(meta: dict[str, Any], expected: dict[str, Any], path: Path) -> None:
    for key, value in expected.items():
        if meta.get(key) != value:
            raise ValueError(f"--resume: {path} was made with {key}={meta.get(key)!r}, now {key}={value!r}; "
                             f"use the same settings or another --output")


def format_summary(result: dict[str, Any]) -> str:
    """The end-of-run table."""
    if result["mode"] == "grpo":
        from .grpo_run import format_grpo_summary

        return format_grpo_summary(result)
    data = result["data"]
    rows = [("mode", result["mode"]),
            ("examples (kept / records)", f"{data['examples']} / {data['records']}"),
            ("packed rows", result["rows"]),
            *([("graph: problems / nodes (right) / pairs (lost across rows)",
                f"{data['problems']} / {data['nodes']} ({data['right_nodes']}) / {data['pairs']} ({data['pairs_split']})")]
              if "pairs" in data else []),
            *([("correct: continues left out (no --continues)", data["skipped_continues"])]
              if result["mode"] == "correct" else []),
            ("steps", f"{result['steps_done']} / {result['steps']}"),
            ("epochs", f"{result['epochs_done']:.2f}"),
            ("target tokens / step (mean)", f"{result['target_tokens_per_step']:.0f}"),
            ("train tokens", result["train_tokens"]),
            ("tokens/s", f"{result['tokens_per_second']:.0f}"),
            ("first / final loss", f"{result['first_loss']:.4f} / {result['final_loss']:.4f}"),
            ("train time (s)", f"{result['train_seconds']:.1f}")]
    for e in result["evals"]:
        rows.append((f"accuracy at step {e['step']} (T={e['temperature']}, {e['problems']} problems)",
                     f"{100 * e['accuracy']:.1f}%"))
    rows.append(("student", result["model"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _run_paths(cfg: DistillConfig) -> tuple[Path, Path, torch.device]:
    """``(output folder, model folder, device)`` of a resolved run; ``ValueError`` for a model folder
    without config.json, or an output folder already holding a run without ``--resume``."""
    out, model_dir, device = Path(cfg.output), Path(cfg.model), torch.device(cfg.device)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"--model {model_dir}: no config.json there (expected a Hugging Face checkpoint folder)")
    started = [p for p in (out / "metrics.jsonl", out / "checkpoints", out / "model") if p.exists()]
    if started and not cfg.resume:
        raise ValueError(f"{out} already holds a run ({started[0].name}); pass --resume to continue it "
                         f"or another --output")
    return out, model_dir, device


def distill(config: DistillConfig, *, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run ``config`` (see the module docstring); returns the result dict also written to
    ``summary.json``. Raises ``ValueError`` (one line) for bad input, :class:`NonFiniteLossError` when a
    loss goes NaN/inf (the last good checkpoint is kept)."""
    log = log or (lambda line: None)
    given_data = config.data is not None
    if config.output is None and not config.resume:
        # the default folder is shared by every default run: continue or reuse it, never refuse it
        config = dataclasses.replace(config, resume=True)
    cfg = config.resolved()
    if cfg.fsdp_cpu_offload and not (cfg.fsdp and torch.device(cfg.device).type == "cuda"):
        raise ValueError(f"--fsdp-cpu-offload needs --fsdp on a GPU (it keeps the GPU's shards and optimiser state "
                         f"in CPU memory); got fsdp={cfg.fsdp}, device={cfg.device!r}")
    if cfg.fsdp and cfg.mode not in ("rsft", "da", "pad", "correct"):
        raise ValueError(f"--fsdp shards the next-token loss of --mode rsft, da, pad and correct; --mode {cfg.mode} "
                         f"runs without it (under torchrun with DDP)")
    ranks, device = init_ranks(cfg.device, group=cfg.fsdp)
    cfg = dataclasses.replace(cfg, device=device)
    if cfg.batch_rows % (ranks.world * cfg.micro_batch_rows):
        raise ValueError(f"batch_rows ({cfg.batch_rows}) must be a multiple of ranks x micro_batch_rows "
                         f"({ranks.world} x {cfg.micro_batch_rows})")
    if not ranks.main:
        log = lambda line: None  # rank 0 speaks for the run
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _distill(cfg, given_data, log, ranks)
    finally:
        torch.set_num_threads(threads)


def _distill(cfg: DistillConfig, given_data: bool, log: Callable[[str], None], ranks: Ranks) -> dict[str, Any]:
    if cfg.mode == "grpo":  # online RL on engine rollouts: its own loop, the same output folder
        from .grpo_run import distill_grpo

        return distill_grpo(cfg, given_data, log, ranks)
    from tqdm.auto import tqdm

    from arkfast.models import load_model, load_tokenizer

    out, model_dir, device = _run_paths(cfg)
    if ranks.main:
        _ensure_default_data(cfg, given_data, log)
    ranks.barrier()  # every rank has checked the folder before rank 0 writes into it

    t_data = time.perf_counter()
    tokenizer = load_tokenizer(model_dir)
    if cfg.mode == "graph":  # nodes grouped by problem, pairs per row (.graph)
        from .graph import load_graph_rows

        rows, stats = load_graph_rows(cfg.data, tokenizer, cfg.row_tokens, span_weights=cfg.span_weights)
    else:
        examples, stats = load_examples(cfg.data, tokenizer, cfg.mode, pad_weighting=cfg.pad_weighting,
                                        pad_clip=cfg.pad_clip, row_tokens=cfg.row_tokens,
                                        span_weights=cfg.span_weights, continues=cfg.continues)
        rows = pack_rows(examples, cfg.row_tokens)
    order = RowOrder(len(rows), cfg.batch_rows, cfg.seed)
    steps = cfg.steps or math.ceil(cfg.epochs * len(rows) / cfg.batch_rows)
    last = min(cfg.stop_after or steps, steps)
    schedule = TrainConfig(steps=steps, lr=cfg.lr, min_lr_ratio=cfg.min_lr_ratio, warmup_ratio=cfg.warmup_ratio)
    meta = {**cfg.curve_settings(), "data_fingerprint": rows_fingerprint(rows), "schedule_steps": steps}
    log(f"data: {stats.examples} examples of {stats.records} records ({stats.skipped_long} longer than "
        f"{cfg.row_tokens} tokens skipped), {stats.tokens} tokens in {len(rows)} rows; {steps} steps of "
        f"{cfg.batch_rows} rows ({time.perf_counter() - t_data:.1f}s)")

    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    if cfg.resume and summary_path.is_file():
        import json

        previous = json.loads(summary_path.read_text())
        if previous.get("finished") and previous.get("meta") == {**meta, "ranks": ranks.world} \
                and previous.get("steps_done") == last:
            log(f"{out}: this run already finished; reusing it")
            return previous

    model = load_model(model_dir, torch.float32, device).train()
    objective, concat, optimizer_cls = None, concat_rows, None
    if cfg.mode == "graph":  # the decoder and the heads on its pooled states, trained together
        from .graph import GraphObjective, GraphOptimizer, concat_graph_rows

        optimizer_cls = GraphOptimizer
        objective, concat = GraphObjective(model, margin=cfg.graph_margin, margin_weight=cfg.graph_margin_weight,
                                           node_weight=cfg.graph_node_weight, seed=cfg.seed), concat_graph_rows
    start = 0
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        import json

        _check_resume(json.loads((ckpt / "trainer_state.json").read_text()), meta, ckpt)
        load_weights(ckpt, model)  # whole, before FSDP shards it
    par, optimizer = wrap(model, ranks, device, fsdp=cfg.fsdp, precision=cfg.precision,
                          cpu_offload=cfg.fsdp_cpu_offload, gradient_checkpointing=cfg.gradient_checkpointing,
                          lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                          objective=objective, optimizer_cls=optimizer_cls)
    if ckpt is not None:
        start = load_state(ckpt, None, optimizer)["step"]
        log(f"resumed from {ckpt} (step {start})")
    elif cfg.resume:
        log(f"--resume: no checkpoint in {out}; starting from the base model")
    runlog = RunLog(out, tensorboard=cfg.tensorboard and ranks.main,
                    resume_step=start if ckpt is not None else None, write=ranks.main)
    files = _base_files(model_dir)
    evals = [e for e in read_jsonl(runlog.eval_path)]

    evaluate = step_evaluator(cfg, runlog, evals, log, enabled=ranks.main)

    def save(step: int) -> Path | None:
        weights = par.full_weights()  # under FSDP gathered from every rank, as is the optimiser state
        state = Gathered(optimizer.state_dict()) if par.kind == "fsdp" else optimizer
        if not ranks.main:
            return None
        return save_state(out, step, weights, state, meta=meta, extra_files=files, keep=cfg.keep_checkpoints)

    if cfg.eval_at_start and start == 0:
        evaluate(0, model_dir)
    metrics = read_jsonl(runlog.metrics_path)
    bar = tqdm(total=last, initial=start, unit="step", desc=f"distill {cfg.mode}", dynamic_ncols=True,
               disable=not (cfg.progress and ranks.main))
    t0 = time.perf_counter()
    try:
        for step in range(start, last):
            t_step = time.perf_counter()
            step_rows = [rows[i] for i in order.step_rows(step)]
            count = max(step_target_count(step_rows), 1)  # N of the module docstring of .loop, all ranks'
            graph_args = None
            if objective is not None:  # the step's pair and node counts P, J (host ints) beside N
                graph_args = (device, count, *objective.step_counts(step_rows), cfg.gradient_checkpointing)
            step_loss = train_step(par, optimizer, ranks.share(step_rows), count, cfg.micro_batch_rows,
                                   concat=concat, objective_args=graph_args)
            if objective is not None:
                ranks.sum_(list(objective.sums.values()))
            norm = optimizer.grad_norm()
            # One host sync per optimiser step (not per micro-batch): metrics.jsonl logs every step, and
            # the NaN guard has to see the loss before the update is applied.
            loss_value, norm_value = float(step_loss), float(norm)
            done = step + 1
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                optimizer.discard()
                good = latest_checkpoint(out)
                raise NonFiniteLossError(
                    f"step {done}: the loss is {loss_value} (gradient norm {norm_value}); stopped before the "
                    f"update; last good checkpoint: {good if good is not None else 'none saved yet'}")
            lr = learning_rate(step, schedule)
            optimizer.step(lr, cfg.grad_clip, norm)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the step's time includes its kernels
            seconds = time.perf_counter() - t_step
            tokens = sum(r.num_tokens for r in step_rows)
            record = {"step": done, "epoch": round(order.epoch_of(done), 4), "loss": loss_value, "lr": lr,
                      "grad_norm": norm_value, "tokens": tokens, "target_tokens": count,
                      "tokens_per_second": tokens / seconds, "seconds": round(time.perf_counter() - t0, 3)}
            if objective is not None:  # each term's mean over the step's rows (summed over the ranks above)
                record.update(objective.pop_metrics())
            runlog.step(record)
            metrics.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens / seconds:.0f}", lr=f"{lr:.2e}")
            saved = None
            if cfg.save_every and done % cfg.save_every == 0 and done != last:
                saved = save(done)
            if cfg.eval_every and done % cfg.eval_every == 0 and done != last:
                evaluate(done, saved or save(done))
        bar.close()
        save(last)
        from arkfast.train import save_checkpoint

        weights = par.full_weights()
        if ranks.main:
            evaluate(last, save_checkpoint(weights, out / "model", extra_files=files))
        ranks.barrier()  # the run's files are complete when any rank returns
    finally:
        bar.close()
        runlog.close()

    train_s = sum(m["tokens"] / m["tokens_per_second"] for m in metrics) if metrics else 0.0
    train_tokens = sum(m["tokens"] for m in metrics)
    result = {
        "mode": cfg.mode, "model": str(out / "model"), "output": str(out), "finished": True,
        "steps": steps, "steps_done": last, "epochs_done": order.epoch_of(last), "rows": len(rows),
        "data": vars(stats), "train_tokens": train_tokens,
        "train_target_tokens": sum(m["target_tokens"] for m in metrics), "train_seconds": train_s,
        "wall_seconds": time.perf_counter() - t_data,
        "tokens_per_second": train_tokens / train_s if train_s else 0.0,
        "target_tokens_per_step": sum(m["target_tokens"] for m in metrics) / max(len(metrics), 1),
        "first_loss": metrics[0]["loss"] if metrics else float("nan"),
        "final_loss": metrics[-1]["loss"] if metrics else float("nan"),
        "losses": [m["loss"] for m in metrics], "evals": evals,
        "final_accuracy": evals[-1]["accuracy"] if evals and evals[-1]["step"] == last else None,
        "config": cfg.to_dict(), "meta": {**meta, "ranks": ranks.world},
    }
    if not ranks.main:
        return result
    if cfg.plot and plot_curves(metrics, evals, out / "loss.png", title=f"{cfg.mode}: {out}") is None:
        log("loss.png not drawn (matplotlib is not installed: pip install matplotlib)")
    write_json_atomic(summary_path, result)
    return result
