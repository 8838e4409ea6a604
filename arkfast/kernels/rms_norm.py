"""RMSNorm, optionally with the residual add fused in front of it.

    h   = x + residual                      (when a residual is given; in the input dtype, as HF does)
    out = weight * (h / sqrt(mean(h**2) + eps))   (statistics in fp32, cast to the input dtype before
                                                   the weight multiply, like transformers' LlamaRMSNorm)

The kernel keeps whole rows in registers: one program normalises ``BLOCK_M`` rows of ``BLOCK_H``
(the next power of two >= H) columns, several rows per program when H is small (Qwen3's per-head
q/k norms have H = 128) so each program still moves a few KiB. Every rounding the reference does is
done in the same place: ``h`` is rounded to the input dtype, the normalised row is rounded to the input
dtype before the weight multiply, and the product is rounded once to the output dtype
(``promote_types(weight.dtype, x.dtype)``, as ``weight * normed`` gives in torch).

The kernel forward is the ``torch.library`` custom op ``arkfast::rms_norm`` (a fake implementation
for ``torch.compile``); its backward is written in torch (see ``_rms_norm_backward``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import KernelSpec
from ._common import TRITON_TYPE
from ._dispatch import use_triton

# Largest row the single-pass kernel takes (a whole row lives in registers): Llama-3 405B's hidden
# size. 16384 fp32 values over 16 warps are 32 registers per thread.
MAX_H = 16384
_MIN_BLOCK_H = 64
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    n_rows, H,
    stride_x, stride_res, stride_out, stride_res_out,
    eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = tl.arange(0, BLOCK_H)  # [BLOCK_H]
    col_mask = cols < H
    mask = (rows < n_rows)[:, None] & col_mask[None, :]  # [BLOCK_M, BLOCK_H]
    rows = rows.to(tl.int64)  # row * stride can pass 2**31 elements

    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
        # torch adds two bf16/fp16 tensors in fp32 and rounds once: so do we.
        h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + rows[:, None] * stride_res_out + cols[None, :], h, mask=mask)
    else:
        h = x
    h32 = h.to(tl.float32)
    # Masked columns load as 0, so they add nothing to the sum of squares; divide by the true H.
    rstd = tl.math.rsqrt(tl.sum(h32 * h32, axis=1) / H + eps)  # [BLOCK_M]
    normed = (h32 * rstd[:, None]).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0)  # [BLOCK_H]
    out = w.to(tl.float32)[None, :] * normed.to(tl.float32)  # exact in fp32; one rounding below
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_config(H: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_H, num_warps)`` for rows of H elements: at least 2048 elements per program,
    about 16-32 per thread."""
    block_h = max(_MIN_BLOCK_H, triton.next_power_of_2(H))
    block_m = max(1, 2048 // block_h)
    num_warps = min(16, max(4, block_m * block_h // 512))
    return block_m, block_h, num_warps


def _rows(t: torch.Tensor, name: str, H: int, *, copy_ok: bool) -> torch.Tensor:
    """``t [..., H]`` as ``[rows, H]`` with a contiguous last dim. Inputs whose leading dims do not
    collapse to one row stride are copied (``copy_ok``); outputs must be viewable."""
    if H > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}'s last dim must be contiguous (stride 1), got strides {tuple(t.stride())}")
    if copy_ok:
        return t.reshape(-1, H)
    try:
        return t.view(-1, H)
    except RuntimeError:
        raise ValueError(f"{name} {tuple(t.shape)} with strides {tuple(t.stride())} is not viewable "
                         "as [rows, H]") from None


def _rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                     residual: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                     residual_out: torch.Tensor | None = None):
    """Host launcher. ``x [..., H]`` float32/bfloat16/float16, ``weight [H]`` in x's dtype or float32,
    ``residual`` like ``x``.

    ``out`` (dtype ``promote_types(weight.dtype, x.dtype)``) and ``residual_out`` (x's dtype), shaped
    like ``x``, are written in place when given (tests pass NaN-filled ones), else allocated.
    Returns ``out`` or ``(out, residual_out)``.
    """
    if x.dtype not in _SUPPORTED or weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"rms_norm takes x in {_SUPPORTED} and weight in x's dtype or float32, "
                        f"got x {x.dtype} and weight {weight.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dim [..., H], got a scalar")
    H = x.shape[-1]
    if weight.shape != (H,):
        raise ValueError(f"weight must have shape ({H},) to match x {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if not 1 <= H <= MAX_H:
        raise ValueError(f"the rms_norm kernel takes 1 <= H <= {MAX_H}, got H={H}")
    if H > 1 and weight.stride(0) != 1:
        raise ValueError(f"weight must be contiguous, got stride {weight.stride(0)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x {tuple(x.shape)} {x.dtype}, "
                         f"got {tuple(residual.shape)} {residual.dtype}")
    devices = {t.device for t in (x, weight, residual, out, residual_out) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"rms_norm tensors must share one device, got {sorted(map(str, devices))}")

    def output(buf: torch.Tensor | None, dtype: torch.dtype, name: str) -> torch.Tensor:
        if buf is None:
            return torch.empty(x.shape, dtype=dtype, device=x.device)
        if buf.shape != x.shape or buf.dtype != dtype:
            raise ValueError(f"{name} must be {tuple(x.shape)} {dtype}, got {tuple(buf.shape)} {buf.dtype}")
        return buf

    out = output(out, torch.promote_types(weight.dtype, x.dtype), "out")
    x2, out2 = _rows(x, "x", H, copy_ok=True), _rows(out, "out", H, copy_ok=False)  # [R, H]
    res2 = resout2 = x2  # stand-ins when there is no residual: never read or written
    if residual is not None:
        residual_out = output(residual_out, x.dtype, "residual_out")
        res2 = _rows(residual, "residual", H, copy_ok=True)
        resout2 = _rows(residual_out, "residual_out", H, copy_ok=False)

    n_rows = x2.shape[0]
    if n_rows:
        block_m, block_h, num_warps = _launch_config(H)
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
            x2, res2, weight, out2, resout2,
            n_rows, H,
            x2.stride(0), res2.stride(0), out2.stride(0), resout2.stride(0),
            float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_H=block_h, num_warps=num_warps,
        )
    return out if residual is None else (out, residual_out)


