"""python -m arkfast.experiment: the interval helpers against hand-computed values, the RFT token
matching and debate reuse on hand-made records, and one tiny end-to-end experiment (a few problems, one
training step, one seed) that writes every row and column and is reused, not redone, on a rerun."""
import json
import os
import subprocess
import sys

import pytest

from arkfast.experiment import main, normal_interval, paired_interval, t_interval, t_quantile, wilson_interval
from arkfast.experiment.data import copy_reusable_debates, select_token_matched


def close(a, b, tol=1e-4):
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- statistics


def test_wilson_interval_matches_hand_computed_values():
    # 8/10: p = 0.8, z² = 3.841459; centre = 0.8 + z²/20 = 0.992073; half = z·sqrt(0.016 + z²/400) = 0.313617;
    # scale = 1 + z²/10 = 1.384146  ->  [0.490160, 0.943308]
    assert close(wilson_interval(8, 10), (0.490160, 0.943308))
    # 0/10: [0, 2·(z²/20) / scale] = [0, 0.277533]; the interval does not collapse at 0%
    assert close(wilson_interval(0, 10), (0.0, 0.277533))
    assert close(wilson_interval(10, 10), (1 - 0.277533, 1.0))
    with pytest.raises(ValueError, match="correct=11, n=10"):
        wilson_interval(11, 10)


def test_t_quantiles_and_intervals():
    assert t_quantile(1) == 12.706 and t_quantile(2) == 4.303 and t_quantile(30) == 2.042
    assert abs(t_quantile(40) - 2.0211) < 1e-3 and abs(t_quantile(120) - 1.9799) < 1e-3  # tables: 2.021, 1.980
    with pytest.raises(ValueError, match="got 0"):
        t_quantile(0)
    # mean 0.82, s = 0.02, half = 4.303 · 0.02 / sqrt(3) = 0.049687
    assert close(t_interval([0.80, 0.82, 0.84]), (0.770313, 0.869687))
    assert t_interval([0.5]) is None
    # differences 0.04, 0.01, 0.03: mean 0.026667, s = 0.015275, half = 4.303 · s / sqrt(3) = 0.037949
    d = paired_interval([0.90, 0.85, 0.88], [0.86, 0.84, 0.85])
    assert abs(d["mean"] - 0.026667) < 1e-5 and abs(d["std"] - 0.015275) < 1e-5 and d["n"] == 3
    assert close(d["interval"], (-0.011282, 0.064616))
    # mean 0.75, s = 0.5, half = 1.959964 · 0.5 / 2 = 0.489991
    assert close(normal_interval([1, 0, 1, 1]), (0.260009, 1.239991))
    with pytest.raises(ValueError, match="2 and 1"):
        paired_interval([1, 2], [1])


# ---------------------------------------------------------------- data helpers


def _rec(problem, i, n_tokens):
    return {"id": f"{problem}/{i}", "problem_id": problem, "response": "x" * n_tokens}


def test_token_matched_selection_takes_one_per_problem_in_turn_and_stops_at_the_target():
    pool = [_rec("a", 0, 10), _rec("a", 1, 10), _rec("a", 2, 10), _rec("b", 0, 7), _rec("c", 0, 5), _rec("c", 1, 5)]
    tokens_of = lambda r: len(r["response"])
    chosen, tokens = select_token_matched(pool, tokens_of, 22, seed=0)
    # first the most preferred record of every problem (22 tokens), then stop: the target is reached
    assert tokens == 22 and sorted(r["id"] for r in chosen) == ["a/0", "b/0", "c/0"]
    chosen, tokens = select_token_matched(pool, tokens_of, 30, seed=0)
    assert tokens >= 30 and tokens - 10 < 30  # at most one record past the target
    assert {r["id"] for r in chosen} >= {"a/0", "b/0", "c/0"} and len(chosen) == 4
    chosen, tokens = select_token_matched(pool, tokens_of, 10 ** 6, seed=0)  # not enough: all of the pool
    assert tokens == 47 and len(chosen) == len(pool)


