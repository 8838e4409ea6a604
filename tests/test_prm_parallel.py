"""``prm train`` over two gloo ranks (DDP, gradients summed): the same steps as one process training
the same batches, in float64, with the contrastive term on and off (off, the projection head takes
no part in the loss and DDP must be told so)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_prm import TINY, _exact_examples, _records, load_prm_backbone

from arkfast.distill.ranks import init_ranks
from arkfast.models import load_tokenizer
from arkfast.prm import PRMConfig, ProcessRewardModel, pack_step_rows
from arkfast.prm.training import PRMTrainConfig, train_prm
from kernel_testing import assert_close

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("step", "bce", "contrastive", "grad_norm", "tokens")


def run_prm(contrastive_weight: float) -> dict:
    """Four optimiser steps of a float64 PRM (projection head of 4) on 4 rows per step, over this
    process's torchrun ranks or alone: ``{"metrics", "weights"}``."""
    ranks, _ = init_ranks("cpu")
    tok = load_tokenizer(TINY)
    rows = pack_step_rows(_exact_examples(tok, _records(tok, 12, seed=8)), 200)
    prm = ProcessRewardModel(load_prm_backbone(), PRMConfig(projection_dim=4), seed=0).double()
    cfg = PRMTrainConfig(steps=4, batch_rows=4, lr=3e-3, log_every=1, seed=1, contrastive_weight=contrastive_weight)
    result = train_prm(prm, rows, cfg, log=None, ranks=ranks)
    return {"rows": len(rows), "metrics": result.metrics,
            "weights": {n: p.detach().clone() for n, p in prm.named_parameters()}}


