"""RoPE kernel (through the Triton interpreter) against its torch reference."""

import pytest
import torch

import arkfast.kernels.rope as rope_mod
from arkfast.kernels.rope import _apply_rope_triton, apply_rope, apply_rope_reference, rope_inv_freq
from kernel_testing import MUL32, MUL64, assert_close, assert_compiles_sm90, poison_like, sm90_ptx

# Numerically sensitive: CI also runs these under other ATen CPU capabilities (.ci/run).
pytestmark = pytest.mark.numerics

# A 64-bit product of two registers (row * stride in int64) and a 32-bit one (the same product left
# in int32, which wraps past 2**31 elements) in sm_90 PTX; multiplies by constants are not matched.
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def _fused_qkv(seed, T, n_q, n_kv, D, dtype):
    """q and k as strided views into one fused qkv projection output ``[T, (n_q + 2 n_kv) * D]``."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, (n_q + 2 * n_kv) * D, generator=g).to(dtype)
    heads = qkv.view(T, n_q + 2 * n_kv, D)
    return heads[:, :n_q], heads[:, n_q:n_q + n_kv]  # [T, n_q, D], [T, n_kv, D], token stride (n_q+2n_kv)D


@pytest.mark.parametrize("T", [1, 17])
@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_on_qkv_slices(triton_interp, T, D, dtype):
    q, k = _fused_qkv(T * 131 + D, T, 8, 2, D, dtype)
    assert T == 1 or not (q.is_contiguous() or k.is_contiguous())
    q_in, k_in = q.clone(), k.clone()
    positions = torch.arange(T) * 37 + 1000  # not starting at 0, not consecutive
    inv_freq, scale = rope_inv_freq(D, 500000.0, LLAMA3)
    exp_q, exp_k = apply_rope_reference(q, k, positions, inv_freq, scale)
    q_out, k_out = poison_like(exp_q), poison_like(exp_k)
    got_q, got_k = _apply_rope_triton(q, k, positions, inv_freq, scale, q_out=q_out, k_out=k_out)
    assert got_q is q_out and got_k is k_out
    assert_close(q_out, exp_q, name="q")
    assert_close(k_out, exp_k, name="k")
    assert torch.equal(q, q_in) and torch.equal(k, k_in), "inputs were modified"


def test_public_function_allocates_new_tensors(triton_interp):
    q, k = _fused_qkv(1, 17, 8, 2, 80, torch.bfloat16)
    positions = torch.randint(0, 100_000, (17,), dtype=torch.int32)
    inv_freq, _ = rope_inv_freq(80, 1_000_000.0)
    got_q, got_k = apply_rope(q, k, positions, inv_freq, 0.75)
    exp_q, exp_k = apply_rope_reference(q, k, positions, inv_freq, 0.75)
    assert got_q.is_contiguous() and got_q.data_ptr() != q.data_ptr()
    assert_close(got_q, exp_q, name="q")
    assert_close(got_k, exp_k, name="k")


def test_fp16_rounding_order_matches(triton_interp):
    # The interpreter rounds fp16 exactly like the GPU (bf16 it truncates), so fp16 shows whether the
    # kernel rounds each product and the sum where the reference does: nearly every element is equal.
    q, k = _fused_qkv(2, 17, 32, 8, 128, torch.float16)
    positions = torch.arange(17) + 4000
    inv_freq, _ = rope_inv_freq(128, 10000.0)
    got_q, got_k = apply_rope(q, k, positions, inv_freq)
    exp_q, exp_k = apply_rope_reference(q, k, positions, inv_freq)
    for name, got, exp in (("q", got_q, exp_q), ("k", got_k, exp_k)):
        assert_close(got, exp, name=name)
        mismatched = (got != exp).float().mean().item()
        assert mismatched < 1e-3, f"{name}: {mismatched:.2%} of elements differ from the reference"


@pytest.mark.parametrize("heads_per_prog", [3, 16])
def test_several_heads_per_program(triton_interp, monkeypatch, heads_per_prog):
    # Long prefills give each program a run of heads; 3 makes a run cross from q's heads into k's
    # (heads 6, 7 | 8 of 8 + 2), 16 makes one program take every head.
    real = rope_mod._launch_config
    monkeypatch.setattr(rope_mod, "_launch_config", lambda *a: (*real(*a)[:2], heads_per_prog))
    T, D = 40, 64
    g = torch.Generator().manual_seed(3)
    q = torch.randn(T, 8, D, generator=g)
    k = torch.randn(T, 2, D, generator=g)
    positions = torch.arange(T, dtype=torch.int64) + 7
    inv_freq, _ = rope_inv_freq(D, 10000.0)
    q_out, k_out = poison_like(q), poison_like(k)
    _apply_rope_triton(q, k, positions, inv_freq, q_out=q_out, k_out=k_out)
    exp_q, exp_k = apply_rope_reference(q, k, positions, inv_freq)
    assert_close(q_out, exp_q, name="q")
    assert_close(k_out, exp_k, name="k")
    assert real(4096, 40, 128)[2] == 8 and real(64, 40, 128)[2] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference_autograd(triton_interp, dtype):
    q, k = _fused_qkv(4, 17, 8, 2, 64, dtype)
    positions = torch.arange(17) + 300
    inv_freq, scale = rope_inv_freq(64, 500000.0, LLAMA3)
    g = torch.Generator().manual_seed(5)
    gq = torch.randn(17, 8, 64, generator=g).to(dtype)
    gk = torch.randn(17, 2, 64, generator=g).to(dtype)
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
    ref_leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
    out_q, out_k = apply_rope(*leaves, positions, inv_freq, scale)
    ((out_q.float() * gq.float()).sum() + (out_k.float() * gk.float()).sum()).backward()
    ref_q, ref_k = apply_rope_reference(*ref_leaves, positions, inv_freq, scale)
    ((ref_q.float() * gq.float()).sum() + (ref_k.float() * gk.float()).sum()).backward()
    assert_close(leaves[0].grad, ref_leaves[0].grad, name="grad q")
    assert_close(leaves[1].grad, ref_leaves[1].grad, name="grad k")


def test_validation_errors():
    q, k = torch.randn(4, 8, 64), torch.randn(4, 2, 64)
    pos, inv_freq = torch.arange(4), rope_inv_freq(64, 10000.0)[0]
    with pytest.raises(ValueError, match="must be \\[T, heads, D\\]"):
        _apply_rope_triton(q[0], k, pos, inv_freq)
    with pytest.raises(ValueError, match="head dim"):
        _apply_rope_triton(q, torch.randn(4, 2, 32), pos, inv_freq)
    with pytest.raises(TypeError, match="must share one of"):
        _apply_rope_triton(q, k.to(torch.bfloat16), pos, inv_freq)
    with pytest.raises(ValueError, match="positions must be"):
        _apply_rope_triton(q, k, pos.float(), inv_freq)
    with pytest.raises(ValueError, match="inv_freq must have shape"):
        _apply_rope_triton(q, k, pos, inv_freq[:16])
    with pytest.raises(ValueError, match="last dim must be contiguous"):
        _apply_rope_triton(torch.randn(4, 64, 8).transpose(1, 2), k, pos, inv_freq)
    with pytest.raises(ValueError, match="head_dim must be even"):
        _apply_rope_triton(torch.randn(4, 8, 63), torch.randn(4, 2, 63), pos, inv_freq)


def test_cpu_tensors_take_the_reference_without_forcing(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the kernel launcher ran on CPU tensors without force_triton()")

    monkeypatch.setattr(rope_mod, "_apply_rope_triton", boom)
    q, k = _fused_qkv(6, 5, 4, 2, 64, torch.float32)
    positions = torch.arange(5)
    inv_freq, _ = rope_inv_freq(64, 10000.0)
    got_q, got_k = apply_rope(q, k, positions, inv_freq)
    exp_q, exp_k = apply_rope_reference(q, k, positions, inv_freq)
    assert torch.equal(got_q, exp_q) and torch.equal(got_k, exp_k)


def test_compiles_sm90():
    records = assert_compiles_sm90("arkfast.kernels.rope")
    assert all(r["vector_loads"] for r in records), [r["name"] for r in records if not r["vector_loads"]]


def test_offsets_are_64_bit():
    # token * token_stride (a fused qkv row of 256k packed tokens) and head * head_stride (head-major
    # views) can pass 2**31 elements: both products must be formed in int64.
    ptx = sm90_ptx("arkfast.kernels.rope", "rope_bf16_posi64_t8_half128", "rope_fp32_posi32_t32_half32")
    for name, code in ptx.items():
        assert not MUL32.search(code), f"{name}: 32-bit offset product {MUL32.search(code).group()}"
        assert len(MUL64.findall(code)) >= 2, name
