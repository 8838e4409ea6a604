"""Prefill attention kernels (varlen causal forward, paged-prefix forward, backward) against the torch
references, through the Triton interpreter. Interpreter tile sizes: fp32 64 rows x 32 keys, bf16 128
rows x 64 keys; GQA groups are stacked as rows (e.g. 4 heads x 32 tokens)."""
import pytest
import torch

import kernel_testing
from arkfast.kernels._dispatch import force_triton
from arkfast.kernels.paged_kv import allocate_kv_cache, write_kv_cache_reference
from arkfast.kernels.prefill_attention import (
    _prefill_attention_triton,
    kernel_supports,
    prefill_attention,
    prefill_attention_reference,
    varlen_attention,
    varlen_attention_reference,
)

# Numerically sensitive: CI also runs these under other ATen CPU capabilities (.ci/run).
pytestmark = pytest.mark.numerics

DTYPES = [torch.float32, torch.bfloat16]


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _qkv(lengths, Hq, Hkv, D, dtype, seed):
    torch.manual_seed(seed)
    T = sum(lengths)
    return (torch.randn(T, Hq, D, dtype=dtype), torch.randn(T, Hkv, D, dtype=dtype),
            torch.randn(T, Hkv, D, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths, Hq, Hkv, D", [
    ([1], 2, 2, 64),                       # one token
    ([17, 0, 33, 1, 70], 2, 2, 64),        # GQA 1, empty sequence, query/key block crossings
    ([17, 0, 33, 1, 70], 8, 2, 64),        # GQA 4: 4 heads stacked per tile
    ([5, 40], 6, 2, 64),                   # GQA 3: tile rows not a multiple of the group
    ([19, 3], 8, 1, 32),                   # GQA 8, head dim 32 (zero-padded tile)
    ([17, 9], 4, 2, 128),                  # head dim 128
])
def test_varlen_forward(triton_interp, dtype, lengths, Hq, Hkv, D):
    q, k, v = _qkv(lengths, Hq, Hkv, D, dtype, seed=sum(lengths) * 31 + Hq * 7 + D)
    cu = _cu(lengths)
    out = kernel_testing.poison_like(q)
    out, lse = _prefill_attention_triton(q, k, v, cu, max(lengths), out=out, return_lse=True)
    ref, ref_lse = prefill_attention_reference(q, k, v, cu, return_lse=True)
    kernel_testing.assert_close(out, ref, name="out")
    # lse = log(sum of n <= 2048 exps): the fp32 sum's error gamma_n = n u = 1.2e-4 relative is
    # that much absolute on its log (atol); the log's own rounding is rtol * |lse|.
    kernel_testing.assert_close(lse, ref_lse, dtype=torch.float32, atol=1e-4, name="lse")
    # the existing reference of the model's entry point agrees too
    kernel_testing.assert_close(varlen_attention(q, k, v, cu, max_seqlen=max(lengths)),
                                varlen_attention_reference(q, k, v, cu), name="varlen_attention")


def test_varlen_forward_max_seqlen_none_and_scale(triton_interp):
    lengths = [9, 30]
    q, k, v = _qkv(lengths, 4, 2, 64, torch.float32, seed=3)
    cu = _cu(lengths)
    out = varlen_attention(q, k, v, cu, scale=0.3)  # max_seqlen computed from cu_seqlens
    kernel_testing.assert_close(out, varlen_attention_reference(q, k, v, cu, scale=0.3))


def test_varlen_forward_all_empty(triton_interp):
    q, k, v = _qkv([0], 4, 2, 64, torch.bfloat16, seed=0)
    cu = torch.tensor([0, 0, 0], dtype=torch.int32)
    assert varlen_attention(q, k, v, cu, max_seqlen=0).shape == (0, 4, 64)


