"""The inference engine end to end on tiny random-weight checkpoints (CPU, fp32, torch references).

Greedy outputs are compared token for token with transformers' ``generate``; the engine's own
features (chunked prefill, prefix caching, preemption, copy-on-write, cascade decode) are checked by
running the same requests with the feature on and off: greedy outputs must not change.
"""
import itertools
import subprocess
import sys

import pytest
import torch

from arkfast import LLM, SamplingParams
from arkfast.engine.model_runner import prefix_groups
from model_fixtures import EOS_ID, VOCAB_SIZE, build_tiny_checkpoint, load_hf_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=10)
# Mistral keeps a sliding window shorter than max_position_embeddings: the engine's context is the window.
ARCH_OVERRIDES = {"llama": {}, "qwen2": {}, "qwen3": {}, "mistral": {"sliding_window": 64}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return {arch: build_tiny_checkpoint(arch, root / arch, seed=11 + i, max_position_embeddings=128, **extra)
            for i, (arch, extra) in enumerate(ARCH_OVERRIDES.items())}


def random_ids(n, seed):
    # ids >= 3: no special tokens inside prompts
    return torch.randint(3, VOCAB_SIZE, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def debate_prompts(seed=0):
    """Two 'problems' with a shared question each (one spanning a block boundary) and agent suffixes of
    awkward lengths, plus an unrelated prompt of one token."""
    q1, q2 = random_ids(21, seed), random_ids(35, seed + 1)
    return ([q1 + random_ids(n, seed + 10 + n) for n in (1, 6, 17)]
            + [q2 + random_ids(n, seed + 20 + n) for n in (3, 4)]
            + [random_ids(1, seed + 30)])


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def hf_greedy(path, prompts, max_tokens, *, with_gaps=False):
    """transformers' greedy continuation of each prompt alone, cut after its first EOS; with
    ``with_gaps`` also, per generated token, its logit minus the runner-up's, and max |logit|."""
    hf = load_hf_model(path)
    results, gaps, scale = [], [], 0.0
    with torch.no_grad():
        for prompt in prompts:
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                              eos_token_id=EOS_ID, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True)
            ids = out.sequences[0, len(prompt):].tolist()
            n = ids.index(EOS_ID) + 1 if EOS_ID in ids else len(ids)
            logits = torch.cat(out.logits)[:n]                        # [n, V]
            top2 = logits.topk(2, dim=-1).values                      # [n, 2]
            results.append(ids[:n])
            gaps.append((top2[:, 0] - top2[:, 1]).tolist())
            scale = max(scale, logits.abs().max().item())
    return (results, gaps, scale) if with_gaps else results


def assert_greedy_equal(got, expected, gaps, bound):
    """Greedy token ids equal, except that the two runs may part where transformers' best two logits
    are within ``bound`` of each other (a tie at the precision both compute in: which side of it each
    lands on depends on summation order, i.e. on the CPU's vector ISA). After such a tie the sequences
    continue from different tokens, so the rest is not compared. Any other difference fails."""
    ties = 0
    for i, (g, e, gap) in enumerate(zip(got, expected, gaps)):
        j = next((t for t, (a, b) in enumerate(zip(g, e)) if a != b), None)
        if j is None:
            assert len(g) == len(e), f"prompt {i}: {len(g)} tokens, transformers {len(e)}: {g} vs {e}"
            continue
        assert gap[j] <= bound, (f"prompt {i}, token {j}: {g[j]} vs transformers' {e[j]}, whose logit leads "
                                 f"the runner-up by {gap[j]:.3e} > {bound:.3e} (not a tie)")
        ties += 1
    assert ties <= len(expected) // 4, f"{ties} of {len(expected)} prompts parted at near-ties"
    return ties


@pytest.mark.numerics
@pytest.mark.parametrize("arch", list(ARCH_OVERRIDES))
def test_greedy_matches_transformers(checkpoints, arch):
    prompts = debate_prompts(seed=len(arch))
    # A 24-token budget chunks the longer prompts' prefill over several steps.
    llm = LLM(checkpoints[arch], max_num_batched_tokens=24)
    outputs = llm.generate(prompts, GREEDY)
    expected, gaps, scale = hf_greedy(checkpoints[arch], prompts, GREEDY.max_tokens, with_gaps=True)
    # Both run fp32: each of the ~4 ops a layer on the residual path and the LM head is within
    # gamma_n = n * u_fp32 of exact, n <= 128 (hidden) here, so a logit of either side is within
    # (4 L + 1) * 128 * u * max|logit| of exact and the two within twice that; a token can flip only
    # where the best two logits are closer than twice that again.
    layers, hidden = 2, 128
    bound = 4 * (4 * layers + 1) * hidden * 2.0 ** -24 * scale
    ties = assert_greedy_equal(token_ids(outputs), expected, gaps, bound)
    for out, prompt, exp in zip(outputs, prompts, expected):
        assert out.prompt_token_ids == prompt
        assert out.finished and out.metrics.arrival_time <= out.metrics.first_token_time <= out.metrics.finished_time
        if out.outputs[0].token_ids == exp:
            assert out.outputs[0].finish_reason == ("stop" if exp[-1] == EOS_ID else "length")
    stats = llm.stats
    assert stats["prompt_tokens"] == sum(map(len, prompts))
    if not ties:
        assert stats["generated_tokens"] == sum(map(len, expected))
    assert stats["cached_prompt_tokens"] > 0 and stats["steps"] > GREEDY.max_tokens


def test_prefix_caching_on_off_and_cascade_on_off_agree(checkpoints):
    path = checkpoints["qwen2"]
    prompts = debate_prompts(seed=3)
    runs = {}
    for name, options in {"cache": {}, "no-cache": {"enable_prefix_caching": False},
                          "cascade-on": {"cascade": "on"}, "cascade-off": {"cascade": "off"}}.items():
        llm = LLM(path, **options)
        outputs = llm.generate(prompts, GREEDY)
        runs[name] = (token_ids(outputs), [o.num_cached_tokens for o in outputs], llm.stats)
    reference = runs["no-cache"][0]
    for name, (ids, _, _) in runs.items():
        assert ids == reference, name
    cached, no_cache = runs["cache"][1], runs["no-cache"][1]
    assert no_cache == [0] * len(prompts) and runs["no-cache"][2]["cached_prompt_tokens"] == 0
    # The first prompt of each problem computes the question; its siblings take it from the cache
    # (whole blocks and then part of the next block).
    assert cached[0] == 0 and all(c >= 16 for c in cached[1:3] + cached[4:5])
    assert runs["cache"][2]["cached_prompt_tokens"] == sum(cached) > 0
    assert runs["cascade-on"][2]["cascade_steps"] > 0 and runs["cascade-off"][2]["cascade_steps"] == 0


def test_small_kv_cache_preempts_and_keeps_outputs(checkpoints):
    path = checkpoints["llama"]
    prompts = [random_ids(n, seed=40 + n) for n in (30, 25, 33, 18, 29, 31)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = token_ids(LLM(path).generate(prompts, params))
    llm = LLM(path, num_kv_blocks=9, max_model_len=128)  # 144 slots for ~6 x 54 tokens
    assert token_ids(llm.generate(prompts, params)) == expected
    assert llm.stats["preemptions"] > 0
    assert all(len(ids) == 24 for ids in expected)
    # The smallest cache allowed (one longest sequence plus a block for a copy) and 3-token prefill
    # chunks: no livelock, every sequence finishes with the same tokens.
    tight = LLM(path, num_kv_blocks=5, max_model_len=64, max_num_batched_tokens=3)
    assert token_ids(tight.generate(prompts[:4], params)) == expected[:4]
    assert tight.stats["preemptions"] > 0
    # Too few blocks for even one sequence of max_model_len tokens is refused up front.
    with pytest.raises(ValueError, match="max_model_len=128"):
        LLM(path, num_kv_blocks=4, max_model_len=128)


def test_copy_on_write_for_identical_prompts(checkpoints):
    path = checkpoints["qwen3"]
    prompt = random_ids(21, seed=50)  # one full block and a partial one
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = token_ids(LLM(path).generate([prompt], params))[0]
    llm = LLM(path)
    outputs = llm.generate([prompt] * 4, params)
    assert token_ids(outputs) == [alone] * 4
    assert llm.block_manager.num_copied_blocks >= 3
    assert [o.num_cached_tokens for o in outputs] == [0, 20, 20, 20]
    # Sampled continuations of the shared prompt diverge and each matches its own run alone.
    sampled = [SamplingParams(temperature=1.0, max_tokens=12, seed=s, ignore_eos=True) for s in range(4)]
    together = token_ids(llm.generate([prompt] * 4, sampled))
    assert len({tuple(t) for t in together}) > 1
    assert together == [token_ids(LLM(path).generate([prompt], [p]))[0] for p in sampled]


def test_seeded_sampling_is_reproducible_across_batches(checkpoints):
    path = checkpoints["llama"]
    llm = LLM(path, seed=1)
    prompt = random_ids(13, seed=60)
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=16, seed=2024, ignore_eos=True)
    alone = token_ids(llm.generate([prompt], params))[0]
    others = [random_ids(n, seed=61 + n) for n in (5, 40)]
    batch = llm.generate([others[0], prompt, others[1]],
                         [SamplingParams(temperature=1.0, max_tokens=16), params, SamplingParams(temperature=0.0)])
    assert batch[1].outputs[0].token_ids == alone
    assert token_ids(LLM(path, seed=7).generate([prompt], params))[0] == alone
    # top_k = 1 is greedy, whatever the temperature.
    greedy = token_ids(llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)))
    assert token_ids(llm.generate([prompt], SamplingParams(temperature=2.0, top_k=1, max_tokens=16,
                                                           ignore_eos=True))) == greedy


