"""arkfast.kernels.patch_hf_model: a patched transformers model computes the unpatched model's loss and
gradients, on padded-free batches, packed rows, with per-token weights, through the Triton kernels
(interpreter), under torch.compile, and can be undone."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

from arkfast.kernels import hf_patch, patch_hf_model, unpatch_hf_model
from kernel_testing import U32, assert_close, hf_float64_rtol
from model_fixtures import ARCHS, randomize_, tiny_hf_config

LAYERS, HIDDEN = 2, 128  # tiny_hf_config's sizes


def _model(arch: str, dtype: torch.dtype = torch.float64, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_hf_config(arch, **overrides), dtype=torch.float32,
                                             attn_implementation="eager")
    randomize_(model, seed)
    return model.to(dtype).train()


def _pair(arch: str, dtype: torch.dtype = torch.float64, **overrides):
    """(unpatched, patched) copies of one random model."""
    model = _model(arch, dtype, **overrides)
    return model, patch_hf_model(copy.deepcopy(model))


def _labels(ids: torch.Tensor, position_ids: torch.Tensor | None = None, prompt: int = 3) -> torch.Tensor:
    labels = ids.clone()
    labels[:, :prompt] = -100
    if position_ids is not None:
        labels[position_ids == 0] = -100  # a packed sequence's first token is never a target
    return labels


def _reference_loss(model, ids, labels, weights=None, **kwargs):
    """The unpatched model's logits and the weighted cross-entropy of the shifted labels in the
    logits' dtype (transformers' own loss casts logits to float32 first)."""
    logits = model(input_ids=ids, use_cache=False, **kwargs).logits  # [B, S, V]
    V = logits.shape[-1]
    y = labels[:, 1:].reshape(-1)
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, V), y, ignore_index=-100, reduction="none")
    if weights is not None:
        per_token = per_token * weights[:, 1:].reshape(-1)
    return per_token.sum() / (y != -100).sum(), logits


def _packed_rtol(config, max_len: int) -> float:
    """Relative bound for a packed row, patched (varlen reference: scores in float32) against
    transformers' eager attention (scores in float64, softmax in float32), both in float64: see
    test_packed_row_matches_unpatched_float64."""
    D = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    max_score = 10.0  # |q.k| * D^-0.5 of these random weights stays well below this (logits are O(1))
    return hf_float64_rtol(LAYERS, HIDDEN, max_len) + LAYERS * (D + 2) * U32 * (1 + 2 * max_score)


def _count_calls(monkeypatch, module, name: str) -> list[int]:
    """Wrap ``module.name`` so calls are counted in the returned one-element list."""
    count, fn = [0], getattr(module, name)

    def counted(*args, **kwargs):
        count[0] += 1
        return fn(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return count


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _packed_row(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (1, sum(lengths)), generator=gen)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]  # [1, T], restarting per sequence
    return ids, position_ids


@pytest.mark.numerics
@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_grads_match_unpatched_float64(arch):
    """A padded-free batch (B = 2, no mask) in float64 on CPU: the references of every kernel. Both
    models run the same maths in the same order up to the loss, so the loss agrees to float64 rounding;
    the gradients flow back through transformers' float32 casts (RMSNorm, the eager softmax) in both,
    where a last-bit difference in float64 can flip one float32 rounding: the bound is
    ``hf_float64_rtol`` (see kernel_testing) times the gradient's scale."""
    ref_model, model = _pair(arch)
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    labels = _labels(ids)
    ref, _ = _reference_loss(ref_model, ids, labels)
    ref.backward()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    assert out.logits is None  # training: the logits are never formed
    assert_close(out.loss, ref, torch.float64, name="loss")
    rtol = hf_float64_rtol(LAYERS, HIDDEN, 11)
    expected = _grads(ref_model)
    got = _grads(model)
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        assert_close(grad, expected[name], atol=rtol * expected[name].abs().max().item(), rtol=0.0, name=name)


