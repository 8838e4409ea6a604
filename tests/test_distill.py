"""python -m arkfast.distill: tokenisation as the tiny model was trained, PAD weights, the step-normalised
loss (packed == unpacked, k micro-batches == one batch, float64), bf16 master weights, checkpoints that
transformers loads, resume after SIGKILL continuing the same losses, the NaN guard, bad input errors,
and the CLI end to end on the shipped tiny model."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from arkfast.debate import PromptBuilder, first_round_text
from arkfast.distill import (
    DistillConfig,
    NonFiniteLossError,
    Optimizer,
    RowOrder,
    build_parser,
    concat_rows,
    config_from_args,
    distill,
    load_examples,
    micro_batch_loss_sum,
    pad_step_weights,
    record_example,
    step_target_count,
    step_weights,
)
from arkfast.distill.checkpoints import latest_checkpoint, read_jsonl
from arkfast.generate import default_model_path
from arkfast.models import VarlenContext, load_model, load_tokenizer, save_model
from arkfast.tasks import ArithTask, arith_problems
from arkfast.train import IGNORE_INDEX, Example, new_model, pack_rows
from arkfast.trajectories import segment_steps, tokenizer_fingerprint, write_trajectories
from kernel_testing import assert_close, hf_float64_rtol

REPO = Path(__file__).resolve().parents[1]
VOCAB = 41


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tok():
    return load_tokenizer(default_model_path())


def arith_records(tok, n: int, *, seed: int = 0, scores: bool = True, offset: int = 0) -> list[dict]:
    """Trajectory records of the first ``n`` arith train problems answered with their reference
    solution (line steps), with random step scores."""
    task = ArithTask()
    rng = random.Random(seed)
    fp = tokenizer_fingerprint(tok)
    out = []
    for p in arith_problems("train", offset + n, task.config)[offset:]:
        steps = segment_steps(p.meta["solution"], "line")
        out.append({"id": f"{p.id}/r1/a0", "problem_id": p.id, "task": "arith", "gold": p.gold, "answer": p.gold,
                    "correct": True, "source": {"round": 1, "agent": 0},
                    "prompt": [{"role": "user", "content": first_round_text(task, p)}],
                    "response": p.meta["solution"], "steps": [list(s) for s in steps],
                    "step_scores": [round(rng.random(), 3) for _ in steps] if scores else None,
                    "tokenizer": fp})
    return out


@pytest.fixture(scope="module")
def traj_file(tiny_tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("traj") / "pad.jsonl"
    write_trajectories(path, arith_records(tiny_tok, 36))
    return path


def small_config(data, output, **overrides) -> DistillConfig:
    """A quick run of the tiny model: short rows, no eval, no plots, one thread (bit-reproducible)."""
    base = {"data": [str(data)], "mode": "rsft", "output": str(output), "row_tokens": 160, "epochs": 2.0,
            "lr": 1e-3, "save_every": 3, "eval_limit": 0, "threads": 1, "tensorboard": False, "plot": False,
            "progress": False}
    return DistillConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, dtype=torch.float64):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64,
           "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu"}
    return new_model(cfg, seed=seed, std=0.2).to(dtype)


def random_examples(n: int, seed: int) -> list[Example]:
    """Awkward sizes: empty prompts, 1-token completions, weights of both signs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, c = int(torch.randint(0, 14, (), generator=g)), int(torch.randint(1, 12, (), generator=g))
        ids = torch.randint(0, VOCAB, (p + c,), generator=g).tolist()
        out.append(Example(ids[:p], ids[p:], (torch.rand(c, generator=g) * 3 - 1).tolist()))
    return out


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


# -- data -------------------------------------------------------------------------------------------

def test_examples_are_tokenised_the_way_the_tiny_model_was_trained(tiny_tok):
    """prompt = the engine's round-1 prompt ids, completion = ids(solution + "<|im_end|>"), exactly
    :func:`arkfast.zoo.data.build_examples`'s round-1 example (without its operand swaps)."""
    task = ArithTask()
    builder = PromptBuilder(tiny_tok, task)
    records = arith_records(tiny_tok, 7, scores=False)
    for record, problem in zip(records, arith_problems("train", 7, task.config)):
        ex = record_example(tiny_tok, record, None, tiny_tok.eos_token_id)
        assert list(ex.prompt) == builder.first_round(problem)
        assert list(ex.completion) == builder.encode(problem.meta["solution"] + tiny_tok.eos_token)
        assert ex.completion[-1] == tiny_tok.convert_tokens_to_ids("<|im_end|>") and ex.weights is None


