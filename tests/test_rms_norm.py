"""RMSNorm kernel (through the Triton interpreter) against its torch reference."""
import importlib

import pytest
import torch

from arkfast.kernels.rms_norm import _rms_norm_triton, rms_norm, rms_norm_reference
from kernel_testing import MUL32, MUL64, assert_close, assert_compiles_sm90, poison_like, sm90_ptx

# Numerically sensitive: CI also runs these under other ATen CPU capabilities (.ci/run).
pytestmark = pytest.mark.numerics

rms_mod = importlib.import_module("arkfast.kernels.rms_norm")


# A 64-bit product of two registers (row * stride in int64) and a 32-bit one (the same product left
# in int32, which wraps past 2**31 elements) in sm_90 PTX; multiplies by constants are not matched.
def _exact_in_fp32(dtype):
    """x + residual is rounded once to the input dtype, as torch does, so fp32 matches bit for bit.
    The interpreter truncates fp32 -> bf16 where the GPU rounds to nearest, so bf16 gets 1 ulp."""
    return {"atol": 0.0, "rtol": 0.0} if dtype == torch.float32 else {}


def _inputs(seed, lead, H, dtype, w_dtype=None, residual=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, H, generator=g).mul_(3.0).to(dtype)
    w = (1.0 + 0.5 * torch.randn(H, generator=g)).to(w_dtype or dtype)
    r = torch.randn(*lead, H, generator=g).to(dtype) if residual else None
    return x, w, r


