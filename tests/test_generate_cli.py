"""``python -m arkfast.generate``: flags, output files, resume after a crash, and end to end on a tiny
random-weight checkpoint with the real engine (greedy debates match with the prefix cache on and off)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_debate import FakeLLM

import arkfast
from arkfast.generate import build_parser, default_model_path, main, read_records
from model_fixtures import build_tiny_checkpoint, build_tiny_tokenizer

QUESTIONS = [("Ann has 3 pens and buys 4. How many pens?", 7), ("Bo has 9 cups and breaks 2. How many?", 7),
             ("What is 6 times 7?", 42), ("What is 10 minus 4?", 6), ("What is 5 plus 5?", 10)]


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": f"step\n#### {a}"}) + "\n" for q, a in QUESTIONS))
    return path


def comparable(record):
    """A record without what depends on timing or on the prefix cache."""
    out = {k: v for k, v in record.items() if k != "cost"}
    out["rounds"] = [[{k: v for k, v in t.items() if k != "cached_tokens"} for t in ts] for ts in record["rounds"]]
    if out.get("aggregator"):
        out["aggregator"] = {k: v for k, v in out["aggregator"].items() if k != "cached_tokens"}
    return out


def by_id(records):
    return {r["id"]: comparable(r) for r in records}


# ------------------------------------------------------------------------------------------------
# flags and files (engine double)
# ------------------------------------------------------------------------------------------------


def test_help_lists_every_flag_with_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--model", "--dataset", "--task", "--question-field", "--answer-field", "--split", "--limit",
                 "--protocol", "--agents", "--rounds", "--aggregator", "--layout", "--temperature", "--top-p",
                 "--top-k", "--max-tokens", "--seed", "--dtype", "--device", "--threads", "--output", "--resume",
                 "--block-size", "--num-kv-blocks", "--max-num-seqs", "--no-prefix-caching"):
        assert flag in text, flag
    assert "(default: debate)" in text and "(default: 5)" in text and "(default: 0.5)" in text
    args = build_parser().parse_args([])
    assert (args.protocol, args.agents, args.rounds, args.layout, args.temperature) == ("debate", 5, 2, "shared", 0.5)
    assert args.threads is None and build_parser().parse_args(["--threads", "1"]).threads == 1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--threads", "0"])


def test_missing_default_model_is_a_clear_error():
    if (Path(arkfast.__file__).parent / "zoo" / "tiny" / "config.json").exists():
        assert default_model_path().name == "tiny"
        return
    with pytest.raises(FileNotFoundError, match="no default model is installed.*pass --model"):
        main(["--limit", "1"])


@pytest.fixture
def fake_llm(monkeypatch, tmp_path_factory):
    """``arkfast.LLM`` replaced by a double answering "The answer is 7" (right for 2 of 5 questions)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))))
    made = []

    def factory(model, **kwargs):
        llm = FakeLLM(tokenizer, lambda text, params: f"I think {params.seed % 3}.\nThe answer is 7.",
                      steps=lambda text: 1 + len(text) % 4)
        llm.kwargs = kwargs
        made.append(llm)
        return llm
    monkeypatch.setattr(arkfast, "LLM", factory, raising=False)
    return made


def test_cli_writes_records_and_summary(tmp_path, dataset, fake_llm, capsys):
    out = tmp_path / "run"
    summary = main(["--model", "m", "--dataset", str(dataset), "--agents", "3", "--rounds", "2", "--output",
                    str(out), "--no-prefix-caching", "--max-num-seqs", "8", "--seed", "3"])
    assert fake_llm[0].kwargs == {"dtype": None, "device": None, "seed": 3, "max_num_seqs": 8,
                                  "enable_prefix_caching": False}
    records = read_records(out / "debates.jsonl")
    assert sorted(r["id"] for r in records) == [f"data-{i}" for i in range(5)]
    assert all(len(r["rounds"]) == 2 and all(len(ts) == 3 for ts in r["rounds"]) for r in records)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary and summary["finished"]
    for key in ("single_agent_accuracy", "majority_accuracy_by_round", "final_accuracy", "tokens_generated",
                "tokens_per_second", "prefix_cache_hit_rate", "problems", "errors", "protocol", "model",
                "config", "self_consistency_accuracy"):
        assert key in summary, key
    assert summary["problems"] == 5 and summary["final_accuracy"] == pytest.approx(2 / 5)
    assert summary["single_agent_accuracy"] == pytest.approx(2 / 5)
    assert summary["tokens_generated"] == sum(r["cost"]["completion_tokens"] for r in records)
    assert summary["config"]["agents"] == 3 and summary["config"]["task"] == "gsm8k"
    assert "final" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already exists; pass --resume"):
        main(["--model", "m", "--dataset", str(dataset), "--output", str(out)])
    with pytest.raises(ValueError, match="--resume: .* agents=3, now agents=5"):
        main(["--model", "m", "--dataset", str(dataset), "--output", str(out), "--resume"])


