"""The C++ CPU decode attention (arkfast.engine.cpu_attention) against the float64 attention over each
sequence's dense K/V, on prefix forests laid out as the block manager lays out a debate."""
import pytest
import torch
from test_cascade_attention import MIXED, make_forest

from arkfast.engine.cpu_attention import best_cpu_level, paged_decode_attention_cpu, plan_cpu_paged_decode
from kernel_testing import assert_close, dense_attention, poison_like, poison_other_prefix_copies

pytestmark = pytest.mark.numerics

# Every x86-64 level the kernel is built for and this CPU runs (4 AVX-512, 3 AVX2 + FMA, 1 the
# baseline): a CPU of another level runs other vector code, so each is checked here.
LEVELS = [level for level in (1, 3, 4) if level <= best_cpu_level()]

CASES = [  # groups [(prefix_len, [suffix_len of each member])], Hq, Hkv, D, block_size
    (MIXED, 8, 2, 64, 16),                                            # partial prefix block, empty suffix
    ([(19, [2, 7, 1, 4, 16]), (0, [0, 3])], 2, 2, 32, 16),           # GQA 1, an empty sequence
    ([(50, [1, 3, 2, 6, 1, 4, 2, 1, 9]), (7, [2])], 8, 1, 128, 32),   # GQA 8, 9 members, block 32
    ([(16, [0, 1]), (1, [0, 15, 16])], 4, 1, 16, 16),                 # sequences that are only a prefix
    ([(48, [17, 1, 33, 96, 5]), (32, [1, 1, 1, 1, 1]), (16, [423])], 6, 2, 32, 16),  # debate-like, one long
    (MIXED, 12, 4, 256, 64),                                          # GQA 3, D 256, block 64
]


def _forest(groups, Hq, Hkv, D, block_size, dtype, seed, shuffle, poison=True):
    k_cache, v_cache, tables, seq_lens, group_ids, prefix_lens, keys, values = make_forest(
        groups, num_kv_heads=Hkv, head_dim=D, block_size=block_size, dtype=dtype, seed=seed)
    B = len(group_ids)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(B)
    tables, seq_lens = tables[perm], seq_lens[perm]
    group_ids = [group_ids[i] for i in perm.tolist()]
    keys, values = [keys[i] for i in perm.tolist()], [values[i] for i in perm.tolist()]
    # The prefix is read through the first member in batch order: every other copy of a partial
    # prefix block becomes NaN, so reading it would show.
    if poison:
        poison_other_prefix_copies(k_cache, v_cache, tables, group_ids, prefix_lens, block_size)
    q = torch.randn(B, Hq, D, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
    return q, k_cache, v_cache, tables, seq_lens, group_ids, prefix_lens, keys, values


@pytest.mark.parametrize("level", LEVELS, ids=[f"x86_64_v{level}" for level in LEVELS])
@pytest.mark.parametrize("shuffle", [False, True], ids=["grouped_order", "shuffled"])
@pytest.mark.parametrize("grouped", [True, False], ids=["groups", "no_groups"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups,Hq,Hkv,D,block_size", CASES)
def test_matches_dense_oracle(dtype, grouped, shuffle, groups, Hq, Hkv, D, block_size, level):
    seed = Hq * 10 + D + len(groups) + block_size
    q, k_cache, v_cache, tables, seq_lens, group_ids, prefix_lens, keys, values = _forest(
        groups, Hq, Hkv, D, block_size, dtype, seed, shuffle, poison=grouped)  # ungrouped: every copy is read
    plan = plan_cpu_paged_decode(tables, seq_lens.tolist(), block_size=block_size,
                                 group_ids=group_ids if grouped else None,
                                 prefix_lens=prefix_lens if grouped else None)
    shared = sum(1 for p, s in groups if p > 0 and len(s) > 1)
    assert plan.num_prefix_groups == (shared if grouped else 0)
    out = poison_like(q)
    got, lse = paged_decode_attention_cpu(q, k_cache, v_cache, plan, out=out, return_lse=True, level=level)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype and lse.dtype == dtype
    expected, expected_lse = dense_attention(q, keys, values)
    # float64: the same maths accumulated in float64, so float64 tolerances. fp32: TOLERANCES (the
    # online softmax and both dot products accumulate in fp32 over <= 423 + 48 keys or D <= 256 dims;
    # exp is a polynomial within ~1e-7 relative, one more rounding).
    assert_close(got, expected, dtype=dtype, name="cpu attention")
    # lse = log(sum of n <= 471 exps): the fp32 sum's relative error gamma_n = n u = 2.8e-5 is that
    # much absolute on its log; 1e-4 leaves room for the rescaling by e^(m - m') once per block.
    assert_close(lse, expected_lse, dtype=dtype, atol=None if dtype == torch.float64 else 1e-4,
                 name="cpu attention lse")
    empty = seq_lens == 0
    assert torch.equal(got[empty], torch.zeros_like(got[empty])) and torch.isneginf(lse[empty]).all()


def test_strided_q_and_scale():
    """q as a view of a fused projection (non-contiguous) and an explicit scale."""
    groups = [(37, [3, 20, 1]), (0, [9])]
    q, k_cache, v_cache, tables, seq_lens, group_ids, prefix_lens, keys, values = _forest(
        groups, 4, 2, 32, 16, torch.float64, seed=3, shuffle=False)
    fused = torch.randn(len(group_ids), 3, 4, 32, dtype=torch.float64)
    fused[:, 1] = q
    plan = plan_cpu_paged_decode(tables, seq_lens, block_size=16, group_ids=group_ids, prefix_lens=prefix_lens)
    got = paged_decode_attention_cpu(fused[:, 1], k_cache, v_cache, plan, scale=0.3)
    expected, _ = dense_attention(q, keys, values, scale=0.3)
    assert_close(got, expected, name="strided q")


def test_bad_plans_are_refused():
    groups = [(20, [3, 5])]
    q, k_cache, v_cache, tables, seq_lens, _, _, _, _ = _forest(
        groups, 2, 1, 16, 16, torch.float32, seed=5, shuffle=False)
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = 999"):
        plan_cpu_paged_decode(tables, [23, 999], block_size=16)
    with pytest.raises(ValueError, match="prefix_lens"):
        plan_cpu_paged_decode(tables, [23, 25], block_size=16, group_ids=[0, 0], prefix_lens=[24])
    with pytest.raises(ValueError, match="group id 3"):
        plan_cpu_paged_decode(tables, [23, 25], block_size=16, group_ids=[0, 3], prefix_lens=[16])
    bad = tables.clone()
    bad[1, 1] = k_cache.shape[0]  # one past the last block
    plan = plan_cpu_paged_decode(bad, seq_lens, block_size=16)
    with pytest.raises(ValueError, match="block table entry"):
        paged_decode_attention_cpu(q, k_cache, v_cache, plan)
    plan = plan_cpu_paged_decode(tables, seq_lens, block_size=16)
    with pytest.raises(TypeError, match="float32/float64"):
        paged_decode_attention_cpu(q.bfloat16(), k_cache, v_cache, plan)
    with pytest.raises(ValueError, match="k_cache"):
        paged_decode_attention_cpu(q, k_cache.double(), v_cache, plan)
    with pytest.raises(ValueError, match="built for 2"):
        paged_decode_attention_cpu(q[:1], k_cache, v_cache, plan)
    with pytest.raises(ValueError, match="level must be"):
        paged_decode_attention_cpu(q, k_cache, v_cache, plan, level=2)
    if best_cpu_level() < 4:
        with pytest.raises(ValueError, match="at most"):
            paged_decode_attention_cpu(q, k_cache, v_cache, plan, level=4)
