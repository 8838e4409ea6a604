"""The whole experiment, stage by stage, each reused when finished (:class:`~.stages.StageLog`).

Experiment folder (default ``runs/experiment/``)::

    config.json                 the data settings (a rerun must match them)
    stages/<stage>.json         finished-stage markers (result, seconds); stages.jsonl: the log
    train-debates/              debates of the first N train problems (copied from runs/arith-train when
                                that run has them, the rest generated)
    trajectories/               rsft / da / pad / correct .jsonl and graphs.jsonl from those debates
    test/base-s<S>/, test/self-consistency/, test/debate/, test/self-refine/   the baselines on the test split
    rft-samples/                rft_samples single-agent samples per train problem (self-consistency)
    rft-trajectories/           their distinct correct ones (DA's rules): the compute-matched RFT set (da.jsonl)
    rft-tokens/rft.jsonl        the training-token-matched RFT set, drawn from the same samples
    prm/                        labels.jsonl, model/, scored/pad.jsonl (python -m arkfast.prm)
    students/<system>/seed-<K>/ train/ (distill output), eval-s<S>/ (generate output; refine-s<S>/ for
                                self-refine), log.txt
    experiment.json, experiment.md
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from arkfast.generate import write_json_atomic

from .config import DISTILL_ARGV, REFINE_EVALS, STUDENTS, ExperimentConfig
from .report import write_report
from .stages import StageLog

__all__ = ["run_experiment"]


def _check_settings(root: Path, settings: dict[str, Any]) -> None:
    path = root / "config.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        for key, value in settings.items():
            if previous.get(key) != value:
                raise ValueError(f"{root} holds an experiment made with {key}={previous.get(key)!r}, now "
                                 f"{key}={value!r}; use the same settings or another --output")
    else:
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, settings)


class _Experiment:
    def __init__(self, cfg: ExperimentConfig, argv: list[str], log: Callable[[str], None]):
        from arkfast.generate import default_model_path

        self.cfg, self.argv, self.log = cfg, argv, log
        self.root = Path(cfg.output)
        self.model = str(Path(cfg.model).resolve()) if cfg.model else str(default_model_path())
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"--model {self.model}: no config.json there (expected a Hugging Face checkpoint)")
        _check_settings(self.root, cfg.data_settings(self.model))
        self.stages = StageLog(self.root, log)
        self.missing: dict[str, str] = {}  # system -> why it has no (complete) row
        self.t0, self.ended = time.perf_counter(), False
        from .report import commit

        self.stages.event("experiment", "start", argv=argv, commit=commit())

    def report(self) -> dict[str, Any]:
        running = 0.0 if self.ended else time.perf_counter() - self.t0  # once ended, it is in stages.jsonl
        return write_report(self.root, self.cfg, self.model, self.argv, self.missing, invocation_seconds=running)

    # ------------------------------------------------------------------ data stages

    def train_debates(self) -> dict[str, Any]:
        """The committee's debates on the first ``train_problems`` train problems: records already in
        the default run (or ``--reuse-debates``) are copied, the rest generated."""
        from arkfast import workflow
        from arkfast.tasks import load_problems

        from .data import copy_reusable_debates, generation_cost
        from .jobs import eval_argv

        cfg, out = self.cfg, self.root / "train-debates"
        task, problems = load_problems(None, split="train", limit=cfg.train_problems)
        expected = {"protocol": "debate", "agents": cfg.agents, "rounds": cfg.rounds, "layout": "shared",
                    "aggregator": False, "temperature": cfg.temperature, "top_p": 1.0, "top_k": -1,
                    "max_tokens": task.default_max_tokens, "seed": 0, "task": task.name, "dataset": "arith",
                    "split": "train", "model": self.model}
        source = Path(cfg.reuse_debates) if cfg.reuse_debates else workflow.default_debates()
        copied = copy_reusable_debates(source, out / "debates.jsonl", {p.id for p in problems}, expected,
                                       log=self.log)
        from arkfast import generate

        t0 = time.perf_counter()
        generate.main(eval_argv(self.model, out, seed=0, problems=cfg.train_problems, temperature=cfg.temperature,
                                protocol="debate", agents=cfg.agents, rounds=cfg.rounds, split="train"))
        return {**generation_cost(out / "debates.jsonl"), "reused_records": copied,
                "reused_from": str(source) if copied else None, "generate_seconds": round(time.perf_counter() - t0, 2)}

    def trajectories(self, debates: Path, output: Path) -> dict[str, Any]:
        from arkfast.trajectories.__main__ import main as trajectories_main

        stats = trajectories_main(["--debates", str(debates), "--output", str(output), "--model", self.model,
                                   "--max-per-problem", str(self.cfg.max_per_problem)])
        return {name: {k: s[k] for k in ("records", "problems", "correct", "incorrect")}
                for name, s in stats["sets"].items()} | {"problems": stats["problems"]}

    def rft_samples(self) -> dict[str, Any]:
        """``rft_samples`` independent single-agent samples per train problem (self-consistency records)."""
        from arkfast import generate

        from .data import generation_cost
        from .jobs import eval_argv

        out = self.root / "rft-samples"
        generate.main(eval_argv(self.model, out, seed=0, problems=self.cfg.train_problems,
                                temperature=self.cfg.temperature, protocol="self-consistency",
                                agents=self.cfg.rft_samples, split="train"))
        return generation_cost(out / "debates.jsonl")

    def rft_tokens(self) -> dict[str, Any]:
        """The R-SFT-token-matched RFT set: distinct correct single-agent samples, one per problem in
        turn, until R-SFT's tokens are reached (:func:`~.data.select_token_matched`)."""
        from arkfast.distill import end_of_turn_id, load_examples, record_example
        from arkfast.models import load_tokenizer
        from arkfast.trajectories import read_trajectories, write_trajectories

        from .data import select_token_matched

        tokenizer = load_tokenizer(Path(self.model))
        _, rsft = load_examples([self.root / "trajectories" / "rsft.jsonl"], tokenizer, "rsft",
                                row_tokens=self.cfg.row_tokens)
        pool = read_trajectories(self.root / "rft-trajectories" / "da.jsonl", tokenizer=tokenizer)
        eos = end_of_turn_id(tokenizer)
        chosen, tokens = select_token_matched(pool, lambda r: len(record_example(tokenizer, r, None, eos)),
                                              rsft.tokens, seed=0)
        out = self.root / "rft-tokens" / "rft.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_trajectories(out, chosen)
        self.log(f"rft-tokens: {len(chosen)} records of {len({r['problem_id'] for r in chosen})} problems, "
                 f"{tokens} tokens (R-SFT: {rsft.examples} records, {rsft.tokens} tokens)")
        return {"records": len(chosen), "problems": len({r["problem_id"] for r in chosen}), "tokens": tokens,
                "rsft_records": rsft.examples, "rsft_tokens": rsft.tokens}

    def prm(self) -> Path | None:
        """Label, train and score with ``python -m arkfast.prm`` (through its ``main``); the scored
        ``pad.jsonl``, or None (PAD then has no row, and the reason is recorded)."""
        try:
            from arkfast.prm.__main__ import main as prm_main
        except ImportError as e:
            self.missing["pad"] = f"arkfast.prm is not available ({e}); PAD needs its scored pad.jsonl"
            return None
        cfg, prm = self.cfg, self.root / "prm"
        pad = self.root / "trajectories" / "pad.jsonl"
        labels, model, scored = prm / "labels.jsonl", prm / "model", prm / "scored" / "pad.jsonl"
        threads = str(self.cfg.threads_per_job())
        try:
            self.stages.run("prm-label", lambda: prm_main([
                "label", "--trajectories", str(pad), "--output", str(labels), "--limit", str(cfg.prm_label_limit),
                "--k", str(cfg.prm_k), "--model", self.model, "--seed", "0", "--resume"]))
            self.stages.run("prm-train", lambda: prm_main([
                "train", "--labels", str(labels), "--output", str(model), "--base-model", self.model,
                "--steps", str(cfg.prm_steps), "--seed", "0", "--threads", threads]))
            self.stages.run("prm-score", lambda: prm_main(["score", "--input", str(pad), "--prm", str(model),
                                                           "--output", str(scored)]))
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            self.missing["pad"] = f"python -m arkfast.prm failed: {e}"
            self.log(f"error: {self.missing['pad']}")
            return None
        return scored

    # ------------------------------------------------------------------ students

    def student_jobs(self, data: dict[str, list[str]]) -> list[tuple[str, dict[str, Any]]]:
        """``(marker name, job)`` for every (system, seed) whose marker lacks an evaluation seed; seed 0 of
        every system first, so each row fills in early."""
        cfg, jobs = self.cfg, []
        for seed in range(cfg.seeds):
            for system in cfg.systems:
                if system not in data:
                    continue
                name = f"student-{system}-seed{seed}"
                marker = self.stages.finished(name)
                have = set(marker["result"]["evals"]) if marker else set()
                todo = [s for s in range(cfg.eval_seeds) if str(s) not in have]
                if marker is not None and not todo:
                    self.stages.event(name, "reused")
                    continue
                jobs.append((name, {
                    "system": system, "mode": STUDENTS[system][0], "seed": seed, "data": data[system],
                    "model": self.model, "output": str(self.root / "students" / system / f"seed-{seed}"),
                    "epochs": cfg.epochs, "lr": cfg.lr, "row_tokens": cfg.row_tokens,
                    "pad_weighting": cfg.pad_weighting, "threads": cfg.threads_per_job(), "eval_seeds": todo,
                    "test_problems": cfg.test_problems, "temperature": cfg.temperature,
                    "distill_argv": DISTILL_ARGV.get(system, []),
                    "refine": system in REFINE_EVALS}))
        return jobs

    def graphs(self) -> dict[str, Any]:
        """The train debates' interaction-graph statistics and self-correction counts
        (``trajectories/graphs.jsonl``, ``correct.jsonl``); the trajectories are rebuilt (the same bytes
        for the R-SFT, DA and PAD sets) when an earlier stage made them before those files existed."""
        out = self.root / "trajectories"
        stats = json.loads((out / "stats.json").read_text()) if (out / "stats.json").is_file() else {}
        if "graphs" not in stats or not (out / "correct.jsonl").is_file():
            self.trajectories(self.root / "train-debates" / "debates.jsonl", out)
            stats = json.loads((out / "stats.json").read_text())
        return {"graphs": stats["graphs"], "correct": stats["correct"]}
    def online_jobs(self, scored: Path | None) -> list[tuple[str, dict[str, Any]]]:
        """The ``pad-online`` jobs: each seed starts from the DA student of that seed (so it runs once DA
        has) and reads the train problems of ``trajectories/pad.jsonl`` and the experiment's PRM."""
        if "pad-online" not in self.cfg.systems:
            return []
        if scored is None:
            self.missing["pad-online"] = self.missing.get("pad", "no PRM: online PAD needs its step scores")
            return []
        jobs = []
        for name, job in self.student_jobs({"pad-online": [str(self.root / "trajectories" / "pad.jsonl")]}):
            init = self.root / "students" / "da" / f"seed-{job['seed']}" / "train" / "model"
            if self.stages.finished(f"student-da-seed{job['seed']}") is None or not (init / "config.json").is_file():
                self.missing["pad-online"] = f"{name}: it starts from the DA student of seed {job['seed']}, not trained"
                continue
            jobs.append((name, {**job, "model": str(init), "prm": str(self.root / "prm" / "model"),
                                "online_steps": self.cfg.online_steps, "online_lr": self.cfg.online_lr,
                                "online_prm_coef": self.cfg.online_prm_coef}))
        return jobs

    def run(self) -> dict[str, Any]:
        import torch

        from .jobs import student_job

        threads = torch.get_num_threads()
        # One thread per process: on a shared machine torch's default (every core) lets OpenMP threads spin
        # on each other; measured here, a single-agent generation ran over 100x slower with 2 threads than 1.
        torch.set_num_threads(self.cfg.threads_per_job())
        jobs = _Jobs(self)
        try:
            scored = self._run(jobs)
            jobs.wait()
            for name, job in self.online_jobs(scored):  # after DA: each starts from a DA student
                jobs.submit(name, student_job, job)
            jobs.wait()
        finally:
            jobs.close()
            torch.set_num_threads(threads)
            self.stages.event("experiment", "end", seconds=round(time.perf_counter() - self.t0, 2))
            self.ended = True
        return self.report()

    def _run(self, jobs: _Jobs) -> Path | None:
        """Every stage and job but online PAD's; returns the scored ``pad.jsonl`` (None without a PRM)."""
        from .jobs import baseline_job, eval_argv, student_job

        cfg, root, st = self.cfg, self.root, self.stages
        st.run("train-debates", self.train_debates)
        st.run("trajectories", lambda: self.trajectories(root / "train-debates" / "debates.jsonl", root / "trajectories"))
        baselines = [(f"test-base-s{s}", "single", 1, 1, s) for s in range(cfg.eval_seeds)]
        baselines += [("test-self-consistency", "self-consistency", cfg.sc_agents, 1, 0),
                      ("test-debate", "debate", cfg.agents, cfg.rounds, 0)]
        if set(REFINE_EVALS) & set(cfg.systems):  # the base model drafting and revising alone
            baselines.append(("test-self-refine", "self-refine", 1, 2, 0))
        for name, protocol, agents, rounds, seed in baselines:
            out = root / "test" / name.removeprefix("test-")
            jobs.submit(name, baseline_job, {
                "output": str(out), "threads": cfg.threads_per_job(),
                "argv": eval_argv(self.model, out, seed=seed, problems=cfg.test_problems, temperature=cfg.temperature,
                                  protocol=protocol, agents=agents, rounds=rounds)})
        traj = root / "trajectories"
        data: dict[str, list[str]] = {"rsft": [str(traj / "rsft.jsonl")], "da": [str(traj / "da.jsonl")],
                                      "rsft-span": [str(traj / "rsft.jsonl")]}
        if {"graph", "graph-nt", "correct"} & set(cfg.systems):
            graphs = st.run("graphs", self.graphs)["result"]
            data["graph"] = data["graph-nt"] = [str(traj / "pad.jsonl")]
            if graphs["correct"]["records"]:
                data["correct"] = [str(traj / "rsft.jsonl"), str(traj / "correct.jsonl")]
            elif "correct" in cfg.systems:
                self.missing["correct"] = "the train debates hold no usable wrong -> right or right -> right transition"
        if {"rft-tokens", "rft-compute"} & set(cfg.systems):
            st.run("rft-samples", self.rft_samples)
            st.run("rft-trajectories", lambda: self.trajectories(root / "rft-samples" / "debates.jsonl",
                                                                 root / "rft-trajectories"))
            data["rft-compute"] = [str(root / "rft-trajectories" / "da.jsonl")]
            if "rft-tokens" in cfg.systems:
                st.run("rft-tokens-data", self.rft_tokens)
                data["rft-tokens"] = [str(root / "rft-tokens" / "rft.jsonl")]
        jobs.drain()
        scored = None
        if {"pad", "pad-online"} & set(cfg.systems):
            scored = self.prm()
            if scored is not None and "pad" in cfg.systems:
                data["pad"] = [str(scored)]
        jobs.drain()
        self.report()
        for name, job in self.student_jobs(data):
            jobs.submit(name, student_job, job)
        return scored


