"""Accuracy and cost over a set of debate records (the ``summary.json`` numbers) and their table.

Accuracies are over all problems: a problem with an ``error`` counts as wrong in every column.
``single_agent_accuracy`` is agent 1 in round 1 (one sample, the ``single`` protocol's number);
``majority_accuracy_by_round[r]`` the majority vote of round r+1 (round 1's is the self-consistency
number); ``final_accuracy`` the protocol's final answer (last round's vote, or the aggregator's).
``prefix_cache_hit_rate`` is prompt tokens served from the prefix cache over all prompt tokens.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["format_summary", "summarize"]


def summarize(records: Sequence[dict[str, Any]], *, num_rounds: int) -> dict[str, Any]:
    """The summary numbers of ``records`` (``debates.jsonl`` records of a ``num_rounds``-round run)."""
    n = len(records)

    def rate(count: float) -> float:
        return count / n if n else 0.0

    def first_agent_correct(record: dict[str, Any]) -> bool:
        first = record["rounds"][0] if record["rounds"] else []
        return any(t["agent"] == 0 and t["correct"] for t in first)

    by_round = [rate(sum(1 for r in records if len(r["round_majority_correct"]) > i
                         and r["round_majority_correct"][i])) for i in range(num_rounds)]
    prompt = sum(r["cost"]["prompt_tokens"] for r in records)
    cached = sum(r["cost"]["cached_prompt_tokens"] for r in records)
    generated = sum(r["cost"]["completion_tokens"] for r in records)
    seconds = [r["cost"]["seconds"] for r in records]
    return {
        "problems": n,
        "errors": sum(1 for r in records if r.get("error")),
        "single_agent_accuracy": rate(sum(1 for r in records if first_agent_correct(r))),
        "self_consistency_accuracy": by_round[0] if by_round else 0.0,
        "majority_accuracy_by_round": by_round,
        "final_accuracy": rate(sum(1 for r in records if r["correct"])),
        "prompt_tokens": prompt,
        "cached_prompt_tokens": cached,
        "tokens_generated": generated,
        "prefix_cache_hit_rate": cached / prompt if prompt else 0.0,
        "mean_seconds_per_problem": sum(seconds) / n if n else 0.0,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A small table for people: the accuracy comparison, then tokens and throughput. With
    ``summary["protocol"] == "single"`` the majority-vote rows are left out; ``self-refine`` shows the
    revision's accuracy and its gain over the draft (round 1, the single-agent row) instead."""
    rows = [("problems", f"{summary['problems']} ({summary['errors']} with errors)"),
            ("single agent (agent 1, round 1)", f"{summary['single_agent_accuracy']:.1%}")]
    if summary.get("protocol") == "self-refine":  # one agent, its draft then its revision
        draft, revised = summary["majority_accuracy_by_round"][:2]
        rows += [("revised (round 2)", f"{revised:.1%}"),
                 ("draft -> revised gain", f"{100 * (revised - draft):+.1f} points")]
    elif summary.get("protocol") != "single":  # one agent: a "majority" is that agent's answer again
        rows.append(("majority of round 1 (self-consistency)", f"{summary['self_consistency_accuracy']:.1%}"))
        for i, acc in enumerate(summary["majority_accuracy_by_round"][1:], start=2):
            rows.append((f"majority of round {i}", f"{acc:.1%}"))
    rows += [("final", f"{summary['final_accuracy']:.1%}"),
             ("tokens generated", f"{summary['tokens_generated']:,}"),
             ("prompt tokens (from prefix cache)",
              f"{summary['prompt_tokens']:,} ({summary['prefix_cache_hit_rate']:.1%})")]
    if "tokens_per_second" in summary:
        rows.append(("tokens/s (this run)", f"{summary['tokens_per_second']:,.1f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
