"""``python -m arkfast.generate``: run single-agent, self-consistency, debate or self-refine generation
on a task.

    python -m arkfast.generate                                   # tiny embedded model, built-in arith
    python -m arkfast.generate --model DIR --dataset gsm8k.jsonl --agents 5 --rounds 2 --limit 100
    python -m arkfast.generate --output runs/x --resume          # continue a run that was cut off
    torchrun --nproc-per-node 8 -m arkfast.generate --output runs/x ...   # one engine per GPU
    python -m arkfast.generate --output runs/x --shard 3/8 ...   # shard 3 of 8 (a scheduler's array job)
    python -m arkfast.generate --merge runs/x                    # merge the finished shards' parts

Writes ``<output>/debates.jsonl`` (one record per problem, appended, flushed and fsync'd as each problem
finishes) and ``<output>/summary.json`` (rewritten atomically: a temp file, then a rename). With
``--resume`` the problems already in ``debates.jsonl`` are skipped, a truncated last line (a crash in
mid-write) is cut off and redone, and the summary covers every record in the file; its
``tokens_per_second`` (and ``run``) are this invocation's throughput, model loading excluded.
Under ``torchrun`` or with ``--shard i/n`` each process runs its share of the problems into its own
part folder and the parts are merged into ``debates.jsonl`` + ``summary.json`` at the end
(:mod:`arkfast.debate.shards`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from arkfast.cli import NON_NEGATIVE_INT, POSITIVE_INT, PROBABILITY, TEMPERATURE, number, run_cli

__all__ = ["build_parser", "default_model_path", "main", "read_records"]

SUMMARY_EVERY_S = 10.0


_TOP_K = number(int, low=-1, what="an integer >= -1 (-1 or 0: off)")


def default_model_path() -> Path:
    """The embedded tiny model, ``arkfast/zoo/tiny`` (must hold a ``config.json``)."""
    path = Path(__file__).resolve().parent / "zoo" / "tiny"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no default model is installed (looked for {path / 'config.json'}); "
                                f"pass --model DIR with a Hugging Face checkpoint")
    return path


def build_parser() -> argparse.ArgumentParser:
    from arkfast.debate import LAYOUTS, PROTOCOLS
    from arkfast.debate.shards import Shard
    from arkfast.tasks import TASK_NAMES

    p = argparse.ArgumentParser(
        prog="python -m arkfast.generate",
        description="Generate single-agent, self-consistency or multi-agent debate answers for a task; "
                    "write debates.jsonl (one record per problem) and summary.json.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", metavar="DIR", default=None,
                   help="Hugging Face checkpoint folder, or a .gguf file or a folder holding one (default: "
                        "the embedded tiny model arkfast/zoo/tiny)")
    g.add_argument("--dataset", metavar="PATH_OR_NAME", default=None,
                   help="local .json/.jsonl/.parquet file or folder, a datasets save_to_disk folder, a local "
                        "datasets cache folder, or a hub name 'owner/name[:config]' (default: the built-in "
                        "arith task)")
    g.add_argument("--task", choices=TASK_NAMES, default=None,
                   help="dataset adapter (default: detected from the dataset's fields)")
    g.add_argument("--question-field", metavar="NAME", default=None, help="field holding the question (generic adapter)")
    g.add_argument("--answer-field", metavar="NAME", default=None, help="field holding the gold answer (generic adapter)")
    g.add_argument("--split", default=None,
                   help="split of a hub dataset, saved DatasetDict, cache or arith (default: test, or the only "
                        "one); a local file is one split and ignores it")
    g.add_argument("--limit", type=NON_NEGATIVE_INT, metavar="N", default=None,
                   help="use only the first N problems (default: all)")

    g = p.add_argument_group("protocol")
    g.add_argument("--protocol", choices=PROTOCOLS, default="debate",
                   help="single: one agent; self-consistency: N samples and a majority vote; "
                        "debate: N agents x R rounds, final answer by majority vote of the last round; "
                        "self-refine: one agent drafts, then revises its own draft with the debate's update "
                        "request (2 calls; the final answer is the revision's) (default: %(default)s)")
    g.add_argument("--agents", type=POSITIVE_INT, metavar="N", default=5,
                   help="agents (samples); ignored by single and self-refine (default: %(default)s)")
    g.add_argument("--rounds", type=POSITIVE_INT, metavar="R", default=2,
                   help="debate rounds; only debate uses more than 1 (self-refine: always 2) (default: %(default)s)")
    g.add_argument("--aggregator", action="store_true",
                   help="one more call reads all final solutions and gives the final answer; not with "
                        "--protocol single or self-refine (default: off, the final answer is the last round's vote)")
    g.add_argument("--layout", choices=LAYOUTS, default="shared",
                   help="shared: one transcript per round shared by all agents (prefix-cache friendly) "
                        "+ a per-agent suffix; classic: each agent's own LLM-Debate conversation "
                        "(default: %(default)s)")
    g.add_argument("--max-active-problems", type=POSITIVE_INT, metavar="N", default=None,
                   help="problems in flight at once (default: enough to fill the engine's batch twice, "
                        "2 x max-num-seqs / agents; fewer means records are written sooner)")

    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=TEMPERATURE, metavar="T", default=0.5,
                   help="sampling temperature, 0 is greedy (default: %(default)s)")
    g.add_argument("--top-p", type=PROBABILITY, metavar="P", default=1.0,
                   help="nucleus sampling threshold (default: %(default)s)")
    g.add_argument("--top-k", type=_TOP_K, metavar="K", default=-1,
                   help="sample from the k most likely tokens, -1: off (default: %(default)s)")
    g.add_argument("--max-tokens", type=POSITIVE_INT, metavar="N", default=None,
                   help="tokens per completion (default: the task's: 96 for arith, 512 for gsm8k/choice/"
                        "generic, 1024 for math)")
    g.add_argument("--seed", type=int, metavar="S", default=0, help="seed of the engine and of every request's sampling (default: %(default)s)")

    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on a GPU, "
                                                  "else float32)")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if present)")
    g.add_argument("--threads", type=POSITIVE_INT, metavar="N", default=None,
                   help="torch CPU threads (default: torch's, every core; on a machine whose cores other jobs "
                        "use, 1 is many times faster)")
    g.add_argument("--block-size", type=POSITIVE_INT, metavar="N", default=None,
                   help="KV-cache block size, a power of two >= 16 (default: engine's, 16)")
    g.add_argument("--num-kv-blocks", type=POSITIVE_INT, metavar="N", default=None,
                   help="KV-cache blocks (default: sized from memory by the engine)")
    g.add_argument("--max-num-seqs", type=POSITIVE_INT, metavar="N", default=None,
                   help="sequences in flight (default: engine's, 256)")
    g.add_argument("--max-model-len", type=POSITIVE_INT, metavar="N", default=None,
                   help="longest prompt + completion (default: the model's)")
    g.add_argument("--max-num-batched-tokens", type=POSITIVE_INT, metavar="N", default=None,
                   help="tokens one engine step computes, the chunked-prefill budget "
                        "(default: engine's, 4096)")
    g.add_argument("--gpu-memory-utilization", type=PROBABILITY, metavar="F", default=None,
                   help="share of the GPU's memory the engine may fill, KV cache included "
                        "(default: engine's, 0.9)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs for decode steps (default: off)")
    g.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off (default: on)")

    g = p.add_argument_group("output")
    g.add_argument("--output", metavar="DIR", default=None,
                   help="run folder (default: runs/<protocol>-<timestamp>/ under the working directory)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --output: skip problems already in its debates.jsonl; the "
                        "protocol, dataset and sampling flags must match the run's (default: off)")
    g.add_argument("--shard", type=Shard.flag, metavar="I/N", default=None,
                   help="run only shard I of N (0-based; a problem's shard is a hash of its id) into "
                        "<output>/parts/, for launches without torchrun such as array jobs; the last shard "
                        "to finish merges the parts (default: all problems, or the rank's under torchrun)")
    g.add_argument("--merge", metavar="DIR", default=None,
                   help="only merge the finished parts of the sharded run in DIR into its debates.jsonl "
                        "and summary.json, then exit")
    return p


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options the flags set (the rest stay at the engine's defaults)."""
    names = ("block_size", "num_kv_blocks", "max_num_seqs", "max_model_len", "max_num_batched_tokens",
             "gpu_memory_utilization")
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.no_prefix_caching:
        options["enable_prefix_caching"] = False
    if args.enforce_eager:
        options["enforce_eager"] = True
    return options


