"""The benchmark suite's driver (plan, budgets, failures, timeouts, results redirection), the harness's
timing helpers, the correctness pass's comparison, and the report built from a fixture of records."""
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check, harness, report, suite

REPO = Path(__file__).resolve().parents[1]


def _write_bench(folder: Path, name: str, body: str, spec: str = "") -> None:
    """A fake ``bench_<name>.py`` that follows the suite's contract by hand (no harness import)."""
    code = textwrap.dedent(f"""\
        import json, os, sys, time
        {spec}
        def save(row):
            folder = os.environ["ARKFAST_BENCH_RESULTS"]
            with open(os.path.join(folder, "{name}.jsonl"), "a") as f:
                f.write(json.dumps({{"bench": "{name}", "smoke": "--smoke" in sys.argv, **row}}) + "\\n")
        """) + textwrap.dedent(body)
    (folder / f"bench_{name}.py").write_text(code)


@pytest.fixture
def fake_benches(tmp_path):
    folder = tmp_path / "benches"
    folder.mkdir()
    _write_bench(folder, "ok", "save({'x': 1}); save({'x': 2}); print('done')",
                 spec='SUITE = {"smoke": {"budget_s": 5, "args": ["--flag"]}, "cpu": {"budget_s": 7}}')
    _write_bench(folder, "broken", "save({'x': 1}); raise SystemExit('boom: bad shape 17')",
                 spec='SUITE = {"smoke": {"budget_s": 5}}')
    _write_bench(folder, "slow", "save({'x': 1}); time.sleep(60)", spec='SUITE = {"smoke": {"budget_s": 2}}')
    _write_bench(folder, "huge", "save({'x': 1})", spec='SUITE = {"smoke": {"budget_s": 500}}')
    return folder


def _config(folder, tmp_path, **kw):
    kw.setdefault("mode", "smoke")
    kw.setdefault("budget_s", 30)
    return suite.SuiteConfig(results=tmp_path / "results", bench_dir=folder, report=False, **kw)


def test_plan_budgets_fit_by_construction(fake_benches, tmp_path):
    plan = suite.build_plan(_config(fake_benches, tmp_path))
    assert [s.name for s in plan.steps] == ["broken", "ok", "slow"]  # sorted; huge dropped
    assert dict(plan.left_out)["huge"].startswith("over budget (500 s would make 505 s > 30 s)")
    assert plan.planned_s == 12  # <= the 30 s total
    ok = next(s for s in plan.steps if s.name == "ok")
    assert ok.argv[-3:] == ("--device", "cpu", "--flag") and "--smoke" in ok.argv
    cpu = suite.build_plan(_config(fake_benches, tmp_path, mode="cpu", budget_s=100))
    assert [s.name for s in cpu.steps] == ["ok"] and cpu.steps[0].budget_s == 7
    assert dict(cpu.left_out)["slow"] == "GPU only (no SUITE['cpu'] entry)"


def test_only_skip_and_unknown_names(fake_benches, tmp_path):
    only = suite.build_plan(_config(fake_benches, tmp_path, only=("ok", "slow")))
    assert [s.name for s in only.steps] == ["ok", "slow"]
    skip = suite.build_plan(_config(fake_benches, tmp_path, skip=("slow",)))
    assert [s.name for s in skip.steps] == ["broken", "ok"] and ("slow", "--skip") in skip.left_out
    with pytest.raises(ValueError, match="--only: unknown step 'nope'"):
        suite.build_plan(_config(fake_benches, tmp_path, only=("nope",)))


