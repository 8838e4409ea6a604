"""Fixed-capacity decode plans (``plan_decode(..., into=DecodePlanBuffers(...))``): the same attention as
the per-step plans on random prefix forests, through the Triton interpreter, with one set of buffers
reused across steps; steps that exceed the capacity raise, and the engine's planner falls back."""
import pytest
import torch
from test_cascade_attention import make_forest

from arkfast.engine.planner import DecodePlanner, PlanCapacity
from arkfast.kernels.decode_attention import decode_attention, plan_decode
from arkfast.kernels.decode_cost import DecodeCostModel
from arkfast.kernels.plan_buffers import DecodePlanBuffers, PlanCapacityError
from kernel_testing import assert_close, dense_attention, poison_like

pytestmark = pytest.mark.numerics

HQ, HKV, D, BS = 4, 2, 32, 16


def random_forest(seed):
    """1-3 groups of 1-5 members, prefixes of 0-70 tokens (block-aligned or not), suffixes of 0-40."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=gen))
    return [(rand(0, 70), [rand(0, 40) for _ in range(rand(1, 5))]) for _ in range(rand(1, 3))]


def buffers(**kw):
    args = {"max_seqs": 16, "max_blocks": 12, "plain_items": 64, "cascade_items": 64, "num_parts": 128,
            "num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": D, "block_size": BS, "device": "cpu"} | kw
    return DecodePlanBuffers(**args)


def test_fixed_capacity_plans_attend_as_per_step_plans(triton_interp):
    """Six random forests, larger and smaller, through one set of buffers (a step's stale items must
    not leak into the next), each planned plain and cascade with split sizes that cut prefixes and
    suffixes across items. The fixed plan launches the buffers' whole capacity (padding items exit at
    once) and must give the per-step plan's output: equal for plain decode (the same items in the same
    tiles), to fp32 rounding for cascade (its tiles are padded to the capacity's member count)."""
    bufs = buffers()
    for seed in range(6):
        groups = random_forest(seed)
        k_cache, v_cache, tables, seq_lens, group_ids, prefix_lens, keys, values = make_forest(
            groups, num_kv_heads=HKV, head_dim=D, block_size=BS, dtype=torch.float32, seed=seed)
        q = torch.randn(len(group_ids), HQ, D, generator=torch.Generator().manual_seed(100 + seed))
        expected = dense_attention(q, keys, values)[0]
        for mode in ("plain", "cascade"):
            kw = {"group_ids": group_ids, "prefix_lens": prefix_lens, "block_size": BS, "num_kv_heads": HKV,
                  "num_q_heads": HQ, "head_dim": D, "dtype": torch.float32, "mode": mode,
                  "kv_chunk_size": 16 + 8 * (seed % 3)}
            step = plan_decode(tables, seq_lens, **kw)
            fixed = plan_decode(tables, seq_lens, into=bufs, **kw)
            work, fixed_work = (step.cascade, fixed.cascade) if mode == "cascade" else (step.plain, fixed.plain)
            assert fixed_work.num_items == bufs.items[mode] > work.num_items       # padded grid
            assert fixed_work.table_row.data_ptr() == bufs._dev_views[f"{mode}.table_row"].data_ptr()
            got = decode_attention(q, k_cache, v_cache, fixed, out=poison_like(q))
            want = decode_attention(q, k_cache, v_cache, step)
            if mode == "plain":
                assert torch.equal(got, want), (got - want).abs().max()
            else:
                assert_close(got, want.double(), dtype=torch.float32, name=f"seed {seed} fixed vs per-step")
            assert_close(got, expected, dtype=torch.float32, name=f"seed {seed} {mode}")


def test_a_step_past_the_capacity_raises():
    _, _, tables, seq_lens, group_ids, prefix_lens, _, _ = make_forest(
        [(40, [3, 20, 5]), (0, [9])], num_kv_heads=HKV, head_dim=D, block_size=BS, dtype=torch.float32, seed=1)
    kw = {"group_ids": group_ids, "prefix_lens": prefix_lens, "block_size": BS, "num_kv_heads": HKV,
          "num_q_heads": HQ, "head_dim": D, "mode": "cascade"}
    for too_small, match in (({"max_seqs": 3}, "4 sequences"), ({"max_blocks": 3}, "blocks"),
                             ({"plain_items": 2}, "plain work list has"), ({"num_parts": 5}, "partial slots")):
        with pytest.raises(PlanCapacityError, match=match):
            plan_decode(tables, seq_lens, into=buffers(**too_small), **kw)
    with pytest.raises(PlanCapacityError, match="cascade work list has"):
        plan_decode(tables, seq_lens, into=buffers(cascade_items=3), kv_chunk_size=16, **kw)
    with pytest.raises(ValueError, match="buffers were made for"):
        plan_decode(tables, seq_lens, into=buffers(head_dim=64), **kw)
    # A table wider than the buffers still fits when its sequences use no more blocks than they hold.
    wide = torch.cat((tables, torch.full((4, 6), -1, dtype=torch.int32)), 1)
    narrow = buffers(max_blocks=tables.shape[1])
    assert plan_decode(wide, seq_lens, into=narrow, **kw).block_tables.shape == (4, tables.shape[1])


def test_the_planner_falls_back_when_a_step_overflows(triton_interp):
    """Capacity for 4 sequences: a 3-sequence step uses the buffers, a 6-sequence step gets a plan of
    its own (and the right attention), the next small step the buffers again."""
    cost = DecodeCostModel()
    cap = PlanCapacity.from_limits(max_seqs=4, max_blocks=8, num_q_heads=HQ, num_kv_heads=HKV,
                                   num_sms=cost.default_num_sms, cost_model=cost)
    planner = DecodePlanner(BS, HQ, HKV, D, torch.float32, torch.device("cpu"), cascade="on", capacity=cap)
    for members, fits in (([20, 3, 7], True), ([20, 3, 7, 1, 9, 2], False), ([5, 1], True)):
        k_cache, v_cache, tables, seq_lens, _, _, keys, values = make_forest(
            [(33, members)], num_kv_heads=HKV, head_dim=D, block_size=BS, dtype=torch.float32, seed=len(members))
        rows = [[b for b in row if b >= 0] for row in tables.tolist()]
        before = planner.num_capacity_fallbacks
        plan = planner.plan(rows, seq_lens.tolist(), cpu_path=False)
        in_buffers = plan.part_o.data_ptr() == planner.buffers.part_o.data_ptr()
        assert in_buffers == fits and planner.num_capacity_fallbacks == before + (not fits)
        assert plan.use_cascade
        q = torch.randn(len(members), HQ, D, generator=torch.Generator().manual_seed(len(members)))
        got = decode_attention(q, k_cache, v_cache, plan)
        assert_close(got, dense_attention(q, keys, values)[0], dtype=torch.float32, name=f"{len(members)} seqs")


def test_capacity_from_limits_holds_the_cost_models_plans():
    """Steps at the capacity's sequence limit, long and short, shared and not, fit the capacity the
    limits give (its bounds are derived in PlanCapacity.from_limits)."""
    cost = DecodeCostModel()
    for hq, hkv in ((12, 2), (32, 8), (8, 8)):
        cap = PlanCapacity.from_limits(max_seqs=32, max_blocks=400, num_q_heads=hq, num_kv_heads=hkv,
                                       num_sms=132, cost_model=cost)
        bufs = DecodePlanBuffers(max_seqs=32, max_blocks=400, plain_items=cap.plain_items,
                                 cascade_items=cap.cascade_items, num_parts=cap.num_parts, num_q_heads=hq,
                                 num_kv_heads=hkv, head_dim=128, block_size=16, device="cpu")
        for lens, groups in (([6400] * 32, [0] * 32), ([17] * 32, list(range(32))),
                             ([3000 + 7 * b for b in range(32)], [b // 5 for b in range(32)]),
                             ([1] + [6000] * 31, [0] + [1] * 31)):
            prefix = [min(n for n, g in zip(lens, groups) if g == i) - 1 for i in range(max(groups) + 1)]
            tables = torch.arange(32 * 400, dtype=torch.int32).reshape(32, 400)
            plan = plan_decode(tables, lens, group_ids=groups, prefix_lens=prefix, block_size=16,
                               num_kv_heads=hkv, num_q_heads=hq, head_dim=128, cost_model=cost, num_sms=132,
                               into=bufs)
            assert plan.cascade is not None
