"""A few TRL SFTTrainer steps with packing (padding-free rows, varlen boundaries from TRL's collator) on a
patched tiny model give the unpatched model's losses."""
from __future__ import annotations

import copy

import pytest
import torch

from arkfast.kernels import hf_patch, patch_hf_model
from kernel_testing import hf_float64_rtol
from model_fixtures import build_tiny_tokenizer, randomize_, tiny_hf_config

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
