"""One student: distill (``python -m arkfast.distill``) then evaluate alone on the test split
(``python -m arkfast.generate --protocol single``), once per evaluation seed.

:func:`student_job` takes and returns plain dicts, so it runs the same inline or in a worker process
(``spawn``: a fresh interpreter, no forked torch thread pool). Its console output goes to the job's
``log.txt``, the main process prints one line per finished job.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

__all__ = ["baseline_job", "eval_argv", "student_job"]


def eval_argv(model: str, output: Path, *, seed: int, problems: int, temperature: float,
              protocol: str = "single", agents: int = 1, rounds: int = 1, split: str = "test") -> list[str]:
    """The ``generate`` flags of one evaluation run (resumable: ``--resume`` into ``output``)."""
    argv = ["--protocol", protocol, "--split", split, "--limit", str(problems), "--model", model,
            "--seed", str(seed), "--temperature", str(temperature), "--output", str(output), "--resume"]
    if protocol != "single":
        argv += ["--agents", str(agents), "--rounds", str(rounds)]
    return argv


def evaluation(argv: list[str], output: Path) -> dict[str, Any]:
    """Run ``generate.main(argv)`` and return what the table needs from its ``debates.jsonl``: the
    cost (:func:`~arkfast.experiment.data.generation_cost`), accuracy, per-problem correctness and the
    wall time of the call."""
    from arkfast import generate

    from .data import generation_cost, per_problem_correct

    t0 = time.perf_counter()
    generate.main(argv)
    seconds = time.perf_counter() - t0
    cost = generation_cost(output / "debates.jsonl")
    return {**cost, "accuracy": cost["correct"] / cost["problems"] if cost["problems"] else 0.0,
            "per_problem": per_problem_correct(output / "debates.jsonl"), "seconds": round(seconds, 2)}


def baseline_job(job: dict[str, Any]) -> dict[str, Any]:
    """One ``generate`` run (``job["argv"]`` into ``job["output"]``) with ``job["threads"]`` torch
    threads, its console output in ``<output>/log.txt``; :func:`evaluation`'s dict plus ``job_seconds``."""
    import torch

    t0 = time.perf_counter()
    torch.set_num_threads(job["threads"])
    out = Path(job["output"])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), \
            contextlib.redirect_stderr(f):
        result = evaluation(job["argv"], out)
    return {**result, "job_seconds": round(time.perf_counter() - t0, 2)}


def student_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train ``job["system"]`` with ``job["seed"]`` (distill, resumable) and evaluate it with each seed
    of ``job["eval_seeds"]`` (and, with ``job["refine"]``, also with ``generate --protocol self-refine``:
    ``refine_evals``). ``job["distill_argv"]``: more distill flags. Returns ``{"system", "seed",
    "train": {...}, "evals": {seed: {...}}}``."""
    import torch

    from arkfast import distill

    t_job = time.perf_counter()
    torch.set_num_threads(job["threads"])
    out = Path(job["output"])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), \
            contextlib.redirect_stderr(f):
        t0 = time.perf_counter()
        if job["mode"] == "grpo":  # online PAD: RL steps from its initial student, rollouts at the experiment's T
            schedule = ["--steps", str(job["online_steps"]), "--lr", str(job["online_lr"]), "--prm", job["prm"],
                        "--grpo-temperature", str(job["temperature"]),
                        "--grpo-prm-coef", str(job.get("online_prm_coef", 1.0))]
        else:
            schedule = ["--epochs", str(job["epochs"]), "--lr", str(job["lr"]), "--row-tokens", str(job["row_tokens"])]
        argv = ["--data", *job["data"], "--mode", job["mode"], "--model", job["model"],
                "--output", str(out / "train"), "--seed", str(job["seed"]), *schedule, "--eval-limit", "0",
                "--threads", str(job["threads"]), "--no-progress", "--no-tensorboard", "--resume"]
        if job["mode"] == "pad":
            argv += ["--pad-weighting", job["pad_weighting"]]
        argv += job.get("distill_argv", [])
        result = distill.main(argv)
        train = {"steps": result["steps_done"], "examples": result["data"]["examples"],
                 "rollout_tokens": result.get("rollout_tokens"), "rollout_seconds": result.get("rollout_seconds"),
                 "data_tokens": result["data"]["tokens"], "train_tokens": result["train_tokens"],
                 "train_seconds": round(result["train_seconds"], 2), "final_loss": result["final_loss"],
                 "wall_seconds": round(time.perf_counter() - t0, 2), "student": result["model"]}
        evals, refine = {}, {}
        for seed in job["eval_seeds"]:
            path = out / f"eval-s{seed}"
            evals[str(seed)] = evaluation(eval_argv(result["model"], path, seed=seed, problems=job["test_problems"],
                                                    temperature=job["temperature"]), path)
            if job.get("refine"):  # the same student drafting, then revising its draft (2 calls)
                path = out / f"refine-s{seed}"
                refine[str(seed)] = evaluation(eval_argv(result["model"], path, seed=seed,
                                                         problems=job["test_problems"], temperature=job["temperature"],
                                                         protocol="self-refine"), path)
    out_dict = {"system": job["system"], "seed": job["seed"], "train": train, "evals": evals,
                "job_seconds": round(time.perf_counter() - t_job, 2)}
    if job.get("refine"):
        out_dict["refine_evals"] = refine
    return out_dict
