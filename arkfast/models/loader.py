"""Hugging Face checkpoints in and out: ``*.safetensors`` ↔ :class:`DecoderModel`, and the tokenizer;
GGUF checkpoints (llama.cpp) in, through transformers' GGUF loader (:mod:`arkfast.models.gguf`).

The arkfast layout differs from transformers' in two fused projections, concatenated along the output
dim at load time and split again at save time::

    layers.{i}.attn.qkv_proj      = cat(self_attn.q_proj, self_attn.k_proj, self_attn.v_proj)
    layers.{i}.mlp.gate_up_proj   = cat(mlp.gate_proj, mlp.up_proj)

(weights and, where present, biases); every other tensor is a rename (:data:`RENAMED`).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig, parse_dtype
from .decoder import DecoderModel
from .gguf import gguf_file, gguf_tensors, gguf_tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

FUSED = {
    "attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
RENAMED = {
    "input_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "attn.o_proj": "self_attn.o_proj",
    "attn.q_norm": "self_attn.q_norm",
    "attn.k_norm": "self_attn.k_norm",
    "mlp.down_proj": "mlp.down_proj",
}
TOP_LEVEL = {"embed_tokens": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head": "lm_head.weight"}


def hf_names(name: str) -> list[str]:
    """The transformers tensor names that make up arkfast parameter ``name``, in concatenation order.

    >>> hf_names("layers.3.mlp.gate_up_proj.weight")
    ['model.layers.3.mlp.gate_proj.weight', 'model.layers.3.mlp.up_proj.weight']
    """
    if name in TOP_LEVEL:
        return [TOP_LEVEL[name]]
    _, i, rest = name.split(".", 2)  # "layers", index, "<module>.<weight|bias>"
    module, kind = rest.rsplit(".", 1)
    parts = FUSED.get(module) or (RENAMED[module],)
    return [f"model.layers.{i}.{part}.{kind}" for part in parts]


def _split_sizes(name: str, cfg: ModelConfig) -> list[int]:
    """Output-dim sizes of the pieces of a fused parameter."""
    if ".attn.qkv_proj." in name:
        return [cfg.q_size, cfg.kv_size, cfg.kv_size]
    return [cfg.intermediate_size, cfg.intermediate_size]


def _ignorable(hf_name: str, cfg: ModelConfig) -> bool:
    """Checkpoint tensors we may skip: rotary buffers older exports saved, and a tied lm_head."""
    tied_head = cfg.tie_word_embeddings and hf_name == "lm_head.weight"
    return tied_head or hf_name.endswith("rotary_emb.inv_freq")


def _weight_map(path: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file holding it, for a single-file or sharded checkpoint."""
    if (path / INDEX_FILE).is_file():
        index = json.loads((path / INDEX_FILE).read_text())
        return {name: path / file for name, file in index["weight_map"].items()}
    if (path / SINGLE_FILE).is_file():
        with safe_open(path / SINGLE_FILE, framework="pt") as f:
            return {name: path / SINGLE_FILE for name in f.keys()}
    raise ValueError(f"no {SINGLE_FILE}, {INDEX_FILE} or .gguf file in {path}")


def load_model(path: str | Path, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None) -> DecoderModel:
    """Load a Llama / Qwen2 / Qwen3 / Mistral checkpoint into a :class:`DecoderModel`.

    ``path``: a checkpoint directory (``config.json`` and ``model.safetensors`` or the shards listed in
    ``model.safetensors.index.json``), or a GGUF checkpoint (a ``.gguf`` file or a folder holding one,
    dequantised through transformers' GGUF loader). ``dtype`` (float32, bfloat16 or float16, or their
    names) defaults to float32; ``device`` to CPU. A missing or unexpected tensor, or one of the wrong
    shape, raises ``ValueError`` naming it. The model is returned in train mode with gradients enabled,
    like any ``nn.Module``; wrap inference in ``torch.no_grad()``.
    """
    path = Path(path)
    cfg = ModelConfig.from_pretrained(path)
    dtype = parse_dtype(dtype) or torch.float32
    with torch.device(device or "cpu"):
        model = DecoderModel(cfg, dtype)

    with contextlib.ExitStack() as stack, torch.no_grad():
        gguf = gguf_file(path)
        if gguf is not None:
            tensors = gguf_tensors(gguf)
            available, read = tensors.keys(), tensors.__getitem__
        else:
            files = _weight_map(path)
            handles = {f: stack.enter_context(safe_open(f, framework="pt")) for f in set(files.values())}
            available, read = files.keys(), lambda name: handles[files[name]].get_tensor(name)
        params = dict(model.named_parameters())
        wanted = {name: hf_names(name) for name in params}
        expected = {n for names in wanted.values() for n in names}
        missing = sorted(expected - set(available))
        if missing:
            raise ValueError(f"checkpoint {path} is missing tensors: {', '.join(missing)}")
        unexpected = sorted(n for n in available if n not in expected and not _ignorable(n, cfg))
        if unexpected:
            raise ValueError(f"checkpoint {path} has unexpected tensors: {', '.join(unexpected)}")
        for name, param in params.items():
            parts = [read(n) for n in wanted[name]]
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
            if tensor.shape != param.shape:
                shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in zip(wanted[name], parts))
                raise ValueError(f"checkpoint shape mismatch for {name} {tuple(param.shape)}: {shapes}")
            param.copy_(tensor)  # casts to the model dtype and moves to its device
    return model


def save_model(model: DecoderModel, path: str | Path) -> Path:
    """Write ``model`` as a transformers-loadable checkpoint: ``config.json`` (the loaded config with
    ``dtype`` set to the parameters' dtype) and one ``model.safetensors``. Returns ``path``.
    Tokenizer files are not written here (use the tokenizer's own ``save_pretrained``)."""
    cfg = model.config
    if not cfg.raw:
        raise ValueError("save_model needs a ModelConfig read from a config.json (config.raw is empty)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        names = hf_names(name)
        pieces = [param] if len(names) == 1 else param.split(_split_sizes(name, cfg), dim=0)
        for hf_name, piece in zip(names, pieces):
            tensors[hf_name] = piece.detach().to("cpu").contiguous()
    save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})
    (path / INDEX_FILE).unlink(missing_ok=True)  # a stale shard index would shadow the new file
    raw = {k: v for k, v in cfg.raw.items() if k != "torch_dtype"}
    raw["dtype"] = str(model.embed_tokens.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return path


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (with its chat template) via ``transformers.AutoTokenizer``; for a GGUF
    checkpoint, the one transformers builds from the file's vocabulary."""
    gguf = gguf_file(path)
    if gguf is not None:
        return gguf_tokenizer(gguf)
    from transformers import AutoTokenizer  # imported here: transformers is slow to import

    return AutoTokenizer.from_pretrained(str(path))
