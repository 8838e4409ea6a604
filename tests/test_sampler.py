"""The sampler (greedy, temperature, top-k, top-p, seeds), SamplingParams validation and the incremental
detokenizer's stop strings."""
import pytest
import torch

from arkfast.engine.detokenizer import IncrementalDetokenizer
from arkfast.engine.sampler import Sampler, SamplingBatch, apply_top_k_top_p, mix_seed, seed_uniform
from arkfast.engine.sampling_params import SamplingParams

CPU = torch.device("cpu")


def logits_for(rows, vocab, seed):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def sample(sampler, logits, params, positions=None):
    positions = positions or [10] * len(params)
    return sampler(logits, SamplingBatch(params, positions))


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = logits_for(17, 301, seed=0)
    sampler = Sampler(CPU, seed=0)
    greedy = sample(sampler, logits, [SamplingParams(temperature=0.0)] * 17)
    assert torch.equal(greedy, logits.argmax(-1))
    top1 = sample(sampler, logits, [SamplingParams(temperature=1.3, top_k=1)] * 17)
    assert torch.equal(top1, greedy)
    # A mixed batch: greedy rows stay greedy whatever the others do.
    mixed = [SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=5.0) for i in range(17)]
    out = sample(sampler, logits, mixed)
    assert torch.equal(out[1::2], greedy[1::2])


def test_exponential_race_matches_the_distribution():
    """Empirical frequencies of 40k draws from one row equal softmax(logits / T) within 4 sigma."""
    V, draws, T = 7, 40_000, 0.7
    logits = logits_for(1, V, seed=1)
    sampler = Sampler(CPU, seed=3)
    tokens = sample(sampler, logits.expand(draws, V), [SamplingParams(temperature=T)] * draws)
    freq = torch.bincount(tokens, minlength=V).double() / draws
    p = torch.softmax(logits[0].double() / T, -1)
    sigma = (p * (1 - p) / draws).sqrt()
    assert ((freq - p).abs() <= 4 * sigma + 1e-4).all(), (freq, p)


def reference_filter(logits, k, p):
    """Row by row: keep the k largest, then the smallest prefix of them (by probability) reaching p."""
    out = torch.full_like(logits, float("-inf"))
    for i in range(logits.shape[0]):
        order = logits[i].argsort(descending=True, stable=True)[:k[i]]
        probs = torch.softmax(logits[i, order], -1)
        keep, total = [], 0.0
        for j, token in enumerate(order.tolist()):
            keep.append(token)
            total += probs[j].item()
            if total >= p[i]:
                break
        out[i, keep] = logits[i, keep]
    return out


