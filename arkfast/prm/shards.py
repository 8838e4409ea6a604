"""Data-parallel labelling (``prm label`` under ``torchrun`` or with ``--shard i/n``): shard ``i`` labels
the trajectories whose id hashes to it (:class:`arkfast.debate.shards.Shard`) into its own part, an
ordinary, resumable label file with its summary::

    labels.jsonl.parts/00000-of-00002.jsonl  (+ 00000-of-00002.summary.json)
    labels.jsonl.parts/00001-of-00002.jsonl
    labels.jsonl, labels.summary.json        the merge: every part's records in the selection's order

Every shard reads and selects the same trajectories, so the one that merges (rank 0 once every part
has finished, or the last ``--shard`` to finish) knows the order.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from arkfast.debate.shards import Shard

__all__ = ["label_part", "merge_label_parts", "parts_finished"]


def label_part(out: Path, shard: Shard) -> Path:
    """The part file of ``shard`` for the label file ``out``."""
    return out.with_name(out.name + ".parts") / f"{shard.index:05d}-of-{shard.count:05d}.jsonl"


def _summary_path(path: Path) -> Path:
    return path.with_name(path.stem + ".summary.json")


def parts_finished(out: Path, count: int) -> bool:
    for i in range(count):
        path = _summary_path(label_part(out, Shard(i, count)))
        if not path.is_file() or not json.loads(path.read_text()).get("finished"):
            return False
    return True


def merge_label_parts(out: Path, count: int, order: Sequence[str], *, wait: bool = False) -> dict[str, Any]:
    """Write ``out`` (the parts' records in the order of the ids ``order``) and its summary; with
    ``wait``, first wait for every part to finish (the other ranks of a torchrun launch)."""
    from arkfast.debate.shards import write_text_atomic
    from arkfast.generate import read_records, write_json_atomic

    while wait and not parts_finished(out, count):
        time.sleep(1.0)
    parts = [label_part(out, Shard(i, count)) for i in range(count)]
    summaries = [json.loads(_summary_path(p).read_text()) for p in parts]
    if not all(s.get("finished") for s in summaries):
        raise ValueError(f"{out}: not every one of the {count} parts has finished; run (or --resume) those shards")
    configs = [{k: v for k, v in s["config"].items() if k != "shard"} for s in summaries]
    if any(c != configs[0] for c in configs):
        raise ValueError(f"{out}: the parts were labelled with different settings")
    by_id = {r["id"]: r for p in parts for r in read_records(p)}
    missing = [i for i in order if i not in by_id]
    if missing or len(by_id) != len(order):
        raise ValueError(f"{out}: the parts hold {len(by_id)} records for {len(order)} trajectories "
                         f"(missing {missing[:3]})")
    records = [by_id[i] for i in order]
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    labels = [v for r in records for v in r["step_labels"]]
    runs = [s["this_run"] for s in summaries]
    this_run = {k: sum(r[k] for r in runs) for k in runs[0] if k not in ("tokens_per_second", "seconds",
                                                                           "prefix_cache_hit_rate")}
    this_run["seconds"] = max(r["seconds"] for r in runs)
    this_run["tokens_per_second"] = sum(r["tokens_per_second"] for r in runs)  # the parts ran side by side
    this_run["prefix_cache_hit_rate"] = (this_run["cached_prompt_tokens"] / this_run["prompt_tokens"]
                                         if this_run["prompt_tokens"] else 0.0)
    summary = {"finished": True, "labels": str(out), "label_source": summaries[0]["label_source"],
               "trajectories_labelled": len(records), "this_run": this_run, "steps": len(labels),
               "mean_label": sum(labels) / len(labels) if labels else None,
               "steps_label_0": sum(1 for v in labels if v == 0.0),
               "steps_label_1": sum(1 for v in labels if v == 1.0), "config": configs[0], "parts": count}
    write_json_atomic(_summary_path(out), summary)
    return summary
