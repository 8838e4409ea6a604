"""The arkfast decoder against transformers on tiny random checkpoints of every supported architecture.

Each case saves a random-weight model with ``save_pretrained``, loads it into arkfast, runs a few
prompts of different lengths packed into one varlen forward, and compares the logits with the
transformers model run on each prompt alone (eager attention). Where the dtype is free both run in
float64, so the tolerance is the bound of :func:`kernel_testing.hf_float64_rtol` (transformers' own
float32 steps) and does not depend on the CPU's vector ISA; the bf16 and Triton-kernel tests derive
theirs in place.
"""
from __future__ import annotations

import importlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from arkfast.kernels._dispatch import force_reference
from arkfast.models import DecoderModel, ModelConfig, VarlenContext, load_model, load_tokenizer, save_model
from arkfast.models.loader import hf_names
from kernel_testing import U32, UBF16, assert_close, hf_float64_rtol
from model_fixtures import EOS_ID, VOCAB_SIZE, build_tiny_checkpoint, load_hf_model, tiny_hf_config

# Numerically sensitive: CI also runs these under other ATen CPU capabilities (.ci/run).
pytestmark = pytest.mark.numerics

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
PROMPT_LENGTHS = [1, 7, 13]

# name -> (arch, transformers config overrides, shard size)
CASES = {
    "llama-sharded": ("llama", {}, "20KB"),
    "llama3-rope-tied": ("llama", {"tie_word_embeddings": True, "rope_scaling": LLAMA3_ROPE,
                                   "rope_theta": 500000.0}, None),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}, None),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}, "20KB"),
    "qwen3-qk-norm": ("qwen3", {}, None),
    "mistral-window": ("mistral", {}, None),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Case name -> checkpoint dir, built once per module."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny_checkpoint(arch, root / name, seed=i, shard_size=shard, **overrides)
            for i, (name, (arch, overrides, shard)) in enumerate(CASES.items())}


def _prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB_SIZE, (n,), generator=gen) for n in lengths]


def _packed_logits(model: DecoderModel, prompts) -> torch.Tensor:
    """Logits ``[sum(len), V]`` of all prompts from one packed varlen forward."""
    ctx, positions = VarlenContext.from_lengths([len(p) for p in prompts])
    with torch.no_grad():
        return model.compute_logits(model(torch.cat(prompts), positions, ctx))


def _hf_logits(hf, prompts) -> torch.Tensor:
    """Logits ``[sum(len), V]`` of the transformers model run on each prompt alone."""
    with torch.no_grad():
        return torch.cat([hf(input_ids=p[None]).logits[0] for p in prompts])


def _assert_logits_close(ours, ref, rel, name):
    """``|ours - ref| <= rel * max|ref|`` elementwise: ``rel`` is a relative error bound on the
    activations, so it bounds a logit's absolute error relative to the logits' scale."""
    scale = ref.abs().max().item()
    err = (ours.double() - ref.double()).abs().max().item()
    print(f"{name}: max |logit| {scale:.3f}, max abs err {err:.3e}, bound {rel * scale:.3e}")
    assert_close(ours.double(), ref.double(), torch.float64, atol=rel * scale, rtol=0.0, name=name)


def _rtol_vs_hf(arch: str = "llama", max_len: int = max(PROMPT_LENGTHS)) -> float:
    cfg = tiny_hf_config(arch)
    return hf_float64_rtol(cfg.num_hidden_layers, cfg.hidden_size, max_len)


def _float64(path):
    """The checkpoint at ``path`` in arkfast and in transformers, both float64."""
    return load_model(path).double(), load_hf_model(path, torch.float64)


@pytest.mark.parametrize("case", list(CASES))
def test_float64_logits_match_transformers(checkpoints, case):
    model, hf = _float64(checkpoints[case])
    prompts = _prompts(PROMPT_LENGTHS, seed=len(case))
    _assert_logits_close(_packed_logits(model, prompts), _hf_logits(hf, prompts), _rtol_vs_hf(), case)


