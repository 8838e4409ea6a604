"""SwiGLU kernels (through the Triton interpreter) against the torch reference."""
import importlib

import pytest
import torch

from arkfast.kernels.swiglu import _swiglu_triton, swiglu, swiglu_reference
from kernel_testing import MUL32, MUL64, assert_close, assert_compiles_sm90, poison_like, sm90_ptx

# Numerically sensitive: CI also runs these under other ATen CPU capabilities (.ci/run).
pytestmark = pytest.mark.numerics

swiglu_mod = importlib.import_module("arkfast.kernels.swiglu")


# A 64-bit product of two registers (row * stride in int64) and a 32-bit one (the same product left
# in int32, which wraps past 2**31 elements) in sm_90 PTX; multiplies by constants are not matched.
def _gate_up(seed, lead, I, dtype):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, 2 * I, generator=g).mul_(3.0).to(dtype)  # gates well into silu's tails


@pytest.mark.parametrize("rows", [1, 17, 423])
@pytest.mark.parametrize("I", [64, 100, 1536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_poisoned_out(triton_interp, rows, I, dtype):
    gate_up = _gate_up(rows * 31 + I, (rows,), I, dtype)
    expected = swiglu_reference(gate_up)
    out = poison_like(expected)
    assert _swiglu_triton(gate_up, out=out) is out
    assert_close(out, expected)


def test_public_function_strided_rows_and_leading_dims(triton_interp):
    # A [2, 3, 2I] slice of a wider buffer: the row stride is not 2I.
    base = _gate_up(1, (2, 3), 600, torch.bfloat16)
    gate_up = base[..., 200:200 + 2 * 300]
    got = swiglu(gate_up)
    assert got.shape == (2, 3, 300) and got.is_contiguous()
    assert_close(got, swiglu_reference(gate_up))


def test_fp16_rounding_order_matches(triton_interp):
    # The interpreter rounds fp16 like the GPU (bf16 it truncates): silu is rounded to the dtype before
    # the product, as F.silu(gate) * up does, so nearly every element is bit-equal.
    gate_up = _gate_up(2, (17,), 1000, torch.float16)
    got, expected = swiglu(gate_up), swiglu_reference(gate_up)
    assert_close(got, expected)
    mismatched = (got != expected).float().mean().item()
    assert mismatched < 2e-3, f"{mismatched:.2%} of elements differ from the reference"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference_autograd(triton_interp, dtype):
    gate_up = _gate_up(3, (17,), 100, dtype)
    grad_out = torch.randn(17, 100, generator=torch.Generator().manual_seed(4)).to(dtype)
    leaf, ref_leaf = gate_up.clone().requires_grad_(), gate_up.clone().requires_grad_()
    swiglu(leaf).backward(grad_out)
    swiglu_reference(ref_leaf).backward(grad_out)
    assert_close(leaf.grad, ref_leaf.grad, name="grad gate_up")
    # A non-contiguous upstream gradient (here expanded with stride 0) is accepted.
    leaf.grad = None
    swiglu(leaf).backward(grad_out[:1].expand(17, 100))
    ref_leaf.grad = None
    swiglu_reference(ref_leaf).backward(grad_out[:1].expand(17, 100))
    assert_close(leaf.grad, ref_leaf.grad, name="grad gate_up (expanded grad_out)")


def test_empty_and_validation():
    assert _swiglu_triton(torch.empty(0, 8)).shape == (0, 4)
    with pytest.raises(ValueError, match="last dim must be even"):
        swiglu(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"must be \[\.\.\., 2 \* I\]"):
        _swiglu_triton(torch.randn(3, 7))
    with pytest.raises(TypeError, match="swiglu supports"):
        _swiglu_triton(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="last dim must be contiguous"):
        _swiglu_triton(torch.randn(8, 3).t())
    with pytest.raises(ValueError, match="out must be"):
        _swiglu_triton(torch.randn(3, 8), out=torch.empty(3, 8))


def test_cpu_tensors_take_the_reference_without_forcing(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the kernel launcher ran on CPU tensors without force_triton()")

    monkeypatch.setattr(swiglu_mod, "_swiglu_triton", boom)
    gate_up = _gate_up(5, (3,), 64, torch.float32)
    assert torch.equal(swiglu(gate_up), swiglu_reference(gate_up))


def test_compiles_sm90():
    records = assert_compiles_sm90("arkfast.kernels.swiglu")
    # BLOCK = 128 (I <= 128, toy models) runs one warp with 4 elements per thread: 8-byte loads in
    # bf16/fp16. Every other configuration must use 16-byte vector loads.
    wide = [r for r in records if not r["name"].endswith("_b128") or "fp32" in r["name"]]
    assert all(r["vector_loads"] for r in wide), [r["name"] for r in wide if not r["vector_loads"]]


def test_row_offsets_are_64_bit():
    # 256k rows x 2I = 2 x 14336 is past 2**31 elements: row * stride must be formed in int64.
    ptx = sm90_ptx("arkfast.kernels.swiglu", "swiglu_fwd_bf16_b1024", "swiglu_bwd_bf16_b1024")
    for name, code in ptx.items():
        assert not MUL32.search(code), f"{name}: 32-bit offset product {MUL32.search(code).group()}"
        assert len(MUL64.findall(code)) >= (2 if "fwd" in name else 3), name
