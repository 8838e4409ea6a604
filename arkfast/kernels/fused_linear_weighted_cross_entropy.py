"""Fused linear + step-weighted cross-entropy: the LM-head projection, softmax cross-entropy and its
gradient without ever holding the ``[N, V]`` logits.

Per token t (rows of ``hidden [N, H]``), with ``s_t = hidden_t @ weight.T (+ bias)`` the logits,
``z_t = c * tanh(s_t / c)`` when a soft-cap ``c`` is given (Gemma 2) else ``z_t = s_t``, and
``lse_t = log sum_j exp(z_tj)`` (natural log, fp32):

    loss_t = w_t * (lse_t - z_t[y_t] + z_loss * lse_t**2)      for y_t != ignore_index, else 0
    logp_t = z_t[y_t] - lse_t                                  (0 for ignored tokens)

``reduction="none"`` returns ``loss [N]``, ``"sum"`` their sum, ``"mean"`` their sum divided by the
number of non-ignored tokens (0 when every token is ignored: 0/0 is defined as 0). The loss (and the
log-probabilities) are float32 (float64 for float64 inputs) whatever the input dtype.

Design: chunks of rows, cuBLAS for the three matmuls, one Triton kernel for the softmax.
  For each chunk of C rows: ``logits = hidden_chunk @ weight.T`` (cuBLAS, into a reused
  ``[C, V_pad]`` buffer in the input dtype, exactly the rounding eager ``F.linear`` does); one Triton
  program per row computes the online log-sum-exp in fp32 and overwrites the row with
  ``dL/dlogits``; then ``grad_hidden_chunk = dlogits @ weight`` and
  ``grad_weight += dlogits.T @ hidden_chunk`` (cuBLAS, accumulated in an fp32 ``[V, H]`` buffer).
  A fully fused tl.dot kernel would save the logits round trip through HBM but has to re-tile a
  152k-wide vocabulary for three GEMM shapes; cuBLAS runs those near the tensor-core peak, and the
  softmax kernel only streams the chunk (2 reads + 1 write per row; one write for ignored rows), so
  the split is the simpler route to GEMM speed. ``benchmarks/bench_fused_loss.py`` measures the
  result against the three-GEMM time on a GPU.

Memory (bf16, N tokens, vocab V, hidden H): eager keeps several ``[N, V]`` tensors alive at once (the
  logits, the fp32 copy transformers' loss makes, the log-softmax, the gradient): 5 GB per bf16 copy
  and 10 GB per fp32 one at N = 16k, V = 152k. Here: one ``[C, V_pad]`` logits buffer in the input
  dtype (V_pad = V rounded up to 16; C = min(N, max(1024, ceil(N / 4)), the rows that fit in
  ``_MAX_CHUNK_BYTES`` = 512 MiB), so at most 512 MiB and a quarter of the rows once N >= 4 * 1024),
  the fp32 ``grad_weight`` accumulator ``4 * V * H`` bytes (5 GB at V = 152k, H = 8192) while the
  chunks run, then the grads in the inputs' dtypes (``[V, H]`` and ``[N, H]``; for "mean"/"sum" they
  are formed in the forward and held until backward). Chunks of ``_MIN_CHUNK_ROWS`` rows or more keep
  the fp32 read-modify-write of ``grad_weight`` (8 bytes per weight per chunk) small next to the
  ``2 * C * V * H`` flops of that chunk's GEMM; the memory cap gives fewer rows only for
  V_pad > 256k (bf16/fp16 logits) or > 128k (fp32).

Gradients (derived where the kernel forms them, see ``_weighted_ce_rows_kernel``): with the upstream
  gradient g_t of loss_t and h_t of logp_t,
      dL/dz_tj = A_t * softmax_tj - B_t * [j == y_t],
      A_t = g_t * w_t * (1 + 2 * z_loss * lse_t) - h_t,      B_t = g_t * w_t - h_t,
  times ``1 - (z_tj / c)**2`` with a soft-cap. Token weights and g_t are folded into dlogits before
  the reduction over tokens into ``grad_weight``, so each token's factor lands on its own row.
  * ``"mean"``/``"sum"`` (no ``return_logprobs``): g_t is one scalar (1/n_valid or 1) times the
    upstream scalar. The grads are formed in the forward with the upstream scalar taken as 1, and
    backward only multiplies them by it (a device tensor: no host sync).
  * ``"none"`` or ``return_logprobs=True``: the per-token upstream gradients are only known in
    backward, so backward recomputes each chunk's logits (one more GEMM) from the saved lse and forms
    dlogits with them. Log-probabilities are differentiable: d logp_t / dz_tj = [j == y_t] - softmax_tj.
  ``token_weights`` get a gradient too: dL/dw_t = g_t * (lse_t - z_t[y_t] + z_loss * lse_t**2).

Labels must lie in ``[0, V)`` or equal ``ignore_index``; other values are not checked (that would
need a host sync) and give an unspecified loss for that token.

Example::

    loss = fused_linear_weighted_cross_entropy(hidden, lm_head.weight, labels, step_weights)
    loss.backward()  # grads in hidden.grad (hidden's dtype) and lm_head.weight.grad
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import KernelSpec
from ._dispatch import use_triton

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_REDUCTIONS = ("none", "sum", "mean")
BLOCK_V = 4096  # vocabulary columns per step of the row loop; 8 warps -> 16 bf16 (2 x 16 B) per thread
_NUM_WARPS = 8
_COL_ALIGN = 16  # the logits buffer's row stride is a multiple of 16 elements: aligned vector loads
_MAX_CHUNK_BYTES = 512 << 20
_MIN_CHUNK_ROWS = 1024
# aten::addmm.dtype_out (CUDA, torch >= 2.8) runs a bf16/fp16 GEMM with an fp32 accumulator and adds
# it into an fp32 ``self`` in the epilogue. Its first form still required ``self`` in the operands'
# dtype ("self and mat2 must have the same dtype"); torch 2.11 accepts an fp32 ``self`` ("self dtype
# must match either out_dtype or mat1 dtype" in libtorch_cuda). The release in between that relaxed
# it is not pinned down, so releases before 2.11 take the fallback in ``_accumulate_fp32``.
_HAS_ADDMM_OUT_DTYPE = "dtype_out" in torch.ops.aten.addmm.overloads() and torch.__version__ >= (2, 11)


@triton.jit
def _weighted_ce_rows_kernel(
    logits_ptr, row_stride,          # [C, row_stride] input dtype; columns >= n_cols are padding
    labels_ptr, weights_ptr,         # [C] int64, [C] acc dtype (fp32, or fp64 for fp64 inputs)
    gloss_ptr, gloss_stride,         # upstream grad of loss_t: [C] (stride 1) or a scalar (stride 0)
    glogp_ptr, glogp_stride,         # upstream grad of logp_t: [C] or a scalar (stride 0)
    lse_ptr, loss_ptr, logp_ptr,     # [C] acc dtype: written when COMPUTE_LSE, lse read otherwise
    n_cols, ignore_index, z_loss, softcap,
    BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    COMPUTE_LSE: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    """One program per row. COMPUTE_LSE: pass 1 (online log-sum-exp; loss, logp and lse out).
    WRITE_GRAD: pass 2 overwrites the row with dL/dlogits (lse from pass 1 or from ``lse_ptr``).

    Soft-cap ``c * tanh(s / c)`` is written out inline (a nested jit call costs the interpreter
    dearly per block) with tanh via exp, as tl.math has no portable tanh: with e = exp(-2|x|),
    tanh(x) = sign(x) * (1 - e) / (1 + e), which never overflows."""
    # Ignored rows (prompt tokens) read nothing: their loads are masked off, so they compute on zeros
    # (a finite, unused lse) and cost one write of a zero dlogits row.
    acc_ty = lse_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)  # row * row_stride can pass 2**31
    row_ptr = logits_ptr + row * row_stride
    offs = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    load_end = tl.where(valid, row_stride, 0)  # still a multiple of 16, so loads stay vectorised

    if COMPUTE_LSE:
        # Online log-sum-exp over blocks: with the running max m and d = sum_j exp(z_j - m),
        # a block with max m_b gives m' = max(m, m_b), d' = d * exp(m - m') + sum_b exp(z_j - m').
        # m' is -inf while every logit so far is -inf (a -inf bias masking part of the vocabulary,
        # padding columns): exp(-inf - (-inf)) would be NaN, so the exponents subtract s = m', or 0
        # while m' = -inf (then exp(z_j - s) = 0 and d stays 0). A row of only -inf gets
        # lse = -inf + log(0) = -inf, as torch.logsumexp gives. The first block is peeled so m and
        # d start in the accumulator's dtype.
        z = tl.load(row_ptr + offs, mask=offs < load_end, other=0.0).to(acc_ty)
        if HAS_SOFTCAP:
            e = tl.exp(-2.0 * tl.abs(z) / softcap)
            z = tl.where(z < 0, -softcap, softcap) * ((1.0 - e) / (1.0 + e))
        z = tl.where(offs < n_cols, z, float("-inf"))
        m = tl.max(z, axis=0)
        d = tl.sum(tl.exp(z - tl.where(m == float("-inf"), 0.0, m)), axis=0)
        for start in range(BLOCK_V, row_stride, BLOCK_V):
            cols = start + offs
            z = tl.load(row_ptr + cols, mask=cols < load_end, other=0.0).to(acc_ty)
            if HAS_SOFTCAP:
                e = tl.exp(-2.0 * tl.abs(z) / softcap)
                z = tl.where(z < 0, -softcap, softcap) * ((1.0 - e) / (1.0 + e))
            z = tl.where(cols < n_cols, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            d = d * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
            m = m_new
        lse = m + tl.log(d)
        z_y = tl.load(row_ptr + tl.where(valid, label, 0)).to(acc_ty)
        if HAS_SOFTCAP:
            e_y = tl.exp(-2.0 * tl.abs(z_y) / softcap)
            z_y = tl.where(z_y < 0, -softcap, softcap) * ((1.0 - e_y) / (1.0 + e_y))
        w = tl.load(weights_ptr + row).to(acc_ty)
        tl.store(lse_ptr + row, lse)
        tl.store(logp_ptr + row, tl.where(valid, z_y - lse, 0.0))
        tl.store(loss_ptr + row, tl.where(valid, w * (lse - z_y + z_loss * lse * lse), 0.0))
    else:
        lse = tl.load(lse_ptr + row)

    if WRITE_GRAD:
        # loss_t = w (lse - z_y + zl lse^2) and d lse / dz_j = p_j = exp(z_j - lse), so
        #   d loss_t / dz_j = w ((1 + 2 zl lse) p_j - [j = y]);  d logp_t / dz_j = [j = y] - p_j.
        # With upstream g (loss) and h (logp): dz_j = A p_j - B [j = y], A = g w (1 + 2 zl lse) - h,
        # B = g w - h. Ignored rows get A = B = 0: a zero row, so they add nothing to the GEMMs.
        # Soft-cap: z = c tanh(s / c) has dz/ds = 1 - tanh^2 = 1 - (z / c)^2.
        g = tl.load(gloss_ptr + row * gloss_stride).to(acc_ty)
        h = tl.load(glogp_ptr + row * glogp_stride).to(acc_ty)
        gw = tl.where(valid, g * tl.load(weights_ptr + row).to(acc_ty), 0.0)
        h = tl.where(valid, h, 0.0)
        coef_p = gw * (1.0 + 2.0 * z_loss * lse) - h
        coef_y = gw - h
        for start in range(0, row_stride, BLOCK_V):
            cols = start + offs
            in_row = cols < row_stride
            z = tl.load(row_ptr + cols, mask=cols < load_end, other=0.0).to(acc_ty)
            if HAS_SOFTCAP:
                e = tl.exp(-2.0 * tl.abs(z) / softcap)
                z = tl.where(z < 0, -softcap, softcap) * ((1.0 - e) / (1.0 + e))
            dz = coef_p * tl.exp(z - lse) - tl.where(cols == label, coef_y, 0.0)
            if HAS_SOFTCAP:
                zc = z / softcap
                dz = dz * (1.0 - zc * zc)
            dz = tl.where(cols < n_cols, dz, 0.0)  # padding columns stay 0
            tl.store(row_ptr + cols, dz.to(logits_ptr.dtype.element_ty), mask=in_row)


# ----------------------------------------------------------------------------------------------
# Host launcher


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(n_rows: int, row_stride: int, elem_size: int) -> int:
    """Rows per chunk: the ``[C, row_stride]`` logits buffer stays under ``_MAX_CHUNK_BYTES`` and,
    above ``_MIN_CHUNK_ROWS`` rows, near a quarter of all rows (tests patch this to force chunking)."""
    by_memory = max(_COL_ALIGN, _MAX_CHUNK_BYTES // (row_stride * elem_size) // _COL_ALIGN * _COL_ALIGN)
    quarter = max(_MIN_CHUNK_ROWS, -(-n_rows // 4))
    return max(1, min(n_rows, by_memory, quarter))


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launcher allocates and the kernel must fill (tests fill them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _per_row(t: torch.Tensor, r0: int, r1: int) -> tuple[torch.Tensor, int]:
    """A per-token tensor's rows ``r0:r1`` and stride, or a scalar broadcast with stride 0."""
    return (t, 0) if t.dim() == 0 else (t[r0:r1], 1)


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32/fp64 and ``a, b`` in the input dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _HAS_ADDMM_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)  # tensor cores, fp32 epilogue
    elif a.is_cuda:
        acc.add_(torch.mm(a, b))  # older torch: fp32 across chunks, the chunk's sum rounded once
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))  # CPU (interpreter tests)


