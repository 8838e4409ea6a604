"""Resumable checkpoints and the run's logs: ``checkpoints/step-NNNNNN/``, ``metrics.jsonl``, TensorBoard.

A checkpoint folder is a Hugging Face checkpoint (``config.json``, ``model.safetensors``, the base
model's tokenizer files) plus ``trainer_state.pt`` (the optimiser's moments and step counts, the fp32
master weights under bf16, the RNG states) and ``trainer_state.json`` (the step, the settings that
shape the loss curve, the data's fingerprint). It is written whole into a temporary folder, fsync'd,
and renamed into place (:func:`arkfast.train.save_checkpoint`); older folders are deleted only after
the new one is in place. A process killed at any moment therefore leaves every earlier complete
checkpoint as it was, and only complete folders carry the ``step-`` name.

The data position needs no saving: the rows of step ``s`` are a function of the seed and ``s``
(:class:`arkfast.distill.data.RowOrder`).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from arkfast.train import save_checkpoint

__all__ = ["RunLog", "checkpoint_dir", "latest_checkpoint", "load_state", "load_weights", "save_state"]

STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint under ``output/checkpoints``, by step."""
    root = output / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and (path / STATE_JSON).is_file() and (path / STATE_PT).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(output: Path) -> Path | None:
    found = list_checkpoints(output)
    return found[-1][1] if found else None


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_state(output: Path, step: int, model, optimizer, *, meta: dict[str, Any],
               extra_files: dict[str, str], keep: int) -> Path:
    """Write the checkpoint of ``step`` (see the module docstring) and keep only the ``keep`` newest."""
    def write_extra(folder: Path) -> None:
        torch.save({"optimizer": optimizer.state_dict(), "rng": _rng_state(), "step": step}, folder / STATE_PT)
        (folder / STATE_JSON).write_text(json.dumps({**meta, "step": step}, indent=2) + "\n")

    root = output / "checkpoints"
    if root.is_dir():  # a save killed midway left its temporary folder: never a checkpoint, remove it
        for stale in root.glob(".step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    path = save_checkpoint(model, checkpoint_dir(output, step), extra_files=extra_files, write_extra=write_extra)
    for _, old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_weights(path: Path, model) -> None:
    """Copy the weights of checkpoint folder ``path`` into ``model`` (a plain, unsharded one)."""
    from safetensors import safe_open

    from arkfast.models.loader import hf_names

    with safe_open(str(path / "model.safetensors"), framework="pt") as f, torch.no_grad():
        for name, param in model.named_parameters():
            parts = [f.get_tensor(n) for n in hf_names(name)]
            param.copy_(parts[0] if len(parts) == 1 else torch.cat(parts))


def load_state(path: Path, model, optimizer) -> dict[str, Any]:
    """Restore ``model`` (weights; ``None``: already done with :func:`load_weights`, as before FSDP
    shards it), ``optimizer`` and the RNG states from checkpoint folder ``path``; returns its
    ``trainer_state.json``."""
    meta = json.loads((path / STATE_JSON).read_text())
    state = torch.load(path / STATE_PT, weights_only=False)
    if model is not None:
        load_weights(path, model)
    optimizer.load_state_dict(state["optimizer"])  # under bf16 also sets the weights from the fp32 masters
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return meta


class RunLog:
    """``metrics.jsonl`` (one line per optimiser step, appended, flushed and fsync'd), ``eval.jsonl``
    (one line per evaluation) and TensorBoard scalars under ``tensorboard/`` when tensorboard is
    importable and ``tensorboard`` is on. With ``write=False`` (ranks other than 0) it writes nothing."""

    def __init__(self, output: Path, *, tensorboard: bool, resume_step: int | None, write: bool = True):
        self.output, self.write = output, write
        self.metrics_path, self.eval_path = output / "metrics.jsonl", output / "eval.jsonl"
        for path in (self.metrics_path, self.eval_path) if write else ():
            if resume_step is None:
                path.unlink(missing_ok=True)
            else:  # drop the lines past the checkpoint: the resumed run writes them again
                _truncate_jsonl(path, resume_step)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=resume_step)

    @staticmethod
    def _append(path: Path, record: dict[str, Any]) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def step(self, record: dict[str, Any]) -> None:
        if not self.write:
            return
        self._append(self.metrics_path, record)
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_second"):
                self.writer.add_scalar(f"train/{key}", record[key], record["step"])

    def eval(self, record: dict[str, Any]) -> None:
        if not self.write:
            return
        self._append(self.eval_path, record)
        if self.writer is not None:
            self.writer.add_scalar("eval/accuracy", record["accuracy"], record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a log file (a torn last line, from a kill mid-write, is left out)."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data[:data.rfind(b"\n") + 1].split(b"\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def _truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of ``path`` with ``step <= step``, rewritten atomically."""
    if not path.is_file():
        return
    kept = [r for r in read_jsonl(path) if r["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
