"""The suite driver behind ``python -m benchmarks``: a correctness pass, then every benchmark, each in
its own subprocess under a time budget, inside one total budget.

The contract a benchmark follows to join (``benchmarks/bench_<name>.py``, found by its file name):

* it runs as ``python -m benchmarks.bench_<name>``, takes ``--smoke`` and ``--device``, and exits
  non-zero when it fails;
* it writes its records with :func:`benchmarks.harness.append_result` / ``save_rows``, which honour
  ``$ARKFAST_BENCH_RESULTS`` (the driver sets it to ``--results DIR``);
* it may declare, as a module-level literal (read with :func:`ast.literal_eval`, never imported here)::

      SUITE = {"gpu": {"budget_s": 45, "args": ["--no-compile"]},   # on a CUDA machine
               "cpu": {"budget_s": 120, "args": []},                # CPU figures; absent: not run there
               "smoke": {"budget_s": 15, "args": []}}               # CPU, tiny shapes, seconds

  A missing ``gpu`` or ``smoke`` entry means :data:`DEFAULT_BUDGET_S` seconds (20 and 60) and no extra
  arguments;
  a missing ``cpu`` entry leaves the benchmark out of the CPU plan (a GPU-only benchmark);
* a long grid checks :func:`benchmarks.harness.out_of_time` between points and saves as it goes, so a
  benchmark cut short by the suite's deadline keeps what it measured.

The plan is built before anything runs: steps in order, each with its budget, and a step whose budget
would take the total past ``--budget-s`` is dropped from the plan (listed as such), so the run fits by
construction. At run time each step is killed at its own budget or at the total deadline, whichever
comes first; a failure or a timeout is recorded and the suite carries on.
"""
from __future__ import annotations

import ast
import dataclasses
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
MODES = ("gpu", "cpu", "smoke")
# Total budget per mode, in seconds. gpu: 8 minutes on one H100/H200, which leaves a 15-minute lease
# room for the machine's start, the transfers and one rerun of a failed step.
# smoke: budgets are generous upper bounds for a loaded 2-core CI machine; a smoke step takes 5-25 s.
DEFAULT_TOTAL_S = {"gpu": 480.0, "cpu": 1500.0, "smoke": 900.0}
DEFAULT_BUDGET_S = {"gpu": 20.0, "cpu": 60.0, "smoke": 60.0}
# Correctness first: kernels against their references on the device, then the GPU-marked tests. The
# CPU plan has no correctness step: CPU figures time the torch references, not the kernels.
CHECK_BUDGET_S = {"gpu": 75.0, "smoke": 60.0}
PYTEST_GPU_BUDGET_S = 40.0
KILL_GRACE_S = 3.0  # SIGTERM, then this long before SIGKILL (inside the step's budget)
STATUSES = ("ok", "failed", "timeout", "skipped")


