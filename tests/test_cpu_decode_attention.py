"""The CPU decode path (a shared prefix read once per group, batched torch matmuls) against the float64
attention over each sequence's dense K/V, and against the torch reference of cascade decode."""
import pytest
import torch
from test_cascade_attention import MIXED, make_forest

from arkfast.kernels.cascade_attention import cascade_decode_attention_reference
from arkfast.kernels.cpu_decode_attention import (
    PAD_FRACTION,
    Workspace,
    cpu_decode_attention,
    plan_cpu_decode,
)
from kernel_testing import TOLERANCES, assert_close, dense_attention, poison_like, poison_other_prefix_copies

# Numerically sensitive: CI also runs these under other ATen CPU capabilities (.ci/run).
pytestmark = pytest.mark.numerics

CASES = [  # groups [(prefix_len, [suffix_len of each member])], Hq, Hkv, D, block_size
    (MIXED, 8, 2, 64, 16),                                            # mixed: partial prefix block, empty suffix
    ([(19, [2, 7, 1, 4, 16]), (0, [0, 3])], 2, 2, 32, 16),           # GQA 1, an empty sequence
    ([(50, [1, 3, 2, 6, 1, 4, 2, 1, 9]), (7, [2])], 8, 1, 128, 32),   # GQA 8, 9 members, block 32
    ([(16, [0, 1]), (1, [0, 15, 16])], 4, 1, 16, 16),                 # sequences that are only a prefix
    ([(48, [17, 1, 33, 96, 5]), (32, [1, 1, 1, 1, 1]), (16, [423])], 6, 2, 32, 16),  # debate-like, one long
    ([(0, [1]), (0, [17]), (0, [423])], 6, 2, 32, 16),               # no sharing at all: suffixes bucketed
    (MIXED, 8, 4, 32, 16),                                            # Hkv 4: one gather and bmm per head
]




