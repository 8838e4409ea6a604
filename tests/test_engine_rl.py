"""What an RL trainer needs from the engine: per-token log-probabilities (``SamplingParams(logprobs=k)``)
and new weights from memory (``LLM.update_weights``) without stale prefix-cache entries.

transformers is the oracle: its logits over prompt + sampled tokens give the log-probabilities, and
its greedy decoding of the new weights the tokens the updated engine must produce.
"""
import pytest
import torch
from test_engine import assert_greedy_equal, hf_greedy, random_ids

from arkfast import LLM, SamplingParams
from arkfast.models import load_model
from model_fixtures import build_tiny_checkpoint, load_hf_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-rl")
    return {name: build_tiny_checkpoint("qwen2", root / name, seed=seed, max_position_embeddings=128)
            for name, seed in (("a", 31), ("b", 32))}


@pytest.mark.numerics
def test_logprobs_match_transformers_after_temperature(checkpoints):
    path, T, k = checkpoints["a"], 0.7, 3
    prompts = [random_ids(n, seed=200 + n) for n in (1, 17, 40)]
    params = [SamplingParams(temperature=T, max_tokens=12, seed=i, logprobs=k, ignore_eos=True) for i in range(3)]
    params.append(SamplingParams(temperature=0.0, max_tokens=5, logprobs=0, ignore_eos=True))
    prompts.append(prompts[1])
    outs = LLM(path, max_num_batched_tokens=24).generate(prompts, params)
    hf = load_hf_model(path)
    worst, scale = 0.0, 0.0
    for prompt, p, out in zip(prompts, params, outs):
        c = out.outputs[0]
        assert len(c.logprobs) == len(c.token_ids)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + c.token_ids])).logits[0].double()     # [L, V]
        t = p.temperature or 1.0   # greedy rows report the untempered distribution
        ref = torch.log_softmax(logits[len(prompt) - 1:-1] / t, dim=-1)               # [n, V]
        scale = max(scale, logits.abs().max().item())
        for i, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            top = ref[i].topk(p.logprobs).indices.tolist()
            assert set(entry) == {token, *top}, (i, entry, top)
            for tid, lp in entry.items():
                worst = max(worst, abs(lp.logprob - ref[i, tid].item()))
                assert lp.rank == int((ref[i] > ref[i, tid]).sum()) + 1
        assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for e, t in zip(c.logprobs, c.token_ids)))
    # fp32 on both sides, 2 layers, hidden 128: with the probabilistic rounding bound (Higham & Mary
    # 2019) a logit is within ~sqrt(4L + 1) * sqrt(128) * u * max|z| ~ 2e-6 * max|z| of exact; logp_t =
    # z_y / T - lse(z / T) doubles it and divides by T = 0.7. With max|z| < 10 here that is < 6e-5.
    assert scale < 10, scale
    assert worst < 1e-4, f"max |engine - transformers| log-probability {worst:.2e}"


def test_logprobs_off_by_default_and_validated(checkpoints):
    out = LLM(checkpoints["a"]).generate([random_ids(5, seed=1)], SamplingParams(max_tokens=3, seed=0))[0]
    assert out.outputs[0].logprobs is None and out.outputs[0].cumulative_logprob is None
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="logprobs"):
            SamplingParams(logprobs=bad)


def test_update_weights_gives_the_new_models_greedy_output(checkpoints):
    """Fill the prefix cache with model a, copy model b's weights in from memory: the greedy tokens are
    transformers' greedy tokens of b (a stale cached prefix from a would change them)."""
    prompts = [random_ids(n, seed=300 + n) for n in (40, 33, 52)]
    params = SamplingParams(temperature=0.0, max_tokens=10)
    llm = LLM(checkpoints["a"])
    llm.generate(prompts, params)
    assert llm.generate(prompts[:1], params)[0].num_cached_tokens > 0   # the cache holds a's prefixes
    new = load_model(checkpoints["b"])
    llm.update_weights(new)
    outs = llm.generate(prompts, params)
    assert outs[0].num_cached_tokens == 0, "a prefix computed with the old weights was reused"
    expected, gaps, scale = hf_greedy(checkpoints["b"], prompts, 10, with_gaps=True)
    # the tie bound of test_engine.test_greedy_matches_transformers (2 layers, hidden 128)
    bound = 4 * (4 * 2 + 1) * 128 * 2.0 ** -24 * scale
    assert_greedy_equal([o.outputs[0].token_ids for o in outs], expected, gaps, bound)
    # a mapping of parameter names works the same way, and a wrong tensor is refused by name
    llm.update_weights(dict(load_model(checkpoints["a"]).named_parameters()))
    again = LLM(checkpoints["a"]).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == [o.outputs[0].token_ids for o in again]
    state = dict(new.named_parameters())
    state["norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="norm.weight"):
        llm.update_weights(state)
    del state["norm.weight"]
    with pytest.raises(ValueError, match="missing"):
        llm.update_weights(state)


def test_update_weights_refuses_requests_in_flight(checkpoints):
    llm = LLM(checkpoints["a"])
    llm.add_request(random_ids(8, seed=2), SamplingParams(max_tokens=4, seed=0))
    with pytest.raises(RuntimeError, match="in flight"):
        llm.update_weights(load_model(checkpoints["b"]))
