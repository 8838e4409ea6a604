"""Data-parallel generation (:mod:`arkfast.debate.shards`): ``--shard i/n`` and ``torchrun`` runs write
one part per shard, and the merge equals a one-process run's records; a killed shard resumes with
nothing lost or duplicated."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_generate_cli
from test_generate_cli import QUESTIONS, by_id

import arkfast
from arkfast.debate.shards import Shard, merge_parts, part_dir, read_problem_order
from arkfast.generate import main, read_records
from model_fixtures import build_tiny_checkpoint, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
dataset, fake_llm = test_generate_cli.dataset, test_generate_cli.fake_llm  # the fixtures, shared
IDS = [f"data-{i}" for i in range(len(QUESTIONS))]  # crc32 mod 2: data-4 is shard 0's, the rest shard 1's
SAME = ("problems", "errors", "single_agent_accuracy", "self_consistency_accuracy", "majority_accuracy_by_round",
        "final_accuracy", "prompt_tokens", "tokens_generated")


def test_shard_parse_and_partition():
    assert Shard.parse("1/4") == Shard(1, 4) and str(Shard(1, 4)) == "1/4"
    for bad in ("4/4", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="expected i/n with 0 <= i < n"):
            Shard.parse(bad)
    with pytest.raises(ValueError, match="expected i/n with 0 <= i < n"):
        Shard(2, 2)
    ids = [f"p{i}" for i in range(1000)]
    parts = [[i for i in ids if Shard(k, 3).owns(i)] for k in range(3)]
    assert sorted(i for part in parts for i in part) == sorted(ids)  # each id in exactly one shard
    assert all(280 < len(p) < 390 for p in parts), [len(p) for p in parts]  # a hash: about a third each
    assert [i for i in IDS if Shard(0, 2).owns(i)] == ["data-4"]


def test_shards_merge_to_the_one_process_run(tmp_path, dataset, fake_llm, capsys):
    common = ["--model", "m", "--dataset", str(dataset), "--agents", "3", "--rounds", "2"]
    full = main([*common, "--output", str(tmp_path / "full")])
    reference = read_records(tmp_path / "full" / "debates.jsonl")
    out = tmp_path / "sharded"
    part = main([*common, "--output", str(out), "--shard", "1/2"])
    assert part["problems"] == 4 and part["config"]["shard"] == "1/2" and not (out / "debates.jsonl").exists()
    assert "--merge" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"parts \[0\] of 2 are missing or unfinished"):
        merge_parts(out)
    merged = main([*common, "--output", str(out), "--shard", "0/2"])  # the last shard to finish merges
    records = read_records(out / "debates.jsonl")
    assert [r["id"] for r in records] == IDS == read_problem_order(out)  # dataset order
    assert by_id(records) == by_id(reference)
    assert {k: merged[k] for k in SAME} == {k: full[k] for k in SAME}
    assert merged["finished"] and merged["parts"] == 2 and merged["run"]["problems"] == 5
    assert "shard" not in merged["config"] and merged["config"] == full["config"]
    assert json.loads((out / "summary.json").read_text()) == merged
    # --merge again rewrites the same records; a folder of one shard count takes no other.
    assert main(["--merge", str(out)])["problems"] == 5 and read_records(out / "debates.jsonl") == records
    with pytest.raises(ValueError, match="already exists; pass --resume"):
        main([*common, "--output", str(out), "--shard", "0/3"])
    with pytest.raises(ValueError, match=r"holds parts of runs with \[2, 3\] shards"):
        main([*common, "--output", str(out), "--shard", "0/3", "--resume"])


def test_shard_flag_errors(tmp_path, dataset, fake_llm, monkeypatch, capsys):
    common = ["--model", "m", "--dataset", str(dataset)]
    with pytest.raises(ValueError, match="needs --output DIR"):
        main([*common, "--shard", "0/2"])
    with pytest.raises(SystemExit) as e:
        main([*common, "--shard", "2/2", "--output", str(tmp_path / "x")])
    assert e.value.code == 2 and "argument --shard: expected i/n with 0 <= i < n" in capsys.readouterr().err
    assert fake_llm == []
    main([*common, "--limit", "2", "--shard", "1/2", "--output", str(tmp_path / "y")])
    with pytest.raises(ValueError, match="lists other problems than this run's"):
        main([*common, "--limit", "3", "--shard", "0/2", "--output", str(tmp_path / "y")])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="under torchrun .* use one or the other"):
        main([*common, "--shard", "0/2", "--output", str(tmp_path / "z")])
    assert len(fake_llm) == 1  # every refusal came before a model loaded


SLOW_GENERATE = """
import sys, time
sys.path.insert(0, {tests!r})
from transformers import AutoTokenizer
import arkfast
from arkfast.generate import main
from test_debate import FakeLLM
tokenizer = AutoTokenizer.from_pretrained({tok!r})
step = FakeLLM.step
FakeLLM.step = lambda self: (time.sleep(0.05), step(self))[1]
arkfast.LLM = lambda model, **kwargs: FakeLLM(
    tokenizer, lambda text, params: f"I think {{params.seed % 3}}.\\nThe answer is 7.",
    steps=lambda text: 1 + len(text) % 4)
