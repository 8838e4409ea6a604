"""The trainer over several processes (:mod:`arkfast.distill.parallel`), two gloo ranks on CPU: DDP and
FSDP2 steps equal one process training the same global batch (float64: losses, gradient norms and
final weights, tied and untied LM heads), the ``--fsdp`` CLI run matches the one-process run (fp32),
and a checkpoint resumes on another number of ranks (or is refused, naming why)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_distill
import torch
from test_distill import VOCAB, random_examples, small_config

from arkfast.distill import DistillConfig, distill
from arkfast.distill.checkpoints import read_jsonl
from arkfast.distill.loop import step_target_count
from arkfast.distill.parallel import train_step, wrap
from arkfast.distill.ranks import init_ranks
from arkfast.train import new_model, pack_rows
from kernel_testing import assert_close

ROOT = Path(__file__).resolve().parents[1]
traj_file, tiny_tok = test_distill.traj_file, test_distill.tiny_tok  # the fixtures, shared
STEPS, BATCH_ROWS, LR = 3, 4, 1e-2


def run_steps(fsdp: bool, tied: bool, micro_batch_rows: int, checkpointing: bool = False) -> dict:
    """``STEPS`` optimiser steps (clipping at 1.0 active: the norms are ~8) of a float64 tiny model on
    ``BATCH_ROWS`` packed rows per step, over the ranks of this process's torchrun launch (or alone):
    ``{"losses", "norms", "weights"}`` (weights on rank 0 only)."""
    ranks, _ = init_ranks("cpu", group=fsdp)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64,
           "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": tied, "hidden_act": "silu"}
    model = new_model(cfg, seed=0, std=0.2).double().train()
    rows = pack_rows(random_examples(40, seed=3), 40)
    assert len(rows) >= STEPS * BATCH_ROWS, len(rows)
    par, optimizer = wrap(model, ranks, torch.device("cpu"), fsdp=fsdp, precision="fp32", cpu_offload=False,
                          gradient_checkpointing=checkpointing, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    losses, norms = [], []
    for step in range(STEPS):
        step_rows = rows[step * BATCH_ROWS:(step + 1) * BATCH_ROWS]
        loss = train_step(par, optimizer, ranks.share(step_rows), step_target_count(step_rows), micro_batch_rows)
        norm = optimizer.grad_norm()
        optimizer.step(LR, 1.0, norm)
        losses.append(float(loss))
        norms.append(float(norm))
    full = par.full_weights()
    weights = None if full is None else {n: p.detach().clone() for n, p in full.named_parameters()}
    return {"kind": par.kind, "losses": losses, "norms": norms, "weights": weights}


def torchrun(args: list[str], nproc: int = 2, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.numerics
@pytest.mark.parametrize("fsdp, tied, checkpointing", [(False, True, False), (True, True, False), (True, False, True)],
                         ids=["ddp", "fsdp-tied", "fsdp-untied-checkpointed"])
def test_two_ranks_equal_one_process_float64(tmp_path, fsdp, tied, checkpointing):
    """Two ranks x two micro-batches of one row each == one process x four micro-batches. In float64
    the only difference is the order of the gradient sums ((g1 + g2) + (g3 + g4) against
    ((g1 + g2) + g3) + g4, and the norm's sum of squares over FSDP's shards): a few units of 2^-53
    relative per step, and AdamW's m / sqrt(v) carries them over with a factor of order one, so 1e-12
    relative on losses, norms and weights after three steps leaves four orders of magnitude of room.
    Untied, the LM head is a parameter of its own that the fused loss reads: FSDP must gather it; that
    case also recomputes each (FSDP-sharded) layer in the backward, against a one-process run without."""
    one = run_steps(fsdp=False, tied=tied, micro_batch_rows=1)
    script = tmp_path / "steps.py"
    script.write_text(f"import torch, test_distill_parallel as t\n"
                      f"r = t.run_steps(fsdp={fsdp}, tied={tied}, micro_batch_rows=1, checkpointing={checkpointing})\n"
                      f"if r['weights'] is not None: torch.save(r, {str(tmp_path / 'two.pt')!r})\n")
    torchrun([str(script)])
    two = torch.load(tmp_path / "two.pt")
    assert two["kind"] == ("fsdp" if fsdp else "ddp") and one["kind"] == "single"
    assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=0, rtol=1e-12, name="losses")
    assert_close(torch.tensor(two["norms"]), torch.tensor(one["norms"]), atol=0, rtol=1e-12, name="grad norms")
    assert min(one["norms"]) > 1.0  # clipping was active on every step
    assert two["weights"].keys() == one["weights"].keys() and ("lm_head" in one["weights"]) == (not tied)
    for name, w in one["weights"].items():
        assert_close(two["weights"][name], w, atol=1e-12, rtol=1e-12, name=name)


def cli(traj, out, *extra, batch_rows: int = 4) -> list[str]:
    return ["-m", "arkfast.distill", "--data", str(traj), "--output", str(out), "--row-tokens", "160",
            "--epochs", "1", "--lr", "1e-3", "--batch-rows", str(batch_rows), "--micro-batch-rows", "1",
            "--save-every", "2", "--eval-limit", "0", "--no-progress", "--no-plot", "--no-tensorboard",
            "--threads", "1", *extra]


def settings(traj, out, batch_rows: int = 4, **overrides) -> DistillConfig:
    return small_config(traj, out, epochs=1.0, batch_rows=batch_rows, micro_batch_rows=1, save_every=2, **overrides)


def test_fsdp_cli_on_two_ranks_then_one_matches_one_process(traj_file, tmp_path):
    """``torchrun --nproc-per-node 2 -m arkfast.distill --fsdp`` (fp32, two micro-batches per rank)
    stopped at step 2, refused without ``--fsdp``, resumed by one FSDP rank: the losses and the
    student's weights are the one-process run's on the same global batches.

    Tolerance: in fp32 the ranks' partial gradients are summed in another order than one process's
    running sum, and the gradient norm (a sum of squares over ~1.6M entries) is taken across shards:
    relative rounding of order n u (u = 2^-24) in the worst case and ~1e-7 in practice, per step. The
    norm only scales the clipped gradient, and AdamW's m / sqrt(v) is invariant to a common scale up
    to eps, so the weights differ by such roundings alone: over 5 steps 1e-5 relative on the losses,
    and 1e-5 absolute on weights of magnitude ~0.1 that lr 1e-3 moved by ~1e-2."""
    one = distill(settings(traj_file, tmp_path / "one"), log=None)
    cut = tmp_path / "fsdp"
    proc = torchrun(cli(traj_file, cut, "--fsdp", "--stop-after", "2"))
    assert proc.stdout.count("first / final loss") == 1  # rank 0 alone prints
    first = read_jsonl(cut / "metrics.jsonl")
    assert_close(torch.tensor([m["loss"] for m in first]), torch.tensor(one["losses"][:2]), atol=0, rtol=1e-5,
                 name="losses on two ranks")
    with pytest.raises(ValueError, match="saved with --fsdp; resume with it"):
        distill(settings(traj_file, cut, resume=True), log=None)
    torchrun(cli(traj_file, cut, "--fsdp", "--resume"), nproc=1)
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["meta"]["ranks"] == 1 and summary["steps_done"] == one["steps"] == 5
    resumed = read_jsonl(cut / "metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(1, one["steps"] + 1))
    assert_close(torch.tensor([m["loss"] for m in resumed]), torch.tensor(one["losses"]), atol=0, rtol=1e-5,
                 name="losses, two ranks then one")
    from arkfast.models import load_model

    a, b = load_model(Path(summary["model"])), load_model(Path(one["model"]))
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert_close(p, q, atol=1e-5, rtol=0, name=name)


def test_ddp_checkpoint_resumes_in_one_process_bit_for_bit(traj_file, tmp_path):
    """Two DDP ranks of one row each: the gradient sum is the one process's g1 + g2 exactly, and the
    checkpoint is the whole model and optimiser. Stopped at step 4 on two ranks, resumed alone, the
    curve is the uninterrupted one-process run's, bit for bit."""
    one = distill(settings(traj_file, tmp_path / "one", batch_rows=2), log=None)
    cut = tmp_path / "cut"
    torchrun(cli(traj_file, cut, "--stop-after", "4", batch_rows=2))
    assert [m["loss"] for m in read_jsonl(cut / "metrics.jsonl")] == one["losses"][:4]
    resumed = distill(settings(traj_file, cut, batch_rows=2, resume=True), log=None)
    assert resumed["losses"] == one["losses"] and all(math.isfinite(x) for x in one["losses"])