@dataclasses.dataclass(frozen=True)
class Step:
    """One subprocess of the suite: ``name``, ``kind`` ("check" or "bench"), its argv and budget."""

    name: str
    kind: str
    argv: tuple[str, ...]
    budget_s: float
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("check", "bench"):
            raise ValueError(f"step kind must be 'check' or 'bench', got {self.kind!r}")
        if not self.budget_s > 0:
            raise ValueError(f"step {self.name!r}: budget_s must be > 0, got {self.budget_s!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The steps that run (in order, their budgets summing to at most ``budget_s``), and those left
    out with the reason (``name -> reason``)."""

    mode: str
    budget_s: float
    steps: tuple[Step, ...]
    left_out: tuple[tuple[str, str], ...]

    @property
    def planned_s(self) -> float:
        return sum(s.budget_s for s in self.steps)


@dataclasses.dataclass
class SuiteConfig:
    """What ``python -m benchmarks`` was asked to do (validated here; built from its flags)."""

    mode: str
    results: Path
    budget_s: float
    only: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    jobs: int = 1
    bench_dir: Path = BENCH_DIR
    python: str = sys.executable
    cuda: bool = False  # a CUDA device is present (the pytest -m gpu step needs one)
    report: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.budget_s > 0:
            raise ValueError(f"--budget-s must be > 0, got {self.budget_s!r}")
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise ValueError(f"--jobs must be a positive int, got {self.jobs!r}")
        if self.jobs > 1 and self.mode != "smoke":
            raise ValueError(f"--jobs {self.jobs}: parallel steps would disturb each other's timings; "
                             "only --smoke runs them in parallel")
        self.results = Path(self.results)
        self.bench_dir = Path(self.bench_dir)
        if not self.bench_dir.is_dir():
            raise ValueError(f"benchmark folder {self.bench_dir} does not exist")


def read_suite_spec(path: Path) -> dict[str, dict[str, Any]]:
    """The ``SUITE`` literal of a benchmark file (``{}`` when it declares none); ``ValueError`` naming
    the file when it is not a literal dict of modes to ``{"budget_s": float, "args": [str]}``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else []
        if any(isinstance(t, ast.Name) and t.id == "SUITE" for t in targets):
            try:
                spec = ast.literal_eval(node.value)
            except ValueError:
                raise ValueError(f"{path.name}: SUITE must be a literal dict") from None
            return _check_spec(path.name, spec)
    return {}


def _check_spec(file: str, spec: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(spec, dict) or set(spec) - set(MODES):
        raise ValueError(f"{file}: SUITE must be a dict with keys among {MODES}, got {spec!r}")
    for mode, entry in spec.items():
        if not isinstance(entry, dict) or set(entry) - {"budget_s", "args"}:
            raise ValueError(f"{file}: SUITE[{mode!r}] must be a dict of budget_s and args, got {entry!r}")
        budget = entry.get("budget_s", DEFAULT_BUDGET_S[mode])
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
            raise ValueError(f"{file}: SUITE[{mode!r}]['budget_s'] must be a positive number, got {budget!r}")
        args = entry.get("args", [])
        if not isinstance(args, (list, tuple)) or not all(isinstance(a, str) for a in args):
            raise ValueError(f"{file}: SUITE[{mode!r}]['args'] must be a list of strings, got {args!r}")
    return spec


def discover(bench_dir: Path) -> list[tuple[str, Path]]:
    """``(name, path)`` of every ``bench_<name>.py`` in ``bench_dir``, sorted by name."""
    return [(p.stem.removeprefix("bench_"), p) for p in sorted(bench_dir.glob("bench_*.py"))]


def _launch(path: Path, bench_dir: Path) -> list[str]:
    """``-m benchmarks.bench_x`` for the project's benchmarks, the file itself for any other folder."""
    return ["-m", f"benchmarks.{path.stem}"] if bench_dir.resolve() == BENCH_DIR else [str(path)]


def check_steps(config: SuiteConfig) -> list[Step]:
    """The correctness pass: every kernel against its reference on the device, then ``pytest -m gpu``
    with the Triton interpreter off (tests/conftest.py only *defaults* TRITON_INTERPRET to 1, and
    Triton reads "0" as off), so the GPU tests launch real kernels."""
    mode = config.mode
    if mode == "cpu":
        return []
    argv = [config.python, "-m", "benchmarks.gpu_check"] + (["--smoke"] if mode == "smoke" else [])
    # Smoke: the kernels through the interpreter, which Triton reads at import; gpu: real kernels,
    # whatever the caller's environment says.
    env = (("TRITON_INTERPRET", "1" if mode == "smoke" else "0"),)
    steps = [Step("correctness", "check", tuple(argv), CHECK_BUDGET_S[mode], env=env)]
    if mode == "gpu":
        steps.append(Step("pytest-gpu", "check",
                          (config.python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           "tests"),  # run from the repository root
                          PYTEST_GPU_BUDGET_S, env=(("TRITON_INTERPRET", "0"),)))
    return steps


def build_plan(config: SuiteConfig) -> Plan:
    """Choose the steps of this run and their budgets; see the module docstring."""
    candidates: list[Step] = []
    left_out: list[tuple[str, str]] = []
    benches = discover(config.bench_dir)
    known = {"correctness", "pytest-gpu", *(name for name, _ in benches)}
    for flag, names in (("--only", config.only), ("--skip", config.skip)):
        unknown = sorted(set(names) - known)
        if unknown:
            raise ValueError(f"{flag}: unknown step {unknown[0]!r}; known: {', '.join(sorted(known))}")
    if config.bench_dir.resolve() == BENCH_DIR:
        candidates += check_steps(config)
    for name, path in benches:
        spec = read_suite_spec(path)
        if config.mode == "cpu" and "cpu" not in spec:
            left_out.append((name, "GPU only (no SUITE['cpu'] entry)"))
            continue
        entry = spec.get(config.mode, {})
        argv = [config.python, *_launch(path, config.bench_dir)]
        argv += ["--smoke", "--device", "cpu"] if config.mode == "smoke" else \
            ["--device", "cpu"] if config.mode == "cpu" else []
        argv += list(entry.get("args", []))
        candidates.append(Step(name, "bench", tuple(argv), float(entry.get("budget_s", DEFAULT_BUDGET_S[config.mode]))))
    steps: list[Step] = []
    used = 0.0
    for step in candidates:
        if config.only and step.name not in config.only:
            continue
        if step.name in config.skip:
            left_out.append((step.name, "--skip"))
            continue
        if used + step.budget_s > config.budget_s + 1e-9:
            reason = (f"over budget ({step.budget_s:.0f} s would make "
                      f"{used + step.budget_s:.0f} s > {config.budget_s:.0f} s)")
            left_out.append((step.name, reason))
            continue
        steps.append(step)
        used += step.budget_s
    return Plan(config.mode, config.budget_s, tuple(steps), tuple(left_out))


def print_plan(plan: Plan, file=None) -> None:
    file = sys.stdout if file is None else file
    print(f"plan ({plan.mode}): {len(plan.steps)} steps, {plan.planned_s:.0f} s budgeted of "
          f"{plan.budget_s:.0f} s", file=file)
    print(f"{'step':<24} {'kind':<6} {'budget_s':>8} {'cumulative_s':>12}  command", file=file)
    total = 0.0
    for step in plan.steps:
        total += step.budget_s
        env = " ".join(f"{k}={v}" for k, v in step.env)
        command = " ".join(step.argv[1:])
        print(f"{step.name:<24} {step.kind:<6} {step.budget_s:>8.0f} {total:>12.0f}  "
              f"{(env + ' ') if env else ''}python {command}", file=file)
    for name, reason in plan.left_out:
        print(f"{name:<24} {'-':<6} {'-':>8} {'-':>12}  left out: {reason}", file=file)
    print(f"total {total:.0f} s <= budget {plan.budget_s:.0f} s", file=file)


def _count_records(folder: Path) -> dict[str, int]:
    counts = {}
    for path in folder.glob("*.jsonl"):
        with open(path, "rb") as f:
            counts[path.stem] = sum(1 for _ in f)
    return counts


def _tail(path: Path, chars: int = 600) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return text[-chars:].strip()


def run_step(step: Step, config: SuiteConfig, deadline: float, run_id: str, log_dir: Path) -> dict[str, Any]:
    """Run one step under ``min(its budget, the time to the deadline)``; returns its summary row."""
    row: dict[str, Any] = {"step": step.name, "kind": step.kind, "budget_s": step.budget_s}
    limit = min(step.budget_s, deadline - time.time())
    if limit <= 1.0:
        return {**row, "status": "skipped", "seconds": 0.0, "returncode": None,
                "note": "no time left before the suite's deadline"}
    env = {**os.environ, **dict(step.env)}
    env.update({"ARKFAST_BENCH_RESULTS": str(config.results), "ARKFAST_BENCH_DEADLINE": f"{time.time() + limit:.3f}",
                "ARKFAST_BENCH_RUN": run_id, "PYTHONUNBUFFERED": "1"})
    if config.mode == "smoke":
        env["ARKFAST_BENCH_SMOKE"] = "1"  # smoke records are saved (marked) in the suite's folder
    if config.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Steps side by side share the cores: oversubscribed OpenMP pools stall at every barrier.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // config.jobs))
    log = log_dir / f"{step.name}.log"
    start = time.time()
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(step.argv), cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: a timeout ends all of it
        grace = min(KILL_GRACE_S, 0.1 * limit)
        try:
            returncode = proc.wait(timeout=limit - grace)
            status = "ok" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
            _stop(proc, grace)
            returncode = proc.returncode
    row.update({"status": status, "seconds": time.time() - start, "returncode": returncode,
                "log": str(log)})
    if status == "timeout":
        row["note"] = f"killed at its limit of {limit:.0f} s (log: {log.name})"
    elif status == "failed":
        last = _tail(log).splitlines()[-1:] or [""]
        row["note"] = f"exit {returncode}: {last[0][:160]}"
    return row


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the step's process group, SIGKILL after ``grace`` seconds if it is still there."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_suite(config: SuiteConfig, plan: Plan, file=None) -> dict[str, Any]:
    """Run ``plan``; print progress and the final table; write ``summary.json``; return the summary."""
    file = sys.stdout if file is None else file
    config.results.mkdir(parents=True, exist_ok=True)
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"
    # Logs beside the records, except for the project's own results folder, whose records are
    # committed: its logs go under runs/ (ignored by git).
    in_repo = config.results.resolve() == (BENCH_DIR / "results").resolve()
    log_dir = (REPO_ROOT / "runs" / "bench-logs" if in_repo else config.results / "logs") / run_id
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    deadline = start + config.budget_s
    before = _count_records(config.results)
    rows: list[dict[str, Any]] = []

    def one(index_step):
        index, step = index_step
        print(f"[{index + 1}/{len(plan.steps)}] {step.name} (budget {step.budget_s:.0f} s, "
              f"{deadline - time.time():.0f} s left) ...", file=file, flush=True)
        row = run_step(step, config, deadline, run_id, log_dir)
        print(f"[{index + 1}/{len(plan.steps)}] {step.name}: {row['status']} in {row['seconds']:.1f} s"
              + (f" -- {row['note']}" if row.get("note") else ""), file=file, flush=True)
        return row

    if config.jobs > 1:
        with ThreadPoolExecutor(max_workers=config.jobs) as pool:
            rows = list(pool.map(one, enumerate(plan.steps)))
    else:
        rows = [one(item) for item in enumerate(plan.steps)]
    after = _count_records(config.results)
    for row in rows:
        # Records a step appended (its bench file(s) grew); exact when steps ran one at a time.
        stem = {"correctness": "gpu_check"}.get(row["step"], row["step"])
        row["records"] = after.get(stem, 0) - before.get(stem, 0)
    for name, reason in plan.left_out:
        rows.append({"step": name, "kind": "-", "budget_s": None, "status": "skipped", "seconds": 0.0,
                     "returncode": None, "records": 0, "note": reason})
    summary = {"run": run_id, "mode": plan.mode, "results": str(config.results), "budget_s": config.budget_s,
               "planned_s": plan.planned_s, "seconds": time.time() - start,
               "counts": {s: sum(r["status"] == s for r in rows) for s in STATUSES}, "steps": rows,
               "device": _device_name(config), "commit": _commit()}
    path = config.results / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print_summary(summary, file=file)
    print(f"summary: {path}; logs: {log_dir}", file=file)
    return summary


def print_summary(summary: dict[str, Any], file=None) -> None:
    from benchmarks.harness import print_table  # light (torch is already imported by its caller)

    file = sys.stdout if file is None else file
    print(file=file)
    print_table([{k: r.get(k) for k in ("step", "kind", "status", "seconds", "budget_s", "records", "note")}
                 for r in summary["steps"]], file=file)
    counts = ", ".join(f"{n} {s}" for s, n in summary["counts"].items() if n)
    print(f"\n{summary['mode']} run on {summary['device']}: {counts}; {summary['seconds']:.0f} s of "
          f"{summary['budget_s']:.0f} s", file=file)


def _device_name(config: SuiteConfig) -> str:
    from benchmarks.harness import cpu_model_name

    if config.cuda and config.mode == "gpu":
        import torch

        return torch.cuda.get_device_name()
    return cpu_model_name()


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "--no-optional-locks", "rev-parse", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()
