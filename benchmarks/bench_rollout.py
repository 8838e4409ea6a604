"""Rollouts of online RL (``python -m arkfast.distill --mode grpo``'s workload): ``G`` samples of each of
``P`` prompts on ``arkfast.LLM`` (the G samples share their prompt's KV blocks and are decoded with
cascade attention where the planner chooses it) against a transformers ``generate`` loop doing the
same samples, and the split of a whole GRPO step's time between rollout, PRM scoring and training.

    python -m benchmarks.bench_rollout            # the shipped tiny model on CPU; a 0.5B-shaped model on a GPU
    python -m benchmarks.bench_rollout --smoke    # a few prompts, seconds

Workload: the round-1 single-agent prompts of ``--prompts`` arith train problems (a fresh set per
pass), ``--group`` samples each at temperature 1 (one seed per sample), exactly ``--max-tokens`` tokens
per sample (``ignore_eos``: every provider generates the same number of tokens). Providers:

* ``arkfast``: ``LLM.generate`` on all P x G requests, with ``logprobs=0`` (the sampled token's
  log-probability, which the trainer needs), prefix caching and cascade as configured by default;
* ``hf-generate``: one left-padded batched ``generate`` over all P x G sequences (TRL's rollout
  shape), no log-probabilities.

Reported: generated tokens/s of the median pass. Then ``--steps`` steps of a real GRPO run (the same
P, G and length; a random-head PRM on the model's backbone; no evaluation or checkpoint) and, per step
after the first, the median seconds of rollout, PRM scoring and training (policy and reference
forward, backward, AdamW, the engine's weight update), with their shares. On a GPU the model is
random-weight, shaped like Qwen2.5-0.5B (the tiny tokenizer's ids are valid ids of its vocabulary).
Records go to ``benchmarks/results/rollout.jsonl``.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from arkfast import LLM, SamplingParams

try:
    from benchmarks import harness
except ImportError:  # run as a script: python benchmarks/bench_rollout.py
    import harness

# python -m benchmarks: budgets and arguments per mode (see benchmarks/suite.py). No CPU entry: at 180 s
# it would push bench_train out of the 1500 s CPU plan; its CPU record is made by running it directly.
SUITE = {"gpu": {"budget_s": 90, "args": []},
         "smoke": {"budget_s": 60}}
# python -m benchmarks.report: how its records are read (see benchmarks/report.py).
REPORT = {"key": ["workload", "shape", "prompts", "group", "max_tokens", "dtype"], "provider": "provider",
          "metric": "tokens_per_s", "higher_is_better": True, "baseline": "hf-generate", "headline": "arkfast",
          "extra": ["seconds", "rollout_share", "prm_share", "train_share"]}
SHAPE_05B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
             "rope_theta": 1e6, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def arith_records(n: int, offset: int) -> list[dict]:
    """Trajectory records of arith train problems ``offset .. offset + n - 1`` (their reference
    solutions): what ``--mode grpo`` reads its prompts from."""
    from arkfast.generate import default_model_path
    from arkfast.models import load_tokenizer
    from arkfast.prm.evaluate import solution_record
    from arkfast.tasks import ArithTask, arith_problems
    from arkfast.trajectories import tokenizer_fingerprint

    fingerprint = tokenizer_fingerprint(load_tokenizer(default_model_path()))
    return [solution_record(ArithTask(), p, p.meta["solution"], sample=0, fingerprint=fingerprint)
            for p in arith_problems("train", offset + n)[offset:]]


def prompt_ids(records: list[dict]) -> list[list[int]]:
    from arkfast.generate import default_model_path
    from arkfast.models import load_tokenizer
    from arkfast.trajectories import chat_prompt_ids

    tok = load_tokenizer(default_model_path())
    return [chat_prompt_ids(tok, r["prompt"]) for r in records]


def arkfast_pass(llm: LLM, prompts: list[list[int]], args, pass_index: int) -> tuple[float, int]:
    requests = [p for p in prompts for _ in range(args.group)]
    params = [SamplingParams(temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=0,
                             seed=pass_index * 100_000 + i) for i in range(len(requests))]
    _sync(args.device)
    t0 = time.perf_counter()
    outs = llm.generate(requests, params)
    _sync(args.device)
    return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)


def hf_pass(model, prompts: list[list[int]], args, pass_index: int) -> tuple[float, int]:
    torch.manual_seed(pass_index)
    requests = [p for p in prompts for _ in range(args.group)]
    _sync(args.device)
    t0 = time.perf_counter()
    new = harness.hf_generate_batch(model, requests, args.device, max_new_tokens=args.max_tokens,
                                    min_new_tokens=args.max_tokens, do_sample=True, temperature=1.0, top_k=0,
                                    pad_token_id=0)
    _sync(args.device)
    return time.perf_counter() - t0, int(new.numel())


def timed(name: str, one_pass, workloads, args) -> dict:
    """The first workload untimed (warm-up), each later one timed; the median pass's figures."""
    warm, _ = one_pass(workloads[0], 0)
    seconds, generated = [], 0
    for i, w in enumerate(workloads[1:], start=1):
        t, generated = one_pass(w, i)
        seconds.append(t)
        print(f"  {name}: pass {t:.2f} s, {generated / t:,.0f} tok/s", file=sys.stderr, flush=True)
    median = statistics.median(seconds)
    return {"provider": name, "seconds": median, "p20_seconds": harness._quantile(sorted(seconds), 0.2),
            "p80_seconds": harness._quantile(sorted(seconds), 0.8), "repeats": len(seconds),
            "generated_tokens": generated, "tokens_per_s": generated / median, "warm_seconds": warm}