def test_fsdp_bf16_forward_is_the_one_process_bf16_forward(traj_file, tmp_path):
    """``--fsdp --precision bf16`` gathers bf16 copies of the fp32 shards (the mixed-precision policy);
    the one-process bf16 run rounds its weights to bf16 the same way, so the first step's loss (before
    any update) is the same computation: equal up to the float64 sum of the four rows' fp32 losses in
    another order, 1e-12 relative. (With FSDP casting the layers' floating inputs, the rotary
    frequencies went to bf16 too and this loss moved by 1e-3.)"""
    one = distill(settings(traj_file, tmp_path / "one", precision="bf16", stop_after=1), log=None)
    torchrun(cli(traj_file, tmp_path / "fsdp", "--fsdp", "--precision", "bf16", "--stop-after", "1"))
    first = read_jsonl(tmp_path / "fsdp" / "metrics.jsonl")[0]["loss"]
    assert first == pytest.approx(one["losses"][0], rel=1e-12, abs=0)


def test_fsdp_needs_torchrun(traj_file, tmp_path, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="--fsdp runs under torchrun"):
        distill(settings(traj_file, tmp_path / "x", fsdp=True), log=None)
    for fsdp in (False, True):  # nothing to offload from a CPU device
        with pytest.raises(ValueError, match=f"--fsdp-cpu-offload needs --fsdp on a GPU.*fsdp={fsdp}, device='cpu'"):
            distill(settings(traj_file, tmp_path / "y", fsdp=fsdp, fsdp_cpu_offload=True, device="cpu"), log=None)