def test_fp32_logits_match_transformers(checkpoints):
    """The fp32 model (what a CPU user runs) against transformers in fp32: both round every op to fp32,
    in different orders (fused qkv/gate_up GEMMs, another attention), so each of the ~4 ops per layer
    on the residual path, and the LM head, carries an error up to gamma_n = n * u_fp32 with n the
    longest reduction (hidden 128): (4 L + 1) * 128 * u ~ 7e-5 for L = 2; the float64 test above
    checks the maths, this one that fp32 inputs stay fp32."""
    path = checkpoints["qwen3-qk-norm"]
    model, hf = load_model(path), load_hf_model(path)
    prompts = _prompts(PROMPT_LENGTHS, seed=5)
    ours = _packed_logits(model, prompts)
    assert ours.dtype == torch.float32
    layers = tiny_hf_config("qwen3").num_hidden_layers
    _assert_logits_close(ours, _hf_logits(hf, prompts), (4 * layers + 1) * 128 * U32, "fp32 vs hf fp32")


def test_config_features_are_read(checkpoints):
    """The cases above really exercise what their names say."""
    cfgs = {name: ModelConfig.from_pretrained(path) for name, path in checkpoints.items()}
    assert (path := checkpoints["llama-sharded"] / "model.safetensors.index.json").is_file(), path
    llama3 = cfgs["llama3-rope-tied"]
    assert llama3.tie_word_embeddings and llama3.rope_scaling["rope_type"] == "llama3"
    assert llama3.rope_theta == 500000.0
    assert cfgs["llama-biases"].qkv_bias and cfgs["llama-biases"].o_bias and cfgs["llama-biases"].mlp_bias
    assert cfgs["qwen2-tied"].qkv_bias and not cfgs["qwen2-tied"].o_bias
    assert cfgs["qwen3-qk-norm"].qk_norm and cfgs["qwen3-qk-norm"].head_dim == 64
    assert cfgs["mistral-window"].sliding_window == 16 and cfgs["mistral-window"].max_context == 16
    assert cfgs["qwen2-tied"].eos_token_ids == (EOS_ID,)

    tied, untied = load_model(checkpoints["qwen2-tied"]), load_model(checkpoints["qwen3-qk-norm"])
    assert tied.lm_head_weight is tied.embed_tokens and "lm_head.weight" not in json.loads(
        (checkpoints["qwen2-tied"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert untied.lm_head_weight is untied.lm_head
    assert not torch.equal(untied.lm_head, untied.embed_tokens)


def test_bf16_load_matches_transformers_bf16(checkpoints):
    path = checkpoints["qwen3-qk-norm"]
    model = load_model(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.inv_freq.dtype == torch.float32
    prompts = _prompts(PROMPT_LENGTHS, seed=1)
    ours = _packed_logits(model, prompts)
    assert ours.dtype == torch.bfloat16
    # Same bf16 roundings as transformers, up to GEMM summation order (fused qkv / gate_up): the two
    # round the ~4 ops per layer on the residual path (and the LM head) at different points, each
    # rounding a relative u_bf16 = 2^-8, so they can differ by up to (4 L + 1) u = 9 u = 3.5e-2 (L = 2)
    # relative to the logits' scale ...
    layers = tiny_hf_config("qwen3").num_hidden_layers
    hf_bf16 = load_hf_model(path, torch.bfloat16)
    _assert_logits_close(ours, _hf_logits(hf_bf16, prompts), (4 * layers + 1) * UBF16, "bf16 vs hf bf16")
    # ... and from the exact (float64) model by as much again, plus the rounding of the weights to bf16
    # (one u on every product): (4 L + 2) u = 3.9e-2.
    _assert_logits_close(ours, _hf_logits(load_hf_model(path, torch.float64), prompts),
                         (4 * layers + 2) * UBF16, "bf16 vs hf float64")


def test_bf16_checkpoint_loads_as_fp32(tmp_path):
    path = build_tiny_checkpoint("llama", tmp_path / "bf16", dtype=torch.bfloat16, seed=7, tokenizer=False)
    cfg = ModelConfig.from_pretrained(path)
    assert cfg.dtype == torch.bfloat16
    model = load_model(path)
    assert model.embed_tokens.dtype == torch.float32
    # bf16 -> fp32 is exact, so the fp32 model holds the checkpoint's values; checked in float64.
    prompts = _prompts([5, 9], seed=2)
    _assert_logits_close(_packed_logits(model.double(), prompts),
                         _hf_logits(load_hf_model(path, torch.float64), prompts), _rtol_vs_hf(max_len=9),
                         "bf16 checkpoint in fp32")


def test_packed_forward_equals_separate_forwards(checkpoints):
    """The same maths, so float64 and float64's tolerance."""
    model = load_model(checkpoints["qwen2-tied"]).double()
    prompts = _prompts(PROMPT_LENGTHS, seed=3)
    packed = _packed_logits(model, prompts)
    separate = torch.cat([_packed_logits(model, [p]) for p in prompts])
    assert_close(packed, separate, torch.float64, name="packed vs separate")
    # Packing order does not matter either.
    reordered = _packed_logits(model, prompts[::-1])
    starts = [0, 13, 20]  # offsets of the lengths 13, 7, 1 in the reversed packing
    back = torch.cat([reordered[s:s + len(p)] for s, p in zip(starts[::-1], prompts)])
    assert_close(back, packed, torch.float64, name="reordered")


def test_gradients_match_transformers(checkpoints):
    """The forward is differentiable and its parameter gradients are transformers' (fused ones cat'ed)."""
    path = checkpoints["llama-biases"]
    model, hf = _float64(path)
    hf.train()  # dropout is 0; train mode only enables grads in the same code path
    prompts = _prompts([4, 11], seed=4)
    targets = [torch.roll(p, -1) for p in prompts]

    ctx, positions = VarlenContext.from_lengths([len(p) for p in prompts])
    logits = model.compute_logits(model(torch.cat(prompts), positions, ctx))
    torch.nn.functional.cross_entropy(logits, torch.cat(targets), reduction="sum").backward()
    for p, t in zip(prompts, targets):
        hf_logits = hf(input_ids=p[None]).logits[0]
        torch.nn.functional.cross_entropy(hf_logits, t, reduction="sum").backward()

    # The backward passes through transformers' float32 casts too (a cast's gradient is cast back), so
    # the same relative bound applies twice over (forward activations, backward gradients).
    rtol = 2 * _rtol_vs_hf(max_len=11)
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    for name, param in model.named_parameters():
        expected = torch.cat([hf_grads[n] for n in hf_names(name)])
        assert_close(param.grad, expected, torch.float64, atol=rtol * expected.abs().max().item(), rtol=0.0,
                     name=name)


def test_forward_and_backward_through_triton_kernels(checkpoints, triton_interp):
    """The same forward and backward with every op launched as its Triton kernel (interpreter on CPU):
    the model's strided q/k/v views and fused-residual calls are what the kernels get on a GPU."""
    attention = importlib.import_module("arkfast.kernels.prefill_attention")
    norm = importlib.import_module("arkfast.kernels.rms_norm")
    from arkfast.kernels import rope
    swiglu = importlib.import_module("arkfast.kernels.swiglu")

    launchers = {norm: "_rms_norm_triton", rope: "_apply_rope_triton", swiglu: "_swiglu_triton",
                 attention: "_varlen_attention_triton"}
    absent = [f"{m.__name__}.{fn}" for m, fn in launchers.items() if not hasattr(m, fn)]
    if absent:
        pytest.skip(f"Triton launchers not available yet: {', '.join(absent)}")
    model = load_model(checkpoints["qwen3-qk-norm"])
    ctx, positions = VarlenContext.from_lengths([1, 17])
    ids = torch.cat(_prompts([1, 17], seed=6))

    def logits_and_grads():
        model.zero_grad()
        logits = model.compute_logits(model(ids, positions, ctx))
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ours, grads = logits_and_grads()
    with force_reference():
        ref, ref_grads = logits_and_grads()
    # The kernels take fp32 at most, so this stays fp32: kernels and references sum in other orders,
    # each op on the residual path (~4 a layer, and the LM head) within gamma_n = n * u_fp32 of exact
    # with n its longest reduction (hidden 128): (4 L + 1) * 128 * u = 6.9e-5 for L = 2, relative to
    # the scale of the logits; the backward runs the same ops transposed (reductions over <= 18
    # tokens or 128 features), so the gradients get the same bound twice over.
    layers = tiny_hf_config("qwen3").num_hidden_layers
    rel = (4 * layers + 1) * 128 * U32
    _assert_logits_close(ours, ref, rel, "triton (interpreter) vs reference")
    for name, grad in grads.items():
        expected = ref_grads[name]
        assert_close(grad, expected, atol=2 * rel * expected.abs().max().item(), rtol=0.0, name=name)


def test_mistral_refuses_sequences_longer_than_its_window(checkpoints):
    model = load_model(checkpoints["mistral-window"])
    prompts = _prompts([16, 3])  # exactly the window: fine (checked against transformers above for < 16)
    model64, hf = _float64(checkpoints["mistral-window"])
    _assert_logits_close(_packed_logits(model64, prompts), _hf_logits(hf, prompts), _rtol_vs_hf(max_len=16),
                         "mistral at window")
    with pytest.raises(ValueError, match="sliding_window"):
        _packed_logits(model, _prompts([17]))


def test_save_model_round_trips_through_transformers(checkpoints, tmp_path):
    src = checkpoints["llama-biases"]
    model = load_model(src)
    out = save_model(model, tmp_path / "saved")
    prompts = _prompts([6, 2], seed=5)
    # The same weights run by the same code: bit-identical, on any CPU.
    _assert_logits_close(_hf_logits(load_hf_model(out), prompts), _hf_logits(load_hf_model(src), prompts),
                         0.0, "saved vs original")
    tied = save_model(load_model(checkpoints["qwen2-tied"]), tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tied / "model.safetensors")
    assert torch.equal(load_model(tied).embed_tokens, load_model(checkpoints["qwen2-tied"]).embed_tokens)


def test_to_dtype_keeps_rope_frequencies_fp32(checkpoints):
    model = load_model(checkpoints["llama3-rope-tied"])
    before = model.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, before)


def test_varlen_context_from_lengths():
    ctx, positions = VarlenContext.from_lengths([1, 0, 3])
    assert ctx.cu_seqlens.dtype == torch.int32 and ctx.cu_seqlens.tolist() == [0, 1, 1, 4]
    assert positions.dtype == torch.int64 and positions.tolist() == [0, 0, 1, 2]
    assert ctx.max_seqlen == 3
    with pytest.raises(ValueError, match="lengths\\[1\\] = -2"):
        VarlenContext.from_lengths([3, -2])
    with pytest.raises(TypeError, match="int32"):
        VarlenContext(torch.tensor([0, 3]), 3)


def _valid_config() -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


@pytest.mark.parametrize("change, match", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"model_type": "gpt2"}, "gpt2"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
    ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, "low_freq_factor"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True},
     "use_sliding_window"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"dtype": "float8_e4m3fn"}, "float8_e4m3fn"),
])
def test_bad_config_raises_naming_the_value(change, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict({**_valid_config(), **change})


def test_config_reads_transformers4_rope_fields():
    cfg = ModelConfig.from_dict({**_valid_config(), "rope_parameters": None, "rope_theta": 5e5,
                                 "rope_scaling": {"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items()
                                                                        if k != "rope_type"}},
                                 "torch_dtype": "bfloat16"})
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling["rope_type"] == "llama3" and cfg.dtype == torch.bfloat16
    assert ModelConfig.from_dict({**_valid_config(), "rope_parameters": None}).rope_scaling is None


