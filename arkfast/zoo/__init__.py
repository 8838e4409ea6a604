"""The embedded default model: a tiny Llama trained from scratch on the built-in ``arith`` task.

``python -m arkfast.generate`` uses it when no ``--model`` is given; :func:`tiny_model_path` is its
folder (a Hugging Face checkpoint: config.json, model.safetensors, tokenizer files). How it was trained
and how it scores: docs/tiny_model.md; how to rebuild it: ``python -m arkfast.zoo.train_tiny``.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["tiny_model_path"]


def tiny_model_path() -> Path:
    """The folder of the shipped tiny checkpoint, ``arkfast/zoo/tiny`` inside the installed package."""
    return Path(__file__).resolve().parent / "tiny"
