"""Where the pipeline's stages find each other's outputs when run with no arguments.

Every CLI of the distillation half works with no arguments on the embedded default (the tiny model,
debates on the built-in ``arith`` task's train split). Run one after another in the same working
directory, they read and write these default paths under ``runs/``::

    runs/arith-train/debates/debates.jsonl        python -m arkfast.generate --split train (made on demand)
    runs/arith-train/trajectories/{rsft,da,pad}.jsonl, stats.json     python -m arkfast.trajectories
    runs/arith-train/prm/labels.jsonl             python -m arkfast.prm label
    runs/arith-train/prm/model/                   python -m arkfast.prm train
    runs/arith-train/prm/scored/pad.jsonl         python -m arkfast.prm score
    runs/arith-train/prm/eval.json                python -m arkfast.prm eval
    runs/arith-train/distill/<mode>/              python -m arkfast.distill --mode <mode>

A stage that needs an earlier stage's output and finds none makes it first (:func:`ensure_debates`),
so ``python -m arkfast.distill`` alone runs the whole chain; a finished earlier output is reused.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_RUN", "default_debates", "ensure_debates", "stage_dir"]

DEFAULT_RUN = "arith-train"


def _run(root: str | Path | None) -> Path:
    """``<root>/runs/arith-train`` (``root``: the working directory by default)."""
    return (Path.cwd() if root is None else Path(root)) / "runs" / DEFAULT_RUN


def default_debates(root: str | Path | None = None) -> Path:
    """The default debates file, ``runs/arith-train/debates/debates.jsonl``."""
    return _run(root) / "debates" / "debates.jsonl"


def stage_dir(stage: str, root: str | Path | None = None) -> Path:
    """The default folder of a stage: ``runs/arith-train/<stage>`` (``trajectories``, ``prm``,
    ``distill``, ...)."""
    return _run(root) / stage


def ensure_debates(root: str | Path | None = None, *, limit: int | None = None) -> Path:
    """The default debates file, generated first when it is missing or unfinished: 5 agents x 2 rounds
    of the embedded tiny model on the ``arith`` train split (``python -m arkfast.generate --split train
    --output runs/arith-train/debates --resume``, so an interrupted generation continues). ``limit``:
    only the first N train problems (tests)."""
    import json

    path = default_debates(root)
    summary = path.parent / "summary.json"
    if path.is_file() and summary.is_file() and json.loads(summary.read_text()).get("finished"):
        return path
    from arkfast import generate

    argv = ["--split", "train", "--output", str(path.parent), "--resume"]
    if limit is not None:
        argv += ["--limit", str(limit)]
    print(f"no finished debates at {path}: generating them first (python -m arkfast.generate {' '.join(argv)})")
    generate.main(argv)
    return path