def test_eos_ids_merge_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**_valid_config(), "eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5, 5, 7]}))
    assert ModelConfig.from_pretrained(tmp_path).eos_token_ids == (2, 5, 7)


def _rewrite_checkpoint(src, dst, edit):
    """Copy a single-file checkpoint, applying ``edit`` to its tensor dict."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_unexpected_and_misshaped_weights_raise(checkpoints, tmp_path):
    src = checkpoints["qwen3-qk-norm"]
    name = "model.layers.1.self_attn.k_norm.weight"
    missing = _rewrite_checkpoint(src, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=name):
        load_model(missing)
    extra = _rewrite_checkpoint(src, tmp_path / "extra",
                                lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="model.layers.0.mlp.extra.weight"):
        load_model(extra)
    bad = "model.layers.0.self_attn.v_proj.weight"
    misshaped = _rewrite_checkpoint(src, tmp_path / "misshaped", lambda t: t.update({bad: t[bad][:-1]}))
    with pytest.raises(ValueError, match=bad):
        load_model(misshaped)
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path / "nowhere")


def test_tokenizer_and_chat_template(checkpoints):
    tok = load_tokenizer(checkpoints["qwen3-qk-norm"])
    text = "Agent 2 disagrees: the answer is 42."
    ids = tok.encode(text)
    assert max(ids) < VOCAB_SIZE and tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token_id == EOS_ID