class _Jobs:
    """Jobs run in ``cfg.jobs`` worker processes (``spawn``) while the main process goes on with its own
    stages, or inline, one after another, with ``jobs == 1``. A finished job's marker is written (and the
    report rewritten) by the main process: in :meth:`drain` between its stages and in :meth:`wait`."""

    def __init__(self, experiment: _Experiment):
        from tqdm.auto import tqdm

        self.x, self.futures, self.pool = experiment, {}, None
        self.bar = tqdm(total=0, unit="job", desc="jobs", dynamic_ncols=True, disable=not experiment.cfg.progress)

    def submit(self, name: str, fn: Callable[[dict[str, Any]], dict[str, Any]], job: dict[str, Any]) -> None:
        marker = self.x.stages.finished(name)
        if marker is not None and not (name.startswith("student-") and job.get("eval_seeds")):
            self.x.stages.event(name, "reused")
            return
        self.bar.total += 1
        self.bar.refresh()
        self.x.stages.event(name, "submitted")
        if self.x.cfg.jobs == 1:
            try:
                self._finish(name, fn(job))
            except (ValueError, FileNotFoundError, RuntimeError) as e:
                self._failed(name, e)
            return
        if self.pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(max_workers=self.x.cfg.jobs, mp_context=multiprocessing.get_context("spawn"))
        self.futures[self.pool.submit(fn, job)] = name

    def _finish(self, name: str, result: dict[str, Any]) -> None:
        marker = self.x.stages.finished(name)
        if marker is not None and "evals" in result:  # more evaluation seeds for a finished student
            result["evals"] = {**marker["result"]["evals"], **result["evals"]}
            if "refine_evals" in result:
                result["refine_evals"] = {**marker["result"].get("refine_evals", {}), **result["refine_evals"]}
        self.x.stages.mark(name, result, result["job_seconds"])
        if "evals" in result:
            accs = ", ".join(f"{100 * e['accuracy']:.1f}%" for e in result["evals"].values())
            t = result["train"]
            line = f"{t['steps']} steps, {t['train_tokens']:,} tokens in {t['wall_seconds']:.0f}s; accuracy {accs}"
        else:
            line = f"accuracy {100 * result['accuracy']:.1f}% of {result['problems']} problems"
        self.bar.write(f"[{name}] done in {result['job_seconds']:.0f}s: {line}")
        self.bar.update(1)
        self.x.report()

    def _failed(self, name: str, error: BaseException) -> None:
        system = name.split("-seed")[0].removeprefix("student-") if name.startswith("student-") else name
        self.x.missing.setdefault(system, f"{name}: {type(error).__name__}: {error}")
        self.x.stages.event(name, "failed", error=str(error))
        self.bar.write(f"error: [{name}] {type(error).__name__}: {error}")
        self.bar.update(1)

    def _collect(self, future: Any) -> None:
        name = self.futures.pop(future)
        try:
            self._finish(name, future.result())
        except Exception as e:  # noqa: BLE001 - a failed job leaves its row incomplete, and says why
            self._failed(name, e)

    def drain(self) -> None:
        """Handle the jobs finished so far, without waiting."""
        for future in [f for f in self.futures if f.done()]:
            self._collect(future)

    def wait(self) -> None:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_futures

        while self.futures:
            done, _ = wait_futures(list(self.futures), return_when=FIRST_COMPLETED)
            for future in done:
                self._collect(future)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.bar.close()


def run_experiment(cfg: ExperimentConfig, argv: list[str] | None = None,
                   log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run (or continue) the experiment ``cfg`` describes; returns the ``experiment.json`` dict.
    ``argv``: the command line, recorded in the report."""
    return _Experiment(cfg, list(argv or []), log or (lambda line: None)).run()