def read_records(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """The records of a ``debates.jsonl``. A last line without its newline is an interrupted write:
    with ``repair`` the file is truncated back to the last complete line (so it is redone), else it is
    skipped. A malformed complete line raises ``ValueError`` naming its line number."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes up to and including the last complete line
    if end < len(data) and repair:
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    records = []
    for lineno, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed record ({e.msg}); fix or remove that line") from None
    return records


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temp file and a rename (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _output_dir(args: argparse.Namespace) -> Path:
    if args.output is not None:
        return Path(args.output)
    if args.resume:
        raise ValueError("--resume needs --output DIR (the run folder to continue)")
    return Path.cwd() / "runs" / f"{args.protocol}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_resume_config(out: Path, config: dict[str, Any]) -> None:
    """A resumed run must use the protocol settings of the run it continues."""
    path = out / "summary.json"
    if not path.exists():
        return
    previous = json.loads(path.read_text()).get("config", {})
    keys = ("protocol", "agents", "rounds", "layout", "aggregator", "task", "dataset", "split", "temperature",
            "top_p", "top_k", "max_tokens", "seed")
    diff = [k for k in keys if k in previous and previous[k] != config.get(k)]
    if diff:
        k = diff[0]
        raise ValueError(f"--resume: {out} was run with {k}={previous[k]!r}, now {k}={config.get(k)!r}; "
                         f"use the same settings or another --output")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the summary it wrote."""
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    from arkfast.debate import DebateConfig, format_summary, run_debates, shards, summarize

    if args.merge is not None:
        summary = shards.merge_parts(Path(args.merge))
        print(format_summary(summary))
        print(f"wrote {Path(args.merge) / 'debates.jsonl'} and {Path(args.merge) / 'summary.json'}")
        return summary
    shard, under_torchrun = shards.resolve_shard(args.shard)
    speaks = shard is None or not under_torchrun or shard.index == 0  # under torchrun rank 0 prints
    from arkfast.tasks import load_problems

    model = str(args.model) if args.model is not None else str(default_model_path())
    task, problems = load_problems(args.dataset, task=args.task, split=args.split,
                                   question_field=args.question_field, answer_field=args.answer_field,
                                   limit=args.limit)
    debate = DebateConfig(protocol=args.protocol, agents=args.agents, rounds=args.rounds, layout=args.layout,
                          aggregator=args.aggregator, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k,
                          max_tokens=task.default_max_tokens if args.max_tokens is None else args.max_tokens,
                          seed=args.seed)
    options = engine_options(args)
    config = {**debate.to_dict(), "task": task.name, "dataset": args.dataset or "arith",
              "split": args.split, "limit": args.limit, "model": model, "dtype": args.dtype,
              "device": args.device, "engine_options": options}

    if shard is not None and args.output is None:
        raise ValueError(f"shard {shard} needs --output DIR: every shard writes into the same run folder")
    out = _output_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out
    if shard is not None:  # this shard's problems, into its own part folder (an ordinary run folder)
        merged = out / "debates.jsonl"
        if not args.resume and merged.exists() and merged.stat().st_size > 0:
            raise ValueError(f"{merged} already exists; pass --resume to continue it or another --output")
        shards.check_parts(out, shard)
        shards.write_problem_order(out, [p.id for p in problems])
        problems = shard.select(problems)
        config["shard"] = str(shard)
        out = shards.part_dir(run_dir, shard)
        out.mkdir(parents=True, exist_ok=True)
    debates_path = out / "debates.jsonl"
    if args.resume:
        _check_resume_config(out, config)
        records = read_records(debates_path, repair=True)
    elif debates_path.exists() and debates_path.stat().st_size > 0:
        raise ValueError(f"{debates_path} already exists; pass --resume to continue it or another --output")
    else:
        records = []
    done_ids = {r["id"] for r in records}
    todo = [p for p in problems if p.id not in done_ids]

    import arkfast

    llm = arkfast.LLM(model, dtype=args.dtype, device=shards.rank_device(args.device), seed=args.seed, **options)
    run = {"problems": 0, "tokens_generated": 0, "seconds": 0.0}
    t0 = time.perf_counter()

    def write_summary(finished: bool) -> dict[str, Any]:
        run["seconds"] = time.perf_counter() - t0
        summary = {**summarize(records, num_rounds=debate.num_rounds),
                   "tokens_per_second": run["tokens_generated"] / run["seconds"] if run["seconds"] > 0 else 0.0,
                   "run": dict(run), "finished": finished, "protocol": debate.protocol, "model": model,
                   "task": task.name, "config": config, "arkfast_version": arkfast.__version__}
        write_json_atomic(out / "summary.json", summary)
        return summary

    write_summary(finished=not todo)
    last_summary = time.perf_counter()
    correct = sum(1 for r in records if r["correct"])
    desc = debate.protocol if shard is None else f"{debate.protocol} {shard}"
    bar = tqdm(total=len(todo), unit="problem", desc=desc, dynamic_ncols=True, disable=not speaks)
    finished = False
    try:
        with open(debates_path, "a", encoding="utf-8") as f:
            for record in run_debates(llm, task, todo, debate, max_active_problems=args.max_active_problems):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())  # a finished problem survives a crash of the next one
                records.append(record)
                run["problems"] += 1
                run["tokens_generated"] += record["cost"]["completion_tokens"]
                correct += bool(record["correct"])
                bar.update(1)
                bar.set_postfix(tok_s=f"{run['tokens_generated'] / max(time.perf_counter() - t0, 1e-9):.1f}",
                                acc=f"{correct / len(records):.1%}")
                if time.perf_counter() - last_summary > SUMMARY_EVERY_S:
                    write_summary(finished=False)
                    last_summary = time.perf_counter()
        finished = True
    finally:  # also on an interrupt: the summary covers what was written
        bar.close()
        summary = write_summary(finished=finished)
        if not finished:
            print(f"stopped after {len(records)} of {len(records) + len(todo) - run['problems']} problems; "
                  f"continue with the same flags and --output {run_dir} --resume", file=sys.stderr)
    if shard is not None:
        if under_torchrun and shard.index == 0:
            summary = shards.wait_and_merge(run_dir)  # the other ranks' parts
        elif not under_torchrun and shards.parts_finished(run_dir):
            summary = shards.merge_parts(run_dir)  # the last shard to finish merges
        elif speaks:
            print(f"wrote part {shard} in {out}; once every shard has finished: "
                  f"python -m arkfast.generate --merge {run_dir}")
            return summary
        else:
            return summary
        debates_path = run_dir / "debates.jsonl"
    if speaks:
        print(format_summary(summary))
        print(f"wrote {debates_path} and {debates_path.with_name('summary.json')}")
    return summary


if __name__ == "__main__":
    run_cli(main)  # main() itself says how to resume after an interrupt