def step_split(folder: Path, tmp: Path, args) -> dict:
    """A short ``--mode grpo`` run; the median per-step rollout / PRM / train seconds after step 1."""
    from arkfast.distill import DistillConfig, distill
    from arkfast.distill.checkpoints import read_jsonl
    from arkfast.models import load_model, load_tokenizer
    from arkfast.prm import PRMConfig, ProcessRewardModel, save_prm
    from arkfast.trajectories import tokenizer_fingerprint, write_trajectories

    data = tmp / "problems.jsonl"
    write_trajectories(data, arith_records(args.prompts * args.steps, offset=10_000))
    tok = load_tokenizer(folder)
    prm = ProcessRewardModel(load_model(folder, args.dtype, args.device),
                             PRMConfig(tokenizer=tokenizer_fingerprint(tok)), seed=0)
    save_prm(prm, tmp / "prm", tokenizer=tok)
    del prm
    cfg = DistillConfig(data=[str(data)], mode="grpo", model=str(folder), prm=str(tmp / "prm"),
                        output=str(tmp / "run"), steps=args.steps, grpo_prompts=args.prompts, grpo_group=args.group,
                        grpo_max_tokens=args.max_tokens, save_every=0, eval_limit=0, device=str(args.device),
                        tensorboard=False, plot=False, progress=False)
    result = distill(cfg, log=None)
    metrics = read_jsonl(tmp / "run" / "metrics.jsonl")[1:] or read_jsonl(tmp / "run" / "metrics.jsonl")
    parts = {k: statistics.median(m[f"{k}_seconds"] for m in metrics) for k in ("rollout", "prm", "train")}
    total = sum(parts.values())
    tokens = statistics.median(m["rollout_tokens"] for m in metrics)
    return {"provider": "arkfast-grpo-step", "seconds": total, "repeats": len(metrics),
            "generated_tokens": tokens, "tokens_per_s": tokens / total,
            "rollout_seconds": parts["rollout"], "prm_seconds": parts["prm"], "train_seconds": parts["train"],
            **{f"{k}_share": v / total for k, v in parts.items()}, "updates": metrics[-1]["updates"],
            "train_tokens_per_step": statistics.median(m["tokens"] for m in metrics),
            "steps_done": result["steps_done"]}


