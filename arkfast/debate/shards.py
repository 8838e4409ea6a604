"""Data-parallel generation: one shard of the problems per process, one part folder per shard, and
the merge of the parts into one run.

A problem belongs to shard ``crc32(id) mod n``: the partition depends on nothing but the id (not on
the dataset's order, ``--limit`` or which process asks), so a resumed or re-launched shard picks up
exactly its own problems. Shard ``i`` of ``n`` writes an ordinary run folder (``debates.jsonl`` +
``summary.json``, resumable on its own) under the run's folder::

    <output>/problems.txt                  every problem id of the run, in dataset order
    <output>/parts/00000-of-00002/         shard 0's debates.jsonl and summary.json
    <output>/parts/00001-of-00002/
    <output>/debates.jsonl, summary.json   the merge, once every part has finished

The merge lists the records in dataset order (a one-process run lists them in the order they
finished; the records themselves are the same) and sums the parts' counts; its ``tokens_per_second``
is the parts' rates added up (they ran side by side).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .summary import summarize

__all__ = ["Shard", "check_parts", "merge_parts", "part_dir", "parts_finished", "rank_device", "read_problem_order",
           "resolve_shard", "wait_and_merge", "write_problem_order", "write_text_atomic"]

PARTS = "parts"
ORDER = "problems.txt"


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: expected i/n with 0 <= i < n")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/n"`` (as ``--shard`` takes it)."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if m is None or not int(m[1]) < int(m[2]):
            raise ValueError(f"expected i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
        return cls(int(m[1]), int(m[2]))

    @classmethod
    def flag(cls, text: str) -> Shard:
        """:meth:`parse` as an argparse ``type`` (a bad value is a usage error naming ``--shard``)."""
        import argparse

        try:
            return cls.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    @classmethod
    def from_env(cls) -> Shard | None:
        """The shard of a ``torchrun`` process (``RANK`` of ``WORLD_SIZE``), or ``None`` outside one."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world) if world > 1 else None

    def owns(self, problem_id: str) -> bool:
        return zlib.crc32(problem_id.encode("utf-8")) % self.count == self.index

    def select(self, items: Sequence, key=lambda item: item.id) -> list:
        """This shard's items (problems, or anything whose ``key`` is its id), in their order."""
        return [item for item in items if self.owns(key(item))]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def resolve_shard(flag: Shard | None) -> tuple[Shard | None, bool]:
    """``(shard, under_torchrun)`` from ``--shard i/n`` or, without it, from torchrun's environment.
    Both at once is refused: a torchrun launch already splits the problems by rank."""
    env = Shard.from_env()
    if flag is not None and env is not None:
        raise ValueError(f"--shard {flag} under torchrun (rank {env}): the ranks already split the problems; "
                         f"use one or the other")
    if flag is not None:
        return flag, False
    return env, env is not None


def rank_device(device: str | None) -> str | None:
    """Under torchrun, ``None`` or ``"cuda"`` becomes this rank's GPU ``cuda:<LOCAL_RANK>`` (when CUDA
    is there); anything else is kept."""
    if "LOCAL_RANK" not in os.environ or device not in (None, "cuda"):
        return device
    import torch

    return f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else device


def wait_and_merge(out: Path, *, poll_s: float = 1.0) -> dict[str, Any]:
    """Wait until every part of ``out`` has finished (the other ranks of a torchrun launch; a rank that
    fails makes torchrun stop this one too), then :func:`merge_parts`."""
    import time

    while not parts_finished(out):
        time.sleep(poll_s)
    return merge_parts(out)


def part_dir(out: Path, shard: Shard) -> Path:
    return Path(out) / PARTS / f"{shard.index:05d}-of-{shard.count:05d}"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file of this process and a rename (never half-written)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # shards may write the same file at once
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_problem_order(out: Path, ids: Sequence[str]) -> None:
    """Record the run's problem ids in dataset order (every shard writes the same file; a different
    one already there means another dataset or ``--limit``, refused)."""
    path = Path(out) / ORDER
    text = "".join(f"{i}\n" for i in ids)
    if any("\n" in i for i in ids):
        raise ValueError("a problem id holds a newline; ids must be one line each")
    if path.exists() and path.read_text(encoding="utf-8") != text:
        raise ValueError(f"{path} lists other problems than this run's (another dataset, split or --limit?); "
                         f"use the run's settings or another --output")
    if not path.exists():
        write_text_atomic(path, text)