def test_pad_weights_per_token_follow_the_steps(tiny_tok):
    from arkfast.trajectories import encode_response

    record = arith_records(tiny_tok, 1)[0]
    record["step_scores"] = [0.9, 0.2, 0.7, 0.4, 0.5, 0.6][:len(record["steps"])]
    weights = pad_step_weights(record["step_scores"], "min")
    ex = record_example(tiny_tok, record, weights, tiny_tok.eos_token_id)
    _, ranges = encode_response(tiny_tok, record["response"], record["steps"])
    expected = [w for w, (a, b) in zip(weights, ranges) for _ in range(a, b)] + [weights[-1]]  # + eos
    assert list(ex.weights) == pytest.approx(expected, abs=0)
    assert len(ex.completion) == ranges[-1][1] + 1


def test_pad_weighting_rules_by_hand():
    s = [0.9, 0.3, 0.8, 0.1]
    assert pad_step_weights(s, "score") == s
    assert pad_step_weights(s, "min") == [0.9, 0.3, 0.3, 0.1]
    # baseline 0.5, clip 0.25: 0.4 -> 0.25, -0.2, 0.3 -> 0.25, -0.4 -> -0.25
    assert pad_step_weights(s, "advantage", baseline=0.5, clip=0.25) == pytest.approx([0.25, -0.2, 0.25, -0.25])
    # the baseline is the mean over the problem's trajectories of min step score
    recs = [{"problem_id": "a", "step_scores": [0.9, 0.5]}, {"problem_id": "a", "step_scores": [0.1, 0.7]},
            {"problem_id": "b", "step_scores": [0.6]}]
    got = step_weights(recs, "pad", "advantage", clip=1.0)
    b_a = (0.5 + 0.1) / 2
    assert got[0] == pytest.approx([0.9 - b_a, 0.5 - b_a]) and got[1] == pytest.approx([0.1 - b_a, 0.7 - b_a])
    assert got[2] == pytest.approx([0.0])  # one trajectory: its own weakest step is the baseline
    assert got[1][0] < 0  # a step worse than the problem's typical trajectory is pushed down
    assert step_weights(recs, "rsft") == [None, None, None]
    with pytest.raises(ValueError, match="pad weighting must be one of"):
        pad_step_weights(s, "mean")


def test_row_order_is_a_seeded_permutation_per_epoch():
    order = RowOrder(7, 3, seed=5)
    stream = [i for s in range(14) for i in order.step_rows(s)]  # 42 = 6 epochs of 7
    epochs = [stream[k:k + 7] for k in range(0, 42, 7)]
    assert all(sorted(e) == list(range(7)) for e in epochs) and len({tuple(e) for e in epochs}) > 1
    assert RowOrder(7, 3, seed=5).step_rows(9) == order.step_rows(9)  # a pure function of the step
    assert RowOrder(7, 3, seed=6).step_rows(0) != order.step_rows(0) or \
        RowOrder(7, 3, seed=6).step_rows(1) != order.step_rows(1)


# -- the loss -----------------------------------------------------------------------------------------

