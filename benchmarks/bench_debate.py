"""End-to-end debate generation: ``arkfast.LLM`` (prefix sharing on / off) vs transformers' batched
``generate``, on random-weight models shaped like Qwen2.5-0.5B and Qwen3-1.7B.

    python -m benchmarks.bench_debate               # on a GPU: both shapes, bf16, results appended
    python -m benchmarks.bench_debate --device cpu  # CPU figures: the shipped tiny model, fp32, appended
    python -m benchmarks.bench_debate --smoke       # a tiny random model on CPU, seconds, nothing saved

Workload (greedy, ``ignore_eos``, fixed lengths): P problems x A agents x 2 rounds. Round 1: each
agent reads the problem's question (``--question`` tokens) plus its own instruction suffix
(``--suffix``) and writes ``--output`` tokens. Round 2, submitted for a problem as soon as its round 1
finishes: the question and every agent's round-1 answer (the shared transcript, ``question + A x
output`` tokens, about 1k by default) plus the agent's suffix. Providers:

* ``arkfast``: prefix caching on, cascade decode as the plan's cost model chooses;
* ``arkfast-no-sharing``: prefix caching and cascade off (every sequence computes and reads its own
  prefix);
* ``hf-generate``: transformers, each round one left-padded batched ``generate`` call.

Timing: each provider first runs the whole workload once untimed on other random tokens of the same
lengths (every prefill and decode shape, so every Triton variant and CUDA graph, is compiled before
timing; ``warm_seconds`` reports that pass and ``compile_s`` its excess over a timed pass), then
``--repeats`` timed passes on fresh tokens (no prefix-cache hits across passes); the median pass is
reported, with p20/p80. Engine options (``--max-model-len``, ``--max-num-seqs``, ``--kv-cache-gib``)
default to what the workload needs, so the engines fit one GPU together and none captures graphs for
contexts it never uses.

Reported: generated tokens/s end to end (``speedup_vs_hf``: over transformers in the same run), and for
the arkfast providers the time of one decode step in round 2's steady state (all P x A sequences
decoding) next to its bound: the bytes a step must read (the weights once, plus the K/V of every
*distinct* cached token) over the measured copy bandwidth. Records go to
``benchmarks/results/debate.jsonl``, one shape at a time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from arkfast import LLM, SamplingParams

try:
    from benchmarks import harness
except ImportError:  # run as a script: python benchmarks/bench_debate.py
    import harness

# python -m benchmarks: budgets and arguments per mode (see benchmarks/suite.py).
SUITE = {"gpu": {"budget_s": 90, "args": ["--repeats", "2"]},
         "cpu": {"budget_s": 600, "args": ["--repeats", "3"]},
         "smoke": {"budget_s": 60}}  # transformers' imports alone take seconds on a loaded CI machine
# python -m benchmarks.report: how its records are read (see benchmarks/report.py).
REPORT = {"key": ["shape", "problems", "agents", "question", "suffix", "output", "dtype"],
          "provider": "provider", "metric": "tokens_per_s", "higher_is_better": True, "baseline": "hf-generate",
          "headline": "arkfast", "ceiling": "pct_of_bound", "extra": ["seconds", "compile_s", "decode_step_ms"]}
ZOO = "zoo-tiny"  # the model the project ships (arkfast/zoo/tiny), real weights, fp32

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
    """A transformers model of ``shape`` (random weights; the shipped checkpoint for ``zoo-tiny``) and
    the folder the engine loads it from (``path`` where it was saved); returns ``(model, folder)``."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    if shape == ZOO:
        from arkfast.generate import default_model_path

        folder = default_model_path()
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device)
        return model.eval(), folder
    arch, fields = SHAPES[shape]
    config = (Qwen2Config if arch == "qwen2" else Qwen3Config)(
        **fields, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(str(path))
    return model.eval(), path


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """K and V bytes one token takes in the paged cache over all layers (``config``: transformers')."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype.itemsize


def engine_options(args, config) -> dict:
    """``max_model_len``, ``max_num_seqs`` and ``kv_cache_memory`` sized to the workload (flags win)."""
    longest = args.question + args.agents * args.output + args.suffix + max(args.output, args.warmup + args.reps + 2)
    max_model_len = args.max_model_len or -(-longest // 16) * 16
    max_num_seqs = args.max_num_seqs or args.problems * args.agents
    if args.kv_cache_gib is not None:
        kv_bytes = int(args.kv_cache_gib * 2**30)
    else:
        # Every sequence at full length with no sharing, plus a quarter for blocks still cached from
        # the pass before (evictable, but the allocator should not have to evict them).
        kv_bytes = int(1.25 * max_num_seqs * max_model_len * kv_bytes_per_token(config, args.dtype))
    return {"max_model_len": max_model_len, "max_num_seqs": max_num_seqs, "kv_cache_memory": kv_bytes}


def make_workload(args, vocab: int, seed: int = 0):
    """Per problem: the question's and each agent's suffix token ids (random, no special token 0)."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(1, vocab, (n,), generator=gen).tolist()

    return [(ids(args.question), [ids(args.suffix) for _ in range(args.agents)]) for _ in range(args.problems)]


def round2_prompt(question, answers, suffix):
    return question + [t for a in answers for t in a] + suffix


def debate_pass(llm: LLM, workload, args) -> tuple[float, int, dict]:
    """Both rounds of ``workload`` through the incremental API (a problem's round 2 starts when its
    round 1 ends); returns ``(seconds, generated tokens, round-1 answers per problem)``."""
    params = SamplingParams(temperature=0.0, max_tokens=args.output, ignore_eos=True)
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
    return time.perf_counter() - t0, generated, answers


def pass_stats(warm_seconds: float, seconds: list[float], generated: int) -> dict:
    """Median pass and its spread, tokens/s of the median pass, and the warm-up pass's excess."""
    ordered = sorted(seconds)
    median = statistics.median(ordered)
    return {"seconds": median, "p20_seconds": harness._quantile(ordered, 0.2),
            "p80_seconds": harness._quantile(ordered, 0.8), "repeats": len(ordered),
            "generated_tokens": generated, "tokens_per_s": generated / median,
            "warm_seconds": warm_seconds, "compile_s": max(0.0, warm_seconds - median)}


def run_arkfast(path: Path, workloads, args, **options) -> dict:
    """The first workload untimed (compiles every shape), each later one timed; then one decode step
    timed in round 2's steady state."""
    llm = LLM(path, dtype=args.dtype, device=args.device, **options)
    warm_seconds, _, _ = debate_pass(llm, workloads[0], args)
    _progress(args, "warm-up pass", warm_seconds)
    seconds = []
    for i, workload in enumerate(workloads[1:], 1):
        t, generated, answers = debate_pass(llm, workload, args)
        seconds.append(t)
        _progress(args, f"pass {i}/{len(workloads) - 1}", t, generated)
    stats = llm.stats  # cumulative over every pass (all of the same shape)
    row = {**pass_stats(warm_seconds, seconds, generated), "prefix_cache_hit_rate": stats["prefix_cache_hit_rate"],
           "cascade_steps": stats["cascade_steps"], "steps": stats["steps"],
           **decode_step(llm, workloads[-1], answers, args)}
    del llm
    return row


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


def run_hf(model, workloads, args) -> dict:
    """Each round as one left-padded batched greedy ``generate`` (round 2 after all of round 1); the
    first workload untimed, as for the engine."""
    kwargs = {"max_new_tokens": args.output, "min_new_tokens": args.output, "do_sample": False, "pad_token_id": 0}

    def batch_generate(prompts):
        return harness.hf_generate_batch(model, prompts, args.device, **kwargs).tolist()

    def one_pass(workload):
        _sync(args.device)
        t0 = time.perf_counter()
        round1 = batch_generate([q + s for q, suffixes in workload for s in suffixes])
        answers = [round1[p * args.agents:(p + 1) * args.agents] for p in range(len(workload))]
        round2 = batch_generate([round2_prompt(q, answers[p], s) for p, (q, suffixes) in enumerate(workload)
                                 for s in suffixes])
        _sync(args.device)
        return time.perf_counter() - t0, sum(map(len, round1)) + sum(map(len, round2))

    warm_seconds, _ = one_pass(workloads[0])
    _progress(args, "warm-up pass", warm_seconds)
    timed = []
    for i, workload in enumerate(workloads[1:], 1):
        timed.append(one_pass(workload))
        _progress(args, f"pass {i}/{len(workloads) - 1}", *timed[-1])
    return pass_stats(warm_seconds, [t for t, _ in timed], timed[-1][1])


def _progress(args, what: str, seconds: float, tokens: int | None = None) -> None:
    """One line on stderr per pass: long CPU runs show where they are."""
    rate = f", {tokens / seconds:,.0f} tok/s" if tokens else ""
    print(f"  {args.current}: {what} {seconds:.2f} s{rate}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(parser, warmup=3, reps=20)
    parser.add_argument("--shapes", nargs="+", choices=sorted([*SHAPES, ZOO]), default=None,
                        help=f"model shapes (default qwen2.5-0.5b qwen3-1.7b on CUDA, {ZOO} (the shipped model) "
                             "on CPU, tiny with --smoke)")
    parser.add_argument("--problems", type=int, default=None, help="problems P (default 8; 1 with --smoke)")
    parser.add_argument("--agents", type=int, default=5, help="agents per problem (default 5)")
    parser.add_argument("--question", type=int, default=None,
                        help="question tokens (default 384, so round 2's shared prefix is 384 + 5 x 128 = 1024; "
                             "128 on CPU; 40 with --smoke)")
    parser.add_argument("--suffix", type=int, default=None, help="per-agent suffix tokens (default 32; 5 with --smoke)")
    parser.add_argument("--output", type=int, default=None,
                        help="tokens per answer (default 128; 96 on CPU; 6 with --smoke)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes per provider after the untimed warm-up pass (default 3)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="engine max_model_len (default: the workload's longest sequence, rounded up to 16)")
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="engine max_num_seqs (default: problems x agents)")
    parser.add_argument("--kv-cache-gib", type=float, default=None,
                        help="engine KV-cache memory in GiB (default: every sequence at full length without "
                             "sharing, x 1.25)")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip the transformers baseline")
    args = harness.resolve_common_args(parser.parse_args(argv), gpu_benchmark=False)
    for name in ("problems", "question", "suffix", "output", "max_model_len", "max_num_seqs"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.repeats < 1 or args.agents < 1 or (args.kv_cache_gib is not None and args.kv_cache_gib <= 0):
        parser.error(f"--repeats, --agents and --kv-cache-gib must be positive, got {args.repeats}, "
                     f"{args.agents}, {args.kv_cache_gib}")
    smoke, cpu = args.smoke, args.device.type == "cpu"
    args.shapes = args.shapes or (["tiny"] if smoke else [ZOO] if cpu else ["qwen2.5-0.5b", "qwen3-1.7b"])
    args.problems = args.problems or (1 if smoke else 8)
    args.question = args.question or (40 if smoke else 128 if cpu else 384)
    args.suffix = args.suffix or (5 if smoke else 32)
    args.output = args.output or (6 if smoke else 96 if cpu else 128)
    if smoke:
        args.repeats = 1
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    # The roofline only means something on a GPU; a CPU run reports none.
    args.copy_gbps = harness.copy_bandwidth_gbps(args.device) if args.device.type == "cuda" else None

    rows = []
    for shape in args.shapes:
        if rows and harness.out_of_time(margin_s=30):
            break
        with tempfile.TemporaryDirectory() as tmp:
            hf_model, folder = build_model(shape, Path(tmp), args.dtype, args.device)
            vocab = hf_model.config.vocab_size
            # Seed 1000 + i: the untimed warm-up pass; 0..repeats-1: the timed passes (fresh tokens).
            workloads = [make_workload(args, vocab, seed=1000)] + \
                [make_workload(args, vocab, seed=r) for r in range(args.repeats)]
            options = engine_options(args, hf_model.config)
            base = {"shape": shape, "problems": args.problems, "agents": args.agents, "question": args.question,
                    "suffix": args.suffix, "output": args.output, "dtype": str(args.dtype).removeprefix("torch."),
                    "copy_gbps": args.copy_gbps, "engine_options": json.dumps(options, sort_keys=True)}
            providers = {"arkfast": {}, "arkfast-no-sharing": {"enable_prefix_caching": False, "cascade": "off"}}
            shape_rows, hf_tps = [], None
            if args.hf:  # the baseline first: every later row gets its ratio as it is saved
                args.current = f"{shape} hf-generate"
                hf_row = {**base, "provider": "hf-generate", **run_hf(hf_model, workloads, args)}
                hf_tps = hf_row["tokens_per_s"]
                shape_rows.append(_finish(hf_row, hf_tps, args))
            del hf_model
            _free(args.device)
            for name, extra in providers.items():
                args.current = f"{shape} {name}"
                row = {**base, "provider": name, **run_arkfast(folder, workloads, args, **options, **extra)}
                shape_rows.append(_finish(row, hf_tps, args))
                _free(args.device)
        rows += shape_rows
    if cpu:
        print(f"device: {harness.cpu_model_name()}; {args.repeats} timed passes per provider, median", file=sys.stderr)
    harness.print_table(rows, columns=["shape", "provider", "tokens_per_s", "speedup_vs_hf", "seconds", "p20_seconds",
                                       "p80_seconds", "compile_s", "generated_tokens", "prefix_cache_hit_rate",
                                       "cascade_steps", "decode_batch", "decode_step_ms", "decode_p20_ms",
                                       "decode_p80_ms", "bound_ms", "pct_of_bound"])


def _finish(row: dict, hf_tps: float | None, args) -> dict:
    """Add the ratio to transformers and save the row now: a run cut short keeps what it measured."""
    row["speedup_vs_hf"] = None if hf_tps is None else row["tokens_per_s"] / hf_tps
    if args.save:
        harness.append_result("debate", row, device=args.device)
    return row


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
