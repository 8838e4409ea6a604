"""Monte-Carlo step labelling (``python -m arkfast.prm label``'s workload): rollouts from every step
prefix of many trajectories, on ``arkfast.LLM`` with the prefix cache on / off, and on a plain
transformers ``generate`` loop doing the same rollouts.

    python -m benchmarks.bench_prm_label            # the shipped tiny model on CPU; a 0.5B-shaped model on a GPU
    python -m benchmarks.bench_prm_label --smoke    # a few trajectories, seconds

Workload: ``--trajectories`` reference solutions of arith train problems (5 or 6 lines each), encoded
as ``prm label`` encodes them (the single-agent chat prompt, then the response up to each step's last
token); from each prefix but the last, ``--k`` rollouts of exactly ``--rollout-tokens`` tokens
(``ignore_eos``, so every provider generates the same number of tokens; sampled at temperature 0.7, one
seed per rollout). One pass labels all trajectories; the arkfast providers keep
``max_active`` trajectories in flight (:func:`arkfast.prm.labels.monte_carlo_labels`'s default: all
K x steps requests of a trajectory, and of the next ones, together); transformers runs one left-padded
batched ``generate`` per trajectory (its K x (steps - 1) rollouts). Providers:

* ``arkfast``: prefix caching on (the K copies of a prefix, and the prefixes of one trajectory, share
  KV blocks), cascade decode as the plan's cost model chooses;
* ``arkfast-no-prefix-cache``: prefix caching and cascade off, every rollout prefills its own prefix;
* ``hf-generate``: transformers.

Reported: generated tokens/s of the median pass, the prefix-cache hit rate, and the speed-up over
``arkfast-no-prefix-cache`` and over ``hf-generate``. On a GPU the model is random-weight, shaped like
Qwen2.5-0.5B (the token ids of the tiny tokenizer are valid ids of its vocabulary). Records go to
``benchmarks/results/prm_label.jsonl``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from arkfast import LLM, SamplingParams

try:
    from benchmarks import harness
except ImportError:  # run as a script: python benchmarks/bench_prm_label.py
    import harness

SHAPE_05B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
             "rope_theta": 1e6, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}


def make_workload(n: int, offset: int) -> list[list[list[int]]]:
    """Per trajectory, the token ids of its step prefixes (all but the last step's), as ``prm label``
    builds them: reference solutions of arith train problems ``offset .. offset + n - 1``."""
    from arkfast.generate import default_model_path
    from arkfast.models import load_tokenizer
    from arkfast.prm.evaluate import solution_record
    from arkfast.tasks import ArithTask, arith_problems
    from arkfast.trajectories import chat_prompt_ids, encode_response, tokenizer_fingerprint

    tok = load_tokenizer(default_model_path())
    fingerprint = tokenizer_fingerprint(tok)
    out = []
    for p in arith_problems("train", offset + n)[offset:]:
        record = solution_record(ArithTask(), p, p.meta["solution"], sample=0, fingerprint=fingerprint)
        prompt = chat_prompt_ids(tok, record["prompt"])
        ids, ranges = encode_response(tok, record["response"], record["steps"])
        out.append([prompt + ids[:t1] for _, t1 in ranges[:-1]])
    return out


def _params(args, t: int, s: int, j: int) -> SamplingParams:
    return SamplingParams(temperature=0.7, max_tokens=args.rollout_tokens, ignore_eos=True,
                          seed=(t * 1000 + s) * 64 + j)


def arkfast_pass(llm: LLM, workload, args) -> tuple[float, int]:
    """Every rollout of ``workload`` through ``add_request``/``step``, ``max_active`` trajectories in
    flight (a new one starts when one finishes); returns ``(seconds, generated tokens)``."""
    _sync(args.device)
    t0 = time.perf_counter()
    left = {}
    nxt = 0

    def start(t: int) -> None:
        left[t] = 0
        for s, prefix in enumerate(workload[t]):
            for j in range(args.k):
                llm.add_request(prefix, _params(args, t, s, j), request_id=f"{t}:{s}:{j}")
                left[t] += 1

    while nxt < len(workload) and nxt < args.max_active:
        start(nxt)
        nxt += 1
    generated = 0
    while llm.has_unfinished_requests():
        for out in llm.step():
            generated += len(out.outputs[0].token_ids)
            t = int(out.request_id.split(":")[0])
            left[t] -= 1
            if left[t] == 0 and nxt < len(workload):
                start(nxt)
                nxt += 1
    _sync(args.device)
    return time.perf_counter() - t0, generated


def hf_pass(model, workload, args) -> tuple[float, int]:
    """One left-padded batched sampling ``generate`` per trajectory (its K x (steps - 1) rollouts)."""
    kwargs = {"max_new_tokens": args.rollout_tokens, "min_new_tokens": args.rollout_tokens, "do_sample": True,
              "temperature": 0.7, "top_k": 0, "pad_token_id": 0}
    _sync(args.device)
    t0 = time.perf_counter()
    generated = 0
    for prefixes in workload:
        prompts = [p for p in prefixes for _ in range(args.k)]
        generated += harness.hf_generate_batch(model, prompts, args.device, **kwargs).numel()
    _sync(args.device)
    return time.perf_counter() - t0, generated


def run(name: str, one_pass, workloads, args) -> dict:
    """The first workload untimed (warm-up), each later one timed; the median pass's figures."""
    warm, _ = one_pass(workloads[0])
    seconds, generated = [], 0
    for w in workloads[1:]:
        t, generated = one_pass(w)
        seconds.append(t)
        print(f"  {name}: pass {t:.2f} s, {generated / t:,.0f} tok/s", file=sys.stderr, flush=True)
    median = statistics.median(seconds)
    return {"provider": name, "seconds": median, "p20_seconds": harness._quantile(sorted(seconds), 0.2),
            "p80_seconds": harness._quantile(sorted(seconds), 0.8), "repeats": len(seconds),
            "generated_tokens": generated, "tokens_per_s": generated / median, "warm_seconds": warm}


def build_models(args, tmp: Path):
    """``(transformers model, folder the engine loads)``: the shipped tiny model, or on CUDA a
    random-weight 0.5B-shaped Qwen2 (``--shape 0.5b``)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from arkfast.generate import default_model_path

    if args.shape == "tiny":
        folder = default_model_path()
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=args.dtype).to(args.device).eval(), folder
    config = Qwen2Config(**SHAPE_05B, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=args.dtype)
    model.save_pretrained(str(tmp))
    return model.eval(), tmp


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(parser, warmup=1, reps=3)
    parser.add_argument("--trajectories", type=int, default=None,
                        help="trajectories per pass (default 24 on CPU, 64 on a GPU; 3 with --smoke)")
    parser.add_argument("--k", type=int, default=None, help="rollouts per step prefix (default 8; 2 with --smoke)")
    parser.add_argument("--rollout-tokens", type=int, default=None,
                        help="tokens per rollout (default 24, about what the tiny model writes after a "
                             "prefix; 4 with --smoke)")
    parser.add_argument("--max-active", type=int, default=8,
                        help="trajectories in flight in the engine (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes (default 3; 1 with --smoke)")
    parser.add_argument("--shape", choices=["tiny", "0.5b"], default=None,
                        help="model: the shipped tiny model, or a random Qwen2.5-0.5B shape (default: 0.5b on "
                             "CUDA, tiny on CPU)")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip the transformers baseline")
    args = harness.resolve_common_args(parser.parse_args(argv), gpu_benchmark=False)
    for name in ("trajectories", "k", "rollout_tokens", "repeats"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.max_active <= 0:
        parser.error(f"--max-active must be positive, got {args.max_active}")
    cuda = args.device.type == "cuda"
    args.trajectories = args.trajectories or (3 if args.smoke else 64 if cuda else 24)
    args.k = args.k or (2 if args.smoke else 8)
    args.rollout_tokens = args.rollout_tokens or (4 if args.smoke else 24)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.shape = args.shape or ("0.5b" if cuda and not args.smoke else "tiny")
    args.dtype = torch.bfloat16 if cuda else torch.float32
    workloads = [make_workload(args.trajectories, offset=(r + 1) * args.trajectories) for r in range(args.repeats + 1)]
    requests = sum(len(t) for t in workloads[-1]) * args.k
    base = {"shape": args.shape, "trajectories": args.trajectories, "k": args.k, "rollout_tokens": args.rollout_tokens,
            "requests_per_pass": requests, "max_active": args.max_active, "dtype": str(args.dtype).removeprefix("torch.")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_model, folder = build_models(args, Path(tmp))
        if args.hf:
            rows.append({**base, **run("hf-generate", lambda w, m=hf_model: hf_pass(m, w, args), workloads, args)})
        del hf_model
        options = {"max_num_seqs": 256}
        for name, extra in (("arkfast", {}),
                            ("arkfast-no-prefix-cache", {"enable_prefix_caching": False, "cascade": "off"})):
            llm = LLM(str(folder), dtype=args.dtype, device=args.device, **options, **extra)
            row = {**base, **run(name, lambda w, engine=llm: arkfast_pass(engine, w, args), workloads, args)}
            row["prefix_cache_hit_rate"] = llm.stats["prefix_cache_hit_rate"]
            rows.append(row)
            del llm
    by_name = {r["provider"]: r["tokens_per_s"] for r in rows}
    for row in rows:
        row["speedup_vs_no_prefix_cache"] = row["tokens_per_s"] / by_name["arkfast-no-prefix-cache"]
        row["speedup_vs_hf"] = row["tokens_per_s"] / by_name["hf-generate"] if "hf-generate" in by_name else None
        if args.save:
            harness.append_result("prm_label", row, device=args.device)
    if not cuda:
        print(f"device: {harness.cpu_model_name()}; {args.repeats} timed passes per provider, median", file=sys.stderr)
    harness.print_table(rows, columns=["shape", "provider", "tokens_per_s", "speedup_vs_no_prefix_cache",
                                       "speedup_vs_hf", "seconds", "p20_seconds", "p80_seconds", "generated_tokens",
                                       "requests_per_pass", "prefix_cache_hit_rate"])
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