@pytest.mark.numerics
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_row_matches_unpatched_float64(arch, monkeypatch):
    """One row of three sequences with restarting position ids and no mask (padding-free): the patch
    runs varlen attention; transformers builds a block-diagonal mask from the same positions. The varlen
    reference forms scores in float32 where transformers' eager attention forms them in float64 (both
    take the softmax in float32): per layer a score q.k over D terms is within (D + 2) u32 relative of
    exact (Higham's gamma_D plus the rounding of q and k), which moves the softmax weights by at most
    2 max|score| times that. With ``hf_float64_rtol`` for the rest, relative to the loss."""
    calls = _count_calls(monkeypatch, hf_patch, "varlen_attention")
    ref_model, model = _pair(arch)
    lengths = (5, 7, 4)
    ids, position_ids = _packed_row(lengths)
    labels = _labels(ids, position_ids, prompt=0)
    weights = torch.rand(ids.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref, logits = _reference_loss(ref_model, ids, labels, weights, position_ids=position_ids)
    loss = model(input_ids=ids, position_ids=position_ids, labels=labels, token_weights=weights).loss
    assert calls == [LAYERS]  # every layer took the varlen path (the window, 16, holds 7 tokens)
    rel = _packed_rtol(ref_model.config, max(lengths))
    assert_close(loss, ref, atol=rel * ref.abs().item(), rtol=0.0, name="packed loss")
    # Sanity: the packed row is really three sequences (the first one alone gives its own logits).
    alone = ref_model(input_ids=ids[:, :lengths[0]], use_cache=False).logits
    assert_close(logits[:, :lengths[0]], alone, atol=rel * alone.abs().max().item(), rtol=0.0, name="seq 0")


@pytest.mark.numerics
def test_token_weights_and_num_items_in_batch():
    """Per-token weights aligned with the labels, and the trainer's ``num_items_in_batch`` (a sum over
    the global token count instead of this batch's mean)."""
    ref_model, model = _pair("llama")
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    labels = _labels(ids)
    weights = torch.randn(ids.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref, _ = _reference_loss(ref_model, ids, labels, weights)
    got = model(input_ids=ids, labels=labels, token_weights=weights).loss
    assert_close(got, ref, torch.float64, name="weighted loss")
    n_valid = (labels[:, 1:] != -100).sum()
    summed = model(input_ids=ids, labels=labels, token_weights=weights, num_items_in_batch=3 * n_valid).loss
    assert_close(summed, ref / 3, torch.float64, name="sum over num_items_in_batch")
    with pytest.raises(ValueError, match="shaped like the labels"):
        model(input_ids=ids, labels=labels, token_weights=weights[:, :4])
    with pytest.raises(ValueError, match="need labels"):
        model(input_ids=ids, token_weights=weights)


@pytest.mark.numerics
def test_eval_mode_returns_logits_and_generation_runs():
    ref_model, model = _pair("qwen2")
    ref_model.eval(), model.eval()
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        expected = ref_model(input_ids=ids, use_cache=False).logits
        assert_close(out.logits, expected, torch.float64, name="eval logits")
        # generate fills a KV cache: transformers' own attention, the patched norms and MLPs
        kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(model.generate(ids, **kwargs), ref_model.generate(ids, **kwargs))


@pytest.mark.numerics
def test_kernels_through_the_interpreter(triton_interp, monkeypatch):
    """float32, every op launched as its Triton kernel on CPU (the interpreter), on a packed row:
    RMSNorm, RoPE, SwiGLU, varlen attention forward and backward, the fused loss. Kernels and references
    sum in other orders: each op on the residual path (about 4 a layer) is within gamma_n = n u32 of
    exact for its longest reduction n <= H = 128, relative to the activations' scale, and the loss
    adds the log-sum-exp over V = 300 logits: ((4 L + 1) H + V) u32 relative to the largest logit; the
    backward runs the same ops transposed, so the gradients get the bound twice over."""
    # import_module: the package re-exports functions under some of these module names
    ce, prefill_attention, rms_norm, rope, swiglu = (importlib.import_module(f"arkfast.kernels.{name}") for name in (
        "fused_linear_weighted_cross_entropy", "prefill_attention", "rms_norm", "rope", "swiglu"))
    launches = [_count_calls(monkeypatch, module, name) for module, name in (
        (rms_norm, "_rms_norm_triton"), (rope, "_apply_rope_triton"), (swiglu, "_swiglu_triton"),
        (swiglu, "_swiglu_backward_triton"), (prefill_attention, "_prefill_attention_triton"),
        (prefill_attention, "_varlen_attention_backward_triton"), (ce, "_chunked_pass"))]
    ref_model, model = _pair("qwen3", torch.float32)
    lengths = (1, 9, 6)
    ids, position_ids = _packed_row(lengths, seed=7)
    labels = _labels(ids, position_ids, prompt=0)
    with torch.no_grad():
        max_logit = ref_model(input_ids=ids, position_ids=position_ids, use_cache=False).logits.abs().max().item()
    ref = ref_model(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False).loss
    ref.backward()
    for count in launches:
        count[0] = 0  # the unpatched model launches nothing
    loss = model(input_ids=ids, position_ids=position_ids, labels=labels).loss
    loss.backward()
    # norms: 2 a layer + q/k norms + the final one; rope forward and backward a layer
    assert [c[0] for c in launches] == [4 * LAYERS + 1, 2 * LAYERS, LAYERS, LAYERS, LAYERS, LAYERS, 1]
    rel = ((4 * LAYERS + 1) * HIDDEN + 300) * U32
    assert_close(loss, ref, atol=rel * max_logit, rtol=0.0, name="loss")
    expected = _grads(ref_model)
    for name, grad in _grads(model).items():
        assert_close(grad, expected[name], atol=2 * rel * max(1.0, max_logit) * expected[name].abs().max().item(),
                     rtol=0.0, name=name)


def test_unpatch_restores_the_model():
    ref_model, model = _pair("mistral")
    assert "forward" in model.model.layers[0].mlp.__dict__
    with pytest.raises(ValueError, match="patched already"):
        patch_hf_model(model)
    assert unpatch_hf_model(model) is model
    assert all("forward" not in m.__dict__ for m in model.modules())
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(8))
    out, expected = model(input_ids=ids, labels=ids), ref_model(input_ids=ids, labels=ids)
    assert out.logits is not None and torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)
    with pytest.raises(ValueError, match="not patched"):
        unpatch_hf_model(model)


