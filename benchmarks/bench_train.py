"""Training throughput of the distillation trainer: packed rows vs padded-to-longest batches vs TRL.

    python -m benchmarks.bench_train              # CPU: the tiny model; GPU: a Qwen2.5-0.5B-shaped random model
    python -m benchmarks.bench_train --smoke      # seconds, tiny data, nothing saved

The same examples (a long-tailed, lognormal length distribution, prompt a quarter of each sequence,
token ids random) are trained for the same number of sequences by each provider, one optimiser step
at a time, on the same model and device:

``arkfast packed``
    :func:`arkfast.train.pack_rows` (best-fit-decreasing into ``--row-tokens`` rows), the varlen
    forward, the fused weighted loss, AdamW (:mod:`arkfast.distill.loop`): one row per step.
``arkfast padded``
    the same code with every sequence of a batch padded to the batch's longest (``--pad-batch``
    sequences per step, in random order): what a trainer without packing computes. The pad tokens are
    computed and masked out of the loss.
``trl SFTTrainer``
    TRL's ``SFTTrainer`` with ``packing=True`` (BFD, padding-free, ``max_length = --row-tokens``) on the
    transformers copy of the model, completion-only loss. A benchmark extra (``pip install trl``); the
    provider is skipped with a message when trl is absent.

Reported per provider: real (non-pad) tokens per second over the timed steps (``tokens_per_s``), the
median / p20 / p80 step time, the share of computed tokens that are padding, and the speedup over the
padded baseline. On CUDA also the model FLOP utilisation against a bf16 matmul ceiling measured in the
same run: ``mfu = 6 * params * tokens/s / ceiling`` (attention FLOPs left out, so a lower bound).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    from benchmarks import harness
except ImportError:  # run as a script: python benchmarks/bench_train.py
    import harness

SUITE = {"gpu": {"budget_s": 150, "args": []}, "cpu": {"budget_s": 240, "args": []},
         "smoke": {"budget_s": 60, "args": []}}

# A Qwen2.5-0.5B-shaped model (random weights: nothing is downloaded), for GPU runs.
QWEN_05B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
            "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "tie_word_embeddings": True, "hidden_act": "silu"}


def make_lengths(n: int, row_tokens: int, median: float, seed: int) -> list[int]:
    """``n`` sequence lengths, lognormal (sigma 0.8) around ``median``, clipped to [8, row_tokens]."""
    rng = np.random.default_rng(seed)
    values = rng.lognormal(mean=math.log(median), sigma=0.8, size=n)
    return np.clip(values, 8, row_tokens).astype(int).tolist()


def make_examples(lengths: list[int], vocab: int, seed: int):
    from arkfast.train import Example

    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        p = max(1, n // 4)
        out.append(Example(ids[:p], ids[p:] if n - p > 0 else ids[-1:]))
    return out


def padded_rows(examples, batch: int, seed: int, pad_id: int):
    """Batches of ``batch`` examples in a seeded random order, each padded to its longest: one
    :class:`PackedRow` per batch whose sequences all have the batch's longest length (pad tokens
    labelled -100)."""
    from arkfast.train import IGNORE_INDEX, PackedRow

    order = np.random.default_rng(seed).permutation(len(examples)).tolist()
    rows = []
    for b in range(0, len(order), batch):
        members = [examples[i] for i in order[b:b + batch]]
        width = max(len(e) for e in members)
        ids, labels, weights = [], [], []
        for e in members:
            t, lab, w = e.tensors()
            pad = width - len(e)
            ids.append(torch.cat([t, torch.full((pad,), pad_id, dtype=t.dtype)]))
            labels.append(torch.cat([lab, torch.full((pad,), IGNORE_INDEX, dtype=lab.dtype)]))
            weights.append(torch.cat([w, torch.zeros(pad, dtype=w.dtype)]))
        rows.append((PackedRow(torch.cat(ids), torch.cat(labels), torch.cat(weights), (width,) * len(members)),
                     sum(len(e) for e in members)))
    return rows


def run_arkfast(model, rows_and_real, args) -> dict:
    """Train one step per row; time every step after the warm-up ones."""
    from arkfast.distill.loop import Optimizer, micro_batch_loss_sum

    dev = args.device
    opt = Optimizer(model, precision="bf16" if dev.type == "cuda" else "fp32", lr=1e-4, betas=(0.9, 0.95),
                    eps=1e-8, weight_decay=0.0)
    times, real, computed = [], 0, 0
    for i, (row, n_real) in enumerate(rows_and_real[:args.warmup + args.steps]):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        loss = micro_batch_loss_sum(model, row, dev) / max(row.num_targets, 1)
        opt.backward(loss)
        opt.step(1e-4, 1.0, opt.grad_norm())
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            real += n_real
            computed += row.num_tokens
    return _stats(times, real, computed)


def _stats(times: list[float], real: int, computed: int) -> dict:
    ordered = sorted(t * 1e3 for t in times)
    return {"steps": len(times), "tokens": real, "tokens_per_s": real / sum(times),
            "median_ms": statistics.median(ordered), "p20_ms": harness._quantile(ordered, 0.2),
            "p80_ms": harness._quantile(ordered, 0.8), "pad_fraction": 1 - real / computed}


def run_trl(model_dir: Path, examples, args) -> dict | str:
    """TRL's SFTTrainer with BFD packing on the same examples; returns the stats or why it was skipped."""
    try:
        import trl  # noqa: F401
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, TrainerCallback
        from trl import SFTConfig, SFTTrainer
    except ImportError as e:
        return f"skipped: trl is not installed ({e.name}); pip install trl"
    from arkfast.models import load_tokenizer

    data = Dataset.from_dict({
        "input_ids": [list(e.prompt + e.completion) for e in examples],
        "completion_mask": [[0] * len(e.prompt) + [1] * len(e.completion) for e in examples]})
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if args.device.type == "cuda":
                torch.cuda.synchronize(args.device)
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if args.device.type == "cuda":
                torch.cuda.synchronize(args.device)
            times.append(time.perf_counter() - self.t0)

    cuda = args.device.type == "cuda"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 attn_implementation="sdpa").to(args.device)
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, packing=True, packing_strategy="bfd", max_length=args.row_tokens,
                           per_device_train_batch_size=1, gradient_accumulation_steps=1, learning_rate=1e-4,
                           max_steps=args.warmup + args.steps, logging_steps=10 ** 6, save_strategy="no",
                           report_to="none", use_cpu=not cuda, bf16=cuda, completion_only_loss=True,
                           dataloader_num_workers=0, seed=args.seed, disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=config, train_dataset=data,
                             processing_class=load_tokenizer(model_dir), callbacks=[Timer()])
        packed = trainer.train_dataset
        row_lengths = [len(ids) for ids in packed["input_ids"]]
        trainer.train()
    timed = times[args.warmup:]
    # rows are visited in the sampler's random order: the real tokens of a timed step are estimated by
    # the mean packed row length (TRL's rows carry no padding)
    mean_row = sum(row_lengths) / len(row_lengths)
    real = round(mean_row * len(timed))
    return {**_stats(timed, real, real), "rows_available": len(row_lengths)}