@pytest.mark.numerics
@pytest.mark.parametrize("contrastive_weight", [0.0, 0.3])
def test_two_ranks_equal_one_process_float64(tmp_path, contrastive_weight):
    """Tolerances: the gradients are float64 sums in another order ((g1 + g2) + (g3 + g4) against a
    running sum), a few units of 2^-53 relative, carried through AdamW with a factor of order one:
    1e-12 on norms and weights. The logged bce and contrastive are accumulated in float32 tensors
    (the trainer's logging), four additions of 2^-24 relative rounding each: 1e-6 relative."""
    one = run_prm(contrastive_weight)
    script = tmp_path / "prm_steps.py"
    script.write_text(f"import torch, test_prm_parallel as t\nr = t.run_prm({contrastive_weight})\n"
                      f"import os\nif os.environ['RANK'] == '0': torch.save(r, {str(tmp_path / 'two.pt')!r})\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    assert one["rows"] >= 4 and len(two["metrics"]) == len(one["metrics"]) == 4
    for key in ("step", "tokens"):
        assert [m[key] for m in two["metrics"]] == [m[key] for m in one["metrics"]]
    assert_close(torch.tensor([m["grad_norm"] for m in two["metrics"]]),
                 torch.tensor([m["grad_norm"] for m in one["metrics"]]), atol=0, rtol=1e-12, name="grad norms")
    for key in ("bce", "contrastive"):
        assert_close(torch.tensor([m[key] for m in two["metrics"]]), torch.tensor([m[key] for m in one["metrics"]]),
                     atol=1e-9, rtol=1e-6, name=key)
    assert (max(m["contrastive"] for m in one["metrics"]) > 0) == (contrastive_weight > 0)
    for name, w in one["weights"].items():
        assert_close(two["weights"][name], w, atol=1e-12, rtol=1e-12, name=name)


def test_batch_rows_must_divide_over_the_ranks():
    from arkfast.distill.ranks import Ranks

    with pytest.raises(ValueError, match=r"batch_rows \(3\) must be a multiple of the ranks \(2\)"):
        train_prm(ProcessRewardModel(load_prm_backbone()), [object()], PRMTrainConfig(steps=1, batch_rows=3),
                  log=None, ranks=Ranks(0, 2))


def test_train_cli_under_torchrun_matches_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m arkfast.prm train`` (fp32, one row per rank of each step's two):
    each parameter's gradient is g1 + g2 either way, so the metrics and the saved PRM are the
    one-process run's bit for bit; rank 0 alone prints the table."""
    from test_prm import _cli

    from arkfast.prm import load_prm
    from arkfast.trajectories import write_trajectories

    tok = load_tokenizer(TINY)
    traj = tmp_path / "pad.jsonl"
    write_trajectories(traj, _records(tok, 6, seed=9))
    labels = tmp_path / "labels.jsonl"
    _cli("label", "--trajectories", traj, "--output", labels, "--method", "outcome")
    args = ["train", "--labels", str(labels), "--features", "hidden", "--steps", "4", "--batch-rows", "2",
            "--log-every", "1", "--eval-every", "0", "--row-tokens", "256", "--val-fraction", "0.2", "--threads", "1"]
    one = _cli(*args, "--output", tmp_path / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "arkfast.prm", *args, "--output", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("optimizer steps") == 1, proc.stdout
    def logged(folder):
        return [[m[k] for k in KEYS] for m in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]

    metrics, reference = logged(tmp_path / "two"), logged(tmp_path / "one")
    assert metrics == reference and len(metrics) == one["optimizer_steps"] == 4
    a, b = load_prm(tmp_path / "two").state_dict(), load_prm(tmp_path / "one").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _labels(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_label_shards_merge_to_the_one_process_file(tmp_path):
    """``prm label --shard 0/2`` and ``1/2`` (outcome labels): the last shard merges, and the merged
    file is the one-process file byte for byte (both list the selection's order)."""
    from test_prm import _cli

    from arkfast.trajectories import write_trajectories

    tok = load_tokenizer(TINY)
    traj = tmp_path / "pad.jsonl"
    write_trajectories(traj, _records(tok, 9, seed=2))
    common = ["label", "--trajectories", traj, "--method", "outcome", "--limit", 0]
    one = _cli(*common, "--output", tmp_path / "one.jsonl")
    out = tmp_path / "two.jsonl"
    part = _cli(*common, "--output", out, "--shard", "1/2")
    assert not out.exists() and 0 < part["trajectories_labelled"] < 9 and part["config"]["shard"] == "1/2"
    merged = _cli(*common, "--output", out, "--shard", "0/2")
    assert out.read_bytes() == (tmp_path / "one.jsonl").read_bytes() and merged["parts"] == 2
    for key in ("trajectories_labelled", "steps", "mean_label", "steps_label_0", "steps_label_1", "label_source"):
        assert merged[key] == one[key], key
    assert merged["config"] == one["config"]
    with pytest.raises(ValueError, match="already exists; pass --resume"):
        _cli(*common, "--output", out, "--shard", "0/2")


def test_monte_carlo_labels_under_torchrun_equal_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m arkfast.prm label`` (Monte Carlo rollouts on the tiny model, one
    engine per rank): each rollout's seed depends on the trajectory, step and sample only, so the
    merged labels are the one-process run's, listed in the selection's order."""
    from test_prm import _cli

    from arkfast.trajectories import write_trajectories

    tok = load_tokenizer(TINY)
    traj = tmp_path / "pad.jsonl"
    write_trajectories(traj, _records(tok, 4, seed=3))
    common = ["label", "--trajectories", str(traj), "--k", "2", "--max-tokens", "8", "--limit", "0",
              "--device", "cpu", "--threads", "1"]
    _cli(*common, "--output", tmp_path / "one.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "arkfast.prm", *common, "--output", str(tmp_path / "two.jsonl")],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("label source") == 1, proc.stdout  # rank 0 alone prints
    one, two = _labels(tmp_path / "one.jsonl"), _labels(tmp_path / "two.jsonl")
    assert sorted(one, key=lambda r: r["id"]) == sorted(two, key=lambda r: r["id"]) and len(two) == 4
    parts = sorted((tmp_path / "two.jsonl.parts").glob("*.jsonl"))
    assert [len(_labels(p)) for p in parts] == [2, 2]  # both ranks labelled
    from arkfast.prm.commands import select_trajectories

    assert [r["id"] for r in two] == [r["id"] for r in select_trajectories(_records(tok, 4, seed=3), 0, 0)]
