"""A whole ``--mode grpo`` run: engine rollouts → rewards → clipped policy updates → new engine weights.

Step ``s`` (of ``--steps``, default 100):

1. take ``--grpo-prompts`` problems (a seeded permutation per epoch over the training files' problems,
   :class:`~.data.RowOrder`) and sample ``--grpo-group`` responses to each with the in-process engine
   (:mod:`.rollout`), at ``--grpo-temperature``, keeping each token's log-probability;
2. grade them (the outcome reward), score their steps with the PRM (``--prm``; ``none``: outcome
   only), form step returns and group advantages (:mod:`.rewards`); skip groups with no signal;
3. split the kept groups into ``--grpo-updates`` shares and take one AdamW step on each (:mod:`.grpo`:
   the clipped ratio against the engine's log-probabilities, the k3 KL to the frozen starting model);
4. copy the new weights into the engine (:meth:`arkfast.LLM.update_weights`, which also empties its
   prefix cache).

The output folder, checkpoints, ``--resume``, the NaN guard and ``--eval-every`` are those of the other
modes (:mod:`.run`). ``metrics.jsonl`` has one line per step with, besides the common keys, ``reward``
(mean score), ``outcome_reward`` (the fraction of correct samples), ``prm_reward`` (mean PRM term of
the score, before its coefficient), ``response_length`` (mean sampled tokens), ``kl`` (mean k3 per
token), ``clip_fraction``, ``entropy`` (minus the mean log-probability of the sampled tokens under the
rollout policy: a one-sample estimate of its per-token entropy at the rollout temperature),
``ratio`` (mean), ``skipped_groups`` (fraction), ``updates``, and ``rollout_seconds``,
``prm_seconds``, ``train_seconds``. A resumed run repeats the uninterrupted run's numbers: rollout
seeds depend only on (seed, step, problem, sample), and the engine's prefix cache is empty at the
start of every step either way.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import DistillConfig

__all__ = ["distill_grpo", "format_grpo_summary", "group_statistics"]


def group_statistics(groups, cfg: DistillConfig) -> tuple[list[tuple[list, list[list[float]]]], dict[str, float]]:
    """``(kept, stats)``: the groups with a signal, each as ``(rollouts, per-rollout step advantages)``,
    and the step's reward statistics (``reward``, ``outcome_reward``, ``prm_reward``,
    ``response_length``, ``skipped_groups``)."""
    from .rewards import group_advantages, prm_step_rewards, step_returns, zero_signal

    kept, scores_all, prm_terms, outcomes, lengths, skipped = [], [], [], [], [], 0
    for members in groups:
        returns, scores = [], []
        for r in members:
            rewards = prm_step_rewards(r.step_scores) if r.step_scores else []
            outcome = 1.0 if r.correct else 0.0
            g = step_returns(rewards, outcome, cfg.grpo_credit, temperature=cfg.grpo_softmin_temperature,
                             prm_coef=cfg.grpo_prm_coef if r.step_scores else 0.0,
                             outcome_coef=cfg.grpo_outcome_coef)
            score = g[0] if g else cfg.grpo_outcome_coef * outcome
            returns.append(g)
            scores.append(score)
            prm_terms.append(step_returns(rewards, 0.0, cfg.grpo_credit, temperature=cfg.grpo_softmin_temperature)[0]
                             if rewards else 0.0)
            outcomes.append(outcome)
            lengths.append(len(r.token_ids))
        scores_all += scores
        if zero_signal(scores):
            skipped += 1
            continue
        kept.append((members, group_advantages(returns, scores, cfg.grpo_advantage)))
    n = max(len(scores_all), 1)
    stats = {"reward": sum(scores_all) / n, "outcome_reward": sum(outcomes) / n, "prm_reward": sum(prm_terms) / n,
             "response_length": sum(lengths) / n, "skipped_groups": skipped / max(len(groups), 1)}
    return kept, stats


def _prompts_fingerprint(prompts) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.problem_id, p.task, p.gold, list(p.prompt_ids)]).encode())
    return "sha256:" + h.hexdigest()


def _prm_fingerprint(path: str | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    for name in ("model.safetensors", "prm_head.safetensors"):
        h.update((Path(path) / name).read_bytes())
    return "sha256:" + h.hexdigest()


def distill_grpo(cfg: DistillConfig, given_data: bool, log: Callable[[str], None], ranks) -> dict[str, Any]:
    """Run ``cfg`` (``mode == "grpo"``, resolved); returns the result dict (``summary.json``)."""
    from tqdm.auto import tqdm

    import arkfast
    from arkfast.models import load_model, load_tokenizer
    from arkfast.train import TrainConfig, learning_rate, save_checkpoint

    from .checkpoints import RunLog, latest_checkpoint, load_state, read_jsonl, save_state
    from .data import RowOrder, end_of_turn_id
    from .evaluate import step_evaluator
    from .grpo import build_batch, clipped_objective, policy_logprobs
    from .loop import Optimizer
    from .plot import plot_curves
    from .rollout import load_prompts, sample_groups, score_groups
    from .run import NonFiniteLossError, _base_files, _check_resume, _ensure_default_data, _run_paths

    if ranks.world > 1:
        raise ValueError("--mode grpo runs in one process (the engine and the trainer share it); "
                         "run it without torchrun")
    out, model_dir, device = _run_paths(cfg)
    _ensure_default_data(cfg, given_data, log)
    prm_path = None if cfg.prm == "none" or cfg.grpo_prm_coef == 0 else cfg.prm
    if prm_path is not None and not (Path(prm_path) / "prm_config.json").is_file():
        raise ValueError(f"--prm {prm_path}: not a PRM folder (train one with python -m arkfast.prm train, "
                         f"or pass --prm none for the outcome reward alone)")

    t_data = time.perf_counter()
    tokenizer = load_tokenizer(model_dir)
    eos = end_of_turn_id(tokenizer)
    prompts = load_prompts(cfg.data, tokenizer)
    steps = cfg.steps
    last = min(cfg.stop_after or steps, steps)
    order = RowOrder(len(prompts), cfg.grpo_prompts, cfg.seed)
    schedule = TrainConfig(steps=steps, lr=cfg.lr, min_lr_ratio=cfg.min_lr_ratio, warmup_ratio=cfg.warmup_ratio)
    meta = {**cfg.curve_settings(), "data_fingerprint": _prompts_fingerprint(prompts),
            "prm_fingerprint": _prm_fingerprint(prm_path), "schedule_steps": steps}
    log(f"data: {len(prompts)} problems; {steps} steps of {cfg.grpo_prompts} prompts x {cfg.grpo_group} samples "
        f"({time.perf_counter() - t_data:.1f}s)")

    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    if cfg.resume and summary_path.is_file():
        previous = json.loads(summary_path.read_text())
        if previous.get("finished") and previous.get("meta") == {**meta, "ranks": 1} \
                and previous.get("steps_done") == last:
            log(f"{out}: this run already finished; reusing it")
            return previous

    model = load_model(model_dir, torch.float32, device).train()
    optimizer = Optimizer(model, precision=cfg.precision, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                          weight_decay=cfg.weight_decay)
    dtype = next(model.parameters()).dtype
    reference = None
    if cfg.grpo_kl > 0:
        reference = load_model(model_dir, dtype, device).eval().requires_grad_(False)
    prm = None
    if prm_path is not None:
        from arkfast.prm import load_prm

        prm = load_prm(prm_path, device=device)
    start = 0
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        _check_resume(json.loads((ckpt / "trainer_state.json").read_text()), meta, ckpt)
        start = load_state(ckpt, model, optimizer)["step"]
        log(f"resumed from {ckpt} (step {start})")
    elif cfg.resume:
        log(f"--resume: no checkpoint in {out}; starting from the base model")
    llm = arkfast.LLM(model_dir, dtype=dtype, device=device, seed=cfg.seed)
    if start:
        llm.update_weights(model)
    max_tokens = cfg.grpo_max_tokens or _task_max_tokens(prompts)
    runlog = RunLog(out, tensorboard=cfg.tensorboard, resume_step=start if ckpt is not None else None)
    files = _base_files(model_dir)
    evals = read_jsonl(runlog.eval_path)

    evaluate = step_evaluator(cfg, runlog, evals, log)

    def save(step: int) -> Path:
        return save_state(out, step, model, optimizer, meta=meta, extra_files=files, keep=cfg.keep_checkpoints)

    if cfg.eval_at_start and start == 0:
        evaluate(0, model_dir)
    metrics = read_jsonl(runlog.metrics_path)
    bar = tqdm(total=last, initial=start, unit="step", desc="distill grpo", dynamic_ncols=True,
               disable=not cfg.progress)
    t0 = time.perf_counter()
    try:
        for step in range(start, last):
            t_step = time.perf_counter()
            groups = sample_groups(llm, prompts, order.step_rows(step), group=cfg.grpo_group,
                                   temperature=cfg.grpo_temperature, max_tokens=max_tokens, seed=cfg.seed,
                                   step=step, tokenizer=tokenizer, eos_id=eos)
            t_rollout = time.perf_counter()
            if prm is not None:
                score_groups(prm, groups)
            t_prm = time.perf_counter()
            kept, stats = group_statistics(groups, cfg)
            lr = learning_rate(step, schedule)
            sums = {"loss": 0.0, "pg": 0.0, "kl": 0.0, "clipped": 0.0, "ratio": 0.0, "logp": 0.0, "targets": 0,
                    "tokens": 0, "updates": 0}
            norms = []
            shares = [kept[u * len(kept) // cfg.grpo_updates:(u + 1) * len(kept) // cfg.grpo_updates]
                      for u in range(cfg.grpo_updates)]
            for share in (s for s in shares if s):
                batch = build_batch([r for members, _ in share for r in members],
                                    [a for _, adv in share for a in adv])
                count = batch.num_targets
                labels = batch.labels.to(device)
                mask = labels != -100
                logp = policy_logprobs(model, batch, cfg.grpo_temperature, device)
                ref = None
                if reference is not None:
                    with torch.no_grad():
                        ref = policy_logprobs(reference, batch, cfg.grpo_temperature, device)
                loss, st = clipped_objective(logp, batch.old_logprobs.to(device, logp.dtype),
                                             batch.advantages.to(device, logp.dtype), mask, count=count,
                                             clip=cfg.grpo_clip, ref_logp=ref, kl_coef=cfg.grpo_kl)
                optimizer.backward(loss)
                norm = optimizer.grad_norm()
                # One host sync per update: the NaN guard must see the loss before the update is applied.
                loss_value, norm_value = float(loss.detach()), float(norm)
                if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                    optimizer.discard()
                    good = latest_checkpoint(out)
                    raise NonFiniteLossError(
                        f"step {step + 1}: the loss is {loss_value} (gradient norm {norm_value}); stopped before "
                        f"the update; last good checkpoint: {good if good is not None else 'none saved yet'}")
                optimizer.step(lr, cfg.grad_clip, norm)
                norms.append(norm_value)
                sums["loss"] += loss_value
                for key in ("pg", "kl", "clipped", "ratio", "logp"):
                    sums[key] += float(st[key])
                sums["targets"] += count
                sums["tokens"] += batch.num_tokens
                sums["updates"] += 1
            t_train = time.perf_counter()
            if sums["updates"]:
                llm.update_weights(model)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            done = step + 1
            n_tok = max(sums["targets"], 1)
            train_s = t_train - t_prm
            record = {"step": done, "epoch": round(order.epoch_of(done), 4),
                      "loss": sums["loss"] / max(sums["updates"], 1), "lr": lr,
                      "grad_norm": max(norms) if norms else 0.0, "tokens": sums["tokens"],
                      "target_tokens": sums["targets"], "tokens_per_second": sums["tokens"] / train_s if train_s else 0.0,
                      **{k: round(v, 6) for k, v in stats.items()},
                      "kl": sums["kl"] / n_tok, "clip_fraction": sums["clipped"] / n_tok,
                      "entropy": -sums["logp"] / n_tok if sums["targets"] else 0.0,
                      "ratio": sums["ratio"] / n_tok if sums["targets"] else 1.0, "updates": sums["updates"],
                      "rollout_tokens": sum(len(r.token_ids) for members in groups for r in members),
                      "rollout_seconds": round(t_rollout - t_step, 3), "prm_seconds": round(t_prm - t_rollout, 3),
                      "train_seconds": round(train_s, 3), "seconds": round(time.perf_counter() - t0, 3)}
            runlog.step(record)
            metrics.append(record)
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward']:.3f}", acc=f"{stats['outcome_reward']:.2f}",
                            kl=f"{record['kl']:.4f}", skip=f"{stats['skipped_groups']:.2f}")
            saved = None
            if cfg.save_every and done % cfg.save_every == 0 and done != last:
                saved = save(done)
            if cfg.eval_every and done % cfg.eval_every == 0 and done != last:
                evaluate(done, saved or save(done))
        bar.close()
        save(last)
        evaluate(last, save_checkpoint(model, out / "model", extra_files=files))
    finally:
        bar.close()
        runlog.close()

    def total(key: str) -> float:
        return sum(m[key] for m in metrics)

    train_s, rollout_s, prm_s = total("train_seconds"), total("rollout_seconds"), total("prm_seconds")
    n = max(len(metrics), 1)
    result = {
        "mode": cfg.mode, "model": str(out / "model"), "output": str(out), "finished": True,
        "steps": steps, "steps_done": last, "epochs_done": order.epoch_of(last), "rows": None,
        "data": {"records": None, "examples": len(prompts), "problems": len(prompts),
                 "tokens": sum(len(p.prompt_ids) for p in prompts)},
        "train_tokens": int(total("tokens")), "train_target_tokens": int(total("target_tokens")),
        "train_seconds": train_s, "rollout_seconds": rollout_s, "prm_seconds": prm_s,
        "rollout_tokens": int(total("rollout_tokens")),
        "rollout_tokens_per_second": total("rollout_tokens") / rollout_s if rollout_s else 0.0,
        "wall_seconds": time.perf_counter() - t_data,
        "tokens_per_second": total("tokens") / train_s if train_s else 0.0,
        "target_tokens_per_step": total("target_tokens") / n,
        "first_loss": metrics[0]["loss"] if metrics else float("nan"),
        "final_loss": metrics[-1]["loss"] if metrics else float("nan"),
        "losses": [m["loss"] for m in metrics], "evals": evals,
        "final_accuracy": evals[-1]["accuracy"] if evals and evals[-1]["step"] == last else None,
        "rewards": [m["reward"] for m in metrics], "outcome_rewards": [m["outcome_reward"] for m in metrics],
        "skipped_groups": sum(m["skipped_groups"] for m in metrics) / n,
        "config": cfg.to_dict(), "meta": {**meta, "ranks": 1},
    }
    if cfg.plot and plot_curves(metrics, evals, out / "loss.png", title=f"grpo: {out}") is None:
        log("loss.png not drawn (matplotlib is not installed: pip install matplotlib)")
    from arkfast.generate import write_json_atomic

    write_json_atomic(summary_path, result)
    return result


def format_grpo_summary(result: dict[str, Any]) -> str:
    """The end-of-run table of a grpo run."""
    first, final = result["rewards"][:1], result["rewards"][-1:]
    acc = result["outcome_rewards"]
    rows = [("mode", "grpo"), ("problems", result["data"]["problems"]),
            ("steps", f"{result['steps_done']} / {result['steps']}"),
            ("rollout tokens", f"{result['rollout_tokens']} ({result['rollout_tokens_per_second']:.0f} tokens/s)"),
            ("reward first / last step", f"{first[0]:.3f} / {final[0]:.3f}" if first else "n/a"),
            ("sample accuracy first / last step", f"{acc[0]:.3f} / {acc[-1]:.3f}" if acc else "n/a"),
            ("groups skipped (no signal)", f"{100 * result['skipped_groups']:.1f}%"),
            ("train tokens", result["train_tokens"]),
            ("rollout / PRM / train time (s)",
             f"{result['rollout_seconds']:.1f} / {result['prm_seconds']:.1f} / {result['train_seconds']:.1f}")]
    for e in result["evals"]:
        rows.append((f"accuracy at step {e['step']} (T={e['temperature']}, {e['problems']} problems)",
                     f"{100 * e['accuracy']:.1f}%"))
    rows.append(("student", result["model"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _task_max_tokens(prompts) -> int:
    """The completion budget of the prompts' task (the largest when the files mix tasks)."""
    from arkfast.tasks import ADAPTERS, ArithTask

    return max((ArithTask() if t == "arith" else ADAPTERS[t]()).default_max_tokens for t in {p.task for p in prompts})
