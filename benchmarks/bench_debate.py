"""End-to-end debate generation: ``arkfast.LLM`` (prefix sharing on / off) vs transformers' batched
``generate``, on random-weight models shaped like Qwen2.5-0.5B and Qwen3-1.7B.

    python -m benchmarks.bench_debate            # on a GPU: both shapes, bf16, results appended
    python -m benchmarks.bench_debate --smoke    # a tiny model on CPU (the default without CUDA)

Workload (greedy, ``ignore_eos``, fixed lengths): P problems x A agents x 2 rounds. Round 1: each
agent reads the problem's question (``--question`` tokens) plus its own instruction suffix
(``--suffix``) and writes ``--output`` tokens. Round 2, submitted for a problem as soon as its round 1
finishes: the question and every agent's round-1 answer (the shared transcript, ``question + A x
output`` tokens, about 1k by default) plus the agent's suffix. Providers:

* ``arkfast``: prefix caching on, cascade decode as the plan's cost model chooses;
* ``arkfast-no-sharing``: prefix caching and cascade off (every sequence computes and reads its own
  prefix);
* ``hf-generate``: transformers, each round one left-padded batched ``generate`` call.

Reported: generated tokens/s end to end, and for the arkfast providers the time of one decode step in
round 2's steady state (all P x A sequences decoding) next to its bound: the bytes a step must read
(the weights once, plus the K/V of every *distinct* cached token) over the measured copy bandwidth.
Records go to ``benchmarks/results/debate.jsonl``.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from arkfast import LLM, SamplingParams

try:
    from benchmarks import harness
except ImportError:  # run as a script: python benchmarks/bench_debate.py
    import harness

# transformers config fields of the two model shapes (weights are random).
SHAPES = {
    "qwen2.5-0.5b": ("qwen2", {
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "rope_theta": 1e6, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}),
    "qwen3-1.7b": ("qwen3", {
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
        "rope_theta": 1e6, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}),
    "tiny": ("qwen2", {
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "tie_word_embeddings": True}),
}


def build_model(shape: str, path: Path, dtype: torch.dtype, device: torch.device):
    """A random-weight transformers model of ``shape`` saved at ``path``; returns it (eval mode)."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    arch, fields = SHAPES[shape]
    config = (Qwen2Config if arch == "qwen2" else Qwen3Config)(
        **fields, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(str(path))
    return model.eval()


def make_workload(args, vocab: int, seed: int = 0):
    """Per problem: the question's and each agent's suffix token ids (random, no special token 0)."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(1, vocab, (n,), generator=gen).tolist()

    return [(ids(args.question), [ids(args.suffix) for _ in range(args.agents)]) for _ in range(args.problems)]


def round2_prompt(question, answers, suffix):
    return question + [t for a in answers for t in a] + suffix


def run_arkfast(path: Path, workload, args, **options) -> dict:
    """Both rounds through the incremental API (a problem's round 2 starts when its round 1 ends);
    returns timings and token counts."""
    llm = LLM(path, dtype=args.dtype, device=args.device, **options)
    params = SamplingParams(temperature=0.0, max_tokens=args.output, ignore_eos=True)
    warm = llm.generate([workload[0][0][:8]], SamplingParams(temperature=0.0, max_tokens=2))  # compile/warm
    del warm
    answers: dict[int, list] = {p: [None] * args.agents for p in range(len(workload))}
    _sync(args.device)
    t0 = time.perf_counter()
    for p, (question, suffixes) in enumerate(workload):
        for a, suffix in enumerate(suffixes):
            llm.add_request(question + suffix, params, request_id=f"{p}:1:{a}")
    generated = 0
    while llm.has_unfinished_requests():
        for out in llm.step():
            p, rnd, a = (int(x) for x in out.request_id.split(":"))
            generated += len(out.outputs[0].token_ids)
            if rnd == 1:
                answers[p][a] = out.outputs[0].token_ids
                if all(x is not None for x in answers[p]):
                    question, suffixes = workload[p]
                    for b, suffix in enumerate(suffixes):
                        llm.add_request(round2_prompt(question, answers[p], suffix), params,
                                        request_id=f"{p}:2:{b}")
    _sync(args.device)
    seconds = time.perf_counter() - t0
    stats = llm.stats
    return {"seconds": seconds, "generated_tokens": generated, "tokens_per_s": generated / seconds,
            "prefix_cache_hit_rate": stats["prefix_cache_hit_rate"], "cascade_steps": stats["cascade_steps"],
            "steps": stats["steps"], **decode_step(llm, workload, answers, args)}


def decode_step(llm: LLM, workload, answers, args) -> dict:
    """Time one round-2 decode step with every sequence decoding, and its byte bound."""
    params = SamplingParams(temperature=0.0, max_tokens=args.warmup + args.reps + 2, ignore_eos=True)
    for p, (question, suffixes) in enumerate(workload):
        for suffix in suffixes:
            llm.add_request(round2_prompt(question, answers[p], suffix), params)
    sched = llm.scheduler
    while sched.waiting or any(s.num_tokens - s.num_computed_tokens > 1 for s in sched.running):
        llm.step()  # prefill (and the first tokens)
    batch = len(sched.running)
    bm = llm.block_manager
    distinct = {b for s in sched.running for b in s.block_table}
    kv_tokens = sum(len(bm.blocks[b].token_ids) for b in distinct)
    cfg = llm.model_config
    kv_bytes = kv_tokens * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * llm.dtype.itemsize
    weight_bytes = sum(t.numel() * t.element_size() for t in llm.model.parameters())
    stats = harness.measure(llm.step, warmup=args.warmup, reps=args.reps, device=args.device)
    while llm.has_unfinished_requests():
        llm.step()
    bound_ms = (weight_bytes + kv_bytes) / (args.copy_gbps * 1e6) if args.copy_gbps else None
    return {"decode_batch": batch, "decode_step_ms": stats.median_ms, "decode_p20_ms": stats.p20_ms,
            "decode_p80_ms": stats.p80_ms, "peak_mem_bytes": stats.peak_mem_bytes,
            "weight_bytes": weight_bytes, "distinct_kv_bytes": kv_bytes, "bound_ms": bound_ms,
            "pct_of_bound": None if bound_ms is None else 100 * bound_ms / stats.median_ms}


def run_hf(model, workload, args) -> dict:
    """Each round as one left-padded batched greedy ``generate`` (round 2 after all of round 1)."""
    kwargs = {"max_new_tokens": args.output, "min_new_tokens": args.output, "do_sample": False, "pad_token_id": 0}

    def batch_generate(prompts):
        width = max(map(len, prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(args.device), attention_mask=mask.to(args.device), **kwargs)
        return out[:, width:].tolist()

    batch_generate([workload[0][0][:8]])  # warm-up
    _sync(args.device)
    t0 = time.perf_counter()
    round1 = batch_generate([q + s for q, suffixes in workload for s in suffixes])
    answers = [round1[p * args.agents:(p + 1) * args.agents] for p in range(len(workload))]
    round2 = batch_generate([round2_prompt(q, answers[p], s) for p, (q, suffixes) in enumerate(workload)
                             for s in suffixes])
    _sync(args.device)
    seconds = time.perf_counter() - t0
    generated = sum(map(len, round1)) + sum(map(len, round2))
    return {"seconds": seconds, "generated_tokens": generated, "tokens_per_s": generated / seconds}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(parser, warmup=3, reps=20)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None,
                        help="model shapes (default qwen2.5-0.5b qwen3-1.7b; tiny with --smoke)")
    parser.add_argument("--problems", type=int, default=None, help="problems P (default 8; 1 with --smoke)")
    parser.add_argument("--agents", type=int, default=5, help="agents per problem (default 5)")
    parser.add_argument("--question", type=int, default=None,
                        help="question tokens (default 384, so round 2's shared prefix is 384 + 5 x 128 = 1024; "
                             "40 with --smoke)")
    parser.add_argument("--suffix", type=int, default=None, help="per-agent suffix tokens (default 32; 5 with --smoke)")
    parser.add_argument("--output", type=int, default=None, help="tokens per answer (default 128; 6 with --smoke)")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip the transformers baseline")
    args = harness.resolve_common_args(parser.parse_args(argv))
    smoke = args.smoke
    args.shapes = args.shapes or (["tiny"] if smoke else ["qwen2.5-0.5b", "qwen3-1.7b"])
    args.problems = args.problems or (1 if smoke else 8)
    args.question = args.question or (40 if smoke else 384)
    args.suffix = args.suffix or (5 if smoke else 32)
    args.output = args.output or (6 if smoke else 128)
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    # The roofline only means something on a GPU; a CPU smoke run reports none.
    args.copy_gbps = harness.copy_bandwidth_gbps(args.device) if args.device.type == "cuda" else None

    rows = []
    for shape in args.shapes:
        with tempfile.TemporaryDirectory() as tmp:
            hf_model = build_model(shape, Path(tmp), args.dtype, args.device)
            workload = make_workload(args, SHAPES[shape][1]["vocab_size"])
            base = {"shape": shape, "problems": args.problems, "agents": args.agents, "question": args.question,
                    "suffix": args.suffix, "output": args.output, "dtype": str(args.dtype).removeprefix("torch."),
                    "copy_gbps": args.copy_gbps}
            providers = {"arkfast": {}, "arkfast-no-sharing": {"enable_prefix_caching": False, "cascade": "off"}}
            for name, options in providers.items():
                rows.append({**base, "provider": name, **run_arkfast(Path(tmp), workload, args, **options)})
                _free(args.device)
            if args.hf:
                rows.append({**base, "provider": "hf-generate", **run_hf(hf_model, workload, args)})
            del hf_model
            _free(args.device)
    harness.print_table(rows, columns=["shape", "provider", "tokens_per_s", "seconds", "generated_tokens",
                                       "prefix_cache_hit_rate", "cascade_steps", "decode_batch", "decode_step_ms",
                                       "decode_p20_ms", "decode_p80_ms", "bound_ms", "pct_of_bound"])
    if args.save:
        harness.save_rows("debate", rows, device=args.device)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