def test_top_k_top_p_filter_against_reference():
    logits = logits_for(23, 50, seed=2)
    gen = torch.Generator().manual_seed(5)
    k = torch.randint(1, 51, (23,), generator=gen)
    p = torch.rand(23, generator=gen).clamp(min=0.05)
    p[:3] = 1.0
    k[3:6] = 50
    got = apply_top_k_top_p(logits, k, p)
    expected = reference_filter(logits, k.tolist(), p.tolist())
    assert torch.equal(torch.isinf(got), torch.isinf(expected)), "kept sets differ"
    assert torch.equal(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def test_sampled_tokens_stay_inside_top_k_and_top_p():
    logits = logits_for(1, 200, seed=4).expand(3000, 200)
    sampler = Sampler(CPU, seed=1)
    top_k = sample(sampler, logits, [SamplingParams(top_k=5)] * 3000)
    assert set(top_k.tolist()) <= set(logits[0].topk(5).indices.tolist())
    assert len(set(top_k.tolist())) > 1
    top_p = sample(sampler, logits, [SamplingParams(top_p=0.5)] * 3000)
    nucleus = reference_filter(logits[:1], [200], [0.5])[0]
    assert set(top_p.tolist()) <= set(torch.nonzero(~torch.isinf(nucleus)).flatten().tolist())


def test_seeded_rows_do_not_depend_on_the_batch():
    V = 1000
    logits = logits_for(5, V, seed=6)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    alone = sample(Sampler(CPU, seed=0), logits[2:3], [seeded], positions=[7])
    # Same row, same seed and position, different neighbours, engine seed and row index.
    batch = [SamplingParams(temperature=1.0)] * 2 + [seeded] + [SamplingParams(temperature=0.5, seed=9)] * 2
    together = sample(Sampler(CPU, seed=99), logits, batch, positions=[3, 4, 7, 5, 6])
    assert together[2] == alone[0]
    # Over many positions the draws vary (a seed fixes the sequence of draws, not one token).
    many = [sample(Sampler(CPU), logits[2:3], [seeded], positions=[pos]).item() for pos in range(20)]
    assert len(set(many)) > 1
    assert mix_seed(1, 2) != mix_seed(2, 1) and 0 <= mix_seed(2**62, 10**9) < 2**63


def test_seeded_draws_match_the_distribution_and_the_filters():
    """Seeded rows draw by inversion with one hashed uniform per (seed, position): over 40k positions
    the frequencies equal softmax(logits / T) within 4 sigma, and draws stay inside top-k / top-p."""
    V, draws, T = 7, 40_000, 0.7
    logits = logits_for(1, V, seed=1)
    params = [SamplingParams(temperature=T, seed=11)] * draws
    tokens = sample(Sampler(CPU), logits.expand(draws, V), params, positions=list(range(draws)))
    freq = torch.bincount(tokens, minlength=V).double() / draws
    p = torch.softmax(logits[0].double() / T, -1)
    sigma = (p * (1 - p) / draws).sqrt()
    assert ((freq - p).abs() <= 4 * sigma + 1e-4).all(), (freq, p)
    # One seeded row among unseeded and greedy ones: the same token as alone, and only allowed ones.
    logits = logits_for(1, 200, seed=4).expand(3000, 200)
    allowed_k = set(logits[0].topk(5).indices.tolist())
    nucleus = reference_filter(logits[:1], [200], [0.5])[0]
    allowed_p = set(torch.nonzero(~torch.isinf(nucleus)).flatten().tolist())
    for kwargs, allowed in (({"top_k": 5}, allowed_k), ({"top_p": 0.5}, allowed_p)):
        seeded = [SamplingParams(seed=s, **kwargs) for s in range(3000)]
        got = sample(Sampler(CPU), logits, seeded, positions=[3] * 3000)
        assert set(got.tolist()) <= allowed and len(set(got.tolist())) > 1, kwargs
        mixed = [SamplingParams(temperature=0.0), seeded[7], SamplingParams(**kwargs)]
        assert sample(Sampler(CPU, seed=5), logits[:3], mixed, positions=[3, 3, 3])[1] == got[7]
    us = [seed_uniform(seed, pos) for seed in range(50) for pos in range(200)]
    assert 0 < min(us) and max(us) < 1 and all(torch.tensor(u, dtype=torch.float32).item() == u for u in us)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["ok", ""]}, "stop"),
])
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_normalisation():
    params = SamplingParams(stop="\n\n", top_k=0)
    assert params.stop == ("\n\n",) and params.top_k == -1 and not params.greedy
    assert SamplingParams(temperature=0).greedy
    with pytest.raises(TypeError, match="seed"):
        SamplingParams(seed="7")


def test_incremental_detokenizer_finds_and_trims_stop_strings(tmp_path):
    from transformers import AutoTokenizer

    from model_fixtures import build_tiny_tokenizer

    tok = AutoTokenizer.from_pretrained(str(build_tiny_tokenizer(tmp_path)))
    text = "Agent 1 says the answer is 7. Question: what is 12 + 30?"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, ("answer is 7.", "Question"))
    found = None
    for n in range(1, len(ids) + 1):
        found = detok.update(ids[:n])
        if found:
            break
    assert found == "answer is 7." and detok.stopped
    assert detok.text == "Agent 1 says the "
    # Without a stop string the incremental text is the full decoding.
    detok = IncrementalDetokenizer(tok, ("never",))
    for n in range(1, len(ids) + 1):
        assert detok.update(ids[:n]) is None
    assert detok.text == tok.decode(ids, skip_special_tokens=True) == text