def test_partial_patch_and_bare_model():
    ref_model, _ = _pair("llama")
    model = patch_hf_model(copy.deepcopy(ref_model), fused_loss=False, rope=False)
    assert "forward" not in model.__dict__ and "forward" in model.model.layers[0].self_attn.__dict__
    ids, position_ids = _packed_row((4, 6), seed=9)
    expected = ref_model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
    got = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
    rel = _packed_rtol(ref_model.config, 6)
    assert_close(got, expected, atol=rel * expected.abs().max().item(), rtol=0.0, name="logits")
    body = patch_hf_model(copy.deepcopy(ref_model.model), fused_loss=False)
    assert "forward" in body.norm.__dict__
    with pytest.raises(ValueError, match="lm_head"):
        patch_hf_model(copy.deepcopy(ref_model.model))


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16))
    with pytest.raises(ValueError, match="'gpt2'.*GPT2LMHeadModel"):
        patch_hf_model(model)
    with pytest.raises(ValueError, match="hidden_act"):
        patch_hf_model(_model("llama", hidden_act="gelu"))
    with pytest.raises(ValueError, match="dynamic"):
        patch_hf_model(_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                        "rope_theta": 10000.0}))


@pytest.mark.numerics
def test_a_deep_copy_of_a_patched_model_is_patched_on_its_own_modules():
    """A reference model made by copy.deepcopy (DPO, distillation) must run its own weights."""
    import inspect

    ref_model, model = _pair("qwen3")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.5)
    ids = torch.randint(3, 300, (1, 8), generator=torch.Generator().manual_seed(10))
    position_ids = torch.arange(8)[None]
    # With position ids the patch takes the varlen path (scores in float32): the packed row's bound.
    rel = _packed_rtol(ref_model.config, 8)
    expected, _ = _reference_loss(ref_model, ids, ids, position_ids=position_ids)
    loss = model(input_ids=ids, labels=ids, position_ids=position_ids).loss
    assert_close(loss, expected, atol=rel * expected.abs().item(), rtol=0.0, name="patched loss")
    halved = copy.deepcopy(ref_model)
    with torch.no_grad():
        for p in halved.parameters():
            p.mul_(0.5)
    expected, _ = _reference_loss(halved, ids, ids, position_ids=position_ids)
    loss = clone(input_ids=ids, labels=ids, position_ids=position_ids).loss
    assert_close(loss, expected, atol=rel * expected.abs().item(), rtol=0.0, name="deep copy's loss")
    unpatch_hf_model(clone)
    assert all("forward" not in m.__dict__ for m in clone.modules())
    # Trainer keeps the dataset columns the forward names; generate checks its kwargs against it
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "labels", "position_ids", "token_weights"} <= set(params)
