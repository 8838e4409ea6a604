"""The trajectory record (``rsft.jsonl``, ``da.jsonl``, ``pad.jsonl``): fields, reading, writing.

One JSON object per line::

    id           str    unique in the file, "<problem_id>/r<round>/a<agent>" ("arith-train-3/r2/a1")
    problem_id   str    the debate record's id
    task         str    the task name ("arith", "gsm8k", ...)
    gold         str    the gold answer
    answer       str|null  the answer extracted from the response
    correct      bool   whether that answer is the gold one
    source       {"round": int >= 1, "agent": int >= 0}   where in the debate the response was written
    prompt       [{"role": "user", "content": str}]   the single-agent round-1 prompt (chat messages),
                        whatever round the response came from: the student learns to answer alone
    response     str    the agent's completion
    steps        [[start, end), ...]   sorted, disjoint, non-empty character spans into response
    step_scores  [float in [0, 1], one per step] or null until scored (``python -m arkfast.prm score``)
    tokenizer    str    :func:`tokenizer_fingerprint` of the tokenizer the steps were checked against
    meta         dict   optional: task extras (the arith reference solution, ...)
    score_min, score_prod  float in [0, 1], optional: trajectory scores written with step_scores
    draft, transition  optional, together: a self-correction record (correct.jsonl,
                        :mod:`arkfast.trajectories.correction`): the round-r turn it revises and
                        "corrects" | "continues"

A stage that tokenizes the records passes its tokenizer to :func:`read_trajectories`, which refuses a
file made for another one (token spans and prompt ids would silently differ).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .steps import check_spans

__all__ = ["REQUIRED_FIELDS", "TrajectoryFileError", "chat_prompt_ids", "read_trajectories",
           "tokenizer_fingerprint", "validate_record", "write_trajectories"]

REQUIRED_FIELDS = ("id", "problem_id", "task", "gold", "answer", "correct", "source", "prompt", "response",
                   "steps", "step_scores", "tokenizer")


class TrajectoryFileError(ValueError):
    """A bad trajectory file: the message names the file, the line (1-based) and the field."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field = str(path), line, field
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {'field ' + repr(field) + ': ' if field else ''}{message}")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """``"sha256:<hex>"`` of the tokenizer's content: its serialized fast-tokenizer JSON (vocabulary,
    merges, normalizer, pre-tokenizer, added tokens; with the truncation and padding settings, which
    are call-time state, removed) and its chat template. Equal for every load of the same files;
    a tokenizer without a fast backend is hashed from its sorted vocabulary instead."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        content = json.loads(backend.to_str())
        content.pop("truncation", None)
        content.pop("padding", None)
    else:
        content = {"vocab": sorted(tokenizer.get_vocab().items())}
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):  # None, or a dict of named templates
        template = json.dumps(template, sort_keys=True)
    blob = json.dumps({"tokenizer": content, "chat_template": template}, sort_keys=True, ensure_ascii=False)
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """``messages`` rendered with the tokenizer's chat template and the generation prompt, then encoded
    without special tokens: the ids the engine was given in round 1
    (:meth:`arkfast.debate.PromptBuilder.first_round`)."""
    from arkfast.debate.prompts import render_chat

    return list(tokenizer.encode(render_chat(tokenizer, messages), add_special_tokens=False))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_prob(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0


def validate_record(record: Any, *, require_step_scores: bool = False) -> tuple[str, str] | None:
    """``None`` when ``record`` follows the schema, else ``(field, message)`` for the first problem."""
    if not isinstance(record, dict):
        return "", f"expected a JSON object, got {type(record).__name__}"
    for name in REQUIRED_FIELDS:
        if name not in record:
            return name, "missing"
    for name in ("id", "problem_id", "task", "gold", "response", "tokenizer"):
        if not isinstance(record[name], str):
            return name, f"expected a string, got {record[name]!r}"
    if not record["id"] or not record["problem_id"]:
        return ("id" if not record["id"] else "problem_id"), "expected a non-empty string"
    if record["answer"] is not None and not isinstance(record["answer"], str):
        return "answer", f"expected a string or null, got {record['answer']!r}"
    if not isinstance(record["correct"], bool):
        return "correct", f"expected true or false, got {record['correct']!r}"
    src = record["source"]
    if not (isinstance(src, dict) and _is_int(src.get("round")) and src["round"] >= 1
            and _is_int(src.get("agent")) and src["agent"] >= 0):
        return "source", f"expected {{\"round\": int >= 1, \"agent\": int >= 0}}, got {src!r}"
    prompt = record["prompt"]
    if not (isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt)):
        return "prompt", "expected a non-empty list of {\"role\": str, \"content\": str} messages"
    steps = record["steps"]
    if not (isinstance(steps, list) and all(
            isinstance(s, (list, tuple)) and len(s) == 2 and _is_int(s[0]) and _is_int(s[1]) for s in steps)):
        return "steps", f"expected a list of [start, end] integer pairs, got {str(steps)[:80]}"
    try:
        check_spans([tuple(s) for s in steps], len(record["response"]))
    except ValueError as e:
        return "steps", str(e)
    scores = record["step_scores"]
    if scores is None:
        if require_step_scores:
            return "step_scores", "null: this file has not been scored yet (python -m arkfast.prm score)"
    elif not (isinstance(scores, list) and all(_is_prob(v) for v in scores)):
        return "step_scores", f"expected null or a list of numbers in [0, 1], got {str(scores)[:80]}"
    elif len(scores) != len(steps):
        return "step_scores", f"{len(scores)} scores for {len(steps)} steps"
    if "meta" in record and not isinstance(record["meta"], dict):
        return "meta", f"expected an object, got {record['meta']!r}"
    if "transition" in record or "draft" in record:  # a self-correction record (correct.jsonl)
        if record.get("transition") not in ("corrects", "continues"):
            return "transition", f"expected 'corrects' or 'continues', got {record.get('transition')!r}"
        draft = record.get("draft")
        if not (isinstance(draft, dict) and isinstance(draft.get("response"), str)
                and (draft.get("answer") is None or isinstance(draft.get("answer"), str))
                and isinstance(draft.get("correct"), bool) and _is_int(draft.get("round")) and draft["round"] >= 1):
            return "draft", ("expected {\"response\": str, \"answer\": str or null, \"correct\": bool, "
                             f"\"round\": int >= 1}}, got {str(draft)[:80]}")
    for name in ("score_min", "score_prod"):
        if name in record and record[name] is not None and not _is_prob(record[name]):
            return name, f"expected a number in [0, 1], got {record[name]!r}"
    return None


