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
from pathlib import Path

from arkfast.models import DecoderModel, save_model


def save_checkpoint(model: DecoderModel, path: str | Path, *, tokenizer=None,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write ``model`` (config.json + model.safetensors via :func:`arkfast.models.save_model`), the
    ``tokenizer`` (``save_pretrained``: tokenizer.json, tokenizer_config.json) and ``extra_files``
    (file name → text, e.g. ``generation_config.json``) to ``path``, atomically. Returns ``path``."""
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