def test_resume_after_a_crash_loses_and_duplicates_nothing(tmp_path, dataset, fake_llm):
    common = ["--model", "m", "--dataset", str(dataset), "--agents", "3", "--rounds", "2"]
    main([*common, "--output", str(tmp_path / "full")])
    reference = by_id(read_records(tmp_path / "full" / "debates.jsonl"))

    out = tmp_path / "crashed"
    main([*common, "--output", str(out), "--limit", "2"])
    path = out / "debates.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 2
    # A crash in mid-write: the next record's first half and no newline.
    half = json.dumps(json.loads((tmp_path / "full" / "debates.jsonl").read_text().splitlines()[3]))
    path.write_text("".join(lines) + half[:len(half) // 2])
    summary = main([*common, "--output", str(out), "--resume"])
    records = read_records(path)
    assert len(records) == 5 and len({r["id"] for r in records}) == 5
    assert by_id(records) == reference
    assert path.read_text().count("\n") == 5 and summary["problems"] == 5 and summary["run"]["problems"] == 3
    # Resuming a finished run does nothing and keeps the summary over all records.
    summary = main([*common, "--output", str(out), "--resume"])
    assert summary["problems"] == 5 and summary["run"]["problems"] == 0 and len(read_records(path)) == 5


@pytest.mark.parametrize("flags, message", [
    (["--agents", "0"], "argument --agents: expected an integer >= 1, got '0'"),
    (["--rounds", "two"], "argument --rounds: expected an integer >= 1, got 'two'"),
    (["--temperature", "-1"], "argument --temperature: expected a number >= 0, got '-1'"),
    (["--top-p", "0"], r"argument --top-p: expected a number in \(0, 1\], got '0'"),
    (["--top-k", "-5"], r"argument --top-k: expected an integer >= -1 \(-1 or 0: off\), got '-5'"),
    (["--max-tokens", "0"], "argument --max-tokens: expected an integer >= 1, got '0'"),
    (["--max-active-problems", "0"], "argument --max-active-problems: expected an integer >= 1"),
    (["--limit", "-1"], "argument --limit: expected an integer >= 0, got '-1'"),
])
def test_invalid_flag_values_are_usage_errors(tmp_path, dataset, fake_llm, capsys, flags, message):
    """A bad value stops the run before the model loads, names the flag, and writes nothing (before,
    --temperature -1 wrote one error record per problem and exited 0; --max-tokens 0 meant 512)."""
    with pytest.raises(SystemExit) as e:
        main(["--model", "m", "--dataset", str(dataset), "--output", str(tmp_path / "run"), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert fake_llm == [] and not (tmp_path / "run").exists()


def test_engine_flags_and_resume_settings(tmp_path, dataset, fake_llm):
    out = tmp_path / "run"
    common = ["--model", "m", "--dataset", str(dataset), "--agents", "2", "--rounds", "1",
              "--output", str(out)]
    summary = main([*common, "--limit", "2", "--max-tokens", "7", "--max-num-batched-tokens", "64",
                    "--gpu-memory-utilization", "0.5", "--enforce-eager"])
    assert fake_llm[0].kwargs == {"dtype": None, "device": None, "seed": 0, "max_num_batched_tokens": 64,
                                  "gpu_memory_utilization": 0.5, "enforce_eager": True}
    assert summary["config"]["max_tokens"] == 7
    # Resuming with other sampling settings would mix two experiments in one file and one summary.
    for flag, value in (("--temperature", "0.9"), ("--max-tokens", "8"), ("--seed", "1"), ("--top-k", "5")):
        with pytest.raises(ValueError, match=f"--resume: .* was run with {flag[2:].replace('-', '_')}="):
            main([*common, "--max-tokens", "7", flag, value, "--resume"])
    assert main([*common, "--max-tokens", "7", "--resume"])["problems"] == 5


def test_sigkill_mid_run_then_resume_loses_and_duplicates_nothing(tmp_path, dataset, fake_llm):
    """A real SIGKILL of a running ``generate`` (engine double, slowed down), then ``--resume``."""
    import os
    import signal
    import subprocess
    import sys
    import time

    common = ["--model", "m", "--dataset", str(dataset), "--agents", "3", "--rounds", "2"]
    main([*common, "--output", str(tmp_path / "full")])
    reference = by_id(read_records(tmp_path / "full" / "debates.jsonl"))
    tok = build_tiny_tokenizer(tmp_path / "tok")
    script = tmp_path / "slow_generate.py"
    script.write_text(f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
from transformers import AutoTokenizer
import arkfast
from arkfast.generate import main
from test_debate import FakeLLM
tokenizer = AutoTokenizer.from_pretrained({str(tok)!r})
step = FakeLLM.step
FakeLLM.step = lambda self: (time.sleep(0.05), step(self))[1]
arkfast.LLM = lambda model, **kwargs: FakeLLM(
    tokenizer, lambda text, params: f"I think {{params.seed % 3}}.\\nThe answer is 7.",
    steps=lambda text: 1 + len(text) % 4)
main(sys.argv[1:])
""")
    out = tmp_path / "killed"
    path = out / "debates.jsonl"
    proc = subprocess.Popen([sys.executable, str(script), *common, "--output", str(out),
                             "--max-active-problems", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while (not path.exists() or path.read_bytes().count(b"\n") < 2) and proc.poll() is None:
            assert time.monotonic() < deadline, "no records written"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    written = read_records(path)
    assert 2 <= len(written) < 5
    summary = main([*common, "--output", str(out), "--resume"])
    records = read_records(path)
    assert by_id(records) == reference and len(records) == 5 and path.read_text().count("\n") == 5
    assert summary["problems"] == 5 and summary["run"]["problems"] == 5 - len(written)


def test_read_records_names_a_bad_complete_line(tmp_path):
    path = tmp_path / "debates.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"debates.jsonl:2: malformed record"):
        read_records(path)
    path.write_text('{"id": "a"}\n{"id": "b"')
    assert [r["id"] for r in read_records(path)] == ["a"]  # without repair: skipped, file untouched
    assert path.read_text().endswith('"b"')
    assert [r["id"] for r in read_records(path, repair=True)] == ["a"] and path.read_text() == '{"id": "a"}\n'


# ------------------------------------------------------------------------------------------------
# end to end with the real engine
# ------------------------------------------------------------------------------------------------

needs_engine = pytest.mark.skipif(not hasattr(arkfast, "LLM"), reason="arkfast.LLM is not available")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("ckpt") / "qwen2", max_position_embeddings=1024)


@needs_engine
def test_greedy_debate_is_the_same_with_and_without_prefix_caching(tmp_path, dataset, checkpoint):
    common = ["--model", str(checkpoint), "--dataset", str(dataset), "--limit", "3", "--agents", "3",
              "--rounds", "2", "--temperature", "0", "--max-tokens", "6", "--block-size", "16"]
    on = main([*common, "--output", str(tmp_path / "on")])
    off = main([*common, "--output", str(tmp_path / "off"), "--no-prefix-caching"])
    rec_on = read_records(tmp_path / "on" / "debates.jsonl")
    rec_off = read_records(tmp_path / "off" / "debates.jsonl")
    assert by_id(rec_on) == by_id(rec_off)
    assert all(len(r["rounds"]) == 2 and r["error"] is None for r in rec_on)
    assert all(t["completion_tokens"] > 0 for r in rec_on for ts in r["rounds"] for t in ts)
    assert off["prefix_cache_hit_rate"] == 0.0 and on["prefix_cache_hit_rate"] > 0.3
    assert on["tokens_generated"] == off["tokens_generated"] > 0


@needs_engine
def test_greedy_debate_is_the_same_under_eviction_and_preemption(tmp_path, dataset, checkpoint, monkeypatch):
    """A KV cache of 17 blocks (one 256-token sequence needs 16) forces LRU eviction of cached prefix
    blocks and the preemption of running sequences; the records stay those of an unconstrained run."""
    import arkfast.engine.llm as engine_llm

    engines = []
    init = engine_llm.LLM.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        engines.append(self)

    monkeypatch.setattr(engine_llm.LLM, "__init__", recording_init)
    common = ["--model", str(checkpoint), "--dataset", str(dataset), "--limit", "3", "--agents", "3",
              "--rounds", "2", "--temperature", "0", "--max-tokens", "6", "--block-size", "16",
              "--max-model-len", "256"]
    main([*common, "--output", str(tmp_path / "roomy")])
    main([*common, "--output", str(tmp_path / "tight"), "--num-kv-blocks", "17"])
    assert engines[-1].stats["preemptions"] > 0, engines[-1].stats
    assert engines[-1].block_manager.num_blocks == 17
    assert by_id(read_records(tmp_path / "tight" / "debates.jsonl")) == \
        by_id(read_records(tmp_path / "roomy" / "debates.jsonl"))


@needs_engine
def test_real_engine_resume_and_context_window_error(tmp_path, checkpoint):
    path = tmp_path / "data.jsonl"
    rows = [{"question": q, "answer": f"#### {a}"} for q, a in QUESTIONS[:3]]
    rows.insert(1, {"question": "Count the words: " + "seven " * 1200, "answer": "#### 1200"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", str(checkpoint), "--dataset", str(path), "--agents", "2", "--rounds", "2",
              "--temperature", "0.7", "--max-tokens", "5", "--seed", "1"]
    full = main([*common, "--output", str(tmp_path / "full")])
    reference = read_records(tmp_path / "full" / "debates.jsonl")
    assert full["errors"] == 1 and full["problems"] == 4
    bad = next(r for r in reference if r["id"] == "data-1")
    assert bad["error"] and "round 1" in bad["error"] and not bad["correct"]

    out = tmp_path / "crashed"
    main([*common, "--output", str(out), "--limit", "3"])
    debates = out / "debates.jsonl"
    data = debates.read_bytes()
    last = len(data.splitlines()[-1])
    debates.write_bytes(data[:len(data) - 1 - last // 2])  # killed while writing the third record
    assert len(read_records(debates)) == 2
    main([*common, "--output", str(out), "--resume"])
    assert by_id(read_records(debates)) == by_id(reference)  # per-request seeds: sampling is reproducible


def test_self_refine_writes_two_calls_per_problem_and_resumes(tmp_path, dataset, fake_llm):
    common = ["--model", "m", "--dataset", str(dataset), "--protocol", "self-refine"]
    summary = main([*common, "--output", str(tmp_path / "full")])
    reference = by_id(read_records(tmp_path / "full" / "debates.jsonl"))
    assert summary["config"]["agents"] == 1 and summary["config"]["rounds"] == 2
    assert all([len(ts) for ts in r["rounds"]] == [1, 1] for r in reference.values())

    out = tmp_path / "cut"
    main([*common, "--output", str(out), "--limit", "2"])
    path = out / "debates.jsonl"
    half = (tmp_path / "full" / "debates.jsonl").read_text().splitlines()[2]
    path.write_text(path.read_text() + half[:len(half) // 2])  # killed in mid-write
    summary = main([*common, "--output", str(out), "--resume"])
    assert by_id(read_records(path)) == reference and summary["run"]["problems"] == 3
    with pytest.raises(ValueError, match="--resume: .* protocol='self-refine', now protocol='debate'"):
        main(["--model", "m", "--dataset", str(dataset), "--output", str(out), "--resume"])