def test_config_and_spec_validation(fake_benches, tmp_path):
    with pytest.raises(ValueError, match="--jobs 2"):
        _config(fake_benches, tmp_path, mode="gpu", jobs=2)
    with pytest.raises(ValueError, match="--budget-s must be > 0, got 0"):
        _config(fake_benches, tmp_path, budget_s=0)
    bad = fake_benches / "bench_bad.py"
    bad.write_text('SUITE = {"gpu": {"budget_s": -1}}\n')
    with pytest.raises(ValueError, match=r"bench_bad.py: SUITE\['gpu'\]\['budget_s'\] must be a positive number"):
        suite.read_suite_spec(bad)
    bad.write_text('SUITE = {"tpu": {}}\n')
    with pytest.raises(ValueError, match="bench_bad.py: SUITE must be a dict with keys among"):
        suite.read_suite_spec(bad)


def test_real_benchmarks_declare_plans_that_fit():
    """Every project benchmark's SUITE parses, and the default GPU plan keeps the correctness pass and
    fits 8 minutes (a bench added without a gpu entry gets the 20 s default)."""
    config = suite.SuiteConfig(mode="gpu", results=Path("/nonexistent"), budget_s=suite.DEFAULT_TOTAL_S["gpu"],
                               cuda=True)
    plan = suite.build_plan(config)
    assert suite.DEFAULT_TOTAL_S["gpu"] == 480
    assert [s.name for s in plan.steps[:2]] == ["correctness", "pytest-gpu"]
    assert dict(plan.steps[1].env)["TRITON_INTERPRET"] == "0"
    assert plan.planned_s <= 480
    names = {s.name for s in plan.steps}
    assert {"decode_attention", "debate", "fused_loss", "rms_norm"} <= names
    cpu = suite.build_plan(suite.SuiteConfig(mode="cpu", results=Path("/x"), budget_s=suite.DEFAULT_TOTAL_S["cpu"]))
    assert {"debate", "fused_loss", "packing"} <= {s.name for s in cpu.steps}


def test_run_records_failure_and_timeout_and_carries_on(fake_benches, tmp_path, capsys):
    config = _config(fake_benches, tmp_path)
    plan = suite.build_plan(config)
    t0 = time.time()
    summary = suite.run_suite(config, plan)
    elapsed = time.time() - t0
    assert elapsed < 15, elapsed  # the 60 s sleeper was killed at its 2 s budget
    steps = {s["step"]: s for s in summary["steps"]}
    assert steps["ok"]["status"] == "ok" and steps["ok"]["records"] == 2
    assert steps["broken"]["status"] == "failed" and "boom: bad shape 17" in steps["broken"]["note"]
    assert steps["broken"]["records"] == 1  # what it wrote before failing is kept
    assert steps["slow"]["status"] == "timeout" and steps["slow"]["seconds"] < 5 and steps["slow"]["records"] == 1
    assert steps["huge"]["status"] == "skipped" and "over budget" in steps["huge"]["note"]
    assert summary["counts"] == {"ok": 1, "failed": 1, "timeout": 1, "skipped": 1}
    on_disk = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert on_disk["counts"] == summary["counts"] and on_disk["mode"] == "smoke"
    lines = (tmp_path / "results" / "ok.jsonl").read_text().splitlines()
    assert [json.loads(x)["x"] for x in lines] == [1, 2]
    out = capsys.readouterr().out
    assert "timeout" in out and "1 ok, 1 failed, 1 timeout, 1 skipped" in out


def test_total_deadline_cuts_the_last_step(fake_benches, tmp_path):
    """With 1.5 s of total budget left the sleeper (2 s budget) is planned out; with its plan forced
    in anyway, the deadline, not its own budget, ends it."""
    config = _config(fake_benches, tmp_path, only=("slow",), budget_s=1.5)
    assert suite.build_plan(config).steps == ()
    plan = suite.Plan("smoke", 1.5, (suite.Step("slow", "bench", (sys.executable, str(fake_benches / "bench_slow.py")),
                                                 2.0),), ())
    summary = suite.run_suite(config, plan)
    assert summary["steps"][0]["status"] == "timeout" and summary["steps"][0]["seconds"] < 1.9


