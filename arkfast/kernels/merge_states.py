"""Merging partial attention states by log-sum-exp (kernel and torch reference).

A *state* ``(o, s)`` summarises one query row's attention over a subset K_i of the keys, with
scores ``x_j = scale * q . k_j``:

    s_i = log sum_{j in K_i} exp(x_j)                    (the log-sum-exp, natural log)
    o_i = sum_{j in K_i} exp(x_j - s_i) v_j              (softmax over K_i alone, times V)

For disjoint subsets the state over their union follows without revisiting any key:

    s = log sum_i exp(s_i),        o = sum_i exp(s_i - s) o_i

computed stably with ``m = max_i s_i``: ``w_i = exp(s_i - m)``, ``s = m + log sum_i w_i`` and
``o = sum_i w_i o_i / sum_i w_i`` (the same rescaling as the online softmax, one state at a time).
An empty subset has ``s_i = -inf`` and weight 0; if every part is empty the result is ``o = 0``,
``s = -inf``, never NaN (``m`` is replaced by 0 before subtracting, so no ``-inf - -inf``).

Log base. The kernel works in base 2 (``exp2``/``log2`` are the hardware instructions; base-e math
would cost a multiply per element): it reads ``s_i * lse_in_scale`` and writes ``s * lse_out_scale``.
The public functions here take and return *natural-log* LSEs (``lse_in_scale = log2(e)``,
``lse_out_scale = ln 2``); the decode kernels hand their base-2 partials straight in
(``lse_in_scale = 1``) through :func:`merge_partials`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import KernelSpec
from ._common import DTYPES, HEAD_DIMS, LN_2, LOG2_E, TRITON_TYPE
from ._dispatch import use_triton


# ---------------------------------------------------------------------------------------------------
# Kernel: one program per (row n, BLOCK_H heads). Row n's parts are the flat slots
# [part_ptr[n], part_ptr[n + 1]) (CSR), so rows may have different numbers of parts, including none.
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _merge_partials_kernel(
    part_o_ptr,          # [P, H, D] fp32, contiguous
    part_lse_ptr,        # [P, H] fp32, contiguous
    part_ptr_ptr,        # [N + 1] int32, non-decreasing
    out_ptr,             # [N, H, D] (row and head strides given, unit last stride)
    lse_out_ptr,         # [N, H] fp32, contiguous
    num_heads,
    stride_on, stride_oh,
    lse_in_scale, lse_out_scale,   # fp32: input LSE -> base 2, base 2 -> output LSE
    D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    n = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)   # [BLOCK_H]
    head_ok = heads < num_heads
    dims = tl.arange(0, D)                                        # [D]
    lo = tl.load(part_ptr_ptr + n)
    hi = tl.load(part_ptr_ptr + n + 1)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)   # running max of the base-2 LSEs
    l = tl.zeros([BLOCK_H], tl.float32)                 # running sum_i 2^(s_i - m)
    acc = tl.zeros([BLOCK_H, D], tl.float32)            # running sum_i 2^(s_i - m) o_i
    for i in range(hi - lo):
        p64 = lo.to(tl.int64) + i                                 # this part's flat slot
        s = tl.load(part_lse_ptr + p64 * num_heads + heads, mask=head_ok, other=float("-inf"))
        s = s * lse_in_scale
        o = tl.load(part_o_ptr + (p64 * num_heads + heads[:, None]) * D + dims[None, :],
                    mask=head_ok[:, None], other=0.0)
        m_new = tl.maximum(m, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # all parts so far empty
        alpha = tl.exp2(m - m_safe)                               # rescales the old sums (0 at start)
        w = tl.exp2(s - m_safe)                                   # 0 for an empty part
        # An empty part's o is never trusted (0 * NaN would poison the sum).
        acc = acc * alpha[:, None] + tl.where(w[:, None] > 0, w[:, None] * o, 0.0)
        l = l * alpha + w
        m = m_new

    nonempty = l > 0
    l_safe = tl.where(nonempty, l, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(nonempty, m + tl.log2(l_safe), float("-inf")) * lse_out_scale
    n64 = n.to(tl.int64)
    tl.store(out_ptr + n64 * stride_on + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    tl.store(lse_out_ptr + n64 * num_heads + heads, lse, mask=head_ok)


def _block_h(head_dim: int) -> int:
    return max(1, min(64, 2048 // head_dim))  # <= 2048 fp32 accumulators a program


def merge_partials(part_o: torch.Tensor, part_lse: torch.Tensor, part_ptr: torch.Tensor,
                   out: torch.Tensor, lse_out: torch.Tensor, *, lse_in_scale: float = 1.0,
                   lse_out_scale: float = LN_2) -> None:
    """Low-level launcher: merge each row's CSR list of partial states into ``out`` and ``lse_out``.

    ``part_o [P, H, D]`` fp32 and ``part_lse [P, H]`` fp32 (contiguous; at least the slots the rows
    name); ``part_ptr [N + 1]`` int32, row n owning slots ``[part_ptr[n], part_ptr[n + 1])``;
    ``out [N, H, D]`` (fp32/bf16/fp16, unit last stride) and ``lse_out [N, H]`` fp32 contiguous are
    written. LSE scales as in the module docstring (defaults: base-2 in, natural log out).
    """
    N, H, D = out.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS}, got {D}")
    if out.dtype not in DTYPES:
        raise TypeError(f"out dtype must be one of {DTYPES}, got {out.dtype}")
    if part_o.dim() != 3 or part_o.shape[1:] != (H, D) or part_o.dtype != torch.float32:
        raise ValueError(f"part_o must be [P, {H}, {D}] float32, got {tuple(part_o.shape)} {part_o.dtype}")
    if part_lse.shape != part_o.shape[:2] or part_lse.dtype != torch.float32:
        raise ValueError(f"part_lse must be [P, {H}] float32, got {tuple(part_lse.shape)} {part_lse.dtype}")
    if not (part_o.is_contiguous() and part_lse.is_contiguous()):
        raise ValueError("part_o and part_lse must be contiguous")
    if part_ptr.shape != (N + 1,) or part_ptr.dtype != torch.int32 or part_ptr.stride(0) != 1:
        raise ValueError(f"part_ptr must be a contiguous [N + 1 = {N + 1}] int32 tensor, got "
                         f"{tuple(part_ptr.shape)} {part_ptr.dtype} strides {part_ptr.stride()}")
    if out.stride(-1) != 1:
        raise ValueError(f"out needs a unit last-dim stride, got strides {out.stride()}")
    if lse_out.shape != (N, H) or lse_out.dtype != torch.float32 or not lse_out.is_contiguous():
        raise ValueError(f"lse_out must be a contiguous [{N}, {H}] float32 tensor, got "
                         f"{tuple(lse_out.shape)} {lse_out.dtype}")
    for name, t in (("part_o", part_o), ("part_lse", part_lse), ("part_ptr", part_ptr), ("lse_out", lse_out)):
        if t.device != out.device:
            raise ValueError(f"{name} is on {t.device}, out on {out.device}")
    if N == 0 or H == 0:
        return
    block_h = _block_h(D)
    grid = (N, triton.cdiv(H, block_h))
    _merge_partials_kernel[grid](
        part_o, part_lse, part_ptr, out, lse_out, H, out.stride(0), out.stride(1),
        float(lse_in_scale), float(lse_out_scale), D=D, BLOCK_H=block_h, num_warps=4,
    )


# ---------------------------------------------------------------------------------------------------
# Public ops.
# ---------------------------------------------------------------------------------------------------
def merge_states(v: torch.Tensor, s: torch.Tensor, *, out: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``P`` attention states per row (see the module docstring).

    ``v [N, P, H, D]`` (fp32/bf16/fp16), ``s [N, P, H]`` natural-log LSEs (any float dtype; ``-inf``
    marks an empty state). Returns ``(v_merged [N, H, D]`` in ``v.dtype``, ``s_merged [N, H]``
    float32, natural log``)``. ``out`` (optional, ``[N, H, D]`` in ``v.dtype``) receives ``v_merged``.

    Example::

        v, s = merge_states(torch.stack([v_a, v_b], 1), torch.stack([s_a, s_b], 1))
    """
    if v.dim() != 4 or s.shape != v.shape[:3]:
        raise ValueError(f"v must be [N, P, H, D] and s [N, P, H], got {tuple(v.shape)} and {tuple(s.shape)}")
    if v.dtype not in DTYPES:
        raise TypeError(f"v dtype must be one of {DTYPES}, got {v.dtype}")
    N, P, H, D = v.shape
    if out is None:
        out = torch.empty(N, H, D, dtype=v.dtype, device=v.device)
    elif out.shape != (N, H, D) or out.dtype != v.dtype or out.device != v.device:
        raise ValueError(f"out must be [{N}, {H}, {D}] {v.dtype} on {v.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if not use_triton(v, s):
        ref_v, ref_s = merge_states_reference(v, s)
        out.copy_(ref_v)
        return out, ref_s
    # The kernel reads fp32 [P_total, H, D] parts; row n owns slots n*P .. n*P + P - 1.
    part_o = v.reshape(N * P, H, D).to(torch.float32).contiguous()       # [N*P, H, D]
    part_lse = s.reshape(N * P, H).to(torch.float32).contiguous()        # [N*P, H]
    part_ptr = torch.arange(N + 1, dtype=torch.int32, device=v.device) * P    # [N + 1]
    lse_out = torch.empty(N, H, dtype=torch.float32, device=v.device)
    merge_partials(part_o, part_lse, part_ptr, out, lse_out, lse_in_scale=LOG2_E, lse_out_scale=LN_2)
    return out, lse_out


def merge_state(v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two states: ``v_a, v_b [N, H, D]``, ``s_a, s_b [N, H]`` natural-log LSEs →
    ``(v [N, H, D]`` in ``v_a.dtype``, ``s [N, H]`` float32``)``."""
    if v_a.shape != v_b.shape or s_a.shape != s_b.shape or s_a.shape != v_a.shape[:2]:
        raise ValueError(f"states must be v [N, H, D], s [N, H] alike, got v {tuple(v_a.shape)}, "
                         f"{tuple(v_b.shape)} and s {tuple(s_a.shape)}, {tuple(s_b.shape)}")
    return merge_states(torch.stack((v_a, v_b), 1), torch.stack((s_a, s_b), 1))


def merge_states_reference(v: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`merge_states`: ``v [N, P, H, D]``, ``s [N, P, H]`` (natural log)."""
    s32 = s.float()                                                   # [N, P, H]
    m = s32.amax(dim=1, keepdim=True)                                 # [N, 1, H]
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    w = torch.exp(s32 - m)                                            # [N, P, H], 0 for empty parts
    total = w.sum(dim=1)                                              # [N, H]
    weighted = torch.where(w[..., None] > 0, w[..., None] * v.float(), torch.zeros((), device=v.device))
    o = weighted.sum(dim=1) / torch.where(total > 0, total, torch.ones_like(total))[..., None]
    lse = torch.where(total > 0, m.squeeze(1) + torch.log(total), torch.full_like(total, float("-inf")))
    return o.to(v.dtype), lse


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time configurations: every head dim the launcher accepts x every output dtype.
# ---------------------------------------------------------------------------------------------------
def aot_specs() -> list[KernelSpec]:
    specs = []
    for D in HEAD_DIMS:
        for dtype in DTYPES:
            specs.append(KernelSpec(
                name=f"merge_partials_d{D}_{TRITON_TYPE[dtype]}",
                fn=_merge_partials_kernel,
                signature={
                    "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "part_ptr_ptr": "*i32",
                    "out_ptr": f"*{TRITON_TYPE[dtype]}", "lse_out_ptr": "*fp32", "num_heads": "i32",
                    "stride_on": "i32", "stride_oh": "i32", "lse_in_scale": "fp32", "lse_out_scale": "fp32",
                    "D": "constexpr", "BLOCK_H": "constexpr",
                },
                constexprs={"D": D, "BLOCK_H": _block_h(D)},
                num_warps=4,
                aligned=("part_o_ptr", "part_lse_ptr", "part_ptr_ptr", "out_ptr", "lse_out_ptr",
                         "stride_on", "stride_oh"),
            ))
    return specs