def read_problem_order(out: Path) -> list[str]:
    path = Path(out) / ORDER
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; is {out} the --output of a sharded run?")
    return path.read_text(encoding="utf-8").splitlines()


def _parts(out: Path) -> list[Path]:
    root = Path(out) / PARTS
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _part_summaries(out: Path) -> tuple[int, dict[int, dict[str, Any]]]:
    """``(n, {shard index: its summary})`` of the parts written so far; parts of two different shard
    counts in one folder are refused."""
    counts, summaries = set(), {}
    for part in _parts(out):
        m = re.fullmatch(r"(\d+)-of-(\d+)", part.name)
        if m is None:
            continue
        counts.add(int(m[2]))
        if (part / "summary.json").exists():
            summaries[int(m[1])] = json.loads((part / "summary.json").read_text())
    if len(counts) > 1:
        raise ValueError(f"{Path(out) / PARTS} holds parts of runs with {sorted(counts)} shards; "
                         f"one run folder takes one shard count")
    return (counts.pop() if counts else 0), summaries


def check_parts(out: Path, shard: Shard) -> None:
    """Refuse to start ``shard`` in a run folder whose parts were made with another shard count."""
    n, _ = _part_summaries(out)
    if n and n != shard.count:
        raise ValueError(f"{Path(out) / PARTS} holds parts of runs with {sorted({n, shard.count})} shards; "
                         f"one run folder takes one shard count")


def parts_finished(out: Path) -> bool:
    """Whether every part of the sharded run in ``out`` exists and has finished."""
    n, summaries = _part_summaries(out)
    return n > 0 and len(summaries) == n and all(s.get("finished") for s in summaries.values())


def merge_parts(out: Path) -> dict[str, Any]:
    """Write ``out/debates.jsonl`` (every part's records, in the order of ``problems.txt``) and
    ``out/summary.json``; returns the summary. Every part must have finished, with the same settings."""
    from arkfast.generate import read_records

    out = Path(out)
    n, summaries = _part_summaries(out)
    if n == 0:
        raise FileNotFoundError(f"no parts under {out / PARTS}; is {out} the --output of a sharded run?")
    missing = [i for i in range(n) if i not in summaries or not summaries[i].get("finished")]
    if missing:
        raise ValueError(f"{out}: parts {missing} of {n} are missing or unfinished; run (or --resume) those "
                         f"shards first")
    configs = {i: {k: v for k, v in s["config"].items() if k != "shard"} for i, s in summaries.items()}
    for i in range(1, n):
        if configs[i] != configs[0]:
            key = next(k for k in {*configs[0], *configs[i]} if configs[0].get(k) != configs[i].get(k))
            raise ValueError(f"{out}: part {i} was run with {key}={configs[i].get(key)!r}, part 0 with "
                             f"{key}={configs[0].get(key)!r}; the parts are not one run")
    by_id: dict[str, dict[str, Any]] = {}
    for i in range(n):
        for record in read_records(part_dir(out, Shard(i, n)) / "debates.jsonl"):
            if record["id"] in by_id:
                raise ValueError(f"{out}: problem {record['id']!r} is in two parts")
            by_id[record["id"]] = record
    order = read_problem_order(out)
    lost = [i for i in order if i not in by_id]
    if lost or len(by_id) != len(order):
        raise ValueError(f"{out}: the parts hold {len(by_id)} records for {len(order)} problems "
                         f"(missing {lost[:3]}...)")
    records = [by_id[i] for i in order]
    write_text_atomic(out / "debates.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    first = summaries[0]
    runs = [summaries[i]["run"] for i in range(n)]
    summary = {**summarize(records, num_rounds=configs[0]["rounds"]),
               "tokens_per_second": sum(summaries[i]["tokens_per_second"] for i in range(n)),
               "run": {"problems": sum(r["problems"] for r in runs),
                       "tokens_generated": sum(r["tokens_generated"] for r in runs),
                       "seconds": max(r["seconds"] for r in runs)},
               "finished": True, "protocol": first["protocol"], "model": first["model"], "task": first["task"],
               "config": configs[0],
               "arkfast_version": first["arkfast_version"], "parts": n}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")  # shards may merge at once
    return summary
