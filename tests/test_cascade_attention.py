"""Cascade (shared-prefix) decode attention over a prefix forest: kernel (through the interpreter),
plain paged decode and both references against attention over each sequence's dense K/V."""
import pytest
import torch

from arkfast.kernels import decode_cost
from arkfast.kernels.cascade_attention import cascade_decode_attention, cascade_decode_attention_reference
from arkfast.kernels.decode_attention import decode_attention, paged_decode_attention, plan_decode
from kernel_testing import (
    assert_close,
    assert_compiles_sm90,
    assert_int64_offsets,
    dense_attention,
    poison_like,
    poison_other_prefix_copies,
)

# Numerically sensitive: CI also runs these under other ATen CPU capabilities (.ci/run).
pytestmark = pytest.mark.numerics


def make_forest(groups, *, num_kv_heads, head_dim, block_size, dtype, seed, spare_blocks=2):
    """A paged cache laid out as a block manager with prefix sharing lays out a debate.

    ``groups``: ``[(prefix_len, [suffix_len of each member]), ...]``. A group's full prefix blocks are
    the same physical blocks in every member's table; a partial last prefix block is copied per member
    (copy on write) and continued with that member's suffix. Block ids are shuffled, unused table
    entries are -1, unwritten slots NaN. Returns ``k_cache, v_cache, block_tables, seq_lens,
    group_ids, prefix_lens, keys, values`` (``keys[b]``: sequence b's dense ``[L, Hkv, D]``)."""
    gen = torch.Generator().manual_seed(seed)
    bs = block_size
    members = [(g, prefix, prefix + suffix)
               for g, (prefix, suffixes) in enumerate(groups) for suffix in suffixes]
    own_blocks = [-(-(length - prefix // bs * bs) // bs) for _, prefix, length in members]
    num_blocks = sum(prefix // bs for prefix, _ in groups) + sum(own_blocks) + spare_blocks
    order = iter(torch.randperm(num_blocks, generator=gen).tolist())
    shared = [[next(order) for _ in range(prefix // bs)] for prefix, _ in groups]
    width = max(len(shared[g]) + n for (g, _, _), n in zip(members, own_blocks)) + 1
    shape = (num_blocks, bs, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    tables = torch.full((len(members), width), -1, dtype=torch.int32)
    prefix_kv = [[torch.randn(prefix, num_kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2)]
                 for prefix, _ in groups]
    keys, values = [], []
    for b, ((g, prefix, length), n_own) in enumerate(zip(members, own_blocks)):
        row = shared[g] + [next(order) for _ in range(n_own)]
        tables[b, :len(row)] = torch.tensor(row, dtype=torch.int32)
        k, v = (torch.cat((prefix_kv[g][i], torch.randn(length - prefix, num_kv_heads, head_dim,
                                                         generator=gen).to(dtype))) for i in range(2))
        tok = torch.arange(length)
        blocks = torch.tensor(row, dtype=torch.long)[tok // bs]
        k_cache[blocks, tok % bs] = k
        v_cache[blocks, tok % bs] = v
        keys.append(k)
        values.append(v)
    seq_lens = torch.tensor([length for _, _, length in members], dtype=torch.int32)
    group_ids = [g for g, _, _ in members]
    prefix_lens = [prefix for prefix, _ in groups]
    return k_cache, v_cache, tables, seq_lens, group_ids, prefix_lens, keys, values



MIXED = [(37, [3, 20, 0, 17, 1]),   # 5 agents, prefix not block-aligned, one with an empty suffix
         (20, [5]),                 # a group of one
         (0, [9, 30]),              # an empty prefix
         (32, [1, 40, 6])]          # a block-aligned prefix

CASES = [  # groups, Hq, Hkv, D, block_size, kv_chunk_size
    (MIXED, 8, 2, 64, 16, 32),                       # GQA 4, prefixes split across programs
    (MIXED, 8, 2, 64, 16, None),                     # GQA 4, the plan's own split size
    ([(19, [2, 7, 1, 4, 16])], 2, 2, 128, 16, 16),   # GQA 1, D 128
    ([(50, [1, 3, 2, 6, 1, 4, 2, 1, 9]), (7, [2])], 8, 1, 64, 32, 48),   # GQA 8: 9 agents -> 2 row tiles
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups,Hq,Hkv,D,block_size,chunk", CASES)
def test_cascade_equals_plain_equals_reference(triton_interp, dtype, groups, Hq, Hkv, D, block_size, chunk):
    seed = Hq * 100 + D + len(groups) + (chunk or 0)
    k_cache, v_cache, tables, seq_lens, group_ids, prefix_lens, keys, values = make_forest(
        groups, num_kv_heads=Hkv, head_dim=D, block_size=block_size, dtype=dtype, seed=seed)
    q = torch.randn(len(group_ids), Hq, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    plan = plan_decode(tables, seq_lens, group_ids=group_ids, prefix_lens=prefix_lens, block_size=block_size,
                       num_kv_heads=Hkv, num_q_heads=Hq, head_dim=D, kv_chunk_size=chunk, mode="cascade")
    assert plan.use_cascade
    expected, expected_lse = dense_attention(q, keys, values)

    out = poison_like(q)
    got, lse = cascade_decode_attention(q, k_cache, v_cache, plan, out=out, return_lse=True)
    assert got.data_ptr() == out.data_ptr()
    assert_close(got, expected, dtype=dtype, name="cascade")
    # lse = log(sum of n <= 2048 exps): the fp32 sum's error gamma_n = n u = 1.2e-4 relative is
    # that much absolute on its log (atol); the log's own rounding is rtol * |lse|.
    assert_close(lse, expected_lse, dtype=torch.float32, atol=1e-4, name="cascade lse")
    plain = paged_decode_attention(q, k_cache, v_cache, plan=plan, out=poison_like(q))
    assert_close(plain, expected, dtype=dtype, name="plain")
    assert_close(got, plain.double(), dtype=dtype, name="cascade vs plain")
    ref = cascade_decode_attention_reference(q, k_cache, v_cache, tables, seq_lens, group_ids, prefix_lens)
    assert_close(ref, expected, dtype=dtype, name="reference")


REFERENCE_CASES = [  # groups, Hq, Hkv, D, block_size: the batched reference, no interpreter
    (MIXED, 8, 2, 64, 16),                                           # GQA 4, mixed groups
    ([(19, [2, 7, 1, 4, 16]), (0, [0, 3])], 2, 2, 32, 16),          # GQA 1, an empty sequence
    ([(50, [1, 3, 2, 6, 1, 4, 2, 1, 9]), (7, [2])], 8, 1, 128, 32),  # GQA 8, block 32
    ([(16, [0, 1]), (1, [0, 15, 16])], 4, 1, 16, 16),                # sequences that are only a prefix
]


@pytest.mark.parametrize("chunk", [None, 1, 3], ids=["one_pass", "one_seq_per_chunk", "three_longest"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups,Hq,Hkv,D,block_size", REFERENCE_CASES)
def test_reference_matches_dense_oracle(monkeypatch, chunk, dtype, groups, Hq, Hkv, D, block_size):
    """The batched reference against the per-sequence fp64 loop over the dense K/V, whole or in chunks
    (a gather budget of ``chunk`` longest sequences). Every member but a group's first has its copy of
    a partial last prefix block poisoned with NaN: the reference reads the prefix through the first
    member's table row, as its contract says."""
    seed = Hq * 10 + D + len(groups)
    k_cache, v_cache, tables, seq_lens, group_ids, prefix_lens, keys, values = make_forest(
        groups, num_kv_heads=Hkv, head_dim=D, block_size=block_size, dtype=dtype, seed=seed)
    if chunk is not None:
        budget = chunk * int(seq_lens.max()) * Hkv * D * 8   # fp32 K and V of `chunk` longest sequences
        monkeypatch.setattr(decode_cost, "REFERENCE_GATHER_BYTES", budget)
    poison_other_prefix_copies(k_cache, v_cache, tables, group_ids, prefix_lens, block_size)
    q = torch.randn(len(group_ids), Hq, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    got, lse = cascade_decode_attention_reference(q, k_cache, v_cache, tables, seq_lens, group_ids,
                                                  prefix_lens, return_lse=True)
    expected, expected_lse = dense_attention(q, keys, values)
    assert got.dtype == dtype
    assert_close(got, expected, dtype=dtype, name="reference")
    # lse = log(sum of n <= 2048 exps): the fp32 sum's error gamma_n = n u = 1.2e-4 relative is
    # that much absolute on its log (atol); the log's own rounding is rtol * |lse|.
    assert_close(lse, expected_lse, dtype=torch.float32, atol=1e-4, name="reference lse")
    empty = seq_lens == 0
    assert torch.equal(got[empty], torch.zeros_like(got[empty])) and torch.isneginf(lse[empty]).all()


def test_prefix_read_once_per_row_tile():
    """The work list reads a group's prefix once per row tile, each suffix once."""
    _, _, tables, seq_lens, group_ids, prefix_lens, _, _ = make_forest(
        CASES[3][0], num_kv_heads=1, head_dim=64, block_size=32, dtype=torch.float32, seed=0)
    plan = plan_decode(tables, seq_lens, group_ids=group_ids, prefix_lens=prefix_lens, block_size=32,
                       num_kv_heads=1, num_q_heads=8, head_dim=64, kv_chunk_size=1024, mode="cascade")
    suffixes = sum(n - prefix_lens[g] for n, g in zip(seq_lens.tolist(), group_ids))
    assert plan.cascade.kv_tokens == 2 * 50 + 7 + suffixes   # 9 agents at 8 per tile: two tiles
    assert plan.cascade.rows == 64 and plan.plain.rows == 16
    assert plan.plain.kv_tokens == int(seq_lens.sum())


def test_decode_attention_follows_the_cost_model(triton_interp):
    """A long shared prefix with 5 agents: the plan picks cascade and decode_attention runs it; the
    CPU dispatch (reference path) gives the same numbers."""
    k_cache, v_cache, tables, seq_lens, group_ids, prefix_lens, keys, values = make_forest(
        [(150, [1, 2, 3, 1, 2]), (96, [4, 1, 1, 2, 3])], num_kv_heads=2, head_dim=64, block_size=16,
        dtype=torch.bfloat16, seed=7)
    q = torch.randn(10, 8, 64).bfloat16()
    plan = plan_decode(tables, seq_lens, group_ids=group_ids, prefix_lens=prefix_lens, block_size=16,
                       num_kv_heads=2, num_q_heads=8, head_dim=64, dtype=torch.bfloat16)
    assert plan.use_cascade
    got = decode_attention(q, k_cache, v_cache, plan, out=poison_like(q))
    expected = dense_attention(q, keys, values)[0]
    assert_close(got, expected, dtype=torch.bfloat16)
    from arkfast.kernels._dispatch import force_reference
    with force_reference():
        ref = decode_attention(q, k_cache, v_cache, plan)
    assert_close(ref, expected, dtype=torch.bfloat16, name="reference")


def test_plan_without_groups_refuses_cascade():
    k_cache, v_cache, tables, seq_lens, _, _, _, _ = make_forest(
        [(0, [5, 9])], num_kv_heads=1, head_dim=32, block_size=16, dtype=torch.float32, seed=1)
    plan = plan_decode(tables, seq_lens, block_size=16, num_kv_heads=1, num_q_heads=1, head_dim=32)
    assert plan.cascade is None and not plan.use_cascade
    with pytest.raises(ValueError, match="no prefix groups"):
        cascade_decode_attention(torch.randn(2, 1, 32), k_cache, v_cache, plan)


def test_compiles_for_sm90():
    records = assert_compiles_sm90("arkfast.kernels.cascade_attention")
    by_name = {r["name"]: r for r in records}
    assert by_name["paged_partial_bf16_d128_rows64"]["wgmma"]   # the prefix tile runs on tensor cores


def test_offsets_are_int64():
    """Slot x slot stride (a 100+ GiB cache), sequence x q batch stride, table row x table width and
    partial slot x heads are formed in 64 bits."""
    assert_int64_offsets("arkfast.kernels.cascade_attention", {
        name: ("stride_slot", "stride_qb", "stride_table", "num_q_heads")
        for name in ("paged_partial_bf16_d128_rows64", "paged_partial_fp32_d16_rows16")})
