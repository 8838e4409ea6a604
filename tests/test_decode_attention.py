"""Paged split-KV decode attention and the decode plan: kernel (through the interpreter) and reference
against attention over the sequences' dense K/V, plan reuse across layers, the cost model's choices."""
import pytest
import torch

from arkfast.kernels import decode_cost
from arkfast.kernels.decode_attention import (
    decode_attention,
    paged_decode_attention,
    paged_decode_attention_reference,
    plan_decode,
)
from kernel_testing import assert_close, dense_attention, poison_like

# Numerically sensitive: CI also runs these under other ATen CPU capabilities (.ci/run).
pytestmark = pytest.mark.numerics


def make_paged(lens, *, num_kv_heads, head_dim, block_size, dtype, seed, value_seed=None, spare_blocks=3):
    """Random K/V for sequences of ``lens`` tokens scattered into randomly numbered blocks of a cache
    whose unwritten slots are NaN (a kernel reading past a sequence's end fails loudly). The block
    layout depends on ``seed`` only, the values on ``value_seed`` (default: ``seed``).
    Returns ``k_cache, v_cache, block_tables [B, W] int32, seq_lens [B] int32, keys, values`` with
    ``keys[b]``/``values[b]`` the dense ``[lens[b], Hkv, D]`` data."""
    gen = torch.Generator().manual_seed(seed)
    values_gen = torch.Generator().manual_seed(seed if value_seed is None else value_seed)
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    tables = torch.full((len(lens), max(need, default=0) + 1), -1, dtype=torch.int32)
    order = torch.randperm(num_blocks, generator=gen)
    keys, values, used = [], [], 0
    for b, n in enumerate(lens):
        k = torch.randn(n, num_kv_heads, head_dim, generator=values_gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=values_gen).to(dtype)
        blocks = order[used:used + need[b]]
        used += need[b]
        tables[b, :need[b]] = blocks.int()
        tok = torch.arange(n)
        k_cache[blocks[tok // block_size], tok % block_size] = k
        v_cache[blocks[tok // block_size], tok % block_size] = v
        keys.append(k)
        values.append(v)
    return k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), keys, values



CASES = [  # dtype, Hq, Hkv, D, block_size, lens
    (torch.float32, 4, 4, 64, 16, [1, 17, 40]),          # GQA 1, a one-token sequence
    (torch.bfloat16, 8, 2, 64, 16, [33, 1, 16, 70]),      # GQA 4, block-crossing lengths
    (torch.float32, 8, 1, 128, 32, [17, 65]),             # GQA 8, D 128, block 32
    (torch.bfloat16, 8, 1, 128, 16, [1, 48]),             # GQA 8, D 128
    (torch.float16, 4, 2, 64, 16, [5, 31]),
]


@pytest.mark.parametrize("use_plan", [True, False], ids=["plan", "no_plan"])
@pytest.mark.parametrize("dtype,Hq,Hkv,D,block_size,lens", CASES)
def test_matches_dense_attention(triton_interp, use_plan, dtype, Hq, Hkv, D, block_size, lens):
    seed = sum(lens) + D + Hq
    k_cache, v_cache, tables, seq_lens, keys, values = make_paged(
        lens, num_kv_heads=Hkv, head_dim=D, block_size=block_size, dtype=dtype, seed=seed)
    q = torch.randn(len(lens), Hq, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    plan = None
    if use_plan:  # 48-token splits: several per sequence, boundaries inside blocks
        plan = plan_decode(tables, seq_lens, block_size=block_size, num_kv_heads=Hkv, num_q_heads=Hq,
                           head_dim=D, kv_chunk_size=48)
        assert plan.plain.num_parts == sum(-(-n // 48) for n in lens)
    out = poison_like(q)
    got, lse = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, plan=plan, out=out,
                                      return_lse=True)
    assert got.data_ptr() == out.data_ptr()
    expected, expected_lse = dense_attention(q, keys, values)
    assert_close(got, expected, dtype=dtype)
    # lse = log(sum of n <= 2048 exps): the fp32 sum's error gamma_n = n u = 1.2e-4 relative is
    # that much absolute on its log (atol); the log's own rounding is rtol * |lse|.
    assert_close(lse, expected_lse, dtype=torch.float32, atol=1e-4, name="lse")
    ref, ref_lse = paged_decode_attention_reference(q, k_cache, v_cache, tables, seq_lens, return_lse=True)
    assert_close(ref, expected, dtype=dtype, name="reference")
    # lse = log(sum of n <= 2048 exps): the fp32 sum's error gamma_n = n u = 1.2e-4 relative is
    # that much absolute on its log (atol); the log's own rounding is rtol * |lse|.
    assert_close(ref_lse, expected_lse, dtype=torch.float32, atol=1e-4, name="reference lse")


REFERENCE_CASES = [  # dtype, Hq, Hkv, D, block_size, lens: the batched reference, no interpreter
    (torch.float32, 4, 4, 64, 16, [0, 1, 17, 40, 16]),              # GQA 1, empty and one-token sequences
    (torch.float32, 8, 2, 32, 16, [33, 0, 1, 15, 16, 17, 70, 0]),  # GQA 4, block-crossing lengths
    (torch.bfloat16, 8, 2, 64, 16, [33, 1, 16, 70]),
    (torch.float32, 8, 1, 128, 32, [17, 65, 32, 0]),                # GQA 8, D 128, block 32
    (torch.float16, 8, 1, 16, 16, [5, 31, 1]),
    (torch.float32, 4, 2, 32, 16, [0, 0]),                          # nothing to attend to at all
]


@pytest.mark.parametrize("chunk", [None, 1, 3], ids=["one_pass", "one_seq_per_chunk", "three_longest"])
@pytest.mark.parametrize("dtype,Hq,Hkv,D,block_size,lens", REFERENCE_CASES)
def test_reference_matches_dense_oracle(monkeypatch, chunk, dtype, Hq, Hkv, D, block_size, lens):
    """The batched reference (the CPU decode path) against the per-sequence fp64 loop over the dense
    K/V, at awkward lengths; the cache's unwritten slots and -1 table entries would turn any stray read
    into NaN. ``chunk``: a gather budget of that many longest sequences (chunks of mixed lengths)."""
    if chunk is not None:
        monkeypatch.setattr(decode_cost, "REFERENCE_GATHER_BYTES", chunk * max(lens) * Hkv * D * 8)
    seed = 7 * sum(lens) + D + Hq + len(lens)
    k_cache, v_cache, tables, seq_lens, keys, values = make_paged(
        lens, num_kv_heads=Hkv, head_dim=D, block_size=block_size, dtype=dtype, seed=seed)
    q = torch.randn(len(lens), Hq, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    for lens_arg in (seq_lens, lens):  # a tensor (no plan) or the plan's host list
        got, lse = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens_arg, return_lse=True)
        expected, expected_lse = dense_attention(q, keys, values)
        assert got.dtype == dtype and lse.dtype == torch.float32
        assert_close(got, expected, dtype=dtype, name="reference")
        # lse = log(sum of n <= 2048 exps): the fp32 sum's error gamma_n = n u = 1.2e-4 relative is
        # that much absolute on its log (atol); the log's own rounding is rtol * |lse|.
        assert_close(lse, expected_lse, dtype=torch.float32, atol=1e-4, name="reference lse")
        empty = torch.tensor(lens) == 0
        assert torch.equal(got[empty], torch.zeros_like(got[empty])) and torch.isneginf(lse[empty]).all()
    got = paged_decode_attention_reference(q, k_cache, v_cache, tables, seq_lens, scale=0.3)
    assert_close(got, dense_attention(q, keys, values, scale=0.3)[0], dtype=dtype, name="scale 0.3")


def test_reference_clamps_lengths_to_the_table():
    """As the kernel without a plan: a seq_lens entry past W x block_size counts as that capacity."""
    k_cache, v_cache, tables, _, keys, values = make_paged(
        [16, 5], num_kv_heads=1, head_dim=32, block_size=16, dtype=torch.float32, seed=6)
    q = torch.randn(2, 2, 32, generator=torch.Generator().manual_seed(7))
    got = paged_decode_attention_reference(q, k_cache, v_cache, tables[:, :1], [40, 5])
    assert_close(got, dense_attention(q, keys, values)[0])
    got, lse = paged_decode_attention_reference(q, k_cache, v_cache, torch.empty(2, 0, dtype=torch.int32),
                                                [3, 0], return_lse=True)
    assert torch.equal(got, torch.zeros_like(q)) and torch.isneginf(lse).all()


def test_plan_reused_across_layers_and_scale(triton_interp):
    """One plan, two layers with different caches (same block tables): both answers right; an
    explicit scale is honoured; q may be a strided view of a fused qkv tensor."""
    lens, Hq, Hkv, D, bs = [23, 64, 9], 8, 2, 64, 16
    layers = [make_paged(lens, num_kv_heads=Hkv, head_dim=D, block_size=bs, dtype=torch.float32, seed=10,
                         value_seed=value_seed) for value_seed in (20, 21)]
    tables, seq_lens = layers[0][2], layers[0][3]
    assert torch.equal(layers[1][2], tables)
    plan = plan_decode(tables, seq_lens, block_size=bs, num_kv_heads=Hkv, num_q_heads=Hq, head_dim=D,
                       kv_chunk_size=32)
    qkv = torch.randn(len(lens), (Hq + 2 * Hkv) * D, generator=torch.Generator().manual_seed(11))
    q = qkv[:, :Hq * D].view(len(lens), Hq, D)                                 # batch stride (Hq + 2Hkv) D
    for k_cache, v_cache, _, _, keys, values in layers:
        got = decode_attention(q, k_cache, v_cache, plan, scale=0.3, out=poison_like(q))
        assert_close(got, dense_attention(q, keys, values, scale=0.3)[0], name="layer output")


def test_empty_sequence_gives_zeros_not_nan(triton_interp):
    k_cache, v_cache, tables, seq_lens, keys, values = make_paged(
        [0, 5], num_kv_heads=1, head_dim=32, block_size=16, dtype=torch.float32, seed=3)
    q = torch.randn(2, 2, 32)
    plan = plan_decode(tables, seq_lens, block_size=16, num_kv_heads=1, num_q_heads=2, head_dim=32)
    for p in (plan, None):
        got, lse = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, plan=p, return_lse=True)
        assert torch.equal(got[0], torch.zeros(2, 32)) and torch.isneginf(lse[0]).all()
        assert_close(got[1], dense_attention(q[1:], keys[1:], values[1:])[0][0])


def test_no_plan_never_reads_past_a_table_row(triton_interp):
    """Without a plan seq_lens is not read back to be checked: an entry past the table's capacity
    (W x block_size) counts as that capacity, so the kernel stays inside each row, even one of width 0."""
    k_cache, v_cache, tables, _, keys, values = make_paged(
        [16, 5], num_kv_heads=1, head_dim=32, block_size=16, dtype=torch.float32, seed=6)
    narrow = tables[:, :1].contiguous()                                   # [2, 1]: 16 tokens a row
    q = torch.randn(2, 2, 32, generator=torch.Generator().manual_seed(7))
    got = paged_decode_attention(q, k_cache, v_cache, narrow, torch.tensor([40, 5], dtype=torch.int32),
                                 out=poison_like(q))
    assert_close(got, dense_attention(q, keys, values)[0])
    got, lse = paged_decode_attention(q, k_cache, v_cache, torch.empty(2, 0, dtype=torch.int32),
                                      torch.tensor([3, 0], dtype=torch.int32), out=poison_like(q),
                                      return_lse=True)
    assert torch.equal(got, torch.zeros_like(q)) and torch.isneginf(lse).all()


def test_cpu_dispatch_runs_the_reference():
    k_cache, v_cache, tables, seq_lens, keys, values = make_paged(
        [7, 40], num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32, seed=4)
    q = torch.randn(2, 4, 64)
    got = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens)
    assert_close(got, dense_attention(q, keys, values)[0])


def _tables(lens, block_size):
    width = max(-(-n // block_size) for n in lens)
    return torch.arange(len(lens) * width, dtype=torch.int32).reshape(len(lens), width)


def _plan(lens, group_ids, prefix_lens, **kw):
    return plan_decode(_tables(lens, 16), lens, group_ids=group_ids, prefix_lens=prefix_lens, block_size=16,
                       num_kv_heads=2, num_q_heads=12, head_dim=128, num_sms=132, **kw)


def test_cost_model_choices():
    """Plain for an empty prefix, for groups of one and for a prefix too short to pay for the extra
    partials; cascade for long prefixes shared by 5 agents."""
    five = [0] * 5 + [1] * 5
    assert not _plan([300] * 10, five, [0, 0]).use_cascade                        # prefix 0
    singles = _plan([2100] * 4, [0, 1, 2, 3], [2048] * 4)
    assert not singles.use_cascade                                                 # groups of one
    assert singles.estimated_bytes["cascade"] == singles.estimated_bytes["plain"]
    assert not _plan([16 + 2000] * 10, five, [16, 16]).use_cascade                 # short prefix
    long = _plan([2048 + 64] * 10, five, [2048, 2048])
    assert long.use_cascade                                                        # 5 agents, 2k prefix
    kv_per_token = 2 * 2 * 128 * 2
    assert long.plain.kv_tokens == 10 * 2112 and long.cascade.kv_tokens == 2 * 2048 + 10 * 64
    assert long.estimated_bytes["cascade"] < 0.3 * long.estimated_bytes["plain"]
    assert long.estimated_bytes["plain"] >= 10 * 2112 * kv_per_token
    mixed = _plan([2048 + 64] * 5 + [20 + 64] * 5, five, [2048, 20])
    assert mixed.use_cascade                                     # per group: only the long prefix is shared
    assert mixed.cascade.kv_tokens == 2048 + 5 * 64 + 5 * (20 + 64)
    assert _plan([300] * 10, five, [0, 0], mode="cascade").use_cascade             # forced
    assert not _plan([2112] * 10, five, [2048, 2048], mode="plain").use_cascade
    assert "use_cascade=True" in repr(long)


def test_bad_inputs_raise():
    k_cache, v_cache, tables, seq_lens, _, _ = make_paged(
        [5, 20], num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32, seed=5)
    q = torch.randn(2, 4, 64)
    with pytest.raises(TypeError, match="dtype"):
        paged_decode_attention(q.bfloat16(), k_cache, v_cache, tables, seq_lens)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_decode_attention(torch.randn(2, 3, 64), k_cache, v_cache, tables, seq_lens)
    with pytest.raises(ValueError, match="needs block_tables"):
        paged_decode_attention(q, k_cache, v_cache)
    plan = plan_decode(tables, seq_lens, block_size=16, num_kv_heads=2, num_q_heads=4, head_dim=64)
    with pytest.raises(ValueError, match="plan was built for"):
        paged_decode_attention(torch.randn(3, 4, 64), k_cache, v_cache, plan=plan)
    with pytest.raises(ValueError, match="out must be"):
        paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, out=torch.empty(2, 4, 32))
    bad = tables.clone()
    bad[1, 1] = -1
    with pytest.raises(ValueError, match=r"block_tables\[1, 1\] = -1"):
        plan_decode(bad, seq_lens, block_size=16, num_kv_heads=2, num_q_heads=4, head_dim=64)
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = 99"):
        plan_decode(tables, [5, 99], block_size=16, num_kv_heads=2, num_q_heads=4, head_dim=64)
    with pytest.raises(ValueError, match=r"prefix_lens\[0\] = 6"):
        plan_decode(tables, seq_lens, group_ids=[0, 0], prefix_lens=[6], block_size=16, num_kv_heads=2,
                    num_q_heads=4, head_dim=64)
    with pytest.raises(ValueError, match="pass both or neither"):
        plan_decode(tables, seq_lens, group_ids=[0, 0], block_size=16, num_kv_heads=2, num_q_heads=4,
                    head_dim=64)
