"""The decode graphs' forwards over static buffers and fixed-capacity plans, run without capture
(``DecodeGraphs(..., capture=False)``, no CUDA needed; capturing them needs a GPU and is not run here):
through the Triton interpreter they give the eager forward's hidden states and cache contents, for
plain, cascade and copy-on-write steps at a batch size that pads its bucket, and the engine's tokens."""
import collections

import pytest
import torch

from arkfast import LLM, SamplingParams
from arkfast.engine.cuda_graphs import DecodeGraphs
from arkfast.engine.model_runner import PagedAttentionContext
from kernel_testing import assert_close
from model_fixtures import VOCAB_SIZE, build_tiny_checkpoint

pytestmark = pytest.mark.numerics
MAX_BATCH = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("graphs") / "qwen3", seed=5,
                                 max_position_embeddings=128)


def graphed(llm):
    """Give ``llm``'s runner fixed plan buffers and uncaptured graphs; returns the graphs and a
    counter of the (bucket, cascade, copies) forwards run."""
    runner = llm.runner
    runner.planner = runner.planner.with_capacity(max_seqs=MAX_BATCH, max_blocks=8)
    graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.planner, MAX_BATCH, llm.max_model_len,
                          capture=False)
    used = collections.Counter()
    for key, forward in list(graphs.graphs.items()):
        graphs.graphs[key] = lambda key=key, forward=forward: (used.update([key]), forward())[1]
    runner.graphs = graphs
    return graphs, used


@pytest.mark.parametrize("cascade", [False, True], ids=["plain", "cascade"])
@pytest.mark.parametrize("copies", [False, True], ids=["no_copies", "copies"])
def test_static_forward_equals_eager(checkpoint, triton_interp, cascade, copies):
    """A decode step of 3 sequences (bucket 4) over a random cache: two share 2 prefix blocks. The same
    context through the model eagerly and through the graphs' static buffers: equal hidden states and
    equal caches afterwards (new tokens written, copy-on-write slots copied after the writes)."""
    llm = LLM(checkpoint, cascade="on" if cascade else "off", max_num_seqs=MAX_BATCH)
    graphs, used = graphed(llm)
    runner = llm.runner
    gen = torch.Generator().manual_seed(3 + 2 * cascade + copies)
    for k_cache, v_cache in runner.kv_caches:
        k_cache.copy_(torch.randn(k_cache.shape, generator=gen))
        v_cache.copy_(torch.randn(v_cache.shape, generator=gen))
    bs = runner.block_size
    tables = [[7, 8, 1], [7, 8, 2], [3, 4]]
    lens = [2 * bs + 5, 2 * bs + 9, bs + 3]                                  # after this step's token
    positions = torch.tensor([n - 1 for n in lens])
    slots = torch.tensor([t[p // bs] * bs + p % bs for t, p in zip(tables, positions.tolist())])
    ids = torch.randint(3, VOCAB_SIZE, (3,), generator=gen)
    plan = runner.planner.plan(tables, lens, cpu_path=False)
    assert plan.use_cascade == cascade and graphs.can_run(PagedAttentionContext(
        runner.kv_caches, slots, max(lens), num_decode=3, plan=plan))
    ctx = PagedAttentionContext(runner.kv_caches, slots, max(lens), num_decode=3, plan=plan)
    if copies:  # block 1's first 5 slots (just written there: position 2 bs + 4) into block 5
        ctx.copy_src = torch.arange(bs, bs + 5)
        ctx.copy_dst = torch.arange(5 * bs, 5 * bs + 5)
    before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    with torch.inference_mode():
        eager = runner.model(ids, positions, ctx)
        eager_caches = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
        for (k, v), (k0, v0) in zip(runner.kv_caches, before):
            k.copy_(k0)
            v.copy_(v0)
        got = graphs.run(ids, positions, ctx)
    assert used == {(4, cascade, copies): 1}
    assert_close(got, eager.double(), dtype=torch.float32, name="hidden")
    # Layers past the first write K/V computed from a batch of 4 rows (the bucket) instead of 3: equal
    # to fp32 rounding; every slot the step does not write or copy is untouched.
    for layer, ((k, v), (ke, ve), (k0, _)) in enumerate(zip(runner.kv_caches, eager_caches, before)):
        assert_close(k, ke.double(), dtype=torch.float32, name=f"layer {layer} k_cache")
        assert_close(v, ve.double(), dtype=torch.float32, name=f"layer {layer} v_cache")
        touched = (k != k0).flatten(2).any(-1).nonzero()                          # [n, 2]: block, offset
        allowed = set(slots.tolist()) | (set(range(5 * bs, 5 * bs + 5)) if copies else set())
        assert {b * bs + o for b, o in touched.tolist()} <= allowed
    if copies:
        k = runner.kv_caches[0][0].view(-1, *runner.kv_caches[0][0].shape[2:])
        assert torch.equal(k[5 * bs:5 * bs + 5], k[bs:bs + 5])


def test_engine_tokens_through_the_static_forwards(checkpoint, triton_interp):
    """A debate-shaped batch decoded by the engine with its decode steps sent through the graphs'
    static forwards: the tokens of an eager engine, and cascade steps among them."""
    gen = torch.Generator().manual_seed(9)
    question = torch.randint(3, VOCAB_SIZE, (37,), generator=gen).tolist()
    prompts = [question + torch.randint(3, VOCAB_SIZE, (n,), generator=gen).tolist() for n in (1, 4, 9, 2)]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(checkpoint, cascade="on").generate(prompts, params)]
    llm = LLM(checkpoint, cascade="on", max_num_seqs=MAX_BATCH)
    _, used = graphed(llm)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected
    assert sum(n for (_, cascade, _), n in used.items() if cascade) > 0
    assert llm.runner.planner.num_capacity_fallbacks == 0