def _chunked_pass(hidden, weight, bias, labels, token_weights, gloss, glogp, lse, loss, logp, *,
                  ignore_index: int, z_loss: float, softcap: float, compute_lse: bool,
                  need_grad_hidden: bool, need_grad_weight: bool, need_grad_bias: bool):
    """Run the chunk loop. ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]`` or None (input dtype),
    ``labels [N]`` int64, ``token_weights [N]``, ``gloss``/``glogp`` ``[N]`` or 0-d, ``lse``,
    ``loss``, ``logp`` ``[N]`` (acc dtype, written when ``compute_lse``, ``lse`` read otherwise).
    Returns ``(grad_hidden [N, H], grad_weight [V, H], grad_bias [V])`` in the input dtype, each an
    empty tensor when not asked for."""
    (N, H), V = hidden.shape, weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    write_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    row_stride = -(-V // _COL_ALIGN) * _COL_ALIGN
    rows = _chunk_rows(N, row_stride, hidden.element_size())
    buf = _empty((rows, row_stride), hidden.dtype, hidden.device)  # [C, V_pad]: logits, then dlogits
    buf[:, V:].zero_()  # padding the kernel reads (unmasked, so loads vectorise) and keeps at 0
    grad_hidden = _empty((N, H) if need_grad_hidden else (0,), hidden.dtype, hidden.device)
    grad_w32 = torch.zeros(V, H, dtype=acc, device=hidden.device) if need_grad_weight else None
    grad_b32 = torch.zeros(V, dtype=acc, device=hidden.device) if need_grad_bias else None
    w_t = weight.t()  # [H, V]
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        h = hidden[r0:r1]  # [c, H]
        z = buf[: r1 - r0, :V]  # [c, V], row stride V_pad
        if bias is None:
            torch.mm(h, w_t, out=z)
        else:
            torch.addmm(bias, h, w_t, out=z)
        gl, gl_stride = _per_row(gloss, r0, r1)
        gp, gp_stride = _per_row(glogp, r0, r1)
        _weighted_ce_rows_kernel[(r1 - r0,)](
            buf, row_stride, labels[r0:r1], token_weights[r0:r1], gl, gl_stride, gp, gp_stride,
            lse[r0:r1], loss[r0:r1], logp[r0:r1], V, ignore_index, z_loss, softcap,
            BLOCK_V=BLOCK_V, HAS_SOFTCAP=softcap > 0, COMPUTE_LSE=compute_lse, WRITE_GRAD=write_grad,
            num_warps=_NUM_WARPS,
        )
        if need_grad_hidden:
            torch.mm(z, weight, out=grad_hidden[r0:r1])  # [c, V] @ [V, H]
        if need_grad_weight:
            _accumulate_fp32(grad_w32, z.t(), h)  # [V, c] @ [c, H]
        if need_grad_bias:
            grad_b32 += z.sum(0, dtype=acc)
    grad_weight = grad_w32.to(weight.dtype) if need_grad_weight else hidden.new_empty(0)
    grad_bias = grad_b32.to(bias.dtype) if need_grad_bias else hidden.new_empty(0)
    return grad_hidden, grad_weight, grad_bias


def _valid_count(labels: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    """Non-ignored tokens as a 0-d device tensor, at least 1 (so the mean of nothing is 0/1 = 0)."""
    return (labels != ignore_index).sum().clamp_(min=1).to(dtype)


# ----------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile) and their autograd


@torch.library.custom_op(
    "arkfast::fused_linear_weighted_ce", mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor labels, Tensor token_weights, Tensor? bias, "
           "int ignore_index, str reduction, float z_loss, float softcap, bool precompute_grads, "
           "bool need_grad_hidden, bool need_grad_weight, bool need_grad_bias) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _fused_ce_op(hidden, weight, labels, token_weights, bias, ignore_index, reduction, z_loss, softcap,
                 precompute_grads, need_grad_hidden, need_grad_weight, need_grad_bias):
    """Forward. Returns ``(loss, logp [N], lse [N], grad_hidden, grad_weight, grad_bias)``; the grads
    (for an upstream gradient of 1) only with ``precompute_grads``, else empty."""
    N = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    lse, loss_tok, logp = (_empty((N,), acc, hidden.device) for _ in range(3))
    one = torch.ones((), dtype=acc, device=hidden.device)
    gloss = one / _valid_count(labels, ignore_index, acc) if reduction == "mean" else one
    grads = _chunked_pass(
        hidden, weight, bias, labels, token_weights, gloss, torch.zeros_like(one), lse, loss_tok, logp,
        ignore_index=ignore_index, z_loss=z_loss, softcap=softcap, compute_lse=True,
        need_grad_hidden=precompute_grads and need_grad_hidden,
        need_grad_weight=precompute_grads and need_grad_weight,
        need_grad_bias=precompute_grads and need_grad_bias)
    if reduction == "none":
        loss = loss_tok
    elif reduction == "sum":
        loss = loss_tok.sum()
    else:
        loss = loss_tok.sum() / _valid_count(labels, ignore_index, acc)
    return (loss, logp, lse, *grads)


@_fused_ce_op.register_fake
def _(hidden, weight, labels, token_weights, bias, ignore_index, reduction, z_loss, softcap,
      precompute_grads, need_grad_hidden, need_grad_weight, need_grad_bias):
    N = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    loss = hidden.new_empty(N if reduction == "none" else (), dtype=acc)
    empty = hidden.new_empty(0)
    return (loss, hidden.new_empty(N, dtype=acc), hidden.new_empty(N, dtype=acc),
            torch.empty_like(hidden) if precompute_grads and need_grad_hidden else empty,
            torch.empty_like(weight) if precompute_grads and need_grad_weight else empty.clone(),
            torch.empty_like(bias) if precompute_grads and need_grad_bias else empty.clone())


@torch.library.custom_op(
    "arkfast::fused_linear_weighted_ce_backward", mutates_args=(),
    schema="(Tensor grad_loss, Tensor grad_logp, Tensor hidden, Tensor weight, Tensor labels, "
           "Tensor token_weights, Tensor? bias, Tensor lse, int ignore_index, float z_loss, float softcap, "
           "bool need_grad_hidden, bool need_grad_weight, bool need_grad_bias) -> (Tensor, Tensor, Tensor)")
def _fused_ce_backward_op(grad_loss, grad_logp, hidden, weight, labels, token_weights, bias, lse,
                          ignore_index, z_loss, softcap, need_grad_hidden, need_grad_weight, need_grad_bias):
    """Recomputing backward: ``grad_loss`` is g_t ``[N]`` or a 0-d scalar (already divided by n_valid
    for "mean"), ``grad_logp`` h_t ``[N]`` or 0-d; each chunk's logits are recomputed and turned into
    dlogits with those per-token factors from the saved ``lse [N]``."""
    return _chunked_pass(
        hidden, weight, bias, labels, token_weights, grad_loss, grad_logp, lse, lse, lse,
        ignore_index=ignore_index, z_loss=z_loss, softcap=softcap, compute_lse=False,
        need_grad_hidden=need_grad_hidden, need_grad_weight=need_grad_weight, need_grad_bias=need_grad_bias)


@_fused_ce_backward_op.register_fake
def _(grad_loss, grad_logp, hidden, weight, labels, token_weights, bias, lse, ignore_index, z_loss, softcap,
      need_grad_hidden, need_grad_weight, need_grad_bias):
    empty = hidden.new_empty(0)
    return (torch.empty_like(hidden) if need_grad_hidden else empty,
            torch.empty_like(weight) if need_grad_weight else empty.clone(),
            torch.empty_like(bias) if need_grad_bias else empty.clone())


def _setup_context(ctx, inputs, output):
    (hidden, weight, labels, token_weights, bias, ignore_index, reduction, z_loss, softcap,
     precompute_grads, *_) = inputs
    _, logp, lse, grad_hidden, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(lse, grad_hidden, grad_weight, grad_bias)
    ctx.set_materialize_grads(False)  # never allocate zero grads for the [V, H] outputs
    ctx.args = (ignore_index, reduction, z_loss, softcap, precompute_grads)
    ctx.save_for_backward(hidden, weight, labels, token_weights, bias, logp, lse,
                          grad_hidden, grad_weight, grad_bias)


def _backward(ctx, grad_loss, grad_logp, *_unused):
    ignore_index, reduction, z_loss, softcap, precompute_grads = ctx.args
    hidden, weight, labels, token_weights, bias, logp, lse, grad_hidden, grad_weight, grad_bias = \
        ctx.saved_tensors
    need_h, need_w, _, need_tw, need_b = ctx.needs_input_grad[:5]
    acc = lse.dtype
    zero = torch.zeros((), dtype=acc, device=lse.device)
    go = zero if grad_loss is None else grad_loss.to(acc)  # upstream grad of the returned loss
    # g_t, the upstream gradient of loss_t: per token for "none", one scalar for "sum"/"mean".
    g = go / _valid_count(labels, ignore_index, acc) if reduction == "mean" else go
    gh = gw = gb = None
    if precompute_grads:  # formed in the forward for go = 1 (1/n_valid folded in): scale, no host sync
        gh = grad_hidden * go if need_h else None
        gw = grad_weight * go if need_w else None
        gb = grad_bias * go if need_b else None
    elif need_h or need_w or need_b:
        h = zero if grad_logp is None else grad_logp.to(acc)
        gh, gw, gb = _fused_ce_backward_op(
            g.contiguous(), h.contiguous(), hidden, weight, labels, token_weights, bias, lse,
            ignore_index, z_loss, softcap, need_h, need_w, need_b)
        gh, gw, gb = (gh if need_h else None), (gw if need_w else None), (gb if need_b else None)
    gtw = None
    if need_tw:  # d loss_t / d w_t = -logp_t + z_loss * lse_t^2 on non-ignored tokens
        unweighted = torch.where(labels != ignore_index, z_loss * lse * lse - logp, 0.0)
        gtw = (g * unweighted).to(token_weights.dtype)
    return gh, gw, None, gtw, gb, None, None, None, None, None, None, None, None


_fused_ce_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API


def _validate(hidden, weight, labels, token_weights, bias, reduction, z_loss, softcap) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H] (flatten batch and sequence dims), got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V >= 1, H={hidden.shape[1]}], got {tuple(weight.shape)}")
    if hidden.dtype not in _SUPPORTED or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share one dtype of {_SUPPORTED}, "
                        f"got {hidden.dtype} and {weight.dtype}")
    N, V = hidden.shape[0], weight.shape[0]
    if labels.shape != (N,):
        raise ValueError(f"labels must be [N={N}], got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if token_weights is not None:
        if token_weights.shape != (N,):
            raise ValueError(f"token_weights must be [N={N}], got {tuple(token_weights.shape)}")
        if not token_weights.dtype.is_floating_point:
            raise TypeError(f"token_weights must be floating point, got {token_weights.dtype}")
    if bias is not None and (bias.shape != (V,) or bias.dtype != hidden.dtype):
        raise ValueError(f"bias must be [V={V}] {hidden.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(z_loss, (int, float)) or not 0.0 <= z_loss < float("inf"):
        raise ValueError(f"z_loss must be a finite Python float >= 0, got {z_loss!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not 0.0 < softcap < float("inf")):
        raise ValueError(f"softcap must be None or a finite Python float > 0, got {softcap!r}")
    devices = {t.device for t in (hidden, weight, labels, token_weights, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def fused_linear_weighted_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
    token_weights: torch.Tensor | None = None, *, bias: torch.Tensor | None = None,
    ignore_index: int = -100, reduction: str = "mean", return_logprobs: bool = False,
    z_loss: float = 0.0, softcap: float | None = None,
):
    """Token-weighted cross-entropy of ``hidden @ weight.T (+ bias)`` without materialising logits.

    Args:
        hidden: ``[N, H]`` float32/bfloat16/float16 (float64 for checks), the final hidden states.
        weight: ``[V, H]`` same dtype, the LM head (tied embeddings work as is).
        labels: ``[N]`` integer (int64), target ids in ``[0, V)`` or ``ignore_index``.
        token_weights: ``[N]`` floating, w_t per token (any sign; None = all ones). Differentiable.
        bias: ``[V]`` hidden's dtype, optional.
        reduction: ``"none"`` (``[N]``), ``"sum"`` or ``"mean"`` (over non-ignored tokens; 0 if none).
        return_logprobs: also return ``logp [N]``, log p(y_t) under the (soft-capped) softmax, 0 for
            ignored tokens; differentiable (backward then recomputes the logits, as for "none").
        z_loss: adds ``z_loss * lse_t**2`` to each non-ignored token's loss before the token weight.
        softcap: logit soft-capping ``softcap * tanh(logits / softcap)`` before the softmax (Gemma 2).

    Returns:
        The loss (float32; float64 for float64 inputs), or ``(loss, logp)``. Gradients reach
        ``hidden``, ``weight``, ``bias`` (in their dtypes) and ``token_weights``.

    Example::

        hidden = model(input_ids, positions, ctx)                  # [N, H], the final hidden states
        # labels [N]: the next token's id, -100 on prompt tokens and on each sequence's last token
        loss = fused_linear_weighted_cross_entropy(hidden, model.lm_head_weight, labels, step_weights)
        loss.backward()
    """
    _validate(hidden, weight, labels, token_weights, bias, reduction, z_loss, softcap)
    if hidden.shape[0] == 0 or not use_triton(hidden, weight, labels, token_weights, bias):
        return fused_linear_weighted_cross_entropy_reference(
            hidden, weight, labels, token_weights, bias=bias, ignore_index=ignore_index,
            reduction=reduction, return_logprobs=return_logprobs, z_loss=z_loss, softcap=softcap)
    acc = _acc_dtype(hidden.dtype)
    if token_weights is None:
        token_weights = torch.ones(hidden.shape[0], dtype=acc, device=hidden.device)
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and weight.requires_grad
    need_b = grad_on and bias is not None and bias.requires_grad
    precompute = (need_h or need_w or need_b) and reduction != "none" and not return_logprobs
    loss, logp, *_ = _fused_ce_op(
        hidden, weight, labels.to(torch.int64), token_weights.to(acc).contiguous(), bias, int(ignore_index),
        reduction, float(z_loss), float(softcap or 0.0), precompute, need_h, need_w, need_b)
    return (loss, logp) if return_logprobs else loss


class FusedLinearWeightedCrossEntropy(torch.nn.Module):
    """Module form: ``forward(hidden [N, H], weight [V, H], labels [N], token_weights=None, bias=None)``
    with the options of :func:`fused_linear_weighted_cross_entropy` fixed at construction."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", *, z_loss: float = 0.0,
                 softcap: float | None = None, return_logprobs: bool = False):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.ignore_index, self.reduction = ignore_index, reduction
        self.z_loss, self.softcap, self.return_logprobs = z_loss, softcap, return_logprobs

    def forward(self, hidden, weight, labels, token_weights=None, bias=None):
        return fused_linear_weighted_cross_entropy(
            hidden, weight, labels, token_weights, bias=bias, ignore_index=self.ignore_index,
            reduction=self.reduction, return_logprobs=self.return_logprobs, z_loss=self.z_loss,
            softcap=self.softcap)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}")


# ----------------------------------------------------------------------------------------------
# Torch reference


def fused_linear_weighted_cross_entropy_reference(
    hidden, weight, labels, token_weights=None, *, bias=None, ignore_index=-100, reduction="mean",
    return_logprobs=False, z_loss=0.0, softcap=None,
):
    """Chunk-free torch reference (materialises ``[N, V]``; differentiable by autograd). Same
    arguments, semantics and dtypes as :func:`fused_linear_weighted_cross_entropy`."""
    acc = _acc_dtype(hidden.dtype)
    logits = torch.nn.functional.linear(hidden, weight, bias).to(acc)  # [N, V], rounded like F.linear
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, dim=-1)  # [N]
    valid = labels != ignore_index
    # An ignored row gathers column 0 as a stand-in, which may be a -inf logit (a masking bias); zero it
    # so lse - z_y stays finite there: d(w * inf)/dw = 0 * inf would put NaN in the weight gradient.
    z_y = torch.where(valid, logits.gather(1, torch.where(valid, labels, 0).long()[:, None])[:, 0], 0.0)
    w = torch.ones_like(lse) if token_weights is None else token_weights.to(acc)
    loss = torch.where(valid, w * (lse - z_y + z_loss * lse * lse), 0.0)
    logp = torch.where(valid, z_y - lse, 0.0)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / valid.sum().clamp(min=1).to(acc)
    return (loss, logp) if return_logprobs else loss


# ----------------------------------------------------------------------------------------------
# Ahead-of-time configurations


def aot_specs() -> list[KernelSpec]:
    """Every configuration the launcher can pick: logits dtype (fp32/bf16/fp16, and fp64 with fp64
    statistics) x soft-cap x pass (forward loss only; forward with grads; backward from saved lse)."""
    specs = []
    passes = {"loss": (True, False), "loss_grad": (True, True), "grad": (False, True)}
    for dtype, acc in (("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"), ("fp64", "fp64")):
        for softcap in (False, True):
            for pass_name, (compute_lse, write_grad) in passes.items():
                signature = {
                    "logits_ptr": f"*{dtype}", "row_stride": "i32", "labels_ptr": "*i64",
                    "weights_ptr": f"*{acc}", "gloss_ptr": f"*{acc}", "gloss_stride": "i32",
                    "glogp_ptr": f"*{acc}", "glogp_stride": "i32", "lse_ptr": f"*{acc}",
                    "loss_ptr": f"*{acc}", "logp_ptr": f"*{acc}", "n_cols": "i32", "ignore_index": "i32",
                    "z_loss": "fp32", "softcap": "fp32", "BLOCK_V": "constexpr", "HAS_SOFTCAP": "constexpr",
                    "COMPUTE_LSE": "constexpr", "WRITE_GRAD": "constexpr",
                }
                specs.append(KernelSpec(
                    name=f"weighted_ce_{dtype}_{pass_name}{'_softcap' if softcap else ''}",
                    fn=_weighted_ce_rows_kernel, signature=signature,
                    constexprs={"BLOCK_V": BLOCK_V, "HAS_SOFTCAP": softcap, "COMPUTE_LSE": compute_lse,
                                "WRITE_GRAD": write_grad},
                    num_warps=_NUM_WARPS,
                    aligned=("logits_ptr", "row_stride", "labels_ptr", "weights_ptr", "lse_ptr"),
                ))
    return specs
