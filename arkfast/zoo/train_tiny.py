"""``python -m arkfast.zoo.train_tiny``: train the embedded default model from scratch on a CPU.

A Llama-architecture model (tied embeddings, head_dim 32 so the GPU kernels take it) learns the
built-in ``arith`` task from its train split (1 to 5 steps). A curriculum: first round-1 prompts only
(``--round1-fraction`` of the schedule), then a mix of round-1 prompts, debate round-2 prompts with
right and wrong peer solutions, and a few classic-layout and aggregator prompts
(:mod:`arkfast.zoo.data`), all made by the debate layer's own prompt builders. The run ends at
``--stop-after`` steps of a ``--steps`` schedule, where the model is right about 60% of the time alone
and its debates about 10 points more often (docs/tiny_model.md). It is reproducible from ``--seed``
for a given thread count and machine type unless ``--minutes`` cuts it short. It writes an HF
checkpoint folder: config.json, model.safetensors (fp32), tokenizer.json, tokenizer_config.json
(ChatML template) and generation_config.json.

    python -m arkfast.zoo.train_tiny                       # rebuild arkfast/zoo/tiny (see docs/tiny_model.md)
    python -m arkfast.zoo.train_tiny --output /tmp/tiny --steps 200 --hidden-size 128
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time

from arkfast.tasks import ArithConfig, ArithTask, arith_problems
from arkfast.train import PackedRow, TrainConfig, new_model, pack_rows, train

from . import tiny_model_path
from .data import Mix, build_examples, tokenizer_corpus
from .tokenizer import DEFAULT_VOCAB_SIZE, build_tokenizer, tokenizer_files

# The training problems: the numbers of the default test split (ArithConfig's defaults) with 1 to 5
# steps; the default test split asks 4 or 5.
TRAIN_ARITH = ArithConfig(min_steps=1, max_steps=5)


# The texts the BPE merges are learned from: every prompt kind, in fixed shares, whatever the training
# mix flags say (the vocabulary of the shipped model came from this corpus).
TOKENIZER_CORPUS_MIX = Mix(round1=0.5, shared=0.4, classic=0.05, aggregator=0.05)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m arkfast.zoo.train_tiny",
                                description="Train the tiny embedded arith model from scratch and write an "
                                            "HF checkpoint folder.")
    p.add_argument("--output", metavar="DIR", default=str(tiny_model_path()),
                   help="checkpoint folder, replaced atomically (default: the package's arkfast/zoo/tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the tokenizer corpus, the "
                   "initialisation and the row order (default: %(default)s)")
    p.add_argument("--steps", type=int, default=7000, help="optimiser steps the learning-rate schedule spans "
                   "(default: %(default)s)")
    p.add_argument("--stop-after", type=int, default=5000,
                   help="end the run after this many steps of the schedule, reproducibly: where the default "
                        "model is calibrated for debate (default: %(default)s; 0 or >= --steps: run them all)")
    p.add_argument("--minutes", type=float, default=None,
                   help="stop early (and save) after this many minutes of training; the cosine schedule "
                        "still spans --steps (default: no limit)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads; the weights are bit-reproducible "
                   "for a given thread count (default: %(default)s)")
    g = p.add_argument_group("model size")
    g.add_argument("--hidden-size", type=int, default=192, help="(default: %(default)s)")
    g.add_argument("--layers", type=int, default=4, help="(default: %(default)s)")
    g.add_argument("--heads", type=int, default=6, help="attention heads; head_dim = hidden / heads "
                   "(default: %(default)s)")
    g.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA) (default: %(default)s)")
    g.add_argument("--intermediate-size", type=int, default=512, help="MLP width (default: %(default)s)")
    g.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="BPE vocabulary incl. digits, "
                   "ASCII letters and 4 special tokens (default: %(default)s)")
    g = p.add_argument_group("task difficulty of the training problems (arith; defaults: the numbers of the "
                             "default test split, 1 to 5 steps)")
    defaults = TRAIN_ARITH
    for name in ("min_steps", "max_steps", "max_operand", "max_factor", "max_value"):
        g.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name),
                       help="ArithConfig." + name + " (default: %(default)s)")
    g = p.add_argument_group("data and optimisation")
    g.add_argument("--train-problems", type=int, default=120000,
                   help="arith train-split problems the examples are made from, one example each, cycled "
                        "when the steps need more (default: %(default)s)")
    g.add_argument("--eval-problems", type=int, default=300,
                   help="held-out examples for the eval loss, drawn from the train split beyond the "
                        "training problems (default: %(default)s)")
    g.add_argument("--round1", type=float, default=Mix.round1, help="mix weight of round-1 prompts (default: %(default)s)")
    g.add_argument("--shared", type=float, default=Mix.shared,
                   help="mix weight of shared-layout debate prompts (default: %(default)s)")
    g.add_argument("--classic", type=float, default=Mix.classic,
                   help="mix weight of classic-layout debate prompts (default: %(default)s)")
    g.add_argument("--aggregator", type=float, default=Mix.aggregator,
                   help="mix weight of aggregator prompts (default: %(default)s)")
    g.add_argument("--swap", type=float, default=Mix.swap,
                   help="probability of writing a '+' or '*' step with its operands swapped, in every "
                        "solution the model reads or writes (default: %(default)s)")
    g.add_argument("--peer-accuracy", type=float, nargs=2, default=Mix.peer_accuracy, metavar=("LOW", "HIGH"),
                   help="a debate prompt's peers are each right with a probability drawn uniformly from "
                        "[LOW, HIGH] per example (default: %(default)s)")
    g.add_argument("--drill", type=float, default=Mix.drill,
                   help="mix weight of arithmetic drills (default: %(default)s)")
    g.add_argument("--round1-fraction", type=float, default=0.4,
                   help="curriculum: this fraction of the steps, the first ones, trains on round-1 prompts "
                        "only; the rest on the mix above (default: %(default)s)")
    g.add_argument("--row-tokens", type=int, default=1024, help="tokens per packed row (default: %(default)s)")
    g.add_argument("--batch-rows", type=int, default=1, help="packed rows per step (default: %(default)s)")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    g.add_argument("--eval-every", type=int, default=500, help="steps between eval losses (default: %(default)s)")
    g.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (default: only at the end)")
    return p


def hf_config(args: argparse.Namespace, tokenizer) -> dict:
    """The transformers ``LlamaConfig`` dict of the model (what ``config.json`` holds)."""
    from transformers import LlamaConfig

    if args.hidden_size % args.heads:
        raise ValueError(f"--hidden-size {args.hidden_size} must be a multiple of --heads {args.heads}")
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    return cfg


def generation_config(tokenizer) -> str:
    return json.dumps({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                       "pad_token_id": tokenizer.pad_token_id}, indent=2) + "\n"


def make_rows(tokenizer, problems: list, n_rows: int, mix: Mix, seed: int, task: ArithTask, row_tokens: int,
              chunk: int = 4000) -> list[PackedRow]:
    """``n_rows`` packed rows of ``mix`` examples, made from ``problems`` (cycled, each pass with new
    example draws) in chunks of ``chunk`` problems, each chunk packed on its own."""
    start = 0
    rng = random.Random(seed)
    chunk = min(chunk, max(64, n_rows * row_tokens // 50))  # an example is > 50 tokens: enough for n_rows
    rows: list[PackedRow] = []
    while len(rows) < n_rows:
        batch = [problems[(start + k) % len(problems)] for k in range(chunk)]
        start += chunk
        new = pack_rows(build_examples(tokenizer, batch, rng.randrange(2 ** 31), mix, task), row_tokens)
        rows += new
    return rows[:n_rows]


def training_problems(args: argparse.Namespace) -> tuple[ArithTask, list, list]:
    """``(task, train problems, eval problems)``: the arith train split at the flags' difficulty,
    shuffled by the seed; the eval problems are the last ``--eval-problems``."""
    arith = ArithConfig(min_steps=args.min_steps, max_steps=args.max_steps, max_operand=args.max_operand,
                        max_factor=args.max_factor, max_value=args.max_value)
    problems = arith_problems("train", args.train_problems + args.eval_problems, arith)
    random.Random(args.seed).shuffle(problems)
    return ArithTask(arith), problems[:args.train_problems], problems[args.train_problems:]


def make_tokenizer(args: argparse.Namespace, task: ArithTask, train_problems: list):
    """The run's tokenizer: BPE merges learned on the prompts of the first 5000 train problems."""
    corpus = tokenizer_corpus(train_problems[:5000], args.seed, TOKENIZER_CORPUS_MIX, task)
    return build_tokenizer(corpus, args.vocab_size)


