"""The student as a single agent on a held-out split, with the arkfast engine.

The checkpoint is loaded by :class:`arkfast.LLM` (a fresh engine per evaluation, freed afterwards)
and answers each problem once with the single-agent round-1 prompt (``--protocol single`` of
``python -m arkfast.generate``), sampled at ``temperature`` (``generate``'s default 0.5; 0 is greedy)
with per-problem seeds derived from ``seed``, so two evaluations of the same weights agree exactly.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["evaluate_accuracy", "step_evaluator"]


def evaluate_accuracy(checkpoint: str | Path, *, limit: int, temperature: float = 0.5, seed: int = 0,
                      dataset: str | None = None, split: str = "test", device: str | None = None,
                      dtype: str | None = None) -> dict[str, Any]:
    """Accuracy of ``checkpoint`` alone on the first ``limit`` problems of ``dataset`` (default: the
    built-in arith task) ``split``: ``{"accuracy", "correct", "problems", "temperature", "seed",
    "completion_tokens", "seconds"}``."""
    import arkfast
    from arkfast.debate import DebateConfig, run_debates
    from arkfast.tasks import load_problems

    task, problems = load_problems(dataset, split=split, limit=limit)
    if not problems:
        raise ValueError(f"no eval problems in {dataset or 'arith'} split {split!r}")
    config = DebateConfig(protocol="single", temperature=temperature, max_tokens=task.default_max_tokens,
                          seed=seed)
    t0 = time.perf_counter()
    llm = arkfast.LLM(str(checkpoint), dtype=dtype, device=device, seed=seed)
    correct = tokens = 0
    for record in run_debates(llm, task, problems, config):
        correct += bool(record["correct"])
        tokens += record["cost"]["completion_tokens"]
    del llm
    return {"accuracy": correct / len(problems), "correct": correct, "problems": len(problems),
            "temperature": temperature, "seed": seed, "completion_tokens": tokens,
            "seconds": round(time.perf_counter() - t0, 2)}


def step_evaluator(cfg, runlog, evals: list[dict[str, Any]], log: Callable[[str], None],
                   enabled: bool = True) -> Callable[[int, str | Path], None]:
    """``evaluate(step, checkpoint)`` for a training loop: :func:`evaluate_accuracy` with the run's
    ``--eval-*`` settings (a :class:`~arkfast.distill.config.DistillConfig`), the record appended to
    ``evals`` and to ``eval.jsonl`` (``runlog``) and logged; a no-op without ``--eval-limit`` or when
    not ``enabled`` (a rank other than 0)."""

    def evaluate(step: int, path: str | Path) -> None:
        if not cfg.eval_limit or not enabled:
            return
        record = {"step": step, **evaluate_accuracy(path, limit=cfg.eval_limit, temperature=cfg.eval_temperature,
                                                    seed=cfg.eval_seed, dataset=cfg.eval_dataset,
                                                    split=cfg.eval_split, device=cfg.device)}
        evals.append(record)
        runlog.eval(record)
        log(f"step {step}: accuracy {100 * record['accuracy']:.1f}% ({record['correct']}/{record['problems']}, "
            f"T={cfg.eval_temperature}, {record['seconds']:.0f}s)")

    return evaluate
