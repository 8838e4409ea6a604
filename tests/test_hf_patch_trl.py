"""A few TRL SFTTrainer steps with packing (padding-free rows, varlen boundaries from TRL's collator) on a
patched tiny model give the unpatched model's losses."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from arkfast.kernels import hf_patch, patch_hf_model
from kernel_testing import U32, hf_float64_rtol
from model_fixtures import build_tiny_checkpoint, build_tiny_tokenizer, randomize_, tiny_hf_config

trl = pytest.importorskip("trl")

SENTENCES = [
    "Question: what is 12 + 30? Answer: 42.",
    "Agent 1 says the answer is 7. Agent 2 disagrees and shows its work step by step.",
    "The committee of agents debates the answer, then one student learns from the debate.",
    "Each step is scored by a reward model.",
    "Question: what is 6 x 7? Answer: 42.",
    "One student, many teachers.",
]


def _train(model, tokenizer, out_dir):
    from datasets import Dataset

    args = trl.SFTConfig(
        output_dir=str(out_dir), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
        packing=True, max_length=48, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
        seed=0, data_seed=0, dataloader_num_workers=0, bf16=False, fp16=False, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_dict({"text": SENTENCES * 2}))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.numerics
def test_sft_trainer_with_packing_matches_unpatched(tmp_path, monkeypatch):
    """float64 on CPU (the kernels' references, varlen attention fed TRL's cu_seq_lens). The loss of
    step 1 differs only by where transformers casts to float32 (its norms and softmax) against the
    varlen reference's float32 scores: hf_float64_rtol with the head dim for the scores; Adam's update
    is scale-free, so steps 2 and 3 carry differences of the same relative size forward, bounded here
    by 10x that."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []
    varlen = hf_patch.varlen_attention
    monkeypatch.setattr(hf_patch, "varlen_attention", lambda *a, **k: calls.append(1) or varlen(*a, **k))
    tokenizer = AutoTokenizer.from_pretrained(str(build_tiny_tokenizer(tmp_path / "tok")))
    model = AutoModelForCausalLM.from_config(tiny_hf_config("llama"), dtype=torch.float32, attn_implementation="sdpa")
    randomize_(model, 0)
    model = model.double()
    patched = patch_hf_model(copy.deepcopy(model))
    ref = _train(model, tokenizer, tmp_path / "ref")
    ours = _train(patched, tokenizer, tmp_path / "ours")
    assert calls, "the patched model never took the varlen path"
    assert len(ref) == len(ours) == 3
    rel = 10 * hf_float64_rtol(2, 128 + 32, 48)
    for step, (a, b) in enumerate(zip(ours, ref), start=1):
        assert abs(a - b) <= rel * abs(b), f"step {step}: patched {a} vs unpatched {b} (rel bound {rel:.2e})"


def _recipe(name: str) -> dict:
    """The namespace of the python block marked ``<!-- recipe: name -->`` in docs/hf_patch.md."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "hf_patch.md").read_text()
    block = text.split(f"<!-- recipe: {name} -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, f"docs/hf_patch.md[{name}]", "exec"), namespace)  # noqa: S102 (our own docs)
    return namespace


def _records(n: int, seed: int, weights: float | None = None):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 5 + 3 * i
        ids = torch.randint(3, 300, (length,), generator=gen).tolist()
        w = torch.rand(length, generator=gen).tolist() if weights is None else [weights] * length
        rows.append({"input_ids": ids, "labels": [-100, -100, *ids[2:]], "token_weights": w})
    return rows


@pytest.mark.numerics
def test_trainer_recipe_gives_the_weighted_loss(tmp_path):
    """docs/hf_patch.md's Trainer recipe, one step over all records in one packed row: the logged loss is
    the weighted mean cross-entropy of the unpatched model run on each record alone (a sum over tokens,
    whatever order the sampler packs them in). float32 references on both sides, summed in other
    orders: each op on the residual path is within n u32 of exact for its longest reduction (H = 128),
    about 4 a layer, and the loss adds a log-sum-exp over V = 300: ((4 L + 1) H + V) u32 of the largest
    logit."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    path = build_tiny_checkpoint("llama", tmp_path / "ckpt", tokenizer=False)
    rows = _records(4, seed=1)
    trainer = _recipe("trainer")["train"](
        str(path), Dataset.from_list(rows), str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=len(rows),
        learning_rate=1e-4, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
    logged = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    ref = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager")
    total, count, max_logit = 0.0, 0, 0.0
    with torch.no_grad():
        for r in rows:
            logits = ref(input_ids=torch.tensor([r["input_ids"]]), use_cache=False).logits[0]  # [L, V]
            ce = F.cross_entropy(logits[:-1], torch.tensor(r["labels"][1:]), ignore_index=-100, reduction="none")
            total += (ce * torch.tensor(r["token_weights"][1:])).sum().item()
            count += sum(y != -100 for y in r["labels"][1:])
            max_logit = max(max_logit, logits.abs().max().item())
    expected = total / count
    assert abs(logged - expected) <= ((4 * 2 + 1) * 128 + 300) * U32 * max_logit, (logged, expected)


@pytest.mark.numerics
def test_trl_weighted_recipe(tmp_path):
    """docs/hf_patch.md's weighted SFTTrainer: with every weight 1 it trains as plain SFTTrainer on the
    same padding-free batches (TRL's own fused head there, arkfast's weighted loss here, float64 model);
    with every weight 2 its first loss is twice that."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = _recipe("trl-weighted")
    tokenizer = AutoTokenizer.from_pretrained(str(build_tiny_tokenizer(tmp_path / "tok")))
    model = AutoModelForCausalLM.from_config(tiny_hf_config("qwen2"), dtype=torch.float32, attn_implementation="sdpa")
    randomize_(model, 0)
    model = model.double()

    def run(trainer_cls, weight, collator):
        args = trl.SFTConfig(  # padding-free batches: from TRL's flag, or from the recipe's collator
            output_dir=str(tmp_path / f"out{weight}{collator is None}"), max_steps=2, per_device_train_batch_size=3,
            learning_rate=1e-3, padding_free=collator is None, remove_unused_columns=False, max_length=None,
            logging_steps=1, bf16=False, fp16=False,
            report_to="none", save_strategy="no", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
        kwargs = {} if collator is None else {"data_collator": collator}
        trainer = trainer_cls(model=patch_hf_model(copy.deepcopy(model)), args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_list(_records(6, seed=2, weights=weight)), **kwargs)
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e]

    collator = recipe["WeightedCollator"](pad_token_id=tokenizer.pad_token_id, padding_free=True)
    plain = run(trl.SFTTrainer, 1.0, None)
    ones = run(recipe["WeightedSFTTrainer"], 1.0, collator)
    twos = run(recipe["WeightedSFTTrainer"], 2.0, collator)
    assert len(plain) == len(ones) == 2
    # TRL's head forms its log-probabilities in float32 (a log-sum-exp over V = 300 logits, within
    # (V + 2) u32 relative of exact) and the trainer logs each loss as a float32 (one more u32); the
    # gradients differ by as much, so Adam's second step adds a difference of the same relative size.
    for step, (a, b) in enumerate(zip(ones, plain), start=1):
        assert abs(a - b) <= step * (300 + 3) * U32 * abs(b), (step, ones, plain)
    assert abs(twos[0] - 2 * plain[0]) <= (300 + 3) * U32 * abs(2 * plain[0]), (twos, plain)
