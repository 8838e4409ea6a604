"""The engine's step: where its time goes, and debate generation against transformers' ``generate``.

    python -m benchmarks.bench_engine_step             # CPU: the shipped tiny model, fp32; results appended
    python -m benchmarks.bench_engine_step --smoke     # seconds: 2 problems, short answers, nothing saved

Workload: P problems of the built-in arith task x A agents, the debate's real prompts built by
:class:`arkfast.debate.prompts.PromptBuilder` for the model's tokenizer: round 1 (every agent of a
problem reads the same prompt) and round 2 in the ``shared`` layout (the problem's transcript of the
agents' round-1 answers, then a one-line per-agent suffix). The round-1 answers the round-2 prompts
quote are drawn once, untimed, by the engine (temperature 0.5, seeded per agent, as ``arkfast.generate``
does), so every provider sees the same token ids. Each timed round then decodes greedily ``--output``
new tokens per prompt, ``ignore_eos``.

Two measurements, side by side in one process (providers alternate pass by pass; medians, p20/p80):

* ``tokens_per_s`` of each round and of both rounds together: ``arkfast`` (``LLM.generate`` on the
  round's prompts) vs ``hf-generate`` (one left-padded batched greedy ``generate`` per round);
  ``speedup_vs_hf`` is their ratio in this run.
* the engine's step split into host and model time, per step, summed over the passes: ``schedule``
  (the scheduler and block manager), ``prepare`` (the model runner's per-step metadata), ``model``
  (the forward and the logits), ``sample`` (the sampler and its one device-to-host copy), ``other``
  (the rest of ``LLM.step``: appending tokens, stop checks, detokenising). Measured by wrapping the
  engine's methods with a wall clock; on CUDA each part is synchronised first, so parts are exact
  but the run does not overlap host and device as it would unwrapped.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch

from arkfast import LLM, SamplingParams

try:
    from benchmarks import harness
except ImportError:  # run as a script: python benchmarks/bench_engine_step.py
    import harness

# python -m benchmarks: budgets and arguments per mode (see benchmarks/suite.py).
SUITE = {"gpu": {"budget_s": 20, "args": ["--smoke"]},
         "cpu": {"budget_s": 120, "args": ["--problems", "16", "--repeats", "2"]},
         "smoke": {"budget_s": 60}}
# python -m benchmarks.report: how its records are read (see benchmarks/report.py).
REPORT = {"key": ["workload", "problems", "agents", "output", "dtype"], "provider": "provider",
          "metric": "tokens_per_s", "higher_is_better": True, "baseline": "hf-generate", "headline": "arkfast",
          "extra": ["seconds", "host_ms_per_step", "model_ms_per_step"]}
PARTS = ("schedule", "prepare", "model", "sample", "other")


def debate_prompts(llm: LLM, problems: int, agents: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Round-1 and round-2 (shared layout) prompt ids for ``problems`` arith problems x ``agents``.

    The round-1 answers quoted in round 2 are sampled by ``llm`` (temperature 0.5, a seed per agent),
    at the task's default answer length."""
    from arkfast.debate.prompts import PromptBuilder
    from arkfast.tasks import load_problems

    task, items = load_problems(None, limit=problems)
    builder = PromptBuilder(llm.tokenizer, task)
    round1 = [builder.first_round(p) for p in items for _ in range(agents)]
    params = [SamplingParams(temperature=0.5, max_tokens=task.default_max_tokens, seed=seed + i)
              for i in range(len(round1))]
    answers = [out.outputs[0].text for out in llm.generate(round1, params)]
    round2 = [ids for i, p in enumerate(items)
              for ids in builder.shared_round(p, answers[i * agents:(i + 1) * agents])]
    return round1, round2


class StepClock:
    """Wall time of the parts of ``llm.step`` (see the module docstring), by wrapping the engine's
    methods on this instance only. ``totals[part]`` seconds, ``steps`` the steps timed."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.sync = llm.device.type == "cuda"
        runner, scheduler, model = llm.runner, llm.scheduler, llm.runner.model
        self._originals = [(scheduler, "schedule"), (scheduler, "finish_step"), (runner, "prepare"),
                           (runner, "sampler"), (model, "forward"), (model, "compute_logits"), (llm, "step")]
        self._saved = {(id(o), n): o.__dict__.get(n) for o, n in self._originals}
        self._wrap(scheduler, "schedule", "schedule")
        self._wrap(scheduler, "finish_step", "schedule")
        self._wrap(runner, "prepare", "prepare")
        self._wrap(runner, "sampler", "sample")
        self._wrap(model, "forward", "model")
        self._wrap(model, "compute_logits", "model")
        self._wrap(llm, "step", "step")

    def _wrap(self, obj, name: str, part: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            if self.sync:
                torch.cuda.synchronize(self.llm.device)
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            if part == "sample" and self.sync:
                torch.cuda.synchronize(self.llm.device)
            self.totals[part] += time.perf_counter() - t0
            self.steps += part == "step"
            return result

        setattr(obj, name, timed)

    def close(self) -> None:
        """Put the engine's methods back."""
        for obj, name in self._originals:
            saved = self._saved[(id(obj), name)]
            if saved is None:
                delattr(obj, name)
            else:
                setattr(obj, name, saved)

    def per_step_ms(self) -> dict[str, float]:
        parts = {p: self.totals[p] for p in PARTS if p != "other"}
        parts["other"] = self.totals["step"] - sum(parts.values())
        out = {f"{p}_ms_per_step": 1e3 * t / max(self.steps, 1) for p, t in parts.items()}
        out["host_ms_per_step"] = sum(out[f"{p}_ms_per_step"] for p in PARTS if p != "model")
        out["steps"] = self.steps
        return out