@pytest.mark.numerics
def test_packed_loss_and_grads_equal_unpacked_float64(tmp_path):
    """One packed row holding 9 sequences (positions restarting, no attention across) == each sequence
    run alone through transformers' Llama in float64, the loss normalised by the step's N."""
    from transformers import AutoModelForCausalLM

    examples = random_examples(9, seed=3)
    rows = pack_rows(examples, 400)
    assert len(rows) == 1 and len(rows[0].lengths) == 9
    model = tiny_model(seed=1)
    n_targets = step_target_count(rows)
    packed = micro_batch_loss_sum(model, rows[0], torch.device("cpu")) / n_targets
    packed.backward()
    g_packed = grads(model)

    # the same model, run sequence by sequence (arkfast, float64): the same maths, so float64's tolerance
    alone = torch.zeros((), dtype=torch.float64)
    for e in examples:
        ids, labels, weights = e.tensors()
        ctx, positions = VarlenContext.from_lengths([len(e)])
        logits = model.compute_logits(model(ids, positions, ctx))
        ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
        alone = alone + (weights.double() * ce).sum()
    (alone / n_targets).backward()
    assert_close(packed, alone / n_targets, torch.float64, name="packed vs unpacked loss")
    for name, g in grads(model).items():
        assert_close(g_packed[name], g, torch.float64, name=f"grad {name}")

    # transformers, one sequence at a time. Its RMSNorm and softmax run in fp32 inside a float64 model:
    # every logit is within rtol * max|logit| of the exact one (hf_float64_rtol, see kernel_testing), so
    # CE_t = lse_t - z_t[y] within 2 rtol max|z|, and sum_t w_t CE_t / N within 2 rtol max|z| sum|w| / N.
    save_model(model.float(), tmp_path / "m")
    model.double()
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float64, attn_implementation="eager")
    ref, max_logit, abs_w = torch.zeros((), dtype=torch.float64), 0.0, 0.0
    with torch.no_grad():
        for e in examples:
            ids, labels, weights = e.tensors()
            logits = hf(ids[None]).logits[0]
            ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
            ref += (weights.double() * ce).sum()
            max_logit, abs_w = max(max_logit, logits.abs().max().item()), abs_w + weights.abs().sum().item()
    rtol = hf_float64_rtol(2, 64, max(len(e) for e in examples))
    bound = 2 * rtol * max_logit * abs_w / n_targets
    err = abs(packed.item() - ref.item() / n_targets)
    assert err <= bound, f"packed {packed.item()} vs transformers {ref.item() / n_targets}: {err:.2e} > {bound:.2e}"


@pytest.mark.numerics
@pytest.mark.parametrize("k", [2, 3])
def test_k_micro_batches_equal_one_batch_float64(k):
    """Micro-batches each normalised by the whole step's N sum to the one-batch gradient; normalising
    each by its own count (the 2024 accumulation bug) does not."""
    by_count = {r.num_targets: r for r in pack_rows(random_examples(40, seed=k), 37)}
    rows = list(by_count.values())[:k]  # rows with different target counts: the naive mean is off
    assert len(rows) == k
    model = tiny_model(seed=2)
    dev = torch.device("cpu")
    n = step_target_count(rows)
    one = micro_batch_loss_sum(model, concat_rows(rows), dev) / n
    one.backward()
    g_one = grads(model)
    acc = torch.zeros((), dtype=torch.float64)
    for r in rows:
        loss = micro_batch_loss_sum(model, r, dev) / n
        loss.backward()
        acc += loss.detach()
    g_acc = grads(model)
    assert_close(acc, one, torch.float64, name="accumulated loss")
    for name in g_one:
        assert_close(g_acc[name], g_one[name], torch.float64, name=f"grad {name}")
    naive = sum(micro_batch_loss_sum(model, r, dev) / r.num_targets for r in rows) / k
    assert abs(naive.item() - one.item()) > 1e-6  # the per-micro-batch mean weights tokens unevenly