def test_harness_honours_results_and_deadline_env(tmp_path, monkeypatch):
    monkeypatch.setenv(harness.RESULTS_ENV, str(tmp_path / "elsewhere"))
    monkeypatch.setenv(harness.RUN_ENV, "run-1")
    path = harness.append_result("demo", {"value": 1.5}, device="cpu")
    assert path == tmp_path / "elsewhere" / "demo.jsonl"
    record = json.loads(path.read_text())
    assert record["suite_run"] == "run-1" and record["bench_run"] == harness.BENCH_RUN
    assert record["device"] == harness.cpu_model_name() and "suite_smoke" not in record
    assert record["torch_threads"] == torch.get_num_threads()
    monkeypatch.setenv(harness.DEADLINE_ENV, str(time.time() + 100))
    assert 90 < harness.time_left_s() <= 100
    assert not harness.out_of_time(50) and harness.out_of_time(200)
    monkeypatch.setenv(harness.DEADLINE_ENV, "soon")
    with pytest.raises(ValueError, match="ARKFAST_BENCH_DEADLINE must be a Unix time in seconds, got 'soon'"):
        harness.time_left_s()
    monkeypatch.delenv(harness.RESULTS_ENV)
    assert harness.default_results_dir() == harness.RESULTS_DIR


def test_harness_smoke_saves_only_inside_the_suite(monkeypatch):
    import argparse

    def resolve(*argv):
        parser = argparse.ArgumentParser()
        harness.add_common_args(parser)
        return harness.resolve_common_args(parser.parse_args(list(argv)), gpu_benchmark=False)

    monkeypatch.delenv(harness.SMOKE_ENV, raising=False)
    assert not resolve("--smoke").save and resolve("--device", "cpu").save
    monkeypatch.setenv(harness.SMOKE_ENV, "1")
    assert resolve("--smoke").save and not resolve("--smoke", "--no-save").save
    assert harness.env_record("cpu")["suite_smoke"] is True


