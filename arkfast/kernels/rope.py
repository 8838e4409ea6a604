"""Rotary position embedding, rotate-half convention (Llama / Qwen / Mistral in transformers).

For a head vector x of even size D, with i < D/2 and angle a_i = position * inv_freq[i]:
    out[i]       = x[i]       * cos(a_i) * s - x[i + D/2] * sin(a_i) * s
    out[i + D/2] = x[i + D/2] * cos(a_i) * s + x[i]       * sin(a_i) * s
where s is the scaling's attention factor (1.0 for default and llama3 scaling). Angles are computed in
fp32; cos/sin are cast to the input dtype before the multiply, as transformers does.

The kernel rotates q and k in one launch. A program takes a tile of ``BLOCK_T`` tokens x ``D/2``
frequencies, evaluates its cos/sin once (fp32 ``tl.cos``/``tl.sin`` lower to libdevice's accurate
``__nv_cosf``/``__nv_sinf``, not the ``.approx`` instructions, so large angles keep fp32 accuracy),
then rotates that token tile for a run of heads of the concatenated list (q's heads, then k's). q and
k may be strided views (slices of a fused qkv projection): only their last dim must be contiguous.
The outputs are new contiguous tensors.

Backward: the rotation is orthogonal, so its gradient is the rotation by the negated angle; with the
reference's roundings that is exactly the forward with sin negated (sin_scale = -s), see
``_rope_backward``. The kernel is the custom op ``arkfast::apply_rope``, one node under
``torch.compile``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._aot import KernelSpec
from ._common import TRITON_TYPE
from ._dispatch import use_triton

MAX_HEAD_DIM = 256
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """The fp32 inverse frequencies ``[head_dim // 2]`` and the attention factor for a rope config.

    ``scaling`` is the config's ``rope_scaling`` / ``rope_parameters`` dict; supported types are
    ``default`` (or None) and ``llama3``. Anything else raises ``ValueError``.
    """
    if head_dim % 2:
        raise ValueError(f"rotary head_dim must be even, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) or "default"
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: default, llama3")
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by the factor, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, inv_freq_ptr,
    n_tokens, n_q_heads, n_heads, half, heads_per_prog,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    cos_scale, sin_scale,
    BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Program (i, j) rotates tokens [i * BLOCK_T, (i + 1) * BLOCK_T) of heads
    [j * heads_per_prog, (j + 1) * heads_per_prog) of the concatenated head list (q's heads, then k's)."""
    dtype = q_out_ptr.dtype.element_ty
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    cols = tl.arange(0, BLOCK_HALF)  # [BLOCK_HALF]
    mask = (toks < n_tokens)[:, None] & (cols < half)[None, :]  # [BLOCK_T, BLOCK_HALF]

    # angle = float(position) * inv_freq[i] in fp32, as the reference; cos/sin scaled in fp32, then
    # rounded to the input dtype (cos.to(x.dtype)). One angle per tile element: the tile has as many
    # elements as the program's threads hold, so no thread evaluates the same cos twice.
    pos = tl.load(pos_ptr + toks, mask=toks < n_tokens, other=0).to(tl.float32)  # [BLOCK_T]
    inv_freq = tl.load(inv_freq_ptr + cols, mask=cols < half, other=0.0)  # [BLOCK_HALF]
    angle = pos[:, None] * inv_freq[None, :]  # [BLOCK_T, BLOCK_HALF]
    cos = (tl.cos(angle) * cos_scale).to(dtype).to(tl.float32)
    sin = (tl.sin(angle) * sin_scale).to(dtype).to(tl.float32)

    # Element offsets in int64: token * token_stride passes 2**31 in long packed batches, and so can
    # head * head_stride for head-major views ([H, T, D] transposed: head stride T * D).
    rows = toks.to(tl.int64)[:, None]
    cols = cols[None, :]
    h_start = tl.program_id(1).to(tl.int64) * heads_per_prog  # an int64 loop: h is int64 below
    for h in range(h_start, tl.minimum(h_start + heads_per_prog, n_heads)):
        is_q = h < n_q_heads
        x_ptrs = (tl.where(is_q, q_ptr + h * stride_qh, k_ptr + (h - n_q_heads) * stride_kh)
                  + rows * tl.where(is_q, stride_qt, stride_kt) + cols)
        o_ptrs = (tl.where(is_q, q_out_ptr + h * stride_qoh, k_out_ptr + (h - n_q_heads) * stride_koh)
                  + rows * tl.where(is_q, stride_qot, stride_kot) + cols)
        x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_HALF] first half
        x2 = tl.load(x_ptrs + half, mask=mask, other=0.0).to(tl.float32)  # second half
        # The reference rounds each product to the input dtype, then the sum: x * cos + rotated * sin
        # with rotated = (-x2, x1). A product of two bf16/fp16 values is exact in fp32, so rounding it
        # once here gives torch's result bit for bit on GPU.
        o1 = (x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)
        o2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
        tl.store(o_ptrs, o1.to(dtype), mask=mask)
        tl.store(o_ptrs + half, o2.to(dtype), mask=mask)