def test_copy_reusable_debates_copies_only_matching_settings(tmp_path):
    source = tmp_path / "src" / "debates.jsonl"
    source.parent.mkdir()
    records = [{"id": f"p{i}", "error": None} for i in range(4)]
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {"protocol": "debate", "agents": 5, "seed": 0, "model": "/m"}
    (source.parent / "summary.json").write_text(json.dumps({"config": config}))
    target = tmp_path / "dst" / "debates.jsonl"
    notes = []
    assert copy_reusable_debates(source, target, {"p1", "p3", "p9"}, config, log=notes.append) == 2
    assert [json.loads(line)["id"] for line in target.read_text().splitlines()] == ["p1", "p3"]
    assert copy_reusable_debates(source, target, {"p0"}, config) == 0  # target exists: left alone
    other = tmp_path / "other" / "debates.jsonl"
    assert copy_reusable_debates(source, other, {"p1"}, {**config, "agents": 3}, log=notes.append) == 0
    assert not other.exists() and "agents=5" in notes[-1]


# ---------------------------------------------------------------- end to end

ARGV = ["--train-problems", "4", "--test-problems", "3", "--seeds", "1", "--eval-seeds", "1", "--epochs", "1",
        "--jobs", "1", "--threads", "1", "--prm-label-limit", "2", "--prm-k", "1", "--prm-steps", "1",
        "--online-steps", "2", "--no-progress"]
SYSTEMS = ("base", "self-consistency", "debate", "self-refine", "rft-tokens", "rft-compute", "rsft", "da", "pad",
           "pad-online", "graph", "graph-nt", "correct", "correct-refine", "rsft-span")
COLUMNS = ("accuracy", "interval", "calls_per_problem", "tokens_per_problem", "prompt_tokens_per_problem",
           "generation_tokens", "training_tokens", "wall_seconds")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    argv = [*ARGV, "--output", str(out), "--reuse-debates", str(out / "none.jsonl")]
    return out, argv, main(argv)