def test_stop_strings_and_lengths(checkpoints):
    path = checkpoints["qwen2"]
    llm = LLM(path)
    tok = llm.tokenizer
    prompt = "Question: what is 12 + 30? Agent 1 says"
    full = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))[0]
    text = full.outputs[0].text
    assert full.prompt_token_ids == tok.encode(prompt)
    assert text == tok.decode(full.outputs[0].token_ids, skip_special_tokens=True)
    # Stop at a later ASCII stretch of the greedy text: the same tokens up to it, the text cut before it.
    start = next(i for i in range(len(text) // 2, len(text) - 2) if text[i:i + 2].isascii()
                 and text[i:i + 2].isprintable())
    stop = text[start:start + 2]
    cut = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    assert cut.outputs[0].finish_reason == "stop"
    assert cut.outputs[0].text == text[:text.index(stop)]
    n = len(cut.outputs[0].token_ids)
    assert cut.outputs[0].token_ids == full.outputs[0].token_ids[:n] and n < 40
    # max_tokens, and the context window (Mistral's: its sliding window of 64 tokens).
    short = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0]
    assert len(short.outputs[0].token_ids) == 3 and short.outputs[0].finish_reason == "length"
    mistral = LLM(checkpoints["mistral"])
    assert mistral.max_model_len == 64
    out = mistral.generate([random_ids(60, seed=70)], SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"


def test_incremental_api(checkpoints):
    path = checkpoints["llama"]
    llm = LLM(path, max_num_seqs=2)
    prompts = debate_prompts(seed=5)[:4]
    expected = token_ids(LLM(path).generate(prompts, GREEDY))
    ids = [llm.add_request(p, GREEDY) for p in prompts[:3]]
    assert ids == ["0", "1", "2"] and llm.has_unfinished_requests()
    llm.add_request(prompts[3], GREEDY, request_id="late")
    llm.abort_request("1")
    done = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            done[out.request_id] = out.outputs[0].token_ids
    assert done == {"0": expected[0], "2": expected[2], "late": expected[3]}
    assert llm.step() == []
    # generate() while incremental requests run: theirs come back from the next step().
    llm.add_request(prompts[1], GREEDY, request_id="bg")
    assert token_ids(llm.generate([prompts[0]], GREEDY)) == [expected[0]]
    finished = []
    while llm.has_unfinished_requests() or not finished:
        finished += llm.step()
    assert [(o.request_id, o.outputs[0].token_ids) for o in finished] == [("bg", expected[1])]


def test_validation_errors(checkpoints):
    path = checkpoints["mistral"]
    with pytest.raises(TypeError, match="unknown engine option 'block_sise'"):
        LLM(path, block_sise=16)
    with pytest.raises(ValueError, match="block_size"):
        LLM(path, block_size=24)
    with pytest.raises(ValueError, match="cascade"):
        LLM(path, cascade="maybe")
    with pytest.raises(ValueError, match="max_model_len=100 exceeds the 64"):
        LLM(path, max_model_len=100)
    with pytest.raises(ValueError, match="device must be .* got 'gpu0'"):
        LLM(path, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:1' was asked for, but CUDA is not available"):
            LLM(path, device="cuda:1")
    llm = LLM(path)
    too_long = random_ids(65, seed=80)
    with pytest.raises(ValueError, match="65 tokens long.*64 tokens"):
        llm.generate([random_ids(5, seed=81), too_long], GREEDY)
    assert not llm.has_unfinished_requests()  # nothing of the failed batch was queued
    with pytest.raises(ValueError, match="65 tokens long"):
        llm.add_request(too_long, GREEDY)
    with pytest.raises(ValueError, match="empty"):
        llm.add_request([], GREEDY)
    with pytest.raises(ValueError, match=f"token id {VOCAB_SIZE}"):
        llm.add_request([1, VOCAB_SIZE], GREEDY)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate([[5, 6]], [GREEDY, GREEDY])
    with pytest.raises(TypeError, match="SamplingParams or a list of them .* got dict"):
        llm.generate([[5, 6]], {"temperature": 0.0})
    llm.add_request([5, 6], GREEDY, request_id="x")
    with pytest.raises(ValueError, match="'x' is already in flight"):
        llm.add_request([5, 6], GREEDY, request_id="x")


def test_an_interrupted_step_leaves_the_engine_correct(checkpoints):
    """Ctrl-C (or any exception) inside a step: the step's blocks were already listed in the prefix
    cache but never computed. The engine must forget them, drop the interrupted call's requests, keep
    the others, and give the same tokens as a fresh engine afterwards."""
    path = checkpoints["llama"]
    prompts = [random_ids(n, seed=100 + n) for n in (40, 70, 33)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = token_ids(LLM(path).generate(prompts, params))
    for fail_at in (1, 3, 6):  # a first prefill chunk, a later chunk, a decode step
        llm = LLM(path, max_num_batched_tokens=32)
        background = llm.add_request(prompts[1], params, request_id="bg")
        run, calls = llm.runner.run, []

        def failing_run(batch, run=run, calls=calls, fail_at=fail_at):
            calls.append(batch)
            if len(calls) == fail_at:
                raise KeyboardInterrupt
            return run(batch)
        llm.runner.run = failing_run
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompts, params)
        assert list(llm._requests) == [background], fail_at  # the call's own requests were dropped
        assert token_ids(llm.generate(prompts, params)) == expected, fail_at
        finished = llm.step()  # "bg" may have finished inside generate(): then step() hands it back
        while llm.has_unfinished_requests():
            finished += llm.step()
        assert [(o.request_id, o.outputs[0].token_ids) for o in finished] == [("bg", expected[1])]


def test_triton_kernels_through_the_interpreter(checkpoints, triton_interp):
    """The GPU code path on CPU: every op launches its Triton kernel (interpreted). Mixed steps of
    decode tokens and prefill chunks, cascade decode, prefix hits and copy-on-write copies."""
    path = checkpoints["qwen3"]
    q = random_ids(20, seed=90)
    prompts = [q + random_ids(n, seed=91 + n) for n in (1, 5, 17)] + [q]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    from arkfast.kernels._dispatch import force_reference

    with force_reference():
        expected = token_ids(LLM(path, max_num_batched_tokens=24, cascade="on").generate(prompts, params))
    llm = LLM(path, max_num_batched_tokens=24, cascade="on")
    assert token_ids(llm.generate(prompts, params)) == expected
    assert llm.stats["cascade_steps"] > 0 and llm.block_manager.num_copied_blocks > 0


def test_prefix_groups():
    bs = 16
    # Problems A (4 agents) and B (2 agents) share a one-block "system prompt" (block 0); A's agents
    # then share 3 more blocks, B's 1 more; agent 5 shares only the system prompt; 6 is alone.
    tables = [[0, 1, 2, 3, 10], [0, 1, 2, 3, 11], [0, 1, 2, 3, 12], [0, 1, 2, 3, 13],
              [0, 4, 14], [0, 4, 15], [0, 16], [20, 21]]
    lens = [70, 75, 66, 79, 40, 33, 20, 30]
    group_ids, prefix_lens = prefix_groups(tables, lens, bs)
    groups = {}
    for b, g in enumerate(group_ids):
        groups.setdefault(g, []).append(b)
    by_members = {tuple(m): prefix_lens[g] for g, m in groups.items()}
    # Splitting at the system prompt saves 3 x 4 + 1 x 2 = 14 block reads, grouping everyone there 6.
    assert by_members == {(0, 1, 2, 3): 64, (4, 5): 32, (6,): 0, (7,): 0}
    # Only full blocks before the new token count: sequence lengths of 17 leave one shareable block.
    assert prefix_groups([[0, 1], [0, 1]], [17, 17], bs) == ([0, 0], [16])
    assert prefix_groups([[0, 1], [0, 2]], [16, 17], bs) is None
    assert prefix_groups([[0], [1]], [5, 9], bs) is None


def test_import_arkfast_is_light():
    code = ("import sys, arkfast; assert 'arkfast.engine' not in sys.modules and 'transformers' not in "
            "sys.modules; from arkfast import LLM, SamplingParams; assert 'arkfast.engine' in sys.modules; "
            "print(arkfast.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.1.0"


@pytest.mark.gpu
def test_cuda_graphs_match_eager_bf16(checkpoints):
    path = checkpoints["qwen3"]
    prompts = debate_prompts(seed=9)
    gpu = {"device": "cuda", "dtype": "bfloat16", "kv_cache_memory": 1 << 28}
    eager = token_ids(LLM(path, enforce_eager=True, cascade="off", **gpu).generate(prompts, GREEDY))
    graphed = LLM(path, cascade="off", **gpu)
    assert graphed.runner.graphs is not None
    assert token_ids(graphed.generate(prompts, GREEDY)) == eager
    cascade = LLM(path, cascade="on", **gpu)
    got = token_ids(cascade.generate(prompts, GREEDY))
    assert cascade.stats["cascade_steps"] > 0
    # bf16: cascade merges partial softmaxes in another order; allow a late flip in a few sequences.
    assert sum(a == b for a, b in zip(got, eager)) >= len(prompts) - 2


@pytest.mark.parametrize("cascade", ["on", "off"])
def test_cpu_decode_path_matches_the_reference(checkpoints, cascade):
    """On CPU the engine's decode attention takes the CPU path (float32: the C++ kernel, a group's
    prefix read once); it gives the tokens the torch reference path gives, with caching and copy-on-write."""
    from arkfast.engine.cpu_attention import CpuPagedPlan
    from arkfast.kernels._dispatch import force_reference

    path = checkpoints["llama"]
    prompts = debate_prompts(seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with force_reference():
        expected = token_ids(LLM(path, cascade=cascade, block_size=16).generate(prompts, params))
    llm = LLM(path, cascade=cascade, block_size=16)
    assert llm.runner._cpu_path()
    plan, kinds = llm.runner._decode_plan, set()

    def recording_plan(decode, padded):
        result = plan(decode, padded)
        kinds.add(type(result))
        return result

    llm.runner._decode_plan = recording_plan
    assert token_ids(llm.generate(prompts, params)) == expected
    assert kinds == {CpuPagedPlan}  # float32: the C++ decode attention, every step
    assert (llm.stats["cascade_steps"] > 0) == (cascade == "on")


def test_prepare_metadata_equals_its_per_token_definition(checkpoints):
    """Every step of runs with chunked prefill, prefix hits, copy-on-write and preemption: the
    runner's array-built metadata (input ids, positions, slots, logit rows, the prefill chunks'
    offsets, cached lengths and block tables, the decode plan's padded tables) equals what the
    definitions give token by token from each sequence's ``block_table`` list."""
    path = checkpoints["llama"]
    q = random_ids(37, seed=60)
    prompts = [q + random_ids(n, seed=61 + n) for n in (1, 6, 17, 40)] + [q, q, random_ids(1, seed=70)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    for options in ({"max_num_batched_tokens": 24}, {"num_kv_blocks": 12, "max_model_len": 128}):
        llm = LLM(path, block_size=16, **options)
        runner, bs, checked = llm.runner, 16, []
        prepare, decode_plan, plans = runner.prepare, runner._decode_plan, []

        def recording_plan(decode, padded, decode_plan=decode_plan, plans=plans):
            plans.append(padded.clone())
            return decode_plan(decode, padded)

        def checking_prepare(batch, prepare=prepare, plans=plans, checked=checked, bs=bs):
            plans.clear()
            ids, positions, ctx, rows, sampled = prepare(batch)
            work = [(seq, 1) for seq in batch.decode] + batch.prefill
            tokens = [(seq, j) for seq, n in work
                      for j in range(seq.num_computed_tokens, seq.num_computed_tokens + n)]
            want_pos = [j for _, j in tokens]
            want_ids = [seq.token_ids[j] for seq, j in tokens]
            want_slots = [seq.block_table[j // bs] * bs + j % bs for seq, j in tokens]
            assert positions.tolist() == want_pos and ids.tolist() == want_ids
            assert ctx.slot_mapping.tolist() == want_slots
            assert ctx.max_seqlen == max(seq.num_computed_tokens + n for seq, n in work)
            ends = list(itertools.accumulate(n for _, n in work))
            want = [(e - 1, seq) for (seq, n), e in zip(work, ends)
                    if seq.num_computed_tokens + n == seq.num_tokens]
            assert rows.tolist() == [r for r, _ in want] and sampled == [s for _, s in want]
            for padded, seqs in ((plans[0] if batch.decode else None, batch.decode),
                                 (ctx.block_tables, [s for s, _ in batch.prefill])):
                if not seqs:
                    continue
                width = max(len(s.block_table) for s in seqs)
                assert padded.dtype == torch.int32
                assert padded.tolist() == [s.block_table + [-1] * (width - len(s.block_table)) for s in seqs]
            if batch.prefill:
                assert ctx.cu_seqlens.tolist() == [0, *itertools.accumulate(n for _, n in batch.prefill)]
                assert ctx.cached_lens.tolist() == [s.num_computed_tokens for s, _ in batch.prefill]
                assert ctx.max_new == max(n for _, n in batch.prefill)
            assert ctx.num_decode == len(batch.decode)
            checked.append((len(batch.decode), len(batch.prefill)))
            return ids, positions, ctx, rows, sampled

        runner.prepare, runner._decode_plan = checking_prepare, recording_plan
        llm.generate(prompts, params)
        assert any(d and p for d, p in checked)  # some steps mixed decodes and prefill chunks
    assert llm.stats["preemptions"] > 0 and llm.block_manager.num_copied_blocks > 0