@torch.library.custom_op("arkfast::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel forward as one opaque op: ``(out, h)`` with ``h = x + residual``, or an empty ``h``
    without a residual (an op cannot return None)."""
    if residual is None:
        return _rms_norm_triton(x, weight, eps), x.new_empty(0)
    return _rms_norm_triton(x, weight, eps, residual)


@_rms_norm_op.register_fake
def _(x, weight, eps, residual):
    out = x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))
    return out, (x.new_empty(0) if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format))


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, eps, residual = inputs
    ctx.save_for_backward(x if residual is None else output[1], weight)
    ctx.eps = eps
    ctx.has_residual = residual is not None


def _rms_norm_backward(ctx, grad_out, grad_h):
    """Kernel forward, torch backward. Only ``h`` (x, or the new residual) is saved, in the input dtype.

    With n = h * r, r = (mean_i h_i^2 + eps)^(-1/2) (fp32) and gn the gradient reaching n:
        dr/dh_j = -r^3 h_j / H
        dL/dh_j = r gn_j - sum_i gn_i h_i r^3 h_j / H = r (gn_j - n_j * mean_i(gn_i n_i))
    and dL/dweight = sum over rows of grad_out * n.to(dtype). With a residual, h = x + residual also
    receives the gradient of the returned residual, and x and residual both get dL/dh.
    """
    h, weight = ctx.saved_tensors  # [..., H] input dtype, [H]
    h32 = h.float()
    rstd = torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + ctx.eps)  # [..., 1]
    n = h32 * rstd
    # The same casts as autograd through the reference: grad of weight * n.to(dtype) w.r.t. the
    # cast value is in x's dtype, and the cast's backward brings it back to fp32.
    gn = (grad_out * weight).to(h.dtype).float()
    gh = (rstd * (gn - n * (gn * n).mean(-1, keepdim=True))).to(h.dtype)
    if ctx.has_residual and grad_h is not None:
        gh = gh + grad_h
    grad_w = None
    if ctx.needs_input_grad[1]:
        grad_w = (grad_out * n.to(h.dtype)).reshape(-1, h.shape[-1]).sum(0, dtype=torch.float32)
        grad_w = grad_w.to(weight.dtype)
    grad_x = gh if ctx.needs_input_grad[0] else None
    grad_res = gh if ctx.has_residual and ctx.needs_input_grad[3] else None
    return grad_x, grad_w, None, grad_res


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             residual: torch.Tensor | None = None):
    """RMSNorm over the last dim, with the residual add fused in front when ``residual`` is given.

    ``x [..., H]`` float32/bfloat16/float16 (last dim contiguous on the kernel path), ``weight [H]`` in
    x's dtype or float32 (kernel path), ``residual`` shaped and typed like ``x``. Returns
    ``out [..., H]`` of dtype ``promote_types(weight.dtype, x.dtype)`` or, with a residual,
    ``(out, h)`` where ``h = x + residual`` (x's dtype) is the new residual stream. Dispatches per the
    package rule; the kernel path is the custom op ``arkfast::rms_norm`` (one node under
    ``torch.compile``) with a torch backward.

    Example::

        out, residual = rms_norm(hidden, layer.post_attention_layernorm.weight, 1e-6, residual)
    """
    if use_triton(x, weight, residual):
        out, h = _rms_norm_op(x, weight, float(eps), residual)
        return out if residual is None else (out, h)
    return rms_norm_reference(x, weight, eps, residual)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                       residual: torch.Tensor | None = None):
    """Torch reference. ``x [..., H]``, ``weight [H]``, optional ``residual`` shaped like ``x``.

    Returns ``out`` or, with a residual, ``(out, h)`` where ``h = x + residual`` is the new residual.
    """
    h = x if residual is None else x + residual
    h32 = h.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(x.dtype)
    return out if residual is None else (out, h)


# (x dtype, weight dtype): weights in the activation dtype (inference) or kept in fp32.
_DTYPE_PAIRS = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                (torch.float16, torch.float32))


def aot_specs() -> list[KernelSpec]:
    """Every (dtype pair, residual, block) configuration the launcher picks for H in [1, MAX_H]. The
    row strides and H are marked 16-divisible as the JIT specialises them for real hidden sizes; one
    unaligned configuration (H = 100, say) is added."""
    specs = []
    block = _MIN_BLOCK_H
    blocks = []
    while block <= MAX_H:
        blocks.append(block)
        block *= 2
    aligned = ("x_ptr", "res_ptr", "w_ptr", "out_ptr", "res_out_ptr", "H",
               "stride_x", "stride_res", "stride_out", "stride_res_out")
    for x_dtype, w_dtype in _DTYPE_PAIRS:
        xt, wt = TRITON_TYPE[x_dtype], TRITON_TYPE[w_dtype]
        ot = TRITON_TYPE[torch.promote_types(x_dtype, w_dtype)]
        for has_residual in (False, True):
            for H in blocks:
                block_m, block_h, num_warps = _launch_config(H)
                for unaligned in ((False, True) if (H, xt, wt) == (128, "bf16", "bf16") else (False,)):
                    specs.append(KernelSpec(
                        name=f"rms_norm_x{xt}_w{wt}_res{int(has_residual)}_m{block_m}_h{block_h}"
                             f"{'_unaligned' if unaligned else ''}",
                        fn=_rms_norm_fwd_kernel,
                        signature={"x_ptr": f"*{xt}", "res_ptr": f"*{xt}", "w_ptr": f"*{wt}",
                                   "out_ptr": f"*{ot}", "res_out_ptr": f"*{xt}",
                                   "n_rows": "i32", "H": "i32", "stride_x": "i32", "stride_res": "i32",
                                   "stride_out": "i32", "stride_res_out": "i32", "eps": "fp32",
                                   "HAS_RESIDUAL": "constexpr", "BLOCK_M": "constexpr",
                                   "BLOCK_H": "constexpr"},
                        constexprs={"HAS_RESIDUAL": has_residual, "BLOCK_M": block_m, "BLOCK_H": block_h},
                        num_warps=num_warps,
                        aligned=aligned[:5] if unaligned else aligned,
                    ))
    return specs
