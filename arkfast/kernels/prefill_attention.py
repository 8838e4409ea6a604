"""Prefill attention: varlen causal attention over packed sequences (kernels and torch references).

Sequences are concatenated along the token dim; ``cu_seqlens [B + 1]`` (int32, starting at 0) marks
where each begins. No token attends across sequences. GQA: query head h reads KV head
``h // (Hq // Hkv)``. Scores and softmax in fp32; probabilities cast to the input dtype before the
multiply with V, as transformers' eager attention does.

Paged-prefix form (chunked prefill, prefix reuse): sequence b first has ``cached_lens[b]`` tokens in the
paged KV cache (layout in :mod:`arkfast.kernels.paged_kv`), read through ``block_tables[b]``; its new
tokens sit at positions ``cached_lens[b] + i`` and see every cached token plus the new ones causally.

Kernel path: causal, head dim <= 128 (tiles 64 and 128 wide; a smaller head dim is zero-padded), bf16
and fp16 (fp32 too on CPU tensors, through the interpreter); anything else runs the reference.

Kernel layout. One program owns one tile of ``BLOCK_M`` query rows of one sequence: ``BLOCK_M // G``
consecutive tokens times the ``G`` query heads that share a KV head, stacked as rows (row r is token
``r // G``, head ``r % G``; G is the launcher's ``heads_per_prog``, a divisor of ``Hq // Hkv``). So each
K/V tile is loaded once for the G heads that read it, a short sequence still fills the tensor-core
tile (17 tokens x 4 heads = 68 rows instead of 17 rows in each of 4 programs), the causal diagonal
spans fewer keys per tile, and in the backward one program owns every query head of its KV head, so dK
and dV are summed over the group in registers, without atomics or a per-query-head dK/dV buffer.

Online softmax in base 2 (FlashAttention-2, Dao 2023, arXiv:2307.08691). With natural-log scores
``x_j = scale * q . k_j`` and ``log2(e) = 1 / ln 2``, ``exp(x_j - c) = 2^((x_j - c) * log2(e))``, so the
kernel works with ``u_j = (scale * log2(e)) * q . k_j`` (one multiply: ``qk_scale``) and ``exp2``:
    m' = max(m, max_j u_j)          p_j = 2^(u_j - m')        alpha = 2^(m - m')
    l' = alpha * l + sum_j p_j      acc' = alpha * acc + p @ V    (p cast to the input dtype)
and at the end ``out = acc / l`` and the natural-log ``LSE = ln(sum_j e^(x_j)) = (m + log2 l) * ln 2``.
Every LSE this module stores or returns is natural-log, ``[T, Hq]`` fp32; the backward multiplies it by
log2(e) again to recompute ``p_j = 2^(u_j - LSE * log2 e)``.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ._aot import KernelSpec
from ._common import DTYPES, JIT_LN_2, JIT_LOG2_E, LOG2_E, TRITON_TYPE
from ._dispatch import interpreter_enabled, use_triton
from .paged_kv import check_cache, gather_kv_reference

_TILE_DIMS = (64, 128)  # compiled head-dim tile widths; a smaller head dim is zero-padded to 64
# fp32 runs the kernels on CPU tensors (the interpreter) only. At IEEE precision it has no tensor-core
# path on the GPU: its FMA kernels would be slow, and building them for sm_90 takes longer than all the
# 16-bit ones together; on CUDA, fp32 (a debugging dtype there) runs the exact torch reference.
_GPU_DTYPES = (torch.bfloat16, torch.float16)
_MAX_HEAD_DIM = 128
_MAX_GRID_Y = 65535
# Triton's CPU interpreter (3.9) multiplies bf16 tiles as their raw uint16 bit patterns in tl.dot; under
# it, _mma upcasts operands to fp32 first. Same result: products of bf16/fp16 values are exact in fp32,
# and the GPU's tensor-core MMA accumulates them in fp32 too.
_INTERPRETED = tl.constexpr(interpreter_enabled())


# ---------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _mma(a, b, DOT_PRECISION: tl.constexpr):
    """``a @ b`` accumulated in fp32 (see _INTERPRETED)."""
    if _INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k, v, qk_scale, keep, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step (module docstring) of q [BM, HEAD_DIM] against k, v [BN, HEAD_DIM];
    keep [BM, BN] (read only when MASKED) marks the visible keys."""
    s = _mma(q, tl.trans(k), DOT_PRECISION) * qk_scale  # [BM, BN], log2 units
    if MASKED:
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # m_i starts finite (-1e30): no (-inf) - (-inf) NaN
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,          # q/out [T, Hq, D], k/v [T, Hkv, D], lse [T, Hq]
    cu_seqlens_ptr,                                  # [B + 1] int32
    k_cache_ptr, v_cache_ptr,                        # [num_blocks, block_size, Hkv, D] (PAGED)
    block_tables_ptr, cached_lens_ptr,               # [B, max_blocks] int32, [B] int32 (PAGED)
    qk_scale, head_dim, group_size, heads_per_prog, num_head_chunks,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lt,
    stride_cb, stride_cs, stride_ch, stride_bt, page_shift,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Causal; HEAD_DIM is the tile width (head_dim <= HEAD_DIM, the rest of the tile is zeros)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seq = pid_bh // num_head_chunks
    head0 = (pid_bh % num_head_chunks) * heads_per_prog
    kv_head = head0 // group_size
    start = tl.load(cu_seqlens_ptr + seq)
    seq_len = tl.load(cu_seqlens_ptr + seq + 1) - start
    tile_tokens = BLOCK_M // heads_per_prog
    m0 = pid_m * tile_tokens                       # first new token of this tile
    if m0 >= seq_len:
        return

    rows = tl.arange(0, BLOCK_M)
    tok = m0 + rows // heads_per_prog              # [BM] new-token index within the sequence
    head = head0 + rows % heads_per_prog           # [BM] query head
    row_ok = (rows < tile_tokens * heads_per_prog) & (tok < seq_len)
    dims = tl.arange(0, HEAD_DIM)
    d_ok = (dims < head_dim)[None, :]              # [1, HEAD_DIM]
    cols = tl.arange(0, BLOCK_N)
    tok64 = (start + tok).to(tl.int64)
    q = tl.load(q_ptr + tok64[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & d_ok, other=0.0)   # [BM, HEAD_DIM]
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    if PAGED:
        # Cached prefix: every cached token is visible to every new token. Key n of the prefix is in
        # page block_tables[seq, n >> page_shift] at offset n & (block_size - 1); rows are gathered.
        n_cached = tl.load(cached_lens_ptr + seq)
        table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        in_page = (1 << page_shift) - 1
        full_end = (n_cached // BLOCK_N) * BLOCK_N
        for n0 in range(0, full_end, BLOCK_N):
            n = n0 + cols
            page = tl.load(table + (n >> page_shift))
            slot = page.to(tl.int64) * stride_cb + (n & in_page) * stride_cs + kv_head * stride_ch  # [BN]
            k = tl.load(k_cache_ptr + slot[:, None] + dims[None, :], mask=d_ok, other=0.0)
            v = tl.load(v_cache_ptr + slot[:, None] + dims[None, :], mask=d_ok, other=0.0)
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, qk_scale, 0, False, DOT_PRECISION)
        for n0 in range(full_end, n_cached, BLOCK_N):  # the partial last block, if any
            n = n0 + cols
            n_ok = n < n_cached
            page = tl.load(table + (n >> page_shift), mask=n_ok, other=0)
            slot = page.to(tl.int64) * stride_cb + (n & in_page) * stride_cs + kv_head * stride_ch
            k = tl.load(k_cache_ptr + slot[:, None] + dims[None, :], mask=n_ok[:, None] & d_ok, other=0.0)
            v = tl.load(v_cache_ptr + slot[:, None] + dims[None, :], mask=n_ok[:, None] & d_ok, other=0.0)
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, qk_scale, n_ok[None, :], True,
                                         DOT_PRECISION)

    # New keys: blocks wholly before this tile's first token are visible to every row and need no
    # mask; the blocks on the causal diagonal (up to the tile's last token) are masked.
    free_end = (m0 // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(m0 + tile_tokens, seq_len)
    k_base = k_ptr + start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = v_ptr + start.to(tl.int64) * stride_vt + kv_head * stride_vh
    for n0 in range(0, free_end, BLOCK_N):
        n = (n0 + cols).to(tl.int64)
        k = tl.load(k_base + n[:, None] * stride_kt + dims[None, :], mask=d_ok, other=0.0)
        v = tl.load(v_base + n[:, None] * stride_vt + dims[None, :], mask=d_ok, other=0.0)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, qk_scale, 0, False, DOT_PRECISION)
    for n0 in range(free_end, kv_end, BLOCK_N):
        n = n0 + cols
        kv_mask = (n < seq_len)[:, None] & d_ok
        k = tl.load(k_base + n.to(tl.int64)[:, None] * stride_kt + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + n.to(tl.int64)[:, None] * stride_vt + dims[None, :], mask=kv_mask, other=0.0)
        keep = (n[None, :] <= tok[:, None]) & (n[None, :] < seq_len)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, qk_scale, keep, True, DOT_PRECISION)

    # Every row saw at least one key (new token 0 is visible to all), so l_i >= 1.
    out = acc / l_i[:, None]
    tl.store(out_ptr + tok64[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok)
    lse = (m_i + tl.log2(l_i)) * JIT_LN_2  # base 2 -> natural log: times ln 2
    tl.store(lse_ptr + tok64 * stride_lt + head, lse, mask=row_ok)


def _check_grid_y(programs: int, what: str) -> None:
    """CUDA caps a grid's y dimension at 65535; the interpreter does not, so check on the host."""
    if programs > _MAX_GRID_Y:
        raise ValueError(f"{what} = {programs} programs exceeds the grid limit {_MAX_GRID_Y}")


def _tile_dim(head_dim: int) -> int:
    """The compiled head-dim tile width for a head dim <= 128 (64 or 128)."""
    return 64 if head_dim <= 64 else 128


def _fwd_params(tile_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M rows, BLOCK_N keys, num_warps, num_stages) of the forward. 16-bit tiles fill Hopper's
    wgmma (64 rows per warpgroup; 128 KiB of shared memory at D = 128); fp32 (interpreter only) uses
    small tiles."""
    if dtype == torch.float32:
        return 64, 32, 4, 2
    return (128, 64, 4, 3) if tile_dim == 64 else (128, 64, 8, 3)


def _heads_per_prog(group_size: int, block_m: int) -> int:
    """Query heads stacked per tile: the largest divisor of the GQA group keeping >= 8 tokens a tile."""
    return max(d for d in range(1, min(group_size, block_m // 8) + 1) if group_size % d == 0)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must match the fp32 reference: no TF32 rounding of the operands.
    return "ieee" if dtype == torch.float32 else "tf32"


def kernel_supports(q: torch.Tensor, causal: bool = True) -> bool:
    """Whether the Triton kernels take these inputs: causal, head dim <= 128, bf16/fp16 (and fp32 on CPU
    tensors, through the interpreter). The public functions run the torch reference otherwise, also on
    CUDA."""
    dtypes = _GPU_DTYPES if q.is_cuda else DTYPES
    return causal and q.dim() == 3 and 0 < q.shape[-1] <= _MAX_HEAD_DIM and q.dtype in dtypes


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [T, Hq, D] and k, v [T, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    T, Hq, D = q.shape
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k/v {tuple(k.shape)} must have q's token count {T} and head dim {D}")
    if Hq % k.shape[1]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({k.shape[1]})")
    if not 0 < D <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} is not supported by the kernel (at most {_MAX_HEAD_DIM})")
    dtypes = _GPU_DTYPES if q.is_cuda else DTYPES
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype of {dtypes} on {q.device.type}; got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit last-dim stride, got strides {t.stride()}")
    if (cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype != torch.int32
            or cu_seqlens.stride(0) != 1):
        raise ValueError(f"cu_seqlens must be a contiguous [B + 1] int32 tensor, got {tuple(cu_seqlens.shape)} "
                         f"{cu_seqlens.dtype} strides {cu_seqlens.stride()}")
    for name, t in (("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        if t.device != q.device:  # a CPU index tensor next to CUDA q: the kernel would read a host pointer
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")


def _check_paged(k_cache, v_cache, block_tables, cached_lens, q: torch.Tensor, Hkv: int, B: int) -> None:
    """The paged-prefix inputs: the caches (:func:`~.paged_kv.check_cache`, blocks of >= 16 tokens)
    and ``block_tables [B, W]`` / ``cached_lens [B]`` int32 on ``q``'s device."""
    check_cache(k_cache, v_cache, head_dim=q.shape[-1], dtype=q.dtype, device=q.device, num_kv_heads=Hkv,
                min_block_size=16)
    if (block_tables.dim() != 2 or block_tables.shape[0] != B or block_tables.dtype != torch.int32
            or block_tables.stride(1) != 1):
        raise ValueError(f"block_tables must be [B={B}, max_blocks] int32 with unit column stride, "
                         f"got {tuple(block_tables.shape)} {block_tables.dtype}")
    if cached_lens.shape != (B,) or cached_lens.dtype != torch.int32 or cached_lens.stride(0) != 1:
        raise ValueError(f"cached_lens must be a contiguous [B={B}] int32 tensor, got "
                         f"{tuple(cached_lens.shape)} {cached_lens.dtype} strides {cached_lens.stride()}")
    for name, t in (("block_tables", block_tables), ("cached_lens", cached_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")


def _resolve_max_seqlen(cu_seqlens: torch.Tensor, max_seqlen: int | None) -> int:
    if max_seqlen is not None:
        if max_seqlen < 0:
            raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
        return int(max_seqlen)
    if cu_seqlens.numel() < 2:
        return 0
    # Host sync (reads cu_seqlens back) only when the caller did not pass max_seqlen.
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())


def _prefill_attention_triton(q, k, v, cu_seqlens, max_seqlen=None, scale=None, causal=True,
                              k_cache=None, v_cache=None, block_tables=None, cached_lens=None,
                              *, out=None, return_lse=False):
    """Launcher for both forms (see :func:`prefill_attention`); ``out [T, Hq, D]`` may be given (only
    rows of tokens inside a sequence are written). Returns ``out`` or ``(out, lse)``, ``lse [T, Hq]``
    fp32 natural log (uninitialised for tokens in no sequence)."""
    _check_qkv(q, k, v, cu_seqlens)
    if not causal:
        raise ValueError("the prefill kernels are causal only; causal=False runs the torch reference")
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    B = cu_seqlens.numel() - 1
    paged = k_cache is not None
    if paged:
        _check_paged(k_cache, v_cache, block_tables, cached_lens, q, Hkv, B)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a unit last-dim stride, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    lse = torch.empty(T, Hq, dtype=torch.float32, device=q.device)
    max_seqlen = _resolve_max_seqlen(cu_seqlens, max_seqlen)
    scale = D ** -0.5 if scale is None else float(scale)
    tile_dim = _tile_dim(D)
    block_m, block_n, num_warps, num_stages = _fwd_params(tile_dim, q.dtype)
    group = Hq // Hkv
    hpp = _heads_per_prog(group, block_m)
    chunks = Hq // hpp
    _check_grid_y(B * chunks, "B * Hq / heads_per_prog")
    if T == 0 or B == 0 or max_seqlen == 0:
        return (out, lse) if return_lse else out
    if not paged:  # the prefix loop is compiled out; these only fill the pointer slots
        k_cache, v_cache, block_tables, cached_lens = k, v, cu_seqlens[None, :], cu_seqlens
    block_size = k_cache.shape[1] if paged else 16
    grid = (triton.cdiv(max_seqlen, block_m // hpp), B * chunks)
    _prefill_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens, k_cache, v_cache, block_tables, cached_lens,
        scale * LOG2_E, D, group, hpp, chunks,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        block_size.bit_length() - 1,
        HEAD_DIM=tile_dim, BLOCK_M=block_m, BLOCK_N=block_n, PAGED=paged,
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return (out, lse) if return_lse else out


def _varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen=None, scale=None, causal=True, *, out=None):
    """Forward launcher of the no-cache form (what :func:`varlen_attention` runs without grad)."""
    return _prefill_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale, causal, out=out)


# ---------------------------------------------------------------------------------------------------
# Backward (FlashAttention-2, Algorithm 2). With S = scale * Q K^T, P = softmax(S), O = P V:
#   dV = P^T dO          dP = dO V^T          dS = P * (dP - delta),  delta_i = sum_j P_ij dP_ij
#   dQ = scale * dS K    dK = scale * dS^T Q
# and delta_i = sum_j P_ij (dO_i . V_j) = dO_i . O_i, computed once per row by a preprocess kernel.
# P is recomputed from the saved LSE: P_ij = 2^(u_ij - LSE_i * log2 e). Two main kernels avoid atomics:
# one walks queries for a block of keys (dK, dV, all query heads of the KV head), one walks keys for a
# tile of query rows (dQ).
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess_kernel(out_ptr, dout_ptr, delta_ptr, num_rows, num_heads, head_dim,
                           stride_ot, stride_oh, stride_dt, stride_dh,
                           HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # flat (token, head) rows of [T, Hq]
    tok = (rows // num_heads).to(tl.int64)
    head = rows % num_heads
    dims = tl.arange(0, HEAD_DIM)
    mask = (rows < num_rows)[:, None] & (dims < head_dim)[None, :]
    o = tl.load(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + tok[:, None] * stride_dt + head[:, None] * stride_dh + dims[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + rows, tl.sum(o * do, 1), mask=rows < num_rows)  # delta [T, Hq] contiguous


@triton.jit
def _dkdv_tile(dk, dv, k, v, n, q_ptr, dout_ptr, lse_ptr, delta_ptr, start, seq_len, m0, row_tok,
               head, row_in, dims, d_ok, qk_scale, stride_qt, stride_qh, stride_dt, stride_dh, stride_lt,
               MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add one query tile's share to dK, dV [BN, HEAD_DIM] of keys n [BN]; computed transposed (keys
    as rows), so P^T and dS^T come straight out of the dots."""
    tok = m0 + row_tok                                        # [BM]
    ok = row_in & (tok < seq_len)
    tok64 = (start + tok).to(tl.int64)
    q = tl.load(q_ptr + tok64[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=ok[:, None] & d_ok, other=0.0)          # [BM, HEAD_DIM]
    do = tl.load(dout_ptr + tok64[:, None] * stride_dt + head[:, None] * stride_dh + dims[None, :],
                 mask=ok[:, None] & d_ok, other=0.0)         # [BM, HEAD_DIM]
    # Rows past the end load q = dO = 0 and LSE = delta = 0: P^T = 1 there, and they add zero.
    lse2 = tl.load(lse_ptr + tok64 * stride_lt + head, mask=ok, other=0.0) * JIT_LOG2_E
    delta = tl.load(delta_ptr + tok64 * stride_lt + head, mask=ok, other=0.0)
    p_t = tl.exp2(_mma(k, tl.trans(q), DOT_PRECISION) * qk_scale - lse2[None, :])  # [BN, BM]
    if MASKED:
        p_t = tl.where(tok[None, :] >= n[:, None], p_t, 0.0)  # causal
    dv += _mma(p_t.to(do.dtype), do, DOT_PRECISION)
    dp_t = _mma(v, tl.trans(do), DOT_PRECISION)               # [BN, BM]
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _mma(ds_t.to(q.dtype), q, DOT_PRECISION)
    return dk, dv


@triton.jit
def _prefill_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_seqlens_ptr,
    sm_scale, qk_scale, head_dim, group_size, heads_per_prog, num_kv_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dt, stride_dh, stride_lt,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seq = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads
    start = tl.load(cu_seqlens_ptr + seq)
    seq_len = tl.load(cu_seqlens_ptr + seq + 1) - start
    n0 = pid_n * BLOCK_N
    if n0 >= seq_len:
        return
    n = n0 + tl.arange(0, BLOCK_N)
    n64 = (start + n).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM)
    d_ok = (dims < head_dim)[None, :]
    kv_mask = (n < seq_len)[:, None] & d_ok
    k = tl.load(k_ptr + n64[:, None] * stride_kt + kv_head * stride_kh + dims[None, :],
                mask=kv_mask, other=0.0)                      # [BN, HEAD_DIM]
    v = tl.load(v_ptr + n64[:, None] * stride_vt + kv_head * stride_vh + dims[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    tile_tokens = BLOCK_M // heads_per_prog
    rows = tl.arange(0, BLOCK_M)
    row_tok = rows // heads_per_prog
    row_in = rows < tile_tokens * heads_per_prog
    # Causal: query tiles ending before n0 see none of these keys; tiles starting before the block's
    # last key straddle the diagonal (masked); the later ones see every key of the block.
    q_lo = (n0 // tile_tokens) * tile_tokens
    diag_end = q_lo + tl.cdiv(tl.minimum(n0 + BLOCK_N, seq_len) - q_lo, tile_tokens) * tile_tokens
    for chunk in range(group_size // heads_per_prog):  # every query head reading this KV head
        head = kv_head * group_size + chunk * heads_per_prog + rows % heads_per_prog  # [BM]
        for m0 in range(q_lo, diag_end, tile_tokens):
            dk, dv = _dkdv_tile(dk, dv, k, v, n, q_ptr, dout_ptr, lse_ptr, delta_ptr, start, seq_len, m0,
                                row_tok, head, row_in, dims, d_ok, qk_scale, stride_qt, stride_qh,
                                stride_dt, stride_dh, stride_lt, True, DOT_PRECISION)
        for m0 in range(diag_end, seq_len, tile_tokens):
            dk, dv = _dkdv_tile(dk, dv, k, v, n, q_ptr, dout_ptr, lse_ptr, delta_ptr, start, seq_len, m0,
                                row_tok, head, row_in, dims, d_ok, qk_scale, stride_qt, stride_qh,
                                stride_dt, stride_dh, stride_lt, False, DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(dk_ptr + n64[:, None] * stride_dkt + kv_head * stride_dkh + dims[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + n64[:, None] * stride_dvt + kv_head * stride_dvh + dims[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k, v, qk_scale, keep, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add one key block's share to dQ [BM, HEAD_DIM] (before the final multiply by the scale)."""
    p = tl.exp2(_mma(q, tl.trans(k), DOT_PRECISION) * qk_scale - lse2[:, None])  # [BM, BN]
    if MASKED:
        p = tl.where(keep, p, 0.0)  # also zeroes keys past the end (k = 0 there, so p may overflow)
    dp = _mma(do, tl.trans(v), DOT_PRECISION)                 # [BM, BN]
    ds = p * (dp - delta[:, None])
    return dq + _mma(ds.to(k.dtype), k, DOT_PRECISION)


@triton.jit
def _prefill_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, cu_seqlens_ptr,
    sm_scale, qk_scale, head_dim, group_size, heads_per_prog, num_head_chunks,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dt, stride_dh, stride_lt,
    stride_dqt, stride_dqh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seq = pid_bh // num_head_chunks
    head0 = (pid_bh % num_head_chunks) * heads_per_prog
    kv_head = head0 // group_size
    start = tl.load(cu_seqlens_ptr + seq)
    seq_len = tl.load(cu_seqlens_ptr + seq + 1) - start
    tile_tokens = BLOCK_M // heads_per_prog
    m0 = pid_m * tile_tokens
    if m0 >= seq_len:
        return
    rows = tl.arange(0, BLOCK_M)
    tok = m0 + rows // heads_per_prog
    head = head0 + rows % heads_per_prog
    row_ok = (rows < tile_tokens * heads_per_prog) & (tok < seq_len)
    dims = tl.arange(0, HEAD_DIM)
    d_ok = (dims < head_dim)[None, :]
    cols = tl.arange(0, BLOCK_N)
    tok64 = (start + tok).to(tl.int64)
    q = tl.load(q_ptr + tok64[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & d_ok, other=0.0)
    do = tl.load(dout_ptr + tok64[:, None] * stride_dt + head[:, None] * stride_dh + dims[None, :],
                 mask=row_ok[:, None] & d_ok, other=0.0)
    lse2 = tl.load(lse_ptr + tok64 * stride_lt + head, mask=row_ok, other=0.0) * JIT_LOG2_E
    delta = tl.load(delta_ptr + tok64 * stride_lt + head, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    free_end = (m0 // BLOCK_N) * BLOCK_N              # same split as the forward
    kv_end = tl.minimum(m0 + tile_tokens, seq_len)
    k_base = k_ptr + start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = v_ptr + start.to(tl.int64) * stride_vt + kv_head * stride_vh
    for n0 in range(0, free_end, BLOCK_N):
        n = (n0 + cols).to(tl.int64)
        k = tl.load(k_base + n[:, None] * stride_kt + dims[None, :], mask=d_ok, other=0.0)
        v = tl.load(v_base + n[:, None] * stride_vt + dims[None, :], mask=d_ok, other=0.0)
        dq = _dq_tile(dq, q, do, lse2, delta, k, v, qk_scale, 0, False, DOT_PRECISION)
    for n0 in range(free_end, kv_end, BLOCK_N):
        n = n0 + cols
        kv_mask = (n < seq_len)[:, None] & d_ok
        k = tl.load(k_base + n.to(tl.int64)[:, None] * stride_kt + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + n.to(tl.int64)[:, None] * stride_vt + dims[None, :], mask=kv_mask, other=0.0)
        keep = (n[None, :] <= tok[:, None]) & (n[None, :] < seq_len)
        dq = _dq_tile(dq, q, do, lse2, delta, k, v, qk_scale, keep, True, DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(dq_ptr + tok64[:, None] * stride_dqt + head[:, None] * stride_dqh + dims[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok)


def _bwd_params(tile_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M rows, BLOCK_N keys, num_warps, num_stages), shared by the dK/dV and the dQ kernels."""
    if dtype == torch.float32:
        return 32, 32, 4, 2
    return (64, 64, 4, 3) if tile_dim == 64 else (64, 64, 8, 2)  # dK, dV [64, 128] fp32: 8 warps


def _preprocess_block(tile_dim: int) -> int:
    return 4096 // tile_dim


def _check_backward_grid(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor) -> int:
    """The backward's query heads per program; raises if its grids pass CUDA's y limit. Its tiles are
    half the forward's height, so it stacks fewer heads (GQA 16: 8 instead of 16) and can need twice
    the forward's programs in y: checked before the forward runs, not first at backward time."""
    B, Hq, Hkv = cu_seqlens.numel() - 1, q.shape[1], k.shape[1]
    hpp = _heads_per_prog(Hq // Hkv, _bwd_params(_tile_dim(q.shape[-1]), q.dtype)[0])
    _check_grid_y(B * Hkv, "backward B * Hkv")
    _check_grid_y(B * (Hq // hpp), "backward B * Hq / heads_per_prog")
    return hpp


def _varlen_attention_backward_triton(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    """dQ, dK, dV of the (causal) no-cache form, given the forward's ``out`` and natural-log
    ``lse [T, Hq]``."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    B = cu_seqlens.numel() - 1
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    # Zeroed: tokens in no sequence (past cu_seqlens[-1]) get zero gradients, as in the reference.
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if T == 0 or B == 0 or max_seqlen == 0:
        return dq, dk, dv
    tile_dim = _tile_dim(D)
    delta = torch.empty(T, Hq, dtype=torch.float32, device=q.device)
    rows = _preprocess_block(tile_dim)
    _bwd_preprocess_kernel[(triton.cdiv(T * Hq, rows),)](
        out, dout, delta, T * Hq, Hq, D, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        HEAD_DIM=tile_dim, BLOCK_R=rows, num_warps=4)
    block_m, block_n, num_warps, num_stages = _bwd_params(tile_dim, q.dtype)
    group = Hq // Hkv
    hpp = _check_backward_grid(q, k, cu_seqlens)
    precision = _dot_precision(q.dtype)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               dout.stride(0), dout.stride(1), lse.stride(0))
    meta = {"HEAD_DIM": tile_dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "DOT_PRECISION": precision,
            "num_warps": num_warps, "num_stages": num_stages}
    _prefill_bwd_dkdv_kernel[(triton.cdiv(max_seqlen, block_n), B * Hkv)](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens, scale, scale * LOG2_E, D, group, hpp, Hkv,
        *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), **meta)
    _prefill_bwd_dq_kernel[(triton.cdiv(max_seqlen, block_m // hpp), B * (Hq // hpp))](
        q, k, v, dout, lse, delta, dq, cu_seqlens, scale, scale * LOG2_E, D, group, hpp, Hq // hpp,
        *strides, dq.stride(0), dq.stride(1), **meta)
    return dq, dk, dv


@torch.library.custom_op("arkfast::varlen_attention", mutates_args=())
def _varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal varlen forward as one opaque op: ``(out [T, Hq, D], lse [T, Hq] fp32)``."""
    return _prefill_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale, return_lse=True)


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[:2], dtype=torch.float32))


@torch.library.custom_op("arkfast::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
                                  max_seqlen: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _varlen_attention_backward_triton(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale)


@_varlen_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _varlen_setup_context(ctx, inputs, output):
    """The Triton forward saves (q, k, v, out, lse); the Triton FlashAttention-2 backward recomputes P
    from them."""
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _varlen_backward(ctx, dout, _grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _varlen_attention_backward_op(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_varlen_attention_op.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int | None = None, scale: float | None = None,
                     causal: bool = True) -> torch.Tensor:
    """Varlen (causal) attention over packed sequences; ``q [T, Hq, D]``, ``k/v [T, Hkv, D]``,
    ``cu_seqlens [B + 1]`` int32 → ``[T, Hq, D]`` in q's dtype. ``max_seqlen`` (the longest sequence)
    lets the kernel size its grid without reading ``cu_seqlens`` on the host (when it is None, it is
    computed with one host sync; under ``torch.compile`` pass it). Differentiable in q, k, v; the kernel
    path is the custom op ``arkfast::varlen_attention`` with the Triton backward. ``causal=False``, a
    head dim over 128 or another dtype run the torch reference, also on CUDA (see
    :func:`kernel_supports`). Rows of tokens past ``cu_seqlens[-1]`` are left unset.

    Example::

        q = torch.randn(40, 8, 64); k = v = torch.randn(40, 2, 64)
        cu = torch.tensor([0, 17, 40], dtype=torch.int32)
        out = varlen_attention(q, k, v, cu, max_seqlen=23)   # [40, 8, 64]
    """
    if use_triton(q, k, v) and kernel_supports(q, causal):
        _check_qkv(q, k, v, cu_seqlens)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            _check_backward_grid(q, k, cu_seqlens)
        max_seqlen = _resolve_max_seqlen(cu_seqlens, max_seqlen)
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        return _varlen_attention_op(q, k, v, cu_seqlens, max_seqlen, scale)[0]
    return varlen_attention_reference(q, k, v, cu_seqlens, scale, causal)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                      block_tables: torch.Tensor | None = None, cached_lens: torch.Tensor | None = None,
                      *, max_seqlen: int | None = None, scale: float | None = None,
                      return_lse: bool = False):
    """Causal prefill attention of new tokens over a paged cached prefix plus themselves.

    ``q [T, Hq, D]`` and ``k, v [T, Hkv, D]`` hold the new tokens of B sequences packed by
    ``cu_seqlens [B + 1]`` int32 (k/v need not be in the cache yet). ``k_cache, v_cache [num_blocks,
    block_size, Hkv, D]`` (q's dtype), ``block_tables [B, max_blocks]`` int32 and ``cached_lens [B]``
    int32: new token i of sequence b sits at position ``cached_lens[b] + i`` and attends to the
    ``cached_lens[b]`` cached tokens read through ``block_tables[b]``, then to new tokens 0..i. Pass all
    four cache arguments or none (then this is causal :func:`varlen_attention`). ``max_seqlen`` is the
    most new tokens of any sequence (None: computed with one host sync). Returns ``out [T, Hq, D]``, and
    with ``return_lse`` also ``lse [T, Hq]`` fp32, natural log, for merging with other partial states.
    Forward only on the kernel path: when grad is required the (differentiable) reference runs.

    Example (one sequence, 5 cached tokens in block 3, 2 new tokens)::

        k_cache, v_cache = allocate_kv_cache(1, 8, 16, 2, 64, torch.float32, "cpu")[0]
        out = prefill_attention(torch.randn(2, 8, 64), torch.randn(2, 2, 64), torch.randn(2, 2, 64),
                                torch.tensor([0, 2], dtype=torch.int32), k_cache, v_cache,
                                torch.tensor([[3]], dtype=torch.int32),
                                torch.tensor([5], dtype=torch.int32), max_seqlen=2)
    """
    cache_args = (k_cache, v_cache, block_tables, cached_lens)
    if any(a is None for a in cache_args) and not all(a is None for a in cache_args):
        raise ValueError("pass all of k_cache, v_cache, block_tables, cached_lens, or none of them")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if use_triton(q, k, v) and kernel_supports(q) and not needs_grad:
        return _prefill_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale, True, *cache_args,
                                         return_lse=return_lse)
    return prefill_attention_reference(q, k, v, cu_seqlens, *cache_args, scale=scale, return_lse=return_lse)


# ---------------------------------------------------------------------------------------------------
# Torch references
# ---------------------------------------------------------------------------------------------------
def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens: torch.Tensor, scale: float | None = None,
                               causal: bool = True) -> torch.Tensor:
    """``q [T, Hq, D]``, ``k/v [T, Hkv, D]``, ``cu_seqlens [B + 1]`` → ``out [T, Hq, D]``."""
    Hq, D = q.shape[1:]
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    scale = D ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()  # host loop over sequences: this is the reference, not a hot path
    for start, end in itertools.pairwise(bounds):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1)  # [Hq, L, D]
        ks = k[start:end].transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)
        vs = v[start:end].transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)
        # scores and softmax in fp32 for 16- and 32-bit inputs, in float64 for float64 ones (the same
        # maths as a float64 model, not fp32 roundings whose pattern depends on the GEMM's blocking)
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = (qs.to(acc) @ ks.to(acc).transpose(1, 2)) * scale  # [Hq, L, L]
        if causal:
            L = end - start
            mask = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
            scores.masked_fill_(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out[start:end] = (probs @ vs).transpose(0, 1)
    return out


def prefill_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                                k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                                block_tables: torch.Tensor | None = None,
                                cached_lens: torch.Tensor | None = None, *, scale: float | None = None,
                                return_lse: bool = False):
    """Torch reference of :func:`prefill_attention`: gathers each prefix and concatenates it with the
    new keys. Shapes as there; returns ``out`` or ``(out, lse [T, Hq] fp32 natural log)``."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros_like(q)
    lse = torch.zeros(T, Hq, dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()  # host loop over sequences: the reference, not a hot path
    prefix = [0] * (len(bounds) - 1) if cached_lens is None else cached_lens.tolist()
    for b, (start, end) in enumerate(itertools.pairwise(bounds)):
        if end == start:
            continue
        ks, vs = k[start:end], v[start:end]          # [L, Hkv, D]
        if prefix[b]:
            kc, vc = gather_kv_reference(k_cache, v_cache, block_tables[b], prefix[b])
            ks, vs = torch.cat([kc, ks]), torch.cat([vc, vs])  # [C + L, Hkv, D]
        qs = q[start:end].transpose(0, 1)            # [Hq, L, D]
        ks = ks.transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)  # [Hq, C + L, D]
        vs = vs.transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)
        acc = torch.promote_types(q.dtype, torch.float32)  # as in varlen_attention_reference
        scores = (qs.to(acc) @ ks.to(acc).transpose(1, 2)) * scale   # [Hq, L, C + L]
        L, C = end - start, prefix[b]
        mask = torch.ones(L, C + L, dtype=torch.bool, device=q.device).triu(C + 1)  # key j > C + i
        scores = scores.masked_fill(mask, float("-inf"))
        lse[start:end] = torch.logsumexp(scores, dim=-1).transpose(0, 1)
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out[start:end] = (probs @ vs).transpose(0, 1)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time configurations
# ---------------------------------------------------------------------------------------------------
_QKV_STRIDES = ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh")


def _signature(names: str, types: dict[str, str], default: str = "i32") -> dict[str, str]:
    """Triton signature of a kernel from its argument names (space separated); ``types`` overrides."""
    return {n: types.get(n, "constexpr" if n.isupper() else default) for n in names.split()}


def aot_specs() -> list[KernelSpec]:
    """Every configuration the launchers can pick on a GPU: per dtype (bf16, fp16) and head-dim tile
    (64, 128), the forward (new tokens only, and with a paged prefix) and the backward (preprocess,
    dK/dV, dQ).

    ``aligned``: head dims (hence q/k/v/out/cache token and head strides, fused-qkv views included)
    are multiples of 16 for every model this serves, and allocator pointers are 16-byte aligned; a
    head dim that is not compiles to a variant with scalar loads at run time."""
    fwd_args = ("q_ptr k_ptr v_ptr out_ptr lse_ptr cu_seqlens_ptr k_cache_ptr v_cache_ptr block_tables_ptr "
                "cached_lens_ptr qk_scale head_dim group_size heads_per_prog num_head_chunks "
                f"{' '.join(_QKV_STRIDES)} stride_ot stride_oh stride_lt stride_cb stride_cs stride_ch "
                "stride_bt page_shift HEAD_DIM BLOCK_M BLOCK_N PAGED DOT_PRECISION")
    pre_args = ("out_ptr dout_ptr delta_ptr num_rows num_heads head_dim stride_ot stride_oh stride_dt "
                "stride_dh HEAD_DIM BLOCK_R")
    bwd_ptrs = "q_ptr k_ptr v_ptr dout_ptr lse_ptr delta_ptr"
    bwd_ints = "sm_scale qk_scale head_dim group_size heads_per_prog"
    bwd_strides = f"{' '.join(_QKV_STRIDES)} stride_dt stride_dh stride_lt"
    dkdv_args = (f"{bwd_ptrs} dk_ptr dv_ptr cu_seqlens_ptr {bwd_ints} num_kv_heads {bwd_strides} "
                 "stride_dkt stride_dkh stride_dvt stride_dvh HEAD_DIM BLOCK_M BLOCK_N DOT_PRECISION")
    dq_args = (f"{bwd_ptrs} dq_ptr cu_seqlens_ptr {bwd_ints} num_head_chunks {bwd_strides} "
               "stride_dqt stride_dqh HEAD_DIM BLOCK_M BLOCK_N DOT_PRECISION")
    specs = []
    for dtype in _GPU_DTYPES:
        tname = TRITON_TYPE[dtype]
        ptr = "*" + tname
        types = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "cu_seqlens_ptr": "*i32",
                 "block_tables_ptr": "*i32", "cached_lens_ptr": "*i32", "qk_scale": "fp32", "sm_scale": "fp32"}
        types.update(dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "out_ptr", "k_cache_ptr", "v_cache_ptr",
                                    "dout_ptr", "dq_ptr", "dk_ptr", "dv_ptr"), ptr))
        prec = _dot_precision(dtype)
        qkv_aligned = ("q_ptr", "k_ptr", "v_ptr", "head_dim", *_QKV_STRIDES)
        for tile in _TILE_DIMS:
            bm, bn, warps, stages = _fwd_params(tile, dtype)
            for paged in (False, True):
                specs.append(KernelSpec(
                    name=f"prefill_fwd{'_paged' if paged else ''}_{tname}_d{tile}", fn=_prefill_fwd_kernel,
                    signature=_signature(fwd_args, types), num_warps=warps, num_stages=stages,
                    constexprs={"HEAD_DIM": tile, "BLOCK_M": bm, "BLOCK_N": bn, "PAGED": paged,
                                "DOT_PRECISION": prec},
                    aligned=(*qkv_aligned, "out_ptr", "k_cache_ptr", "v_cache_ptr", "stride_ot", "stride_oh",
                             "stride_cb", "stride_cs", "stride_ch")))
            specs.append(KernelSpec(
                name=f"prefill_bwd_preprocess_{tname}_d{tile}", fn=_bwd_preprocess_kernel,
                signature=_signature(pre_args, types), num_warps=4,
                constexprs={"HEAD_DIM": tile, "BLOCK_R": _preprocess_block(tile)},
                aligned=("out_ptr", "dout_ptr", "head_dim", "stride_ot", "stride_oh", "stride_dt",
                         "stride_dh")))
            bm, bn, warps, stages = _bwd_params(tile, dtype)
            constexprs = {"HEAD_DIM": tile, "BLOCK_M": bm, "BLOCK_N": bn, "DOT_PRECISION": prec}
            bwd_aligned = (*qkv_aligned, "dout_ptr", "stride_dt", "stride_dh")
            specs.append(KernelSpec(
                name=f"prefill_bwd_dkdv_{tname}_d{tile}", fn=_prefill_bwd_dkdv_kernel,
                signature=_signature(dkdv_args, types), constexprs=constexprs, num_warps=warps,
                num_stages=stages, aligned=(*bwd_aligned, "dk_ptr", "dv_ptr", "stride_dkt", "stride_dkh",
                                            "stride_dvt", "stride_dvh")))
            specs.append(KernelSpec(
                name=f"prefill_bwd_dq_{tname}_d{tile}", fn=_prefill_bwd_dq_kernel,
                signature=_signature(dq_args, types), constexprs=constexprs, num_warps=warps,
                num_stages=stages, aligned=(*bwd_aligned, "dq_ptr", "stride_dqt", "stride_dqh")))
    return specs