def _log(line: str) -> None:
    print(line, flush=True)  # progress shows up live when stdout is a file


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    mix = Mix(round1=args.round1, shared=args.shared, classic=args.classic, aggregator=args.aggregator,
              drill=args.drill, swap=args.swap,
              peer_accuracy=tuple(args.peer_accuracy))
    task, train_problems, eval_problems = training_problems(args)
    tokenizer = make_tokenizer(args, task, train_problems)
    # One row per step and batch slot, each seen once: the round-1 phase's rows, then the mix's, each
    # phase in a seeded random order.
    if not 0.0 <= args.round1_fraction <= 1.0:
        raise ValueError(f"--round1-fraction must be in [0, 1], got {args.round1_fraction}")
    round1_steps = round(args.round1_fraction * args.steps)
    phases = [(round1_steps, dataclasses.replace(mix, round1=1.0, shared=0.0, classic=0.0, aggregator=0.0,
                                                 drill=0.0)),
              (args.steps - round1_steps, mix)]
    # The mix phase draws its problems from the list rotated past the first ~rows * row_tokens / 60 ones
    # (a round-1 example is ~50-60 tokens), so that its problems are mostly new ones.
    train_rows, order_rng, offset = [], random.Random(args.seed), 0
    for i, (steps, phase_mix) in enumerate(phases):
        if steps:
            rows = make_rows(tokenizer, train_problems[offset:] + train_problems[:offset],
                             steps * args.batch_rows, phase_mix, args.seed + i, task, args.row_tokens)
            order_rng.shuffle(rows)
            train_rows += rows
        offset = (offset + steps * args.batch_rows * args.row_tokens // 60) % len(train_problems)
    eval_rows = pack_rows(build_examples(tokenizer, eval_problems, args.seed + 1, mix, task), args.row_tokens)
    model = new_model(hf_config(args, tokenizer), seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    n_tokens = sum(r.num_tokens for r in train_rows)
    print(f"model: {n_params / 1e6:.2f}M parameters; data: {n_tokens} tokens in {len(train_rows)} rows of "
          f"<= {args.row_tokens} from {len(train_problems)} problems (built in "
          f"{time.perf_counter() - t0:.0f}s)", flush=True)

    cfg = TrainConfig(steps=args.steps, batch_rows=args.batch_rows, lr=args.lr, seed=args.seed,
                      num_threads=args.threads, eval_every=args.eval_every, log_every=50, save_every=args.save_every,
                      output_dir=args.output, shuffle=False, stop_after=args.stop_after if 0 < args.stop_after < args.steps else None,
                      time_limit_s=None if args.minutes is None else 60 * args.minutes)
    files = {**tokenizer_files(tokenizer), "generation_config.json": generation_config(tokenizer)}
    result = train(model, train_rows, cfg, eval_rows, extra_files=files, log=_log)
    report = {"parameters": n_params, "train_tokens": n_tokens, "steps": result.steps,
              "train_seconds": round(result.seconds, 1), "stopped_early": result.stopped_early,
              "final_eval_loss": result.evals[-1][1] if result.evals else None,
              "args": vars(args), "train_config": dataclasses.asdict(cfg)}
    print(json.dumps({k: v for k, v in report.items() if k not in ("args", "train_config")}))
    return report


if __name__ == "__main__":
    main()
