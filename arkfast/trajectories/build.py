"""From debate records to the three training sets: R-SFT, DA and PAD.

Every agent turn of every ``debates.jsonl`` record is a *candidate*. A candidate is **skipped**, and
counted under its reason, when

``error``       its problem's record has an ``error`` (the debate did not finish cleanly);
``truncated``   it stopped at ``max_tokens`` (``finish_reason == "length"``);
``unfinished``  it ended any other way than ``"stop"`` (an aborted request);
``no_answer``   no answer could be extracted from it (``answer`` is null);
``aggregator``  it is the aggregator's call, which reads the agents' solutions: not a single-agent answer.

The others are *usable*, and are ordered per problem by **preference**: later rounds first (a final
round answer has seen the debate), then agents in a seeded per-problem shuffle (``seed``; the agents of a
round are exchangeable, so no agent index is favoured). From them:

``rsft``  one trajectory per problem whose committee's final answer is right: the most preferred
          final-round trajectory that is correct and holds the consensus (final) answer. A problem the
          committee got wrong contributes nothing (``committee_wrong``); one whose right answer no usable
          final-round trajectory holds is counted as ``rsft_no_candidate``.
``da``    the distinct correct trajectories of every round and agent (committee right or wrong), at most
          ``max_per_problem`` per problem, the most preferred kept.
``pad``   the distinct correct *and* incorrect trajectories, at most ``max_per_problem`` of each per
          problem.

Distinct means different :func:`normalise` d text; a repeat of a kept text is counted as ``duplicate``
and a distinct one past the cap as ``over_cap``, per set. Every record's ``prompt`` is the
single-agent round-1 prompt of its problem (:func:`arkfast.debate.prompts.first_round_text`), whatever
round it came from: the student learns to answer alone.
"""
from __future__ import annotations

import copy
import dataclasses
import random
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .schema import tokenizer_fingerprint
from .steps import default_step_mode, merge_tokenless_steps, segment_steps, validate_step_mode

__all__ = ["SETS", "SKIP_REASONS", "BuildConfig", "DebateFileError", "build_sets", "load_debates", "normalise"]

SETS = ("rsft", "da", "pad")
SKIP_REASONS = ("error", "truncated", "unfinished", "no_answer", "aggregator")


class DebateFileError(ValueError):
    """A bad ``debates.jsonl``: the message names the file, the line and the field."""


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """How the sets are built. ``max_per_problem``: the DA cap, and PAD's cap on each of correct and
    incorrect; ``step_mode``: ``line``/``paragraph``/``regex:PATTERN``, or ``None`` for each task's
    default (:func:`default_step_mode`); ``seed``: the agent-order tie-break."""

    max_per_problem: int = 4
    step_mode: str | None = None
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.max_per_problem, bool) or not isinstance(self.max_per_problem, int) \
                or self.max_per_problem < 1:
            raise ValueError(f"max_per_problem must be an integer >= 1, got {self.max_per_problem!r}")
        if self.step_mode is not None:
            validate_step_mode(self.step_mode)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")