# 423 rows cross several multi-row programs (H = 64: 32 rows each, H = 100: 16); H = 4096 is one row
# per program, so 17 rows suffice there (the interpreter is slow on wide rows).
@pytest.mark.parametrize("rows,H", [(1, 64), (17, 64), (423, 64), (1, 100), (17, 100), (423, 100),
                                    (1, 4096), (17, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_matches_reference_poisoned_out(triton_interp, rows, H, dtype, residual):
    x, w, r = _inputs(rows * 7919 + H, (rows,), H, dtype, residual=residual)
    expected = rms_norm_reference(x, w, 1e-6, r)
    out = poison_like(x)
    res_out = poison_like(x) if residual else None
    got = _rms_norm_triton(x, w, 1e-6, r, out=out, residual_out=res_out)
    if residual:
        assert got[0] is out and got[1] is res_out
        assert_close(out, expected[0], name="out")
        assert_close(res_out, expected[1], **_exact_in_fp32(dtype), name="residual_out")
    else:
        assert got is out
        assert_close(out, expected, name="out")


def test_public_function_leading_dims_and_strided_rows(triton_interp):
    # [2, 3, 5, H] slice of a wider buffer: rows collapse to one stride of 160, not H.
    base, w, _ = _inputs(1, (2, 3, 5), 160, torch.bfloat16, residual=False)
    x = base[..., 16:16 + 96]
    res = torch.randn(2, 3, 5, 96).to(torch.bfloat16)
    out, h = rms_norm(x, w[:96].contiguous(), 1e-5, res)
    exp_out, exp_h = rms_norm_reference(x, w[:96], 1e-5, res)
    assert out.shape == x.shape and h.shape == x.shape
    assert_close(out, exp_out, name="out")
    assert_close(h, exp_h, **_exact_in_fp32(h.dtype), name="h")
    # Leading dims that do not collapse (a transpose) are copied to rows first.
    xt = torch.randn(6, 4, 64).to(torch.bfloat16).transpose(0, 1)[..., :]
    wt = torch.randn(64).to(torch.bfloat16)
    assert_close(rms_norm(xt, wt), rms_norm_reference(xt, wt), name="transposed")


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_other_dtypes(triton_interp, x_dtype, w_dtype):
    x, w, r = _inputs(3, (17,), 1000, x_dtype, w_dtype)
    out, h = rms_norm(x, w, 1e-6, r)
    exp_out, exp_h = rms_norm_reference(x, w, 1e-6, r)
    assert out.dtype == exp_out.dtype == torch.promote_types(x_dtype, w_dtype)
    assert_close(out, exp_out, dtype=x_dtype, name="out")
    assert_close(h, exp_h, **_exact_in_fp32(h.dtype), name="h")
    if x_dtype == torch.float16:
        # The interpreter rounds fp16 like the GPU, so fp16 shows the kernel rounds where the reference
        # does (h, then the normalised row before the weight multiply, then the product): all but a
        # few elements (the fp32 sum of squares is added in another order) are bit-equal.
        assert torch.equal(h, exp_h)
        mismatched = (out != exp_out).float().mean().item()
        assert mismatched < 1e-3, f"{mismatched:.2%} of elements differ from the reference"


def test_max_hidden_size(triton_interp):
    x, w, r = _inputs(4, (3,), rms_mod.MAX_H, torch.bfloat16)
    out, h = rms_norm(x, w, 1e-6, r)
    exp_out, exp_h = rms_norm_reference(x, w, 1e-6, r)
    assert_close(out, exp_out, name="out")
    assert_close(h, exp_h, **_exact_in_fp32(h.dtype), name="h")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_backward_matches_reference_autograd(triton_interp, dtype, residual):
    x, w, r = _inputs(5 + residual, (17,), 100, dtype, residual=residual)
    leaves = [t.clone().requires_grad_() for t in (x, w)] + ([r.clone().requires_grad_()] if residual else [])
    ref_leaves = [t.clone().detach().requires_grad_() for t in leaves]
    g = torch.Generator().manual_seed(11)
    grad_out = torch.randn(17, 100, generator=g).to(dtype)
    grad_h = torch.randn(17, 100, generator=g).to(dtype)

    def loss(fn, ts):
        result = fn(ts[0], ts[1], 1e-6, ts[2] if residual else None)
        if residual:
            return (result[0].float() * grad_out.float()).sum() + (result[1].float() * grad_h.float()).sum()
        return (result.float() * grad_out.float()).sum()

    loss(rms_norm, leaves).backward()
    loss(rms_norm_reference, ref_leaves).backward()
    for name, a, e in zip(("x", "weight", "residual"), leaves, ref_leaves):
        # The weight gradient sums 17 rows of g * x_hat, each product rounded to bf16 (u = 2^-8) in
        # another order than the reference's: |error| <= 17 terms * u * max|g * x_hat|, and with
        # |g|, |x_hat| <= ~4 sigma of N(0, 1) draws that is 17 * 3.9e-3 * ~1.5 (a typical large term)
        # = 0.1 absolute; rtol 2e-2 ~ 5u covers the output's own rounding on large entries.
        tol = {} if dtype == torch.float32 or name != "weight" else {"atol": 0.1, "rtol": 0.02}
        assert_close(a.grad, e.grad, name=f"grad {name}", **tol)


def test_validation_errors():
    x = torch.randn(4, 64)
    w = torch.randn(64)
    with pytest.raises(ValueError, match="weight must have shape"):
        _rms_norm_triton(x, torch.randn(65))
    with pytest.raises(ValueError, match="H <= 16384"):
        _rms_norm_triton(torch.randn(2, rms_mod.MAX_H + 1), torch.randn(rms_mod.MAX_H + 1))
    with pytest.raises(ValueError, match="last dim must be contiguous"):
        _rms_norm_triton(torch.randn(64, 4).t(), w)
    with pytest.raises(ValueError, match="residual must match"):
        _rms_norm_triton(x, w, residual=torch.randn(4, 64).to(torch.bfloat16))
    with pytest.raises(TypeError, match="rms_norm takes x in"):
        _rms_norm_triton(x.double(), w)
    with pytest.raises(TypeError, match="weight in x's dtype or float32"):
        _rms_norm_triton(x, w.to(torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        _rms_norm_triton(x, w, out=torch.empty(4, 64, dtype=torch.bfloat16))


def test_cpu_tensors_take_the_reference_without_forcing(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the kernel launcher ran on CPU tensors without force_triton()")

    monkeypatch.setattr(rms_mod, "_rms_norm_triton", boom)
    x, w, r = _inputs(6, (3,), 64, torch.float32)
    out, h = rms_norm(x, w, 1e-6, r)
    exp_out, exp_h = rms_norm_reference(x, w, 1e-6, r)
    assert torch.equal(out, exp_out) and torch.equal(h, exp_h)


def test_compiles_sm90():
    records = assert_compiles_sm90("arkfast.kernels.rms_norm")
    aligned = [r for r in records if not r["name"].endswith("unaligned")]
    assert all(r["vector_loads"] for r in aligned), [r["name"] for r in aligned if not r["vector_loads"]]


def test_row_offsets_are_64_bit():
    # A packed batch of 256k tokens x hidden 8192 holds 2**31 elements: row * stride must be formed in
    # int64 for x, residual, residual_out and out (one row and several rows per program).
    ptx = sm90_ptx("arkfast.kernels.rms_norm", "rms_norm_xbf16_wbf16_res1_m1_h4096",
                    "rms_norm_xfp32_wfp32_res0_m32_h64")
    for name, code in ptx.items():
        assert not MUL32.search(code), f"{name}: 32-bit offset product {MUL32.search(code).group()}"
        assert len(MUL64.findall(code)) >= (4 if "res1" in name else 2), name