def test_tiny_experiment_writes_every_row_and_column(experiment):
    out, _, result = experiment
    saved = json.loads((out / "experiment.json").read_text())
    rows = {r["system"]: r for r in saved["rows"]}
    assert tuple(rows) == SYSTEMS, saved.get("missing")
    for name, row in rows.items():
        for column in COLUMNS:
            assert column in row, (name, column)
        assert 0.0 <= row["accuracy"] <= 1.0
    assert rows["base"]["calls_per_problem"] == 1 and rows["self-consistency"]["calls_per_problem"] == 5
    assert rows["debate"]["calls_per_problem"] == 10 and rows["rsft"]["calls_per_problem"] == 1
    lo, hi = rows["debate"]["interval"]
    assert 0.0 <= lo <= rows["debate"]["accuracy"] <= hi <= 1.0
    for student in ("rft-tokens", "rft-compute", "rsft", "da", "pad", "pad-online"):
        assert rows[student]["training_tokens"] > 0 and rows[student]["generation_tokens"] > 0
        assert rows[student]["seeds"] == [0] and rows[student]["interval"] is None  # one seed: no t interval
    # PAD's training data also cost the PRM's rollouts
    assert rows["pad"]["generation_tokens"] > rows["da"]["generation_tokens"]
    # online PAD adds its own rollouts, and was trained for its RL steps
    assert rows["pad-online"]["generation_tokens"] > rows["pad"]["generation_tokens"]
    online = json.loads((out / "stages" / "student-pad-online-seed0.json").read_text())["result"]["train"]
    assert online["steps"] == 2 and online["rollout_tokens"] > 0
    # the token-matched control reads about R-SFT's tokens: at most one record more
    assert abs(rows["rft-tokens"]["training_tokens"] - rows["rsft"]["training_tokens"]) < 200
    assert {(c["method"], c["control"]) for c in saved["comparisons"]} == {
        ("rsft", "rft-tokens"), ("da", "rft-compute"), ("pad", "rft-compute"), ("graph", "rft-compute"),
        ("correct", "rft-compute"), ("rsft-span", "rft-tokens"), ("pad-online", "rft-compute"),
        ("pad-online", "pad"), ("pad-online", "da")}
    assert {(c["method"], c["control"]) for c in saved["ablations"]} == {
        ("rsft-span", "rsft"), ("correct-refine", "correct"), ("correct", "rsft"), ("graph", "graph-nt"),
        ("graph", "da")}
    assert len(saved["targets"]) == 10 and saved["targets"][0].startswith("Target 1")
    assert any(t.startswith("Target PAD (online)") for t in saved["targets"])
    # self-refine: two calls per problem; its draft -> revised row next to the committee's
    assert rows["self-refine"]["calls_per_problem"] == 2 and rows["correct-refine"]["calls_per_problem"] == 2
    assert [r["system"] for r in saved["self_correction"]] == ["debate", "self-refine", "correct-refine"]
    assert saved["graphs"]["graphs"]["problems"] == 4 and saved["graphs"]["correct"]["records"] > 0
    # the span-weighted student trained on R-SFT's records with the span weights
    log = (out / "students" / "rsft-span" / "seed-0" / "train" / "summary.json").read_text()
    assert json.loads(log)["config"]["span_weights"] == {"steps": 1.0, "answer": 2.0}
    md = (out / "experiment.md").read_text()
    for text in ("| system | calls / problem", "base model alone", "self-consistency@5", "debate 5x2 (committee)",
                 "RFT, R-SFT's training tokens", "RFT, DA's generation compute", "| R-SFT |", "| DA |", "| PAD |", "| PAD (online) |",
                 "machine: ", "commit: ", "command: `python -m arkfast.experiment --train-problems 4",
                 "Paired differences", "Target 3", "| graph-supervised (MAGDi-style) |", "Draft -> revised",
                 "R-SFT + self-correction, self-refine", "R-SFT, span-weighted (steps=1,answer=2)",
                 "agent round r -> r+1", "metric freedom"):
        assert text in md, text
    assert json.loads(json.dumps(result["rows"])) == saved["rows"]


def test_rerun_reuses_every_finished_stage(experiment):
    out, argv, first = experiment
    debates = sorted(out.rglob("debates.jsonl"))
    models = sorted(out.rglob("model.safetensors"))
    assert len(debates) >= 8 and models
    stamps = {p: os.stat(p).st_mtime_ns for p in debates + models}
    log_lines = len((out / "stages.jsonl").read_text().splitlines())
    second = main(argv)
    events = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()[log_lines:]]
    assert not [e for e in events if e["event"] == "ran"], events
    reused = {e["stage"] for e in events if e["event"] == "reused"}
    assert {"train-debates", "trajectories", "test-debate", "rft-samples", "prm-label", "prm-train",
            "student-pad-seed0", "student-rsft-seed0", "student-pad-online-seed0"} <= reused
    assert {p: os.stat(p).st_mtime_ns for p in debates + models} == stamps
    assert second["rows"] == first["rows"]


def test_cli_errors_are_one_line(experiment):
    _, argv, _ = experiment
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    changed = list(argv)
    changed[changed.index("--train-problems") + 1] = "5"  # another experiment in the same folder
    p = subprocess.run([sys.executable, "-m", "arkfast.experiment", *changed], capture_output=True, text=True,
                       env=env, timeout=120, check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("error: ") and "train_problems=4" in p.stderr
    p = subprocess.run([sys.executable, "-m", "arkfast.experiment", "--systems", "rsft,nope"], capture_output=True,
                       text=True, env=env, timeout=120, check=False)
    assert p.returncode == 2 and "--systems" in p.stderr and "nope" in p.stderr