def normalise(text: str) -> str:
    """The de-duplication key of a response: Unicode NFKC, every whitespace run one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


# ---------------------------------------------------------------- reading debates


def _line_numbers(path: Path) -> list[int]:
    """The 1-based line numbers of the records :func:`arkfast.generate.read_records` returns (its rule:
    complete, non-blank lines)."""
    lines = path.read_bytes().split(b"\n")[:-1]
    return [i for i, line in enumerate(lines, start=1) if line.strip()]


def _check_debate(record: Any, where: str) -> None:
    def bad(field: str, message: str) -> DebateFileError:
        return DebateFileError(f"{where}: field {field!r}: {message}")

    if not isinstance(record, dict):
        raise DebateFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name in ("id", "task", "question", "gold", "rounds", "final_answer", "correct", "error"):
        if name not in record:
            raise bad(name, "missing")
    for name in ("id", "task", "question", "gold"):
        if not isinstance(record[name], str) or not record[name]:
            raise bad(name, f"expected a non-empty string, got {record[name]!r}")
    if not isinstance(record["correct"], bool):
        raise bad("correct", f"expected true or false, got {record['correct']!r}")
    if record["final_answer"] is not None and not isinstance(record["final_answer"], str):
        raise bad("final_answer", f"expected a string or null, got {record['final_answer']!r}")
    if "meta" in record and not isinstance(record["meta"], dict):
        raise bad("meta", f"expected an object, got {record['meta']!r}")
    if not isinstance(record["rounds"], list) or not all(isinstance(r, list) for r in record["rounds"]):
        raise bad("rounds", "expected a list of rounds, each a list of agent turns")
    for r, turns in enumerate(record["rounds"]):
        for i, turn in enumerate(turns):
            field = f"rounds[{r}][{i}]"
            if not isinstance(turn, dict):
                raise bad(field, f"expected an object, got {type(turn).__name__}")
            checks = (("agent", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
                      ("text", lambda v: isinstance(v, str), "a string"),
                      ("answer", lambda v: v is None or isinstance(v, str), "a string or null"),
                      ("correct", lambda v: isinstance(v, bool), "true or false"),
                      ("finish_reason", lambda v: v is None or isinstance(v, str), "a string or null"))
            for name, ok, what in checks:
                if name not in turn:
                    raise bad(f"{field}.{name}", "missing")
                if not ok(turn[name]):
                    raise bad(f"{field}.{name}", f"expected {what}, got {turn[name]!r}")


def load_debates(paths: Sequence[str | Path]) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, int]]:
    """``([(where, record), ...], notes)``: every debate record of ``paths`` with its ``"file:line"``,
    checked. ``DebateFileError`` (one line, naming file, line and field) for a missing or empty file, a
    malformed line, a missing or ill-typed field, or a problem id already read. ``notes`` counts
    ``incomplete_lines``: a last line without its newline (a ``generate`` run cut off mid-write),
    left out and reported, as ``read_records`` does."""
    from arkfast.generate import read_records

    out, seen, notes = [], {}, {"incomplete_lines": 0}
    for path in map(Path, paths):
        if not path.is_file():
            raise DebateFileError(f"{path}: no such debates file")
        try:
            records = read_records(path)
        except ValueError as e:
            raise DebateFileError(str(e)) from None
        data = path.read_bytes()
        if data[data.rfind(b"\n") + 1:].strip():  # text after the last newline: an unfinished write
            notes["incomplete_lines"] += 1
        if not records:
            raise DebateFileError(f"{path}: empty file (no debate records)")
        for lineno, record in zip(_line_numbers(path), records, strict=True):
            where = f"{path}:{lineno}"
            _check_debate(record, where)
            if record["id"] in seen:
                raise DebateFileError(f"{where}: field 'id': problem {record['id']!r} was already read at "
                                      f"{seen[record['id']]}; give each problem once")
            seen[record["id"]] = where
            out.append((where, record))
    return out, notes


# ---------------------------------------------------------------- selection


def _task(name: str, where: str, cache: dict[str, Any]) -> Any:
    if name not in cache:
        from arkfast.tasks import ADAPTERS, ArithTask

        if name == "arith":
            cache[name] = ArithTask()
        elif name in ADAPTERS:
            cache[name] = ADAPTERS[name]()
        else:
            raise DebateFileError(f"{where}: field 'task': unknown task {name!r}; expected 'arith' or one "
                                  f"of {sorted(ADAPTERS)}")
    return cache[name]


def _first_round_prompt(task: Any, record: dict[str, Any]) -> list[dict[str, str]]:
    from arkfast.debate.prompts import first_round_text
    from arkfast.tasks import Problem

    choices = record.get("choices")
    problem = Problem(record["id"], record["question"], record["gold"],
                      choices=tuple(choices) if choices is not None else None, meta=record.get("meta") or {})
    return [{"role": "user", "content": first_round_text(task, problem)}]


def _skip_reason(record: dict[str, Any], turn: dict[str, Any]) -> str | None:
    if record["error"] is not None:
        return "error"
    if turn["finish_reason"] == "length":
        return "truncated"
    if turn["finish_reason"] != "stop":
        return "unfinished"
    if turn["answer"] is None:
        return "no_answer"
    return None


def _keep_distinct(candidates: Iterable[dict[str, Any]], cap: int, counts: Counter, set_name: str) -> list[dict]:
    """The first ``cap`` candidates of distinct normalised text (in the given preference order); a
    repeat of an earlier text is counted as ``<set>.duplicate``, a new text past the cap as
    ``<set>.over_cap``."""
    kept, seen = [], set()
    for c in candidates:
        key = normalise(c["response"])
        if key in seen:  # a repeat of an earlier text, kept or over the cap
            counts[f"{set_name}.duplicate"] += 1
            continue
        seen.add(key)
        if len(kept) >= cap:
            counts[f"{set_name}.over_cap"] += 1
        else:
            kept.append(c)
    return kept


def select_problem(record: dict[str, Any], where: str, tokenizer: Any, fingerprint: str, config: BuildConfig,
                   counts: Counter, tasks: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The R-SFT, DA and PAD records of one debate record (see the module docstring); ``counts``
    gathers the candidates, the skips by reason and the per-set duplicate and cap counts."""
    task = _task(record["task"], where, tasks)
    mode = config.step_mode or default_step_mode(record["task"])
    prompt = _first_round_prompt(task, record)
    counts["problems"] += 1
    counts["committee_correct" if record["correct"] else "committee_wrong"] += 1
    if record["error"] is not None:
        counts["problems_with_error"] += 1
    rng = random.Random(f"{config.seed}/{record['id']}")  # str seeds hash with SHA-512: stable across runs
    agents = sorted({t["agent"] for turns in record["rounds"] for t in turns})
    rank = {a: i for i, a in enumerate(rng.sample(agents, len(agents)))}
    if record.get("aggregator") is not None:
        counts["candidates"] += 1
        counts["skipped.aggregator"] += 1

    usable = []
    for r, turns in enumerate(record["rounds"]):
        for turn in turns:
            counts["candidates"] += 1
            reason = _skip_reason(record, turn)
            if reason is not None:
                counts[f"skipped.{reason}"] += 1
                continue
            usable.append({
                "id": f"{record['id']}/r{r + 1}/a{turn['agent']}", "problem_id": record["id"],
                "task": record["task"], "gold": record["gold"], "answer": turn["answer"],
                "correct": turn["correct"], "source": {"round": r + 1, "agent": turn["agent"]},
                "prompt": prompt, "response": turn["text"], "steps": None,  # segmented once kept, below
                "step_scores": None, "tokenizer": fingerprint, "meta": dict(record.get("meta") or {}),
            })
    counts["usable"] += len(usable)
    usable.sort(key=lambda c: (-c["source"]["round"], rank[c["source"]["agent"]]))

    out = {name: [] for name in SETS}
    if record["correct"]:
        last = len(record["rounds"])
        consensus = task.canonical(record["final_answer"])
        holders = [c for c in usable if c["source"]["round"] == last and c["correct"]
                   and task.canonical(c["answer"]) == consensus]
        if holders:
            out["rsft"] = holders[:1]
        else:
            counts["rsft_no_candidate"] += 1
    cap = config.max_per_problem
    out["da"] = _keep_distinct((c for c in usable if c["correct"]), cap, counts, "da")
    right = _keep_distinct((c for c in usable if c["correct"]), cap, counts, "pad")
    wrong = _keep_distinct((c for c in usable if not c["correct"]), cap, counts, "pad")
    out["pad"] = sorted(right + wrong, key=lambda c: (-c["source"]["round"], rank[c["source"]["agent"]]))
    for c in {id(c): c for records in out.values() for c in records}.values():  # each kept one once
        steps = merge_tokenless_steps(tokenizer, c["response"], segment_steps(c["response"], mode))
        assert steps, "a response with an extracted answer has a non-blank step"
        c["steps"] = [list(s) for s in steps]
    # each set its own dicts (a caller may score or edit one set's records in place)
    return {name: [copy.deepcopy(c) for c in records] for name, records in out.items()}


def build_sets(debates: Iterable[tuple[str, dict[str, Any]]], tokenizer: Any, config: BuildConfig,
               progress: Any = None) -> tuple[dict[str, list[dict[str, Any]]], Counter]:
    """``(sets, counts)``: the ``rsft``/``da``/``pad`` records of ``debates`` (``(where, record)``
    pairs, from :func:`load_debates`), in input order, and the counts behind ``stats.json``.
    ``progress``: an optional tqdm bar, advanced once per debate record."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    sets: dict[str, list[dict[str, Any]]] = {name: [] for name in SETS}
    counts: Counter = Counter()
    tasks: dict[str, Any] = {}
    for where, record in debates:
        for name, records in select_problem(record, where, tokenizer, fingerprint, config, counts, tasks).items():
            sets[name].extend(records)
        if progress is not None:
            progress.update(1)
    return sets, counts
