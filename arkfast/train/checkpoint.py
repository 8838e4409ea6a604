"""Atomic Hugging Face checkpoints: a reader never sees a half-written model directory.

The checkpoint is written into a fresh temporary directory beside the target, then swapped in with
``os.replace`` (atomic on POSIX for a rename into an absent name). An existing target is first renamed
aside and removed only after the new one is in place, so a crash leaves either the old checkpoint, the
new one, or both (the old one under a ``.old-*`` name) — never a mix.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from arkfast.models import DecoderModel, save_model


def save_checkpoint(model: DecoderModel, path: str | Path, *, tokenizer=None,
                    extra_files: dict[str, str] | None = None,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` (config.json + model.safetensors via :func:`arkfast.models.save_model`), the
    ``tokenizer`` (``save_pretrained``: tokenizer.json, tokenizer_config.json) and ``extra_files``
    (file name → text, e.g. ``generation_config.json``) to ``path``, atomically. ``write_extra(dir)``
    may add more files (an optimiser state) to the folder before it is swapped in. Every file is
    fsync'd before the swap, so the swap never publishes a folder whose data a power cut could lose.
    Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_model(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, text in (extra_files or {}).items():
            if os.sep in name or name.startswith("."):
                raise ValueError(f"extra file name {name!r} must be a plain file name")
            (tmp / name).write_text(text)
        if write_extra is not None:
            write_extra(tmp)
        for file in tmp.iterdir():
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
