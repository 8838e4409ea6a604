"""The training loop: label/weight layout, packing, the schedule, packed == unpacked loss, loss goes
down on a toy problem, seeded runs are bit-identical, checkpoints are atomic and load back."""
from __future__ import annotations

import math

import pytest
import torch

from arkfast.models import VarlenContext, load_model
from arkfast.train import (
    IGNORE_INDEX,
    Example,
    TrainConfig,
    evaluate,
    learning_rate,
    new_model,
    pack_rows,
    row_loss_sum,
    save_checkpoint,
    train,
)
from kernel_testing import assert_close

# Numerically sensitive: CI also runs these under other ATen CPU capabilities (.ci/run).
pytestmark = pytest.mark.numerics

VOCAB = 32


def tiny_config(**overrides) -> dict:
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB, hidden_size=64,
               intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
               max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu")
    return {**cfg, **overrides}


def random_examples(n: int, seed: int, max_prompt: int = 12, max_completion: int = 9) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(0, max_prompt + 1, (), generator=g))
        c = int(torch.randint(1, max_completion + 1, (), generator=g))
        ids = torch.randint(0, VOCAB, (p + c,), generator=g).tolist()
        w = (torch.rand(c, generator=g) * 2).tolist()
        out.append(Example(ids[:p], ids[p:], w))
    return out


def toy_examples(n: int, seed: int) -> list[Example]:
    """Learnable: after a random prompt, count up from its last token, mod the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(0, VOCAB, (int(torch.randint(3, 9, (), generator=g)),), generator=g)
        count = (prompt[-1] + torch.arange(1, 7)) % VOCAB
        out.append(Example(prompt.tolist(), count.tolist()))
    return out


def test_example_labels_and_weights():
    tokens, labels, weights = Example([5, 6, 7], [8, 9, 10], [0.5, 1.0, 2.0]).tensors()
    assert tokens.tolist() == [5, 6, 7, 8, 9, 10]
    # position t predicts token t + 1; only completion tokens are targets
    assert labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 8, 9, 10, IGNORE_INDEX]
    assert weights.tolist() == [0.0, 0.0, 0.5, 1.0, 2.0, 0.0]
    # an empty prompt: the first completion token has no predictor
    _, labels, weights = Example([], [3, 4, 5], [1.0, 2.0, 3.0]).tensors()
    assert labels.tolist() == [4, 5, IGNORE_INDEX]
    assert weights.tolist() == [2.0, 3.0, 0.0]
    _, labels, weights = Example([1], [2]).tensors()
    assert labels.tolist() == [2, IGNORE_INDEX] and weights.tolist() == [1.0, 0.0]
    # context tokens inside the completion (an untrained turn) are not targets
    _, labels, weights = Example([1], [2, 3, 4, 5], [1.0, 2.0, 3.0, 4.0], [True, False, False, True]).tensors()
    assert labels.tolist() == [2, IGNORE_INDEX, IGNORE_INDEX, 5, IGNORE_INDEX]
    assert weights.tolist() == [1.0, 0.0, 0.0, 4.0, 0.0]


def test_example_validation():
    with pytest.raises(ValueError, match="completion is empty"):
        Example([1, 2], [])
    with pytest.raises(ValueError, match="weights has 2 entries for 3"):
        Example([1], [2, 3, 4], [1.0, 1.0])
    with pytest.raises(ValueError, match="trained has 1 entries for 3"):
        Example([1], [2, 3, 4], trained=[True])


def test_pack_rows_keeps_every_sequence_whole():
    examples = random_examples(37, seed=1)
    rows = pack_rows(examples, row_tokens=40)
    assert all(row.num_tokens <= 40 for row in rows)
    assert sorted(n for row in rows for n in row.lengths) == sorted(len(e) for e in examples)
    assert sum(row.num_targets for row in rows) == sum(len(e.completion) - (not e.prompt) for e in examples)
    # each row's tokens are its sequences end to end: every sequence appears once, unchanged
    seqs = sorted(e.prompt + e.completion for e in examples)
    found = []
    for row in rows:
        for piece in row.input_ids.split(list(row.lengths)):
            found.append(tuple(piece.tolist()))
    assert sorted(found) == seqs
    ids, positions, labels, weights, ctx = rows[0].to_device("cpu")
    assert ctx.cu_seqlens.tolist() == [0, *torch.tensor(rows[0].lengths).cumsum(0).tolist()]
    assert positions[0] == 0 and positions.shape == ids.shape == labels.shape == weights.shape


def test_pack_rows_rejects_long_example():
    examples = [Example([1] * 5, [2] * 5), Example([1] * 30, [2] * 20)]
    with pytest.raises(ValueError, match="example 1 has 50 tokens, more than row_tokens=40"):
        pack_rows(examples, 40)
    with pytest.raises(ValueError, match="row_tokens"):
        pack_rows(examples, 0)


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=200, lr=1e-3, warmup_ratio=0.03, min_lr_ratio=0.1)
    lrs = [learning_rate(s, cfg) for s in range(cfg.steps)]
    assert cfg.warmup_steps == 6
    assert lrs[0] == pytest.approx(1e-3 / 6) and lrs[5] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:6], lrs[1:6]))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))  # cosine falls
    assert lrs[-1] == pytest.approx(1e-4)
    mid = 5 + (199 - 5) // 2  # half-way through the decay: the mean of peak and floor
    assert lrs[mid] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (mid - 6) / 193)))


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps must be a positive int, got 0"),
    ("batch_rows", -1, "batch_rows must be a positive int, got -1"),
    ("lr", 0.0, "lr must be positive"),
    ("warmup_ratio", 1.0, "warmup_ratio must be in"),
    ("grad_clip", -1.0, "grad_clip must be >= 0"),
    ("num_threads", 0, "num_threads must be a positive int"),
    ("eval_every", -5, "eval_every must be a non-negative int"),
])
def test_train_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("row_tokens", [17, 64, 1000])
def test_packed_loss_equals_unpacked(row_tokens):
    """Sum of w * CE over packed rows == the same sum with every sequence run alone; same gradients.
    The same maths in another order, so both run in float64 and float64's tolerance applies."""
    torch.manual_seed(0)
    examples = random_examples(23, seed=row_tokens)
    examples = [e for e in examples if len(e) <= row_tokens] or examples[:1]
    model = new_model(tiny_config(), seed=3, std=0.2).double()
    rows = pack_rows(examples, row_tokens)

    packed = sum(row_loss_sum(model, row, "cpu") for row in rows)
    packed.backward()
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    alone = torch.zeros((), dtype=torch.float64)
    for e in examples:
        ids, labels, weights = e.tensors()
        ctx, positions = VarlenContext.from_lengths([len(e)])
        hidden = model(ids, positions, ctx)
        logits = model.compute_logits(hidden)
        ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
        alone = alone + (weights.double() * ce).sum()
    alone.backward()
    assert packed.dtype == torch.float64
    assert len(rows) < len(examples) or row_tokens == 17
    assert_close(packed, alone, torch.float64, name="packed vs unpacked loss")
    for n, p in model.named_parameters():
        assert_close(grads_packed[n], p.grad, torch.float64, name=f"grad {n}")