def _paged_inputs(cached, new, Hq, Hkv, D, dtype, block_size, seed):
    """A cache holding each sequence's prefix in shuffled blocks, plus the new tokens' q/k/v."""
    torch.manual_seed(seed)
    max_blocks = max(-(-(c + n) // block_size) for c, n in zip(cached, new)) + 1
    num_blocks = len(cached) * max_blocks + 2
    k_cache, v_cache = allocate_kv_cache(1, num_blocks, block_size, Hkv, D, dtype, "cpu")[0]
    k_cache.copy_(torch.randn_like(k_cache, dtype=torch.float32))  # unused slots hold data too
    v_cache.copy_(torch.randn_like(v_cache, dtype=torch.float32))
    perm = torch.randperm(num_blocks)
    tables = torch.full((len(cached), max_blocks), -1, dtype=torch.int32)
    for b, c in enumerate(cached):
        used = -(-c // block_size)
        tables[b, :used] = perm[b * max_blocks: b * max_blocks + used].int()
        pos = torch.arange(c)
        slots = tables[b, pos // block_size].long() * block_size + pos % block_size
        write_kv_cache_reference(torch.randn(c, Hkv, D, dtype=dtype), torch.randn(c, Hkv, D, dtype=dtype),
                                 k_cache, v_cache, slots)
    q, k, v = _qkv(new, Hq, Hkv, D, dtype, seed + 1)
    return q, k, v, _cu(new), k_cache, v_cache, tables, torch.tensor(cached, dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cached, new, Hq, Hkv, D, block_size", [
    ([0, 5, 16, 37], [3, 17, 0, 33], 8, 2, 64, 16),  # cached 0, partial, block boundary, 2+ blocks
    ([37, 64], [1, 20], 4, 4, 64, 32),               # decode-like single token; prefix = whole blocks
    ([21], [6], 4, 1, 128, 16),                      # head dim 128
])
def test_paged_prefix_forward(triton_interp, dtype, cached, new, Hq, Hkv, D, block_size):
    q, k, v, cu, k_cache, v_cache, tables, cached_lens = _paged_inputs(
        cached, new, Hq, Hkv, D, dtype, block_size, seed=sum(cached) + sum(new) + D)
    out, lse = _prefill_attention_triton(q, k, v, cu, max(new), k_cache=k_cache, v_cache=v_cache,
                                         block_tables=tables, cached_lens=cached_lens,
                                         out=kernel_testing.poison_like(q), return_lse=True)
    ref, ref_lse = prefill_attention_reference(q, k, v, cu, k_cache, v_cache, tables, cached_lens,
                                               return_lse=True)
    kernel_testing.assert_close(out, ref, name="out")
    # lse = log(sum of n <= 2048 exps): the fp32 sum's error gamma_n = n u = 1.2e-4 relative is
    # that much absolute on its log (atol); the log's own rounding is rtol * |lse|.
    kernel_testing.assert_close(lse, ref_lse, dtype=torch.float32, atol=1e-4, name="lse")


def test_paged_prefix_equals_full_recompute(triton_interp):
    """Chunked prefill: prefix in the cache + new tokens == attention over the whole sequence."""
    c, n, Hq, Hkv, D = 37, 11, 4, 2, 64
    q, k, v = _qkv([c + n], Hq, Hkv, D, torch.float32, seed=5)
    k_cache, v_cache = allocate_kv_cache(1, 4, 16, Hkv, D, torch.float32, "cpu")[0]
    tables = torch.tensor([[2, 0, 3, -1]], dtype=torch.int32)
    pos = torch.arange(c)
    write_kv_cache_reference(k[:c], v[:c], k_cache, v_cache, tables[0, pos // 16].long() * 16 + pos % 16)
    out = prefill_attention(q[c:], k[c:], v[c:], _cu([n]), k_cache, v_cache, tables,
                            torch.tensor([c], dtype=torch.int32), max_seqlen=n)
    full = varlen_attention_reference(q, k, v, _cu([c + n]))[c:]
    kernel_testing.assert_close(out, full)


def _grads(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths, Hq, Hkv, D", [
    ([1, 17, 0, 40], 2, 2, 64),   # GQA 1, key and query block crossings (32 / 64-row tiles)
    ([17, 0, 40], 8, 2, 64),      # GQA 4: dK/dV summed over the group in one program
    ([9, 12], 6, 2, 128),         # GQA 3, head dim 128
    ([13, 5], 8, 1, 64),          # GQA 8: in fp32 (32-row tiles) two passes of 4 stacked heads
])
def test_varlen_backward(triton_interp, dtype, lengths, Hq, Hkv, D):
    q, k, v = _qkv(lengths, Hq, Hkv, D, dtype, seed=sum(lengths) + Hq + D)
    dout = torch.randn_like(q)
    cu = _cu(lengths)
    _out, *grads = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, max(lengths)), q, k, v, dout)
    # ground truth: the reference in float64 on the same inputs
    _, *ref = _grads(lambda a, b, c: varlen_attention_reference(a.double(), b.double(), c.double(), cu),
                     q, k, v, dout.double())
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
        assert g.dtype == dtype
        # Each gradient entry sums over at most n = max(40 keys or queries x 8 stacked heads, D = 128)
        # = 320 products, accumulated in fp32 (gamma_n = n * u_fp32 = 1.9e-5 relative to the sum of
        # |terms|, which is within a few times the largest gradient here) -> 1e-4 * max|grad|; bf16
        # also rounds P and dS to bf16 before the dots (u = 2^-8): ~5u = 2e-2 * max|grad|.
        scale = r.abs().max().item()
        atol = (1e-4 if dtype == torch.float32 else 2e-2) * scale
        kernel_testing.assert_close(g, r, dtype=dtype, atol=atol, rtol=0.0, name=name)


def test_fused_qkv_views_forward_and_backward(triton_interp):
    """q, k, v as head slices of one [T, Hq + 2 Hkv, D] projection (token stride (Hq + 2 Hkv) * D)."""
    lengths, Hq, Hkv, D = [11, 26], 4, 2, 64
    torch.manual_seed(11)
    qkv = torch.randn(sum(lengths), Hq + 2 * Hkv, D, requires_grad=True)
    cu = _cu(lengths)
    dout = torch.randn(sum(lengths), Hq, D)
    grads = []
    kernel = lambda *a: varlen_attention(*a, cu, max(lengths))
    for fn in (kernel, lambda *a: varlen_attention_reference(*a, cu)):
        qkv.grad = None
        q, k, v = qkv.split([Hq, Hkv, Hkv], dim=1)
        assert not q.is_contiguous()
        out = fn(q, k, v)
        out.backward(dout)
        grads.append((out.detach(), qkv.grad.clone()))
    kernel_testing.assert_close(grads[0][0], grads[1][0], name="out")
    kernel_testing.assert_close(grads[0][1], grads[1][1], name="d(qkv)")


def test_prefill_attention_with_grad_runs_reference(triton_interp):
    q, k, v, cu, k_cache, v_cache, tables, cached_lens = _paged_inputs(
        [5], [7], 4, 2, 64, torch.float32, 16, seed=9)
    q.requires_grad_()
    out = prefill_attention(q, k, v, cu, k_cache, v_cache, tables, cached_lens, max_seqlen=7)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    kernel_testing.assert_close(out, prefill_attention_reference(q, k, v, cu, k_cache, v_cache, tables,
                                                                 cached_lens))


def test_dispatch_falls_back_to_reference(triton_interp):
    lengths = [6, 9]
    q, k, v = _qkv(lengths, 4, 2, 256, torch.float32, seed=1)  # head dim 256: reference
    cu = _cu(lengths)
    assert not kernel_supports(q) and not kernel_supports(q[..., :64], causal=False)
    assert kernel_supports(q[..., :64])
    assert torch.equal(varlen_attention(q, k, v, cu), varlen_attention_reference(q, k, v, cu))
    q, k, v = (t[..., :64].contiguous() for t in (q, k, v))
    assert torch.equal(varlen_attention(q, k, v, cu, causal=False),
                       varlen_attention_reference(q, k, v, cu, causal=False))
    with force_triton(), pytest.raises(ValueError, match="causal"):
        _prefill_attention_triton(q, k, v, cu, causal=False)


def test_backward_grid_is_checked_before_the_forward(triton_interp):
    """CUDA caps grid y at 65535 programs (the interpreter does not). The backward stacks half as many
    query heads a tile as the forward (fp32, GQA 8: 4 instead of 8), so 32768 sequences fit the forward
    but not the backward: refused up front, not by a failed launch at backward time."""
    cu = torch.zeros(32769, dtype=torch.int32)
    cu[-1] = 1                                     # one token in the last sequence, the rest empty
    q, k, v = _qkv([1], 8, 1, 64, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"backward B \* Hq / heads_per_prog = 65536"):
        varlen_attention(q.requires_grad_(), k, v, cu, max_seqlen=1)


def test_cpu_default_runs_reference():
    q, k, v = _qkv([7, 3], 4, 2, 64, torch.float32, seed=2)
    cu = _cu([7, 3])
    assert torch.equal(varlen_attention(q, k, v, cu), varlen_attention_reference(q, k, v, cu))


@pytest.mark.parametrize("bad, err, match", [
    ("heads", ValueError, "multiple of KV heads"), ("dtype", TypeError, "dtype"),
    ("cu_dtype", ValueError, "cu_seqlens"), ("stride", ValueError, "last-dim"),
    ("out", ValueError, "out must be"), ("block_size", ValueError, "block_size"),
    ("tables", ValueError, "block_tables"), ("partial_cache", ValueError, "all of"),
    ("cu_stride", ValueError, "contiguous"), ("cu_device", ValueError, "cu_seqlens is on meta"),
    ("tables_device", ValueError, "block_tables is on meta")])
def test_rejects_bad_inputs(triton_interp, bad, err, match):
    q, k, v = _qkv([4], 4, 2, 64, torch.float32, seed=0)
    cu, out = _cu([4]), None
    k_cache, v_cache = allocate_kv_cache(1, 2, 16, 2, 64, torch.float32, "cpu")[0]
    tables, cached = torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    if bad == "heads":
        q = torch.randn(4, 3, 64)
    elif bad == "dtype":
        k = k.half()
    elif bad == "cu_dtype":
        cu = cu.long()
    elif bad == "stride":
        q = torch.randn(4, 64, 4).transpose(1, 2)
    elif bad == "out":
        out = torch.empty(4, 4, 32)
    elif bad == "block_size":
        k_cache, v_cache = torch.zeros(2, 24, 2, 64), torch.zeros(2, 24, 2, 64)
    elif bad == "tables":
        tables = tables.long()
    elif bad == "cu_stride":  # the kernels read cu_seqlens[b] at cu_seqlens_ptr + b
        cu = torch.tensor([0, 9, 4, 9], dtype=torch.int32)[::2]
    elif bad == "cu_device":  # an index tensor on another device than q: the kernel reads a foreign pointer
        cu = cu.to("meta")
    elif bad == "tables_device":
        tables = tables.to("meta")
    elif bad == "partial_cache":
        with pytest.raises(err, match=match):
            prefill_attention(q, k, v, cu, k_cache, v_cache)
        return
    with pytest.raises(err, match=match):
        _prefill_attention_triton(q, k, v, cu, 4, k_cache=k_cache, v_cache=v_cache, block_tables=tables,
                                  cached_lens=cached, out=out)


def test_aot_compiles_sm90():
    records = kernel_testing.assert_compiles_sm90("arkfast.kernels.prefill_attention")
    for r in records:
        assert r["vector_loads"], r["name"]
        if "preprocess" not in r["name"]:
            assert r["wgmma"], r["name"]  # every 16-bit attention config runs on Hopper tensor cores


def test_offsets_are_int64():
    """Every token index (a long packed batch), cache block id and table row meets its stride in 64
    bits, in the forward (both forms) and every backward kernel."""
    tokens = ("stride_qt", "stride_kt", "stride_vt")
    kernel_testing.assert_int64_offsets("arkfast.kernels.prefill_attention", {
        "prefill_fwd_bf16_d64": (*tokens, "stride_ot", "stride_lt"),
        "prefill_fwd_paged_fp16_d128": (*tokens, "stride_ot", "stride_lt", "stride_cb", "stride_bt"),
        "prefill_bwd_preprocess_bf16_d128": ("stride_ot", "stride_dt"),
        "prefill_bwd_dkdv_bf16_d64": (*tokens, "stride_dt", "stride_lt", "stride_dkt", "stride_dvt"),
        "prefill_bwd_dq_fp16_d128": (*tokens, "stride_dt", "stride_lt", "stride_dqt"),
    })
