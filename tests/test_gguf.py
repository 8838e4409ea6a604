"""GGUF checkpoints: a random tiny Llama written by the ``gguf`` package the way llama.cpp's converter
writes it, loaded by load_model / ModelConfig / load_tokenizer / arkfast.LLM from the file or its folder;
and a config.json naming only model_type."""
from __future__ import annotations

import json

import pytest
import torch

import arkfast
from arkfast.models import ModelConfig, VarlenContext, load_model, load_tokenizer
from model_fixtures import build_tiny_checkpoint, build_tiny_gguf

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    hf = build_tiny_checkpoint("llama", root / "hf", seed=3)
    (root / "llama.cpp").mkdir()
    gguf = build_tiny_gguf(hf, root / "llama.cpp" / "tiny-f32.gguf")
    return hf, gguf


def test_gguf_loads_the_same_model(checkpoints):
    hf, gguf = checkpoints
    ref = load_model(hf)
    ctx, positions = VarlenContext.from_lengths([5, 3])
    ids = torch.randint(3, 300, (8,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref.compute_logits(ref(ids, positions, ctx))
        for path in (gguf, gguf.parent):  # the file, or the folder holding it
            assert ModelConfig.from_pretrained(path).architecture == "LlamaForCausalLM"
            model = load_model(path)
            # float32 in, float32 out, the q/k rows permuted there and back: the same numbers exactly
            for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
                assert torch.equal(p, q), name
            assert torch.equal(model.compute_logits(model(ids, positions, ctx)), expected)


def test_gguf_tokenizer_and_engine(checkpoints):
    hf, gguf = checkpoints
    text = "Question: what is 12 + 30? Answer: 42."
    assert load_tokenizer(gguf).encode(text) == load_tokenizer(hf).encode(text)
    params = arkfast.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    ours = arkfast.LLM(str(gguf.parent), max_model_len=64).generate([text], params)[0].outputs[0]
    ref = arkfast.LLM(str(hf), max_model_len=64).generate([text], params)[0].outputs[0]
    assert ours.token_ids == ref.token_ids and ours.text == ref.text


def test_folder_with_several_gguf_files_names_them(checkpoints, tmp_path):
    _, gguf = checkpoints
    for name in ("a-q8_0.gguf", "b-f16.gguf"):
        (tmp_path / name).write_bytes(gguf.read_bytes())
    with pytest.raises(ValueError, match="a-q8_0.gguf, b-f16.gguf"):
        load_model(tmp_path)


def test_config_naming_only_model_type(tmp_path):
    """transformers reads a config.json without ``architectures`` by its ``model_type``."""
    path = build_tiny_checkpoint("qwen3", tmp_path / "ckpt", tokenizer=False)
    raw = json.loads((path / "config.json").read_text())
    ref = ModelConfig.from_pretrained(path)
    del raw["architectures"]
    (path / "config.json").write_text(json.dumps(raw))
    cfg = ModelConfig.from_pretrained(path)
    assert cfg.architecture == "Qwen3ForCausalLM" and cfg == ref
    load_model(path)
    with pytest.raises(ValueError, match="gpt2"):
        ModelConfig.from_dict({**raw, "model_type": "gpt2"})
