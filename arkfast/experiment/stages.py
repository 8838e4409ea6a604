"""Finished-stage markers and the stage log of an experiment folder.

Each stage that finishes writes ``stages/<name>.json`` (atomically): its result dict, its wall time
and when it finished. A rerun finds the marker and reuses the result without running the stage again;
a stage killed half-way has no marker and is run again, and the commands it runs (``generate
--resume``, ``distill --resume``, ``prm label --resume``) continue where they stopped. Every run or
reuse is appended to ``stages.jsonl``, so one can see afterwards what a rerun did.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from arkfast.generate import write_json_atomic

__all__ = ["StageLog"]


class StageLog:
    """The markers under ``<root>/stages/`` and the log ``<root>/stages.jsonl``."""

    def __init__(self, root: Path, log: Callable[[str], None] = print):
        self.root = Path(root)
        self.dir = self.root / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = log

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def finished(self, name: str) -> dict[str, Any] | None:
        """The marker of stage ``name`` (``{"stage", "result", "seconds", "finished_at"}``), or None."""
        path = self.path(name)
        return json.loads(path.read_text()) if path.is_file() else None

    def event(self, name: str, event: str, **fields: Any) -> None:
        line = {"stage": name, "event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
        with open(self.root / "stages.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def mark(self, name: str, result: dict[str, Any], seconds: float) -> dict[str, Any]:
        """Write stage ``name``'s marker and log its run; returns the marker."""
        marker = {"stage": name, "result": result, "seconds": round(seconds, 2),
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json_atomic(self.path(name), marker)
        self.event(name, "ran", seconds=marker["seconds"])
        return marker

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Stage ``name``'s marker: reused when finished, else made by running ``fn()`` (its result)."""
        marker = self.finished(name)
        if marker is not None:
            self.event(name, "reused")
            self.log(f"[{name}] finished earlier ({marker['seconds']:.0f}s); reused")
            return marker
        self.log(f"[{name}] running")
        t0 = time.perf_counter()
        result = fn()
        marker = self.mark(name, result, time.perf_counter() - t0)
        self.log(f"[{name}] done in {marker['seconds']:.0f}s")
        return marker
