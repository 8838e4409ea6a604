"""The engine's decode planner: grouping, the cost models it holds, and the plans it hands the kernels
(host side; no kernel runs here)."""
import pytest
import torch

from arkfast.engine import model_runner
from arkfast.engine.planner import (
    CPU_CASCADE_MIN_SAVED_KEYS,
    DecodePlanner,
    cpu_grouping_pays,
    prefix_groups,
)
from arkfast.kernels._common import upload
from arkfast.kernels.cpu_decode_attention import CpuDecodePlan
from arkfast.kernels.decode_attention import DecodePlan, plan_decode
from arkfast.kernels.decode_cost import DecodeCostModel

BS = 16


def forest(problems, agents, prefix_blocks, suffix_tokens):
    """Block tables (host lists) and lengths of ``problems`` x ``agents`` sequences: each problem's
    agents share ``prefix_blocks`` physical blocks, then own ``suffix_tokens`` tokens in blocks of
    their own."""
    tables, lens, nxt = [], [], 0
    for _ in range(problems):
        shared = list(range(nxt, nxt + prefix_blocks))
        nxt += prefix_blocks
        for _ in range(agents):
            own = list(range(nxt, nxt + -(-suffix_tokens // BS)))
            nxt += len(own)
            tables.append(shared + own)
            lens.append(prefix_blocks * BS + suffix_tokens)
    return tables, lens


def planner(**kw):
    return DecodePlanner(BS, 12, 2, 128, torch.bfloat16, torch.device("cpu"), **kw)


def test_prefix_groups_lives_in_the_planner_and_keeps_its_old_import():
    assert model_runner.prefix_groups is prefix_groups
    tables, lens = forest(2, 5, 128, 17)
    group_ids, prefix_lens = prefix_groups(tables, lens, BS)
    assert group_ids == [0] * 5 + [1] * 5 and prefix_lens == [128 * BS] * 2


def test_kernel_path_plan_follows_the_planners_cost_model():
    tables, lens = forest(2, 5, 128, 17)            # 2 problems x 5 agents, 2048 shared tokens each
    plan = planner().plan(tables, lens, cpu_path=False)
    assert isinstance(plan, DecodePlan) and plan.use_cascade
    assert plan.cascade.kv_tokens == 2 * 2048 + 10 * 17
    # The same step planned by plan_decode with the default model: the planner adds nothing of its own.
    padded = torch.tensor(tables, dtype=torch.int32)
    direct = plan_decode(padded, lens, group_ids=[0] * 5 + [1] * 5, prefix_lens=[2048, 2048], block_size=BS,
                         num_kv_heads=2, num_q_heads=12, head_dim=128, dtype=torch.bfloat16)
    assert plan.estimated_bytes == direct.estimated_bytes
    assert torch.equal(plan.cascade.kv_range, direct.cascade.kv_range)
    # Another model, another decision: nothing in the kernels decides for the engine.
    picky = planner(cost_model=DecodeCostModel(min_saving=0.95)).plan(tables, lens, cpu_path=False)
    assert not picky.use_cascade and picky.estimated_bytes == plan.estimated_bytes
    stingy = planner(cost_model=DecodeCostModel(prefix_payback=1e9)).plan(tables, lens, cpu_path=False)
    assert stingy.cascade.kv_tokens == stingy.plain.kv_tokens == 10 * (2048 + 17)
    few_sms = planner(cost_model=DecodeCostModel(default_num_sms=8)).plan(tables, lens, cpu_path=False)
    assert few_sms.plain.num_items < plan.plain.num_items


def test_cascade_on_and_off_force_the_method():
    tables, lens = forest(2, 5, 1, 3)               # a one-block prefix: auto declines it
    assert not planner().plan(tables, lens, cpu_path=False).use_cascade
    on = planner(cascade="on").plan(tables, lens, cpu_path=False)
    assert on.use_cascade and on.group_ids == [0] * 5 + [1] * 5
    off = planner(cascade="off").plan(tables, lens, cpu_path=False)
    assert off.cascade is None and not off.use_cascade
    with pytest.raises(ValueError, match="cascade must be one of"):
        planner(cascade="maybe")


def test_cpu_path_groups_only_when_the_saved_reads_pay():
    small = forest(2, 5, 8, 5)                      # saves 2 x 4 x 128 = 1,024 key reads
    big = forest(2, 5, 64, 5)                       # saves 2 x 4 x 1,024 = 8,192
    for (tables, lens), pays in ((small, False), (big, True)):
        groups = prefix_groups(tables, lens, BS)
        assert cpu_grouping_pays(*groups) is pays
        plan = planner().plan(tables, lens, cpu_path=True)
        assert isinstance(plan, CpuDecodePlan) and plan.num_prefix_groups == (2 if pays else 0)
        assert planner(cascade="on").plan(tables, lens, cpu_path=True).num_prefix_groups == 2
        assert planner(cascade="off").plan(tables, lens, cpu_path=True).num_prefix_groups == 0
    assert cpu_grouping_pays([0, 0, 1], [CPU_CASCADE_MIN_SAVED_KEYS, 0])
    assert not cpu_grouping_pays([0, 0, 1], [CPU_CASCADE_MIN_SAVED_KEYS - 1, 0])
    tables, lens = small
    assert planner(cpu_min_saved_keys=1024).plan(tables, lens, cpu_path=True).num_prefix_groups == 2


def test_the_cpu_workspace_is_kept_from_step_to_step():
    p = planner()
    tables, lens = forest(1, 3, 2, 5)
    assert p.plan(tables, lens, cpu_path=True).workspace is p.plan(tables, lens, cpu_path=True).workspace


def test_upload_packs_aligned_views_in_order():
    parts = [[1, 2, 3], [], torch.arange(6, dtype=torch.int64).reshape(2, 3), [7]]
    for dtype in (torch.int32, torch.int64):
        out = upload(parts, dtype, "cpu")
        assert [t.shape for t in out] == [(3,), (0,), (2, 3), (1,)]
        assert [t.tolist() for t in out] == [[1, 2, 3], [], [[0, 1, 2], [3, 4, 5]], [7]]
        assert all(t.dtype == dtype for t in out)
        base = out[0].data_ptr()
        assert all((t.data_ptr() - base) % 16 == 0 for t in out)      # every part 16-byte aligned
        assert out[0].untyped_storage().data_ptr() == out[3].untyped_storage().data_ptr()  # one buffer