def _launch_config(n_tokens: int, n_heads: int, head_dim: int) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_HALF, heads_per_prog)``: 1024-element tiles (8 per thread), and up to 8 heads
    per program (fewer cos/sin evaluations) while that still leaves about 1024 programs."""
    block_half = max(32, triton.next_power_of_2(head_dim // 2))
    block_t = 1024 // block_half
    token_blocks = triton.cdiv(n_tokens, block_t)
    heads_per_prog = max(1, min(8, token_blocks * n_heads // 1024))
    return block_t, block_half, heads_per_prog


def _apply_rope_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                       attention_scaling: float = 1.0, *, q_out: torch.Tensor | None = None,
                       k_out: torch.Tensor | None = None, sin_sign: float = 1.0):
    """Host launcher. ``q [T, Hq, D]``, ``k [T, Hkv, D]`` (same float dtype, last dim contiguous, any
    token/head strides), ``positions [T]`` int32/int64 and ``inv_freq [D/2]`` on q's device.

    ``q_out``/``k_out`` (shaped and typed like q/k, last dim contiguous) are written when given (tests
    pass NaN-filled ones), else allocated contiguous. ``sin_sign=-1`` rotates by the negated angle (the
    backward). Returns ``(q_out, k_out)``.
    """
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [T, heads, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    T, n_q, D = q.shape
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k {tuple(k.shape)} must have q's token count and head dim ({T}, *, {D})")
    if q.dtype not in _SUPPORTED or k.dtype != q.dtype:
        raise TypeError(f"q and k must share one of {_SUPPORTED}, got {q.dtype} and {k.dtype}")
    if D % 2 or not 2 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be even and in [2, {MAX_HEAD_DIM}], got {D}")
    if positions.shape != (T,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32/int64 of shape ({T},), got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if inv_freq.shape != (D // 2,):
        raise ValueError(f"inv_freq must have shape ({D // 2},), got {tuple(inv_freq.shape)}")
    for name, t in (("k", k), ("positions", positions), ("inv_freq", inv_freq)):
        if t.device != q.device:  # a silent host-to-device copy per layer would be a hidden sync
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: move it once, up front")
    for name, t in (("q", q), ("k", k), ("q_out", q_out), ("k_out", k_out)):
        if t is not None and t.stride(2) != 1:
            raise ValueError(f"{name}'s last dim must be contiguous, got strides {tuple(t.stride())}")
    for name, buf, like in (("q_out", q_out, q), ("k_out", k_out, k)):
        if buf is not None and (buf.shape != like.shape or buf.dtype != like.dtype or buf.device != q.device):
            raise ValueError(f"{name} must be {tuple(like.shape)} {like.dtype} on {q.device}, "
                             f"got {tuple(buf.shape)} {buf.dtype} on {buf.device}")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k_out is None else k_out
    inv_freq = inv_freq.to(torch.float32).contiguous()  # no-op for the fp32 buffer models keep
    positions = positions.contiguous()
    n_heads = n_q + k.shape[1]
    if T:
        block_t, block_half, heads_per_prog = _launch_config(T, n_heads, D)
        grid = (triton.cdiv(T, block_t), triton.cdiv(n_heads, heads_per_prog))
        _rope_kernel[grid](
            q, k, q_out, k_out, positions, inv_freq,
            T, n_q, n_heads, D // 2, heads_per_prog,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            float(attention_scaling), float(sin_sign * attention_scaling),
            BLOCK_T=block_t, BLOCK_HALF=block_half, num_warps=4,
        )
    return q_out, k_out


@torch.library.custom_op("arkfast::apply_rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
             attention_scaling: float, sin_sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel as one opaque op (forward with ``sin_sign = 1``, backward with -1)."""
    return _apply_rope_triton(q, k, positions, inv_freq, attention_scaling, sin_sign=sin_sign)


@_rope_op.register_fake
def _(q, k, positions, inv_freq, attention_scaling, sin_sign):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_setup_context(ctx, inputs, output):
    _, _, positions, inv_freq, attention_scaling, sin_sign = inputs
    ctx.save_for_backward(positions, inv_freq)
    ctx.attention_scaling, ctx.sin_sign = attention_scaling, sin_sign


