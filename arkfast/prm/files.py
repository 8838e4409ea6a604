"""Reading and checking the PRM's files: label files (``labels.jsonl``) and the trajectory files it
scores, with one-line errors naming file, line and field."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from arkfast.generate import read_records
from arkfast.trajectories import TrajectoryFileError, read_trajectories, validate_record

__all__ = ["LABEL_FIELDS", "check_label_record", "read_label_records_for_resume", "read_labels"]

LABEL_FIELDS = ("step_labels", "label_source")


def check_label_record(record: dict[str, Any]) -> tuple[str, str] | None:
    """``None`` when ``record`` is a label record (a trajectory record with ``step_labels``, one
    number in [0, 1] per step, and a ``label_source`` string), else ``(field, message)``."""
    bad = validate_record(record)
    if bad is not None:
        return bad
    for name in LABEL_FIELDS:
        if name not in record:
            return name, "missing (is this a label file from python -m arkfast.prm label?)"
    labels = record["step_labels"]
    if not (isinstance(labels, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             and math.isfinite(v) and 0 <= v <= 1 for v in labels)):
        return "step_labels", f"expected a list of numbers in [0, 1], got {str(labels)[:80]}"
    if len(labels) != len(record["steps"]):
        return "step_labels", f"{len(labels)} labels for {len(record['steps'])} steps"
    if not isinstance(record["label_source"], str):
        return "label_source", f"expected a string, got {record['label_source']!r}"
    return None


def read_labels(path: str | Path, *, tokenizer: Any = None) -> list[dict[str, Any]]:
    """The records of a label file, checked: the trajectory schema and tokenizer
    (:func:`arkfast.trajectories.read_trajectories`), then the label fields.
    :class:`~arkfast.trajectories.TrajectoryFileError` (a ``ValueError``) names file, line and field."""
    path = Path(path)
    records = read_trajectories(path, tokenizer=tokenizer)
    lines = [i for i, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1) if line.strip()]
    for lineno, record in zip(lines, records):
        bad = check_label_record(record)
        if bad is not None:
            raise TrajectoryFileError(path, lineno, bad[0], bad[1])
    return records


def read_label_records_for_resume(path: str | Path) -> list[dict[str, Any]]:
    """The complete records of a label file being appended to (a truncated last line, an interrupted
    write, is cut off: :func:`arkfast.generate.read_records` with ``repair``), each checked."""
    path = Path(path)
    records = read_records(path, repair=True)
    for i, record in enumerate(records):
        bad = check_label_record(record)
        if bad is not None:
            raise TrajectoryFileError(path, i + 1, bad[0], bad[1])
    return records