def matmul_ceiling_tflops(device: torch.device) -> float:
    """Measured bf16 matmul throughput (8192^3), the MFU denominator."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    stats = harness.measure(lambda: a @ b, warmup=3, reps=10, device=device)
    return 2 * 8192 ** 3 / (stats.median_ms * 1e-3) / 1e12


def build_model(args):
    """``(model_dir, arkfast model)``: the tiny model on CPU, a random Qwen2.5-0.5B shape on CUDA,
    saved to a temporary HF folder so that TRL trains the same weights."""
    from arkfast.generate import default_model_path
    from arkfast.models import load_model, save_model
    from arkfast.train import new_model

    if args.device.type != "cuda":
        path = default_model_path()
        return path, load_model(path, torch.float32, args.device).train()
    folder = Path(tempfile.mkdtemp(prefix="bench_train-"))
    model = new_model(QWEN_05B, seed=0)
    save_model(model, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # any tokenizer: the ids are random
        (folder / name).write_text((default_model_path() / name).read_text())
    return folder, model.to(args.device).train()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(parser, warmup=2, reps=20)
    parser.add_argument("--sequences", type=int, default=None,
                        help="examples in the data set (default 400; 48 with --smoke)")
    parser.add_argument("--row-tokens", type=int, default=None,
                        help="tokens per packed row (default 1024 on CPU, 8192 on CUDA; 256 with --smoke)")
    parser.add_argument("--median-length", type=float, default=None,
                        help="median sequence length of the lognormal (default row-tokens / 8)")
    parser.add_argument("--pad-batch", type=int, default=None,
                        help="sequences per padded batch (default: as many as a packed row holds on average)")
    parser.add_argument("--providers", nargs="+", default=None, choices=["packed", "padded", "trl"],
                        help="what to measure (default: all; packed and padded with --smoke, where importing "
                             "TRL alone takes longer than the rest)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the lengths, ids and batch order")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on CPU, the trainer's default; torch's on CUDA)")
    args = harness.resolve_common_args(parser.parse_args(argv), gpu_benchmark=False)
    cuda = args.device.type == "cuda"
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    args.sequences = args.sequences or (48 if args.smoke else 400)
    args.row_tokens = args.row_tokens or (256 if args.smoke else 8192 if cuda else 1024)
    args.median_length = args.median_length or args.row_tokens / 8
    args.providers = args.providers or (["packed", "padded"] if args.smoke else ["packed", "padded", "trl"])
    args.steps = args.reps

    from arkfast.train import pack_rows

    model_dir, model = build_model(args)
    vocab = model.config.vocab_size
    lengths = make_lengths(args.sequences, args.row_tokens, args.median_length, args.seed)
    examples = make_examples(lengths, vocab, args.seed)
    packed = pack_rows(examples, args.row_tokens)
    per_row = len(examples) / len(packed)
    args.pad_batch = args.pad_batch or max(1, round(per_row))
    steps_avail = min(len(packed), math.ceil(len(examples) / args.pad_batch))
    args.steps = min(args.steps, steps_avail - args.warmup)
    if args.steps < 1:
        parser.error(f"{len(packed)} packed rows leave no timed step after {args.warmup} warm-up steps; "
                     f"raise --sequences")
    order = np.random.default_rng(args.seed).permutation(len(packed)).tolist()
    common = {"model": "tiny" if not cuda else "qwen2.5-0.5b-shape", "params": sum(p.numel() for p in model.parameters()),
              "sequences": len(examples), "row_tokens": args.row_tokens, "median_length": args.median_length,
              "mean_length": sum(lengths) / len(lengths), "max_length": max(lengths), "pad_batch": args.pad_batch,
              "seqs_per_row": per_row, "threads": torch.get_num_threads(), "smoke": args.smoke,
              "load_avg_1m": os.getloadavg()[0]}  # other work on the machine, for reading CPU figures
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def fresh():
        model.load_state_dict(initial)
        return model

    rows = []
    if "packed" in args.providers:
        rows.append({"provider": "arkfast packed", **common,
                     **run_arkfast(fresh(), [(packed[i], packed[i].num_tokens) for i in order], args)})
    if "padded" in args.providers:
        pad_id = 0
        rows.append({"provider": "arkfast padded", **common,
                     **run_arkfast(fresh(), padded_rows(examples, args.pad_batch, args.seed, pad_id), args)})
    if "trl" in args.providers:
        got = run_trl(model_dir, examples, args)
        if isinstance(got, str):
            print(f"trl SFTTrainer: {got}", file=sys.stderr)
        else:
            import trl
            rows.append({"provider": "trl SFTTrainer", **common, **got, "trl": trl.__version__})
    base = next((r["tokens_per_s"] for r in rows if r["provider"] == "arkfast padded"), None)
    ceiling = matmul_ceiling_tflops(args.device) if cuda else None
    for r in rows:
        r["speedup_vs_padded"] = None if base is None else r["tokens_per_s"] / base
        if ceiling is not None:
            r["matmul_tflops"] = ceiling
            r["mfu"] = 6 * r["params"] * r["tokens_per_s"] / (ceiling * 1e12)
    print(f"device: {harness.cpu_model_name() if not cuda else torch.cuda.get_device_name(args.device)}; "
          f"{len(examples)} sequences (mean {common['mean_length']:.0f}, max {common['max_length']} tokens), "
          f"{len(packed)} packed rows of <= {args.row_tokens}", file=sys.stderr)
    harness.print_table(rows, columns=["provider", "steps", "tokens", "tokens_per_s", "median_ms", "p20_ms",
                                       "p80_ms", "pad_fraction", "speedup_vs_padded"]
                        + (["mfu"] if cuda else []))
    if args.save:
        harness.save_rows("train", rows, device=args.device)
    return rows


if __name__ == "__main__":
    main()
