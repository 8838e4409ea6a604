"""SwiGLU activation: ``silu(gate) * up`` for a fused gate/up projection output.

``gate_up [..., 2 * I]`` holds the gate in its first half and the up projection in its second (the
model concatenates ``gate_proj`` and ``up_proj`` weights at load time), and the result is ``[..., I]``,
computed in the input dtype like transformers' ``act_fn(gate_proj(x)) * up_proj(x)``.

Rounding, as torch does it in bf16/fp16: ``F.silu`` computes ``g / (1 + exp(-g))`` in fp32 and rounds
to the dtype; the product with ``up`` is formed in fp32 (exact for two bf16/fp16 values) and rounded
once. The kernel rounds in the same two places. The backward kernel follows autograd through the
reference the same way (see ``_swiglu_bwd_kernel``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._aot import KernelSpec
from ._common import TRITON_TYPE
from ._dispatch import use_triton

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _swiglu_fwd_kernel(gu_ptr, out_ptr, n_cols, stride_gu, stride_out, BLOCK: tl.constexpr):
    """Program (row, j): columns [j * BLOCK, (j + 1) * BLOCK) of one row of ``out [rows, I]``."""
    row = tl.program_id(0).to(tl.int64)  # row * stride can pass 2**31 elements
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = cols < n_cols
    gate_ptrs = gu_ptr + row * stride_gu + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + n_cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # F.silu's formula, rounded
    tl.store(out_ptr + row * stride_out + cols, (silu * up).to(dtype), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(gu_ptr, grad_out_ptr, grad_gu_ptr, n_cols, stride_gu, stride_go, stride_ggu,
                       BLOCK: tl.constexpr):
    """Gradient of ``out = silu(gate) * up`` into ``grad_gu [rows, 2I]`` (gate half, then up half).

    With s = sigmoid(g) and silu(g) = g * s:
        d silu / dg = s + g * s * (1 - s) = s * (1 + g * (1 - s))
        grad_up   = grad_out * silu(g)                         (silu rounded as in the forward)
        grad_gate = (grad_out * up) * s * (1 + g * (1 - s))    (grad_out * up rounded first, as
                                                                 autograd's mul backward does)
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = cols < n_cols
    gate_ptrs = gu_ptr + row * stride_gu + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + n_cols, mask=mask, other=0.0).to(tl.float32)
    go = tl.load(grad_out_ptr + row * stride_go + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = grad_gu_ptr.dtype.element_ty
    sig = 1.0 / (1.0 + tl.exp(-gate))
    silu = (gate * sig).to(dtype).to(tl.float32)
    grad_silu = (go * up).to(dtype).to(tl.float32)
    grad_gate = grad_silu * sig * (1.0 + gate * (1.0 - sig))
    grad_ptrs = grad_gu_ptr + row * stride_ggu + cols
    tl.store(grad_ptrs, grad_gate.to(dtype), mask=mask)
    tl.store(grad_ptrs + n_cols, (go * silu).to(dtype), mask=mask)


def _launch_config(n_cols: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)``: up to 1024 columns per program, 4 (fp32) to 8 (bf16) per thread."""
    block = min(1024, max(128, triton.next_power_of_2(n_cols)))
    return block, max(1, block // 256)


def _rows(t: torch.Tensor, name: str, width: int, *, copy_ok: bool) -> torch.Tensor:
    """``t [..., width]`` as ``[rows, width]`` with a contiguous last dim (inputs whose leading dims do
    not collapse to one stride are copied; outputs must be viewable)."""
    if width > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}'s last dim must be contiguous (stride 1), got strides {tuple(t.stride())}")
    if copy_ok:
        return t.reshape(-1, width)
    try:
        return t.view(-1, width)
    except RuntimeError:
        raise ValueError(f"{name} {tuple(t.shape)} with strides {tuple(t.stride())} is not viewable "
                         f"as [rows, {width}]") from None


def _check_gate_up(gate_up: torch.Tensor) -> int:
    if gate_up.dtype not in _SUPPORTED:
        raise TypeError(f"swiglu supports {_SUPPORTED}, got {gate_up.dtype}")
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must be [..., 2 * I], got shape {tuple(gate_up.shape)}")
    return gate_up.shape[-1] // 2


def _swiglu_triton(gate_up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Host launcher. ``gate_up [..., 2 * I]`` float32/bfloat16/float16 with a contiguous last dim
    (leading strides free) → ``out [..., I]`` of the same dtype, written in place when given (tests pass
    a NaN-filled one), else allocated contiguous."""
    I = _check_gate_up(gate_up)
    out_shape = (*gate_up.shape[:-1], I)
    if out is None:
        out = torch.empty(out_shape, dtype=gate_up.dtype, device=gate_up.device)
    elif out.shape != out_shape or out.dtype != gate_up.dtype or out.device != gate_up.device:
        raise ValueError(f"out must be {out_shape} {gate_up.dtype} on {gate_up.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    gu2 = _rows(gate_up, "gate_up", 2 * I, copy_ok=True)  # [R, 2I]
    out2 = _rows(out, "out", I, copy_ok=False)  # [R, I]
    if gu2.shape[0] and I:
        block, num_warps = _launch_config(I)
        _swiglu_fwd_kernel[(gu2.shape[0], triton.cdiv(I, block))](
            gu2, out2, I, gu2.stride(0), out2.stride(0), BLOCK=block, num_warps=num_warps)
    return out


def _swiglu_backward_triton(gate_up: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``gate_up [..., 2I]``, ``grad_out [..., I]`` (same dtype) → ``grad_gate_up [..., 2I]``."""
    I = _check_gate_up(gate_up)
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grad_gu = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    gu2 = _rows(gate_up, "gate_up", 2 * I, copy_ok=True)
    go2 = _rows(grad_out.to(gate_up.dtype), "grad_out", I, copy_ok=True)
    ggu2 = grad_gu.view(-1, 2 * I)
    if gu2.shape[0] and I:
        block, num_warps = _launch_config(I)
        _swiglu_bwd_kernel[(gu2.shape[0], triton.cdiv(I, block))](
            gu2, go2, ggu2, I, gu2.stride(0), go2.stride(0), ggu2.stride(0),
            BLOCK=block, num_warps=num_warps)
    return grad_gu


@torch.library.custom_op("arkfast::swiglu", mutates_args=())
def _swiglu_op(gate_up: torch.Tensor) -> torch.Tensor:
    """The forward kernel as one opaque op; its autograd saves only ``gate_up``."""
    return _swiglu_triton(gate_up)


@_swiglu_op.register_fake
def _(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.custom_op("arkfast::swiglu_backward", mutates_args=())
def _swiglu_backward_op(gate_up: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    return _swiglu_backward_triton(gate_up, grad_out)


@_swiglu_backward_op.register_fake
def _(gate_up, grad_out):
    return gate_up.new_empty(gate_up.shape)


def _swiglu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, grad_out):
    (gate_up,) = ctx.saved_tensors
    return _swiglu_backward_op(gate_up, grad_out)


_swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup_context)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` over the two halves of the last dim of ``gate_up [..., 2 * I]``.

    float32/bfloat16/float16; on the kernel path the last dim must be contiguous. Returns ``[..., I]``
    in the input dtype. Dispatches per the package rule; differentiable (kernel backward).

    Example::

        hidden = down_proj(swiglu(gate_up_proj(x)))   # [T, H] -> [T, 2I] -> [T, I] -> [T, H]
    """
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even (gate and up halves), got {gate_up.shape[-1]}")
    if use_triton(gate_up):
        return _swiglu_op(gate_up)
    return swiglu_reference(gate_up)


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """Torch reference: ``silu(gate_up[..., :I]) * gate_up[..., I:]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up




def aot_specs() -> list[KernelSpec]:
    """Forward and backward for every dtype and every BLOCK the launcher picks (128 to 1024). Row
    strides and I are marked 16-divisible, as the JIT specialises them for real intermediate sizes."""
    specs = []
    for dt in TRITON_TYPE.values():
        for block in (128, 256, 512, 1024):
            _, num_warps = _launch_config(block)
            specs.append(KernelSpec(
                name=f"swiglu_fwd_{dt}_b{block}", fn=_swiglu_fwd_kernel,
                signature={"gu_ptr": f"*{dt}", "out_ptr": f"*{dt}", "n_cols": "i32", "stride_gu": "i32",
                           "stride_out": "i32", "BLOCK": "constexpr"},
                constexprs={"BLOCK": block}, num_warps=num_warps,
                aligned=("gu_ptr", "out_ptr", "n_cols", "stride_gu", "stride_out"),
            ))
            specs.append(KernelSpec(
                name=f"swiglu_bwd_{dt}_b{block}", fn=_swiglu_bwd_kernel,
                signature={"gu_ptr": f"*{dt}", "grad_out_ptr": f"*{dt}", "grad_gu_ptr": f"*{dt}",
                           "n_cols": "i32", "stride_gu": "i32", "stride_go": "i32", "stride_ggu": "i32",
                           "BLOCK": "constexpr"},
                constexprs={"BLOCK": block}, num_warps=num_warps,
                aligned=("gu_ptr", "grad_out_ptr", "grad_gu_ptr", "n_cols", "stride_gu", "stride_go",
                         "stride_ggu"),
            ))
    return specs