def _rope_backward(ctx, grad_q, grad_k):
    """Kernel forward and backward. out = R(a) x with R(a) a rotation of each (x_i, x_{i+D/2}) pair, so
    dL/dx = R(a)^T g = R(-a) g: the same kernel with sin negated. The reference's autograd gives
    g1 * cos + g2 * sin and g2 * cos - g1 * sin with each product rounded to the dtype: the same
    roundings as the forward with -sin."""
    positions, inv_freq = ctx.saved_tensors
    grad_q = grad_q if grad_q.stride(2) == 1 else grad_q.contiguous()
    grad_k = grad_k if grad_k.stride(2) == 1 else grad_k.contiguous()
    gq, gk = _rope_op(grad_q, grad_k, positions, inv_freq, ctx.attention_scaling, -ctx.sin_sign)
    return gq, gk, None, None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
               attention_scaling: float = 1.0):
    """Apply rotary embeddings to ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` at ``positions [T]``.

    q and k share a float dtype (float32/bfloat16/float16); on the kernel path their last dim must be
    contiguous (token and head strides are free, e.g. slices of a fused qkv output) and ``positions``
    (int32/int64) and ``inv_freq [D/2]`` (fp32, from :func:`rope_inv_freq`) must be on their device.
    Returns new ``(q [T, Hq, D], k [T, Hkv, D])``; the inputs are not modified. Dispatches per the
    package rule; differentiable in q and k.

    Example::

        inv_freq, scale = rope_inv_freq(128, 500000.0, {"rope_type": "llama3", ...})
        q, k = apply_rope(qkv[:, :32], qkv[:, 32:40], positions, inv_freq.cuda(), scale)
    """
    if use_triton(q, k):
        return _rope_op(q, k, positions, inv_freq, float(attention_scaling), 1.0)
    return apply_rope_reference(q, k, positions, inv_freq, attention_scaling)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                         inv_freq: torch.Tensor, attention_scaling: float = 1.0):
    """Torch reference. ``q [T, Hq, D]``, ``k [T, Hkv, D]``, ``positions [T]`` (int), ``inv_freq [D/2]``
    fp32. Returns new ``(q, k)`` in the input dtypes."""
    freqs = positions.float()[:, None] * inv_freq.float().to(positions.device)[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    cos = (emb.cos() * attention_scaling)[:, None, :]
    sin = (emb.sin() * attention_scaling)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)

    return rotate(q), rotate(k)




def aot_specs() -> list[KernelSpec]:
    """Every (dtype, positions dtype, BLOCK_HALF) the launcher picks for head_dim up to MAX_HEAD_DIM
    (BLOCK_T follows from BLOCK_HALF). Strides are marked 16-divisible, as the JIT specialises them for
    real head dims (D = 64, 128: every stride is); D = 80/96 fall back to narrower loads."""
    specs = []
    for dt in TRITON_TYPE.values():
        for pt in ("i64", "i32"):
            for block_half in (32, 64, 128):
                block_t, _, _ = _launch_config(1, 1, 2 * block_half)
                specs.append(KernelSpec(
                    name=f"rope_{dt}_pos{pt}_t{block_t}_half{block_half}",
                    fn=_rope_kernel,
                    signature={"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "q_out_ptr": f"*{dt}",
                               "k_out_ptr": f"*{dt}", "pos_ptr": f"*{pt}", "inv_freq_ptr": "*fp32",
                               "n_tokens": "i32", "n_q_heads": "i32", "n_heads": "i32", "half": "i32",
                               "heads_per_prog": "i32",
                               "stride_qt": "i32", "stride_qh": "i32", "stride_kt": "i32",
                               "stride_kh": "i32", "stride_qot": "i32", "stride_qoh": "i32",
                               "stride_kot": "i32", "stride_koh": "i32",
                               "cos_scale": "fp32", "sin_scale": "fp32",
                               "BLOCK_T": "constexpr", "BLOCK_HALF": "constexpr"},
                    constexprs={"BLOCK_T": block_t, "BLOCK_HALF": block_half},
                    num_warps=4,
                    aligned=("q_ptr", "k_ptr", "q_out_ptr", "k_out_ptr", "pos_ptr", "inv_freq_ptr",
                             "half", "stride_qt", "stride_qh", "stride_kt", "stride_kh",
                             "stride_qot", "stride_qoh", "stride_kot", "stride_koh"),
                ))
    return specs