def _run(seed: int, steps: int, examples, **overrides):
    model = new_model(tiny_config(), seed=seed)
    cfg = TrainConfig(**{**dict(steps=steps, batch_rows=2, lr=3e-3, seed=seed, log_every=0, eval_every=0,
                                num_threads=1), **overrides})
    result = train(model, pack_rows(examples, 48), cfg, log=None)
    return model, result


def test_training_reduces_loss_on_toy_problem():
    examples = toy_examples(300, seed=0)
    eval_rows = pack_rows(toy_examples(40, seed=1), 48)
    model = new_model(tiny_config(), seed=0)
    before = evaluate(model, eval_rows)
    cfg = TrainConfig(steps=60, batch_rows=2, lr=1e-2, seed=0, log_every=20, eval_every=30, num_threads=1)
    lines = []
    result = train(model, pack_rows(examples, 48), cfg, eval_rows, log=lines.append)
    after = evaluate(model, eval_rows)
    assert before > 3.0  # ~ln(32) = 3.47 at initialisation
    assert after < 0.5 * before, f"eval loss {before:.3f} -> {after:.3f}"
    assert result.steps == 60 and [s for s, _ in result.evals] == [30, 60]
    assert result.evals[-1][1] == pytest.approx(after, rel=1e-6)
    assert [s for s, _ in result.losses] == [1, 20, 40, 60]
    assert any("eval loss" in line for line in lines)


def test_training_is_reproducible_from_the_seed():
    examples = random_examples(60, seed=5)
    a, _ = _run(0, 5, examples)
    b, _ = _run(0, 5, examples)
    c, _ = _run(1, 5, examples)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), f"{name} differs between two runs with the same seed"
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    init = new_model(tiny_config(), seed=0)
    assert not torch.equal(init.embed_tokens, a.embed_tokens)  # the runs did train


def test_time_limit_stops_early_and_saves(tmp_path):
    examples = random_examples(40, seed=6)
    out = tmp_path / "ckpt"
    _, result = _run(0, 1000, examples, time_limit_s=1e-6, output_dir=str(out))
    assert result.steps == 1 and result.stopped_early
    assert (out / "model.safetensors").is_file()


def test_stop_after_is_the_same_run_cut_short(tmp_path):
    """``stop_after`` trains the first steps of the longer schedule (its learning rates, its rows),
    reproducibly, and saves; a shorter schedule is another run."""
    examples = random_examples(40, seed=8)
    stopped, result = _run(0, 12, examples, stop_after=5, output_dir=str(tmp_path / "ckpt"))
    assert result.steps == 5 and result.stopped_early and (tmp_path / "ckpt" / "model.safetensors").is_file()
    again, _ = _run(0, 12, examples, stop_after=5)
    shorter, _ = _run(0, 5, examples)
    for name, value in stopped.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    assert any(not torch.equal(v, shorter.state_dict()[k]) for k, v in stopped.state_dict().items())
    with pytest.raises(ValueError, match="stop_after"):
        TrainConfig(steps=4, stop_after=5)


def test_checkpoint_is_atomic_and_loads_back(tmp_path):
    out = tmp_path / "ckpt"
    model = new_model(tiny_config(), seed=7)
    save_checkpoint(model, out, extra_files={"generation_config.json": '{"eos_token_id": 2}\n'})
    (out / "stale.txt").write_text("from the previous checkpoint")
    model2 = new_model(tiny_config(), seed=8)
    save_checkpoint(model2, out, extra_files={"generation_config.json": '{"eos_token_id": 2}\n'})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or old folders left behind
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    loaded = load_model(out)
    for (name, p), q in zip(model2.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="plain file name"):
        save_checkpoint(model2, out, extra_files={"../x": ""})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.equal(load_model(out).embed_tokens, model2.embed_tokens)  # failed save left it intact


def test_row_order_shuffles_per_epoch_or_follows_the_curriculum():
    from arkfast.train.trainer import _row_order

    gen = torch.Generator().manual_seed(0)
    order = _row_order(5, gen, shuffle=True)
    epochs = [[next(order) for _ in range(5)] for _ in range(3)]
    assert all(sorted(e) == list(range(5)) for e in epochs) and epochs[0] != epochs[1]
    order = _row_order(3, gen, shuffle=False)
    assert [next(order) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