@pytest.mark.numerics
def test_negative_weights_push_probability_away():
    """w -> -w flips the loss and its gradient exactly; one SGD step on it lowers the target's
    log-probability (unlikelihood)."""
    ex = random_examples(1, seed=11)[0]
    pos = Example(ex.prompt, ex.completion, [abs(w) + 0.1 for w in ex.weights])
    neg = Example(ex.prompt, ex.completion, [-(abs(w) + 0.1) for w in ex.weights])
    model = tiny_model(seed=4)
    dev = torch.device("cpu")
    lp = micro_batch_loss_sum(model, pack_rows([pos], 64)[0], dev)
    lp.backward()
    gp = grads(model)
    ln = micro_batch_loss_sum(model, pack_rows([neg], 64)[0], dev)
    ln.backward()
    gn = grads(model)
    assert_close(ln, -lp, torch.float64, name="negated loss")
    for name in gp:
        assert_close(gn[name], -gp[name], torch.float64, name=f"grad {name}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p -= 1e-2 * gn[name]
    after = micro_batch_loss_sum(model, pack_rows([pos], 64)[0], dev)
    assert after.item() > lp.item()  # the (positively weighted) CE of those tokens went up


@pytest.mark.numerics
def test_gradient_checkpointing_gives_the_same_grads_float64():
    rows = pack_rows(random_examples(8, seed=12), 200)
    model = tiny_model(seed=5)
    dev = torch.device("cpu")
    micro_batch_loss_sum(model, rows[0], dev).backward()
    plain = grads(model)
    micro_batch_loss_sum(model, rows[0], dev, gradient_checkpointing=True).backward()
    for name, g in grads(model).items():
        assert_close(g, plain[name], torch.float64, name=f"grad {name}")


@pytest.mark.numerics
def test_bf16_trains_fp32_master_weights():
    """bf16: the model holds bf16 weights, the optimiser fp32 masters; after a step the model's weights
    are exactly the masters rounded to bf16, and the update is in the masters, not lost to rounding."""
    model = tiny_model(seed=6, dtype=torch.float32)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = Optimizer(model, precision="bf16", lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    rows = pack_rows(random_examples(6, seed=13), 128)
    opt.backward(micro_batch_loss_sum(model, rows[0], torch.device("cpu")) / rows[0].num_targets)
    norm = opt.grad_norm()
    assert all(m.dtype == torch.float32 for m in opt.master) and all(p.grad is None for p in opt.params)
    opt.step(1e-5, 1.0, norm)
    names = sorted(n for n, _ in model.named_parameters())
    for name, p, m in zip(names, opt.params, opt.master):
        assert p.dtype == torch.bfloat16 and torch.equal(p, m.to(torch.bfloat16)), name
        # Adam's first step moves every weight by ~lr = 1e-5, far below a bf16 ulp at |w| ~ 0.2 (2^-10):
        # the master moved, the bf16 copy mostly did not
        assert (m - start[name]).abs().max() > 5e-6, name


# -- runs: checkpoints, resume, NaN guard -------------------------------------------------------------------------------

@pytest.mark.numerics
def test_checkpoint_loads_in_transformers_with_the_same_logits(traj_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = distill(small_config(traj_file, tmp_path / "run", stop_after=4), log=None)
    student = Path(result["model"])
    assert result["steps_done"] == 4 and len(result["losses"]) == 4
    ours = load_model(student).double()
    hf = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float64, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(str(student))
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = torch.tensor(tok.encode("12 + 7 = 19\n19 * 3 = 57\nAnswer: 57", add_special_tokens=False))
    ctx, positions = VarlenContext.from_lengths([len(ids)])
    with torch.no_grad():
        a = ours.compute_logits(ours(ids, positions, ctx))
        b = hf(ids[None]).logits[0]
    # transformers' fp32 RMSNorm/softmax inside a float64 model: hf_float64_rtol x max |logit|
    cfg = ours.config
    tol = hf_float64_rtol(cfg.num_layers, cfg.hidden_size, len(ids)) * float(b.abs().max())
    assert_close(a, b, atol=tol, rtol=0, name="student logits, arkfast vs transformers")
    trained = load_model(latest_checkpoint(tmp_path / "run"))  # the final checkpoint holds the same weights
    for (name, p), q in zip(trained.named_parameters(), load_model(student).parameters()):
        assert torch.equal(p, q), name
    base = load_model(default_model_path())
    assert not torch.equal(base.embed_tokens, trained.embed_tokens)


@pytest.mark.numerics
def test_resume_after_sigkill_continues_the_same_losses(traj_file, tmp_path):
    """A CLI run killed with SIGKILL (mid-step or mid-save), resumed, writes the metrics.jsonl losses of
    an uninterrupted run bit for bit (CPU, one thread)."""
    ref = distill(small_config(traj_file, tmp_path / "ref", epochs=2.0, save_every=5), log=None)
    config = small_config(traj_file, tmp_path / "killed", epochs=2.0, save_every=5).to_dict()
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "arkfast.distill", "--config", str(cfg_file)], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tmp_path / "killed" / "checkpoints" / "step-000005"
    deadline = time.monotonic() + 120
    while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stderr = proc.stderr.read().decode()
    assert proc.returncode == -signal.SIGKILL, stderr
    done_before = len(read_jsonl(tmp_path / "killed" / "metrics.jsonl"))
    assert 5 <= done_before < ref["steps"] and not (tmp_path / "killed" / "summary.json").exists()
    resumed = distill(DistillConfig(**{**config, "resume": True}), log=None)
    assert resumed["steps_done"] == ref["steps"]
    losses = [m["loss"] for m in read_jsonl(tmp_path / "killed" / "metrics.jsonl")]
    assert losses == ref["losses"]  # exact equality, every step
    assert [m["step"] for m in read_jsonl(tmp_path / "killed" / "metrics.jsonl")] == list(range(1, ref["steps"] + 1))
    a, b = load_model(tmp_path / "ref" / "model"), load_model(tmp_path / "killed" / "model")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # a finished run is reused, not retrained
    again = distill(DistillConfig(**{**config, "resume": True}), log=None)
    assert again["losses"] == ref["losses"]
    with pytest.raises(ValueError, match="already holds a run"):
        distill(DistillConfig(**config), log=None)
    with pytest.raises(ValueError, match=r"--resume: .* was made with lr=0.001, now lr=0.002"):
        distill(DistillConfig(**{**config, "resume": True, "lr": 2e-3}), log=None)


def test_crash_during_save_keeps_the_previous_checkpoint(traj_file, tmp_path, monkeypatch):
    import arkfast.distill.checkpoints as ck

    real_save, calls = ck.torch.save, []

    def dying_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-save")  # after the model files were written
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ck.torch, "save", dying_save)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        distill(small_config(traj_file, out, stop_after=8), log=None)
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert latest_checkpoint(out).name == "step-000003"  # the second save (step 6) never appeared
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003"]
    (out / "checkpoints" / ".step-000006.tmp-killed").mkdir()  # what a SIGKILL mid-save leaves
    resumed = distill(small_config(traj_file, out, stop_after=8, resume=True), log=None)
    ref = distill(small_config(traj_file, tmp_path / "ref", stop_after=8), log=None)
    assert resumed["losses"] == ref["losses"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000006", "step-000008"]


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(traj_file, tmp_path, monkeypatch):
    from arkfast.distill import parallel  # where the trainer calls the loss

    real, calls = parallel.micro_batch_loss_sum, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss  # step 5 (one micro-batch per step)

    monkeypatch.setattr(parallel, "micro_batch_loss_sum", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"step 5: the loss is nan .*last good checkpoint: .*step-000003"):
        distill(small_config(traj_file, out), log=None)
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert latest_checkpoint(out).name == "step-000003" and not (out / "model").exists()
    good = load_model(latest_checkpoint(out))
    assert all(torch.isfinite(p).all() for p in good.parameters())


# -- input errors and the CLI ------------------------------------------------------------------------------------

def test_bad_trajectory_files_give_one_line_errors(tiny_tok, tmp_path):
    def run(path, **kw):
        return load_examples([path], tiny_tok, kw.pop("mode", "rsft"), **kw)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: empty file"):
        run(empty)
    records = arith_records(tiny_tok, 3, scores=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        run(bad)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**r, "tokenizer": "sha256:0"}) + "\n" for r in records))
    with pytest.raises(ValueError, match=r"other\.jsonl:1: field 'tokenizer': made for tokenizer sha256:0"):
        run(other)
    unscored = tmp_path / "unscored.jsonl"
    write_trajectories(unscored, records)
    with pytest.raises(ValueError, match=r"unscored\.jsonl:1: field 'step_scores': null"):
        run(unscored, mode="pad")
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({k: v for k, v in records[0].items() if k != "response"}) + "\n")
    with pytest.raises(ValueError, match=r"missing\.jsonl:1: field 'response': missing"):
        run(missing)
    examples, stats = run(unscored)
    assert stats.examples == 3 and len(examples) == 3
    with pytest.raises(ValueError, match="no usable trajectory"):
        run(unscored, row_tokens=8)