@pytest.mark.parametrize("grouped", [True, False], ids=["groups", "no_groups"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups,Hq,Hkv,D,block_size", CASES)
def test_matches_dense_oracle(dtype, grouped, groups, Hq, Hkv, D, block_size):
    seed = Hq * 10 + D + len(groups) + block_size
    k_cache, v_cache, tables, seq_lens, group_ids, prefix_lens, keys, values = make_forest(
        groups, num_kv_heads=Hkv, head_dim=D, block_size=block_size, dtype=dtype, seed=seed)
    if grouped:
        poison_other_prefix_copies(k_cache, v_cache, tables, group_ids, prefix_lens, block_size)
    q = torch.randn(len(group_ids), Hq, D, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64).to(dtype)
    plan = plan_cpu_decode(tables, seq_lens.tolist(), block_size=block_size,
                           group_ids=group_ids if grouped else None, prefix_lens=prefix_lens if grouped else None)
    shared = sum(1 for g, (p, s) in enumerate(groups) if p > 0 and len(s) > 1)
    assert plan.num_prefix_groups == (shared if grouped else 0)
    out = poison_like(q)
    got, lse = cpu_decode_attention(q, k_cache, v_cache, plan, out=out, return_lse=True)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
    expected, expected_lse = dense_attention(q, keys, values)
    # float64 caches: the same maths in float64, so float64 tolerances. fp32 / bf16: TOLERANCES (the
    # softmax and both matmuls accumulate in fp32 over <= 423 + 96 keys or D <= 128 dims).
    assert_close(got, expected, dtype=dtype, name="cpu decode")
    # lse = log(sum of n <= 2048 exps): the fp32 sum's error gamma_n = n u = 1.2e-4 relative is that
    # much absolute on its log (atol); float64: the float64 tolerances.
    if dtype == torch.float64:
        assert lse.dtype == torch.float64
        assert_close(lse, expected_lse, dtype=torch.float64, name="cpu decode lse")
    else:
        assert_close(lse, expected_lse, dtype=torch.float32, atol=1e-4, name="cpu decode lse")
    empty = seq_lens == 0
    assert torch.equal(got[empty], torch.zeros_like(got[empty])) and torch.isneginf(lse[empty]).all()
    if dtype != torch.float64:
        ref = cascade_decode_attention_reference(q, k_cache, v_cache, tables, seq_lens, group_ids, prefix_lens)
        tol = TOLERANCES[dtype]
        assert_close(got.double(), ref.double(), dtype=dtype, atol=2 * tol[0], rtol=2 * tol[1], name="vs reference")


def test_prefix_read_once_per_group():
    """A debate of 3 problems x 5 agents: one prefix pass item per problem, holding its 5 agents' query
    rows, and the prefix tokens appear in no suffix pass."""
    groups = [(64, [1, 5, 9, 2, 17]), (32, [3, 3, 3, 3, 3]), (80, [20, 1, 1, 1, 1])]
    _, _, tables, seq_lens, group_ids, prefix_lens, _, _ = make_forest(
        groups, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32, seed=0)
    plan = plan_cpu_decode(tables, seq_lens.tolist(), block_size=16, group_ids=group_ids, prefix_lens=prefix_lens)
    prefix_items = [(p.num_items, p.members) for p in plan.passes if p.members > 1]
    assert sum(n for n, _ in prefix_items) == 3 and all(m == 5 for _, m in prefix_items)
    read = sum(int((p.bias == 0).sum()) for p in plan.passes)  # keys gathered per KV head
    assert read == sum(prefix_lens) + sum(s for _, suffixes in groups for s in suffixes)


def test_buckets_bound_the_padding():
    """Sequences of very different lengths go to different passes: no pass pads more than
    PAD_FRACTION of its keys; every key is read once."""
    lens = [1, 2, 3, 17, 40, 100, 423, 424, 250]
    _, _, tables, seq_lens, _, _, _, _ = make_forest([(0, [n]) for n in lens], num_kv_heads=1, head_dim=16,
                                                     block_size=16, dtype=torch.float32, seed=1)
    plan = plan_cpu_decode(tables, seq_lens.tolist(), block_size=16)
    for p in plan.passes:
        real = (p.bias == 0).sum(-1).flatten()
        assert real.min() >= PAD_FRACTION * p.length
    assert sum(int((p.bias == 0).sum()) for p in plan.passes) == sum(lens)


def test_plan_validates():
    tables = torch.tensor([[0, 1], [2, -1]])
    with pytest.raises(ValueError, match="seq_lens\\[1\\] = 40"):
        plan_cpu_decode(tables, [20, 40], block_size=16)
    with pytest.raises(ValueError, match="go together"):
        plan_cpu_decode(tables, [20, 5], block_size=16, group_ids=[0, 0])
    with pytest.raises(ValueError, match="prefix_lens\\[0\\] = 16"):
        plan_cpu_decode(tables, [20, 5], block_size=16, group_ids=[0, 0], prefix_lens=[16])


def test_workspace_reused_across_steps():
    """One workspace through plans of growing and shrinking shapes (as the engine reuses it step after
    step) gives what a fresh workspace gives, bit for bit."""
    ws = Workspace()
    for i, groups in enumerate([MIXED, [(48, [17, 1, 33, 96, 5])], MIXED, [(0, [1])], [(16, [423, 2])]]):
        k_cache, v_cache, tables, seq_lens, group_ids, prefix_lens, _, _ = make_forest(
            groups, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32, seed=i)
        q = torch.randn(len(group_ids), 6, 32, generator=torch.Generator().manual_seed(i))
        kwargs = {"block_size": 16, "group_ids": group_ids, "prefix_lens": prefix_lens}
        reused = cpu_decode_attention(q, k_cache, v_cache, plan_cpu_decode(tables, seq_lens.tolist(), workspace=ws,
                                                                           **kwargs))
        fresh = cpu_decode_attention(q, k_cache, v_cache, plan_cpu_decode(tables, seq_lens.tolist(), **kwargs))
        assert torch.equal(reused, fresh)