def test_harness_stats_first_call_and_cpu_graph_fields():
    stats = harness.stats_of([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (stats.median_ms, stats.p20_ms, stats.p80_ms, stats.reps) == (3.0, 1.8, 4.2, 5)
    value, ms = harness.first_call(lambda: 7, "cpu")
    assert value == 7 and ms >= 0
    assert harness.compile_ms(10.0, stats) == 7.0 and harness.compile_ms(1.0, stats) == 0.0
    fields = harness.graph_fields(lambda: None, stats, warmup=1, reps=2, device="cpu")
    assert fields == {"graph_median_ms": None, "graph_p20_ms": None, "graph_p80_ms": None,
                      "launch_overhead_ms": None}
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, got cpu"):
        harness.measure_graph(lambda: None, device="cpu")
    grown = harness.cpu_peak_rss_delta(lambda: torch.ones(32 << 20, dtype=torch.uint8).add_(1))
    if grown is not None:  # Linux /proc: a 32 MiB temporary shows up in the peak RSS
        assert grown >= 24 << 20


def test_gpu_check_comparison_catches_wrong_and_unwritten_outputs(monkeypatch):
    ref = torch.randn(50, dtype=torch.float64)
    assert gpu_check.relative_error(ref.clone(), ref) == 0.0
    assert math.isclose(gpu_check.relative_error(ref * 1.01, ref), 0.01, rel_tol=1e-9)
    poisoned = ref.clone()
    poisoned[3] = float("nan")
    assert math.isnan(gpu_check.relative_error(poisoned, ref))
    ok = lambda dtype, device, gen, smoke: iter([("exact", lambda: ref.clone(), lambda: ref, False)])
    off = lambda dtype, device, gen, smoke: iter([("4% off", lambda: ref * 1.04, lambda: ref, False)])

    def broken(dtype, device, gen, smoke):
        raise RuntimeError("no such kernel")
        yield
    monkeypatch.setattr(gpu_check, "CHECKS", {"ok": ok, "off": off, "broken": broken})
    rows = gpu_check.run_checks(["ok", "off", "broken"], [torch.bfloat16, torch.float16], torch.device("cpu"), True)
    status = {(r["kernel"], r["dtype"]): r["ok"] for r in rows}
    # 4 u: bf16 1.6e-2 (a 4% error fails), fp16 2e-3
    assert status == {("ok", "bfloat16"): True, ("off", "bfloat16"): False, ("broken", "bfloat16"): False,
                      ("ok", "float16"): True, ("off", "float16"): False, ("broken", "float16"): False}
    assert "RuntimeError: no such kernel" in next(r for r in rows if r["kernel"] == "broken")["error"]


def _rec(bench, device, run, commit, ts, **fields):
    return {"bench": bench, "device": device, "bench_run": run, "commit": commit, "dirty": False,
            "timestamp_utc": ts, "torch": "2.11.0", "triton": "3.6.0", **fields}


def _fixture(folder: Path) -> None:
    rows = []
    for run, commit, ts, triton_ms in (("r1", "aaaaaaa1", "2026-11-01T00:00:00", 2.0),
                                       ("r2", "bbbbbbb2", "2026-11-02T00:00:00", 1.0)):
        for H in (2048, 4096):
            common = {"T": 4096, "H": H, "dtype": "bfloat16", "residual": False}
            rows.append(_rec("rms_norm", "NVIDIA H200", run, commit, ts, provider="torch", median_ms=4.0,
                             pct_copy=20.0, **common))
            rows.append(_rec("rms_norm", "NVIDIA H200", run, commit, ts, provider="triton",
                             median_ms=triton_ms * H / 2048, pct_copy=80.0, **common))
    # A later run on another device, and a smoke record that must not count.
    rows.append(_rec("rms_norm", "AMD EPYC", "r3", "ccccccc3", "2026-11-03T00:00:00", provider="torch",
                     median_ms=9.0, T=17, H=64, dtype="float32", residual=False))
    rows.append(_rec("rms_norm", "NVIDIA H200", "r4", "ddddddd4", "2026-11-04T00:00:00", provider="triton",
                     median_ms=1e-3, T=4096, H=2048, dtype="bfloat16", residual=False, suite_smoke=True))
    rows.append(_rec("gpu_check", "NVIDIA H200", "g1", "bbbbbbb2", "2026-11-02T00:00:00", kernel="rope",
                     case="T17", dtype="float16", rel_err=0.01, tol=0.002, ok=False))
    rows.append(_rec("gpu_check", "NVIDIA H200", "g1", "bbbbbbb2", "2026-11-02T00:00:00", kernel="rms_norm",
                     case="17x4096", dtype="float16", rel_err=1e-4, tol=0.002, ok=True))
    rows.append(_rec("mystery", "NVIDIA H200", "m1", "bbbbbbb2", "2026-11-02T00:00:00", widgets=3))
    by_bench = {}
    for r in rows:
        by_bench.setdefault(r["bench"], []).append(json.dumps(r))
    for bench, lines in by_bench.items():
        (folder / f"{bench}.jsonl").write_text("\n".join(lines) + "\n")


def test_report_from_fixture_records(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _fixture(results)
    done = report.write_report([results], tmp_path / "REPORT.md")
    text = (tmp_path / "REPORT.md").read_text()
    assert done["records"] == 12  # the smoke record left out
    # Latest run r2 on the H200: triton 1.0 ms vs torch 4.0 ms at H = 2048 -> 4x; 2.0 ms at 4096 -> 2x.
    assert "| NVIDIA H200 | T=4096, H=2048, dtype=bfloat16, residual=False | triton | 1 | 4 | 80 |" in text
    assert "| NVIDIA H200 | T=4096, H=4096, dtype=bfloat16, residual=False | triton | 2 | 2 | 80 |" in text
    assert "bbbbbbb | 2026-11-02 | 2.11.0 | 3.6.0 | – |" in text and "0.001" not in text
    # The CPU run has no baseline partner for a ratio of its own other than itself.
    assert "| AMD EPYC | T=17, H=64, dtype=float32, residual=False | torch | 9 | 1 |" in text
    # History: geometric mean of (2, 1) = sqrt(2) for r1, of (4, 2) = sqrt(8) for r2.
    assert "| rms_norm | triton / torch | NVIDIA H200 | aaaaaaa | 2026-11-01T00:00 | 1.41 | 2 |" in text
    assert "| rms_norm | triton / torch | NVIDIA H200 | bbbbbbb | 2026-11-02T00:00 | 2.83 | 2 |" in text
    assert "1/2 checks passed; **failed**: rope T17 float16 (rel err 0.01 > 0.002)" in text
    assert "## mystery" in text and "widgets" in text
    for name in ("rms_norm.png", "history.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    smoke = report.write_report([results], tmp_path / "with_smoke.md", include_smoke=True)
    assert smoke["records"] == 13


def test_report_cli_errors_name_the_value(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.report", "--results", str(tmp_path / "missing")],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"--results {tmp_path / 'missing'}: not a folder" in proc.stderr


def test_cli_plan_and_bad_flags():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--plan", "--skip", "debate"], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "plan (smoke)" in proc.stdout and "correctness" in proc.stdout and "left out: --skip" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks", "--plan", "--only", "warp_drive"], check=False, cwd=REPO,
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "--only: unknown step 'warp_drive'" in bad.stderr


def test_real_smoke_run_of_one_benchmark(tmp_path):
    """``python -m benchmarks --smoke --only packing``: the real packer benchmark in a subprocess,
    its records redirected (and marked smoke), the summary and the report written there."""
    results = tmp_path / "out"
    before = (harness.RESULTS_DIR / "packing.jsonl").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--only", "packing", "--results",
                           str(results)], check=False, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((results / "summary.json").read_text())
    assert summary["counts"]["ok"] == 1 and summary["steps"][0]["records"] == 16
    records = [json.loads(x) for x in (results / "packing.jsonl").read_text().splitlines()]
    assert all(r["suite_smoke"] and r["suite_run"] == summary["run"] for r in records)
    assert {r["impl"] for r in records} == {"python reference", "pack, list in", "pack, ndarray in",
                                            "pack_bins, ndarray in"}
    assert "## packing" in (results / "REPORT.md").read_text()
    assert (harness.RESULTS_DIR / "packing.jsonl").read_bytes() == before  # nothing leaked into the repo


def test_debate_engine_options_fit_the_workload():
    """max_model_len covers round 2's prompt plus its output (rounded up to a block), max_num_seqs the
    problems x agents, the KV cache every sequence at full length without sharing x 1.25; flags win."""
    import argparse

    from benchmarks.bench_debate import engine_options, kv_bytes_per_token

    config = argparse.Namespace(num_hidden_layers=28, num_key_value_heads=8, head_dim=128, hidden_size=2048,
                                num_attention_heads=16)
    args = argparse.Namespace(question=384, agents=5, output=128, suffix=32, warmup=3, reps=20, problems=8,
                              max_model_len=None, max_num_seqs=None, kv_cache_gib=None, dtype=torch.bfloat16)
    per_token = kv_bytes_per_token(config, torch.bfloat16)
    assert per_token == 2 * 28 * 8 * 128 * 2
    options = engine_options(args, config)
    assert options["max_model_len"] == 1184  # 384 + 5 * 128 + 32 + 128, a multiple of 16
    assert options["max_num_seqs"] == 40
    assert options["kv_cache_memory"] == int(1.25 * 40 * 1184 * per_token)
    args.output, args.reps = 6, 40  # the timed decode steps outlast the answers: they set the length
    assert engine_options(args, config)["max_model_len"] == -(-(384 + 30 + 32 + 45) // 16) * 16
    args.max_model_len, args.max_num_seqs, args.kv_cache_gib = 2048, 64, 1.5
    assert engine_options(args, config) == {"max_model_len": 2048, "max_num_seqs": 64,
                                            "kv_cache_memory": int(1.5 * 2**30)}