def read_trajectories(path: str | Path, *, tokenizer: Any = None,
                      require_step_scores: bool = False) -> list[dict[str, Any]]:
    """The records of a trajectory file, each checked against the schema.

    ``tokenizer``: a tokenizer (or its :func:`tokenizer_fingerprint`) the records must have been made
    for. Raises :class:`TrajectoryFileError` naming file, line and field for a missing or empty file,
    malformed JSON, a missing or ill-typed field, spans out of range, a duplicate ``id``, a record made
    for another tokenizer, or null ``step_scores`` when ``require_step_scores``. Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise TrajectoryFileError(path, None, None, "no such file")
    expected = None
    if tokenizer is not None:
        expected = tokenizer if isinstance(tokenizer, str) else tokenizer_fingerprint(tokenizer)
    records, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrajectoryFileError(path, lineno, None, f"malformed JSON ({e.msg} at column {e.colno})") from None
            bad = validate_record(record, require_step_scores=require_step_scores)
            if bad is not None:
                raise TrajectoryFileError(path, lineno, bad[0] or None, bad[1])
            if record["id"] in seen:
                raise TrajectoryFileError(path, lineno, "id", f"{record['id']!r} repeats line {seen[record['id']]}")
            seen[record["id"]] = lineno
            if expected is not None and record["tokenizer"] != expected:
                raise TrajectoryFileError(path, lineno, "tokenizer",
                                          f"made for tokenizer {record['tokenizer']}, not this one ({expected}); "
                                          f"rebuild it with python -m arkfast.trajectories --tokenizer DIR")
            records.append(record)
    if not records:
        raise TrajectoryFileError(path, None, None, "empty file (no trajectory records)")
    return records


def write_trajectories(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write ``records`` to ``path`` as JSON lines, atomically: a temp file in the same folder, fsync'd,
    then renamed over ``path`` (a reader sees the old file or the whole new one, never a part).
    Each record is checked against the schema first (``ValueError`` naming its index and field)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for i, record in enumerate(records):
                bad = validate_record(record)
                if bad is not None:
                    raise ValueError(f"record {i} for {path}: field {bad[0]!r}: {bad[1]}")
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