def arkfast_round(llm: LLM, prompts: list[list[int]], output: int) -> int:
    params = SamplingParams(temperature=0.0, max_tokens=output, ignore_eos=True)
    outs = llm.generate(prompts, params)
    return sum(len(o.outputs[0].token_ids) for o in outs)


def hf_round(model, prompts: list[list[int]], output: int, device: torch.device, pad: int) -> int:
    return harness.hf_generate_batch(model, prompts, device, pad=pad, max_new_tokens=output,
                                     min_new_tokens=output, do_sample=False, pad_token_id=pad).numel()


def _stats(seconds: list[float], tokens: int) -> dict:
    ordered = sorted(seconds)
    median = statistics.median(ordered)
    return {"seconds": median, "p20_seconds": harness._quantile(ordered, 0.2),
            "p80_seconds": harness._quantile(ordered, 0.8), "repeats": len(ordered), "generated_tokens": tokens,
            "tokens_per_s": tokens / median}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(parser, warmup=1, reps=3)
    parser.add_argument("--model", default=None, help="model folder (default: the shipped tiny model)")
    parser.add_argument("--problems", type=int, default=None, help="problems P (default 40; 2 with --smoke)")
    parser.add_argument("--agents", type=int, default=5, help="agents per problem (default 5)")
    parser.add_argument("--output", type=int, default=None, help="new tokens per prompt (default 96; 8 with --smoke)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed passes per provider after one untimed pass (default 3; 1 with --smoke)")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip the transformers baseline")
    args = harness.resolve_common_args(parser.parse_args(argv), gpu_benchmark=False)
    args.problems = args.problems or (2 if args.smoke else 40)
    args.output = args.output or (8 if args.smoke else 96)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    for name in ("problems", "agents", "output", "repeats"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    from arkfast.generate import default_model_path

    folder = args.model or str(default_model_path())
    dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    llm = LLM(folder, dtype=dtype, device=args.device)
    rounds = dict(zip(("round1", "round2"), debate_prompts(llm, args.problems, args.agents)))
    hf_model = None
    if args.hf:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
    pad = llm.tokenizer.pad_token_id or 0

    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    tokens: dict[tuple[str, str], int] = {}
    clocks = {}
    for rep in range(args.repeats + 1):  # pass 0 is untimed (first-call costs)
        for provider in ("arkfast", "hf-generate") if args.hf else ("arkfast",):
            for workload, prompts in rounds.items():
                clock = StepClock(llm) if provider == "arkfast" and rep else None
                _sync(args.device)
                t0 = time.perf_counter()
                if provider == "arkfast":
                    n = arkfast_round(llm, prompts, args.output)
                else:
                    n = hf_round(hf_model, prompts, args.output, args.device, pad)
                _sync(args.device)
                t = time.perf_counter() - t0
                if clock is not None:
                    clock.close()
                    clocks.setdefault(workload, []).append(clock)
                if rep:
                    times[provider, workload].append(t)
                    tokens[provider, workload] = n
                print(f"  pass {rep} {provider} {workload}: {t:.2f} s, {n / t:,.0f} tok/s", file=sys.stderr,
                      flush=True)

    rows = []
    base = {"problems": args.problems, "agents": args.agents, "output": args.output,
            "dtype": str(dtype).removeprefix("torch."), "model": "zoo-tiny" if args.model is None else folder}
    for provider in ("hf-generate", "arkfast") if args.hf else ("arkfast",):
        for workload in ("round1", "round2", "both"):
            if workload == "both":
                secs = [a + b for a, b in zip(times[provider, "round1"], times[provider, "round2"])]
                n = tokens[provider, "round1"] + tokens[provider, "round2"]
            else:
                secs, n = times[provider, workload], tokens[provider, workload]
            row = {**base, "workload": workload, "provider": provider, **_stats(secs, n)}
            if provider == "arkfast":
                merged = StepClockSum([c for w in (("round1", "round2") if workload == "both" else (workload,))
                                       for c in clocks[w]])
                row.update(merged.per_step_ms())
            rows.append(row)
    if args.hf:
        hf = {r["workload"]: r["tokens_per_s"] for r in rows if r["provider"] == "hf-generate"}
        for r in rows:
            r["speedup_vs_hf"] = r["tokens_per_s"] / hf[r["workload"]]
    print(f"device: {harness.cpu_model_name() if args.device.type == 'cpu' else args.device}, "
          f"{torch.get_num_threads()} threads; {args.repeats} timed passes per provider, alternating, median",
          file=sys.stderr)
    harness.print_table(rows, columns=["workload", "provider", "tokens_per_s", "speedup_vs_hf", "seconds",
                                       "p20_seconds", "p80_seconds", "generated_tokens", "steps",
                                       *[f"{p}_ms_per_step" for p in PARTS], "host_ms_per_step"])
    if args.save:
        harness.save_rows("engine_step", rows, device=args.device)


class StepClockSum:
    """The parts of several :class:`StepClock` runs added up."""

    def __init__(self, clocks: list[StepClock]):
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = sum(c.steps for c in clocks)
        for c in clocks:
            for k, v in c.totals.items():
                self.totals[k] += v

    per_step_ms = StepClock.per_step_ms


if __name__ == "__main__":
    main()