def build_models(args, tmp: Path):
    """``(transformers model, folder the engine loads)``: the shipped tiny model, or on CUDA a
    random-weight 0.5B-shaped Qwen2 saved with the tiny tokenizer (``--shape 0.5b``)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from arkfast.generate import default_model_path

    tiny = default_model_path()
    if args.shape == "tiny":
        return AutoModelForCausalLM.from_pretrained(str(tiny), dtype=args.dtype).to(args.device).eval(), tiny
    config = Qwen2Config(**SHAPE_05B, bos_token_id=None, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=args.dtype)
    folder = tmp / "model"
    model.save_pretrained(str(folder))
    for name in TOKENIZER_FILES:
        if (tiny / name).is_file():
            shutil.copy(tiny / name, folder / name)
    return model.eval(), folder


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(parser, warmup=1, reps=2)
    parser.add_argument("--prompts", type=int, default=None, help="prompts per pass and step (default 8; 2 with --smoke)")
    parser.add_argument("--group", type=int, default=None, help="samples per prompt, G (default 8; 2 with --smoke)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="tokens per sample (default 64, about the tiny model's arith answers; 8 with --smoke)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rollout passes (default 3; 1 with --smoke)")
    parser.add_argument("--steps", type=int, default=None,
                        help="GRPO steps for the time split, the first untimed (default 4; 2 with --smoke)")
    parser.add_argument("--shape", choices=["tiny", "0.5b"], default=None,
                        help="model: the shipped tiny model, or a random Qwen2.5-0.5B shape (default: 0.5b on "
                             "CUDA, tiny on CPU)")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip the transformers baseline")
    parser.add_argument("--no-split", dest="split", action="store_false", help="skip the GRPO step split")
    args = harness.resolve_common_args(parser.parse_args(argv), gpu_benchmark=False)
    for name in ("prompts", "group", "max_tokens", "repeats", "steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.group is not None and args.group < 2:
        parser.error(f"--group must be at least 2 (a group baseline needs two samples), got {args.group}")
    cuda = args.device.type == "cuda"
    args.prompts = args.prompts or (2 if args.smoke else 8)
    args.group = args.group or (2 if args.smoke else 8)
    args.max_tokens = args.max_tokens or (8 if args.smoke else 64)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.steps = args.steps or (2 if args.smoke else 4)
    args.shape = args.shape or ("0.5b" if cuda and not args.smoke else "tiny")
    args.dtype = torch.bfloat16 if cuda else torch.float32
    workloads = [prompt_ids(arith_records(args.prompts, offset=(r + 1) * args.prompts)) for r in range(args.repeats + 1)]
    base = {"shape": args.shape, "prompts": args.prompts, "group": args.group, "max_tokens": args.max_tokens,
            "dtype": str(args.dtype).removeprefix("torch.")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_model, folder = build_models(args, Path(tmp))
        if args.hf:
            rows.append({**base, "workload": "rollout",
                         **timed("hf-generate", lambda w, i, m=hf_model: hf_pass(m, w, args, i), workloads, args)})
        del hf_model
        llm = LLM(str(folder), dtype=args.dtype, device=args.device)
        row = {**base, "workload": "rollout",
               **timed("arkfast", lambda w, i, engine=llm: arkfast_pass(engine, w, args, i), workloads, args)}
        row["prefix_cache_hit_rate"], row["cascade_steps"] = llm.stats["prefix_cache_hit_rate"], llm.stats["cascade_steps"]
        rows.append(row)
        del llm
        if args.split:
            rows.append({**base, "workload": "grpo-step", **step_split(folder, Path(tmp), args)})
    hf = next((r["tokens_per_s"] for r in rows if r["provider"] == "hf-generate"), None)
    for row in rows:
        row["speedup_vs_hf"] = row["tokens_per_s"] / hf if hf and row["workload"] == "rollout" else None
        if args.save:
            harness.append_result("rollout", row, device=args.device)
    if not cuda:
        print(f"device: {harness.cpu_model_name()}; {args.repeats} timed rollout passes per provider, median",
              file=sys.stderr)
    harness.print_table(rows, columns=["workload", "shape", "provider", "tokens_per_s", "speedup_vs_hf", "seconds",
                                       "p20_seconds", "p80_seconds", "generated_tokens", "prefix_cache_hit_rate",
                                       "rollout_share", "prm_share", "train_share"])
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
