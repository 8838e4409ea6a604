"""The experiment's training data: the train-split debates (reused when already generated), and the
training-token-matched RFT set drawn from the base model's own single-agent samples.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

__all__ = ["copy_reusable_debates", "generation_cost", "per_problem_correct", "select_token_matched"]

# The generate settings a reused record must have been made with (they decide its text).
_SAMPLING_KEYS = ("protocol", "agents", "rounds", "layout", "aggregator", "temperature", "top_p", "top_k",
                  "max_tokens", "seed", "task", "dataset", "split")


def copy_reusable_debates(source: Path, target: Path, ids: set[str], expected: dict[str, Any],
                          log=print) -> int:
    """Copy into ``target`` (a new ``debates.jsonl``) the records of ``source`` whose problem id is in
    ``ids``, when ``source``'s run used the ``expected`` generate settings (``_SAMPLING_KEYS`` and the
    model): each request's sampling seed comes from the run seed and the problem, so such a record is the
    one ``generate`` would write again. Returns the number copied (0 when ``target`` already exists,
    ``source`` is missing, or its settings differ; the reason is logged)."""
    from arkfast.generate import read_records

    summary = source.parent / "summary.json"
    if target.exists() or not source.is_file() or not summary.is_file():
        return 0
    config = json.loads(summary.read_text()).get("config", {})
    diff = [k for k in (*_SAMPLING_KEYS, "model") if config.get(k) != expected.get(k)]
    if diff:
        log(f"not reusing {source}: it was made with {diff[0]}={config.get(diff[0])!r}, this experiment "
            f"uses {expected.get(diff[0])!r}")
        return 0
    records = [r for r in read_records(source) if r["id"] in ids and not r.get("error")]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    log(f"reused {len(records)} of {len(ids)} train debates from {source}")
    return len(records)


def generation_cost(path: Path) -> dict[str, Any]:
    """What the records of a ``debates.jsonl`` cost: ``problems``, generated (``completion_tokens``)
    and ``prompt_tokens``, model ``calls``, and accuracy numbers (``correct``: the final answer right;
    ``first_agent_correct``: agent 0 in round 1)."""
    from arkfast.generate import read_records

    records = read_records(path)
    calls = sum(len(turns) for r in records for turns in r["rounds"]) + sum(r.get("aggregator") is not None
                                                                             for r in records)
    return {"problems": len(records),
            "completion_tokens": sum(r["cost"]["completion_tokens"] for r in records),
            "prompt_tokens": sum(r["cost"]["prompt_tokens"] for r in records),
            "calls": calls, "correct": sum(bool(r["correct"]) for r in records),
            "first_agent_correct": sum(any(t["agent"] == 0 and t["correct"] for t in r["rounds"][0])
                                       for r in records if r["rounds"])}


def per_problem_correct(path: Path) -> dict[str, int]:
    """``{problem id: 1 if the final answer is right else 0}`` of a ``debates.jsonl``."""
    from arkfast.generate import read_records

    return {r["id"]: int(bool(r["correct"])) for r in read_records(path)}


def select_token_matched(pool: list[dict[str, Any]], tokens_of, target_tokens: int, seed: int
                         ) -> tuple[list[dict[str, Any]], int]:
    """Trajectory records from ``pool`` (distinct correct samples, grouped by ``problem_id`` in
    preference order) whose tokens (``tokens_of(record)``) add up to ``target_tokens``: problems in a
    seeded shuffle, one record of each in turn (first every problem's most preferred sample, then the
    second ones, ...), stopping at the first record that reaches the target (so at most one record
    over it). Returns ``(records, tokens)``; all of ``pool`` when it holds fewer tokens."""
    by_problem: dict[str, list[dict[str, Any]]] = {}
    for record in pool:
        by_problem.setdefault(record["problem_id"], []).append(record)
    order = sorted(by_problem)
    random.Random(seed).shuffle(order)
    chosen, tokens, depth = [], 0, 0
    while tokens < target_tokens and any(len(by_problem[p]) > depth for p in order):
        for problem in order:
            if tokens >= target_tokens:
                break
            if len(by_problem[problem]) > depth:
                record = by_problem[problem][depth]
                chosen.append(record)
                tokens += tokens_of(record)
        depth += 1
    return chosen, tokens