main(sys.argv[1:])
"""


def test_killed_shard_resumes_with_nothing_lost_or_duplicated(tmp_path, dataset, fake_llm):
    """A SIGKILL of shard 1/2 (engine double, slowed down) after two of its four records; ``--resume``
    of that shard, then shard 0: the merge holds every problem once, as the one-process run has it."""
    common = ["--model", "m", "--dataset", str(dataset), "--agents", "3", "--rounds", "2"]
    main([*common, "--output", str(tmp_path / "full")])
    reference = by_id(read_records(tmp_path / "full" / "debates.jsonl"))
    script = tmp_path / "slow_generate.py"
    script.write_text(SLOW_GENERATE.format(tests=str(Path(__file__).parent),
                                           tok=str(build_tiny_tokenizer(tmp_path / "tok"))))
    out = tmp_path / "killed"
    path = part_dir(out, Shard(1, 2)) / "debates.jsonl"
    proc = subprocess.Popen([sys.executable, str(script), *common, "--output", str(out), "--shard", "1/2",
                             "--max-active-problems", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while (not path.exists() or path.read_bytes().count(b"\n") < 2) and proc.poll() is None:
            assert time.monotonic() < deadline, "no records written"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the shard ended before it was killed"
    written = len(read_records(path))
    assert 2 <= written < 4
    part = main([*common, "--output", str(out), "--shard", "1/2", "--resume"])
    assert part["problems"] == 4 and part["run"]["problems"] == 4 - written
    merged = main([*common, "--output", str(out), "--shard", "0/2"])
    records = read_records(out / "debates.jsonl")
    assert by_id(records) == reference and [r["id"] for r in records] == IDS
    assert merged["problems"] == 5 and (out / "debates.jsonl").read_text().count("\n") == 5


@pytest.mark.skipif(not hasattr(arkfast, "LLM"), reason="arkfast.LLM is not available")
def test_torchrun_two_ranks_greedy_equals_one_process(tmp_path, dataset):
    """``torchrun --nproc-per-node 2 -m arkfast.generate`` with the real engine on a tiny random
    checkpoint, greedy: rank 0 merges the two parts into the one-process run's records."""
    checkpoint = build_tiny_checkpoint("qwen2", tmp_path / "qwen2", max_position_embeddings=1024)
    common = ["--model", str(checkpoint), "--dataset", str(dataset), "--agents", "2", "--rounds", "2",
              "--temperature", "0", "--max-tokens", "6", "--device", "cpu"]
    full = main([*common, "--output", str(tmp_path / "full")])
    out = tmp_path / "ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "arkfast.generate", *common, "--output", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("final") == 1, proc.stdout  # rank 0 alone prints the summary
    records = read_records(out / "debates.jsonl")
    assert [r["id"] for r in records] == IDS
    assert by_id(records) == by_id(read_records(tmp_path / "full" / "debates.jsonl"))
    merged = json.loads((out / "summary.json").read_text())
    assert {k: merged[k] for k in SAME} == {k: full[k] for k in SAME} and merged["parts"] == 2
    assert [len(read_records(part_dir(out, Shard(i, 2)) / "debates.jsonl")) for i in range(2)] == [1, 4]
