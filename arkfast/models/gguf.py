"""GGUF checkpoints (llama.cpp's single-file format), read through transformers' GGUF loader.

A ``.gguf`` file, or a folder holding exactly one (and no safetensors), stands for a checkpoint: its
metadata becomes the Hugging Face config dict, its tensors are dequantised to float32 under their
transformers names (q/k rows back in rotate-half order), and its vocabulary becomes the tokenizer.
llama.cpp users keep their files as they are; nothing is converted on disk. Needs the ``gguf``
package (``pip install "arkfast[gguf]"``).

    file = gguf_file("models/qwen2.5-0.5b-instruct-q8_0.gguf")
    config = gguf_config_dict(file)            # what config.json would hold
    tensors = gguf_tensors(file)               # {"model.layers.0.self_attn.q_proj.weight": ..., ...}
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SUFFIX = ".gguf"


def gguf_file(path: str | Path) -> Path | None:
    """The GGUF file ``path`` names: itself, or the one ``.gguf`` in a folder without safetensors; None
    for anything else. A folder with several ``.gguf`` files and no safetensors raises ``ValueError``
    naming them (pass the one to load)."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == SUFFIX else None
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    found = sorted(path.glob(f"*{SUFFIX}"))
    if len(found) > 1:
        raise ValueError(f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); "
                         f"pass the path of the one to load")
    return found[0] if found else None


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError('loading a .gguf checkpoint needs the gguf package: pip install "arkfast[gguf]" '
                          "(or pip install gguf)")


def gguf_config_dict(file: Path) -> dict:
    """The transformers config of a GGUF file as a ``config.json``-style dict (``model_type`` set,
    ``architectures`` usually absent)."""
    _require_gguf()
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name).to_dict()


def gguf_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file, dequantised to float32, under its transformers name."""
    _require_gguf()
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    with torch.device("meta"):  # only the module tree: the loader maps GGUF names onto its parameters
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=skeleton)["tensors"]
    return {name: torch.as_tensor(value) for name, value in tensors.items()}


def gguf_tokenizer(file: Path):
    """The tokenizer transformers builds from a GGUF file's vocabulary."""
    _require_gguf()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