def test_config_file_and_flags(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"mode": "pad", "row-tokens": 256, "lr": 1e-4}))
    c = config_from_args(["--config", str(cfg), "--lr", "5e-4"])
    assert (c.mode, c.row_tokens, c.lr) == ("pad", 256, 5e-4)  # the flag overrides the file
    y = tmp_path / "c.yaml"
    y.write_text("mode: da\nbatch_rows: 4\nmicro_batch_rows: 2\n")
    c = config_from_args(["--config", str(y)])
    assert (c.mode, c.batch_rows, c.accumulation) == ("da", 4, 2)
    bad = tmp_path / "bad.json"
    bad.write_text('{"mode": "rsft",\n "learning_rate": 1}')
    with pytest.raises(ValueError, match=r"bad\.json: unknown setting 'learning_rate'"):
        config_from_args(["--config", str(bad)])
    bad.write_text('{"mode": "rsft",\n oops}')
    with pytest.raises(ValueError, match=r"bad\.json:2: malformed JSON"):
        config_from_args(["--config", str(bad)])
    with pytest.raises(ValueError, match="batch_rows .3. must be a multiple of micro_batch_rows .2."):
        config_from_args(["--batch-rows", "3", "--micro-batch-rows", "2"])
    # every flag is a DistillConfig field (the file's keys mirror the flags)
    fields = set(DistillConfig.__dataclass_fields__)
    dests = {a.dest for a in build_parser()._actions if a.dest not in ("help", "config")}
    assert dests == fields


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from arkfast.distill.cli import run_cli

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    monkeypatch.setattr(sys, "argv", ["arkfast.distill", "--data", str(empty), "--output", str(tmp_path / "x"),
                                      "--no-progress"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and "empty.jsonl: empty file" in err


def test_default_data_is_made_when_missing(tiny_tok, tmp_path, monkeypatch):
    """With no --data the default trajectories under runs/arith-train are used, made first by the
    trajectories CLI when missing; pad refuses to guess and names the command to run."""
    import arkfast.trajectories.__main__ as traj_cli

    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_main(argv):
        calls.append(argv)
        path = tmp_path / "runs" / "arith-train" / "trajectories" / "rsft.jsonl"
        write_trajectories(path, arith_records(tiny_tok, 8, scores=False))
        return {}

    monkeypatch.setattr(traj_cli, "main", fake_main)
    with pytest.raises(ValueError, match=r"no scored PAD trajectories at .*prm/scored/pad\.jsonl"):
        distill(DistillConfig(mode="pad", eval_limit=0, progress=False), log=None)
    result = distill(DistillConfig(stop_after=2, row_tokens=256, eval_limit=0, threads=1, tensorboard=False,
                                   plot=False, progress=False), log=None)
    assert calls == [[]] and result["steps_done"] == 2 and result["data"]["examples"] == 8
    assert Path(result["output"]) == tmp_path / "runs" / "arith-train" / "distill" / "rsft"
    # the default folder is continued/reused by a rerun, not refused
    again = distill(DistillConfig(stop_after=2, row_tokens=256, eval_limit=0, threads=1, tensorboard=False,
                                  plot=False, progress=False), log=None)
    assert again["losses"] == result["losses"] and calls == [[]]


@pytest.mark.numerics
def test_cli_end_to_end_under_torchrun(traj_file, tmp_path):
    """The CLI on the shipped tiny model, PAD mode with the advantage rule, under torchrun with two
    gloo ranks (each trains one of a step's two rows against the step's global N, then the gradients
    are summed), eval on 12 test problems by rank 0: a summary table, the output folder's files, and
    the losses of one process training both rows, bit for bit (a + b either way)."""
    settings = small_config(traj_file, tmp_path / "unused", mode="pad", pad_weighting="advantage", batch_rows=2,
                            epochs=1.0, save_every=4).to_dict()
    one = distill(DistillConfig(**{**settings, "output": str(tmp_path / "one")}), log=None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", env["MASTER_PORT"],
           "-m", "arkfast.distill", "--data", str(traj_file), "--mode", "pad", "--pad-weighting", "advantage",
           "--output", str(out), "--row-tokens", "160", "--epochs", "1", "--lr", "1e-3", "--batch-rows", "2",
           "--save-every", "4", "--eval-limit", "12", "--no-progress", "--no-plot", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("accuracy at step") == 1 and "student" in proc.stdout  # rank 0 alone prints
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["ranks"] == 2 and summary["steps"] == one["steps"]
    assert summary["losses"] == one["losses"]
    assert summary["evals"][-1]["problems"] == 12 and 0.0 <= summary["final_accuracy"] <= 1.0
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == summary["steps"] and all(
        {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_second"} <= m.keys() for m in metrics)
    assert [m["target_tokens"] for m in metrics] == [m["target_tokens"] for m in read_jsonl(tmp_path / "one" / "metrics.jsonl")]
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer.json").is_file()
