"""Models trained from scratch: a fresh :class:`DecoderModel` from a Hugging Face config dict, with a
seeded initialisation.

Initialisation (GPT-2 / Llama practice): every matrix ~ N(0, std²), the two projections that write
into the residual stream (``o_proj``, ``down_proj``) ~ N(0, std² / (2 L)) so the residual's variance
stays O(1) over L layers, norm weights 1, biases 0.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from arkfast.models import DecoderModel, ModelConfig

_RESIDUAL_OUT = ("attn.o_proj.weight", "mlp.down_proj.weight")


def init_weights_(model: DecoderModel, seed: int, std: float = 0.02) -> DecoderModel:
    """Redraw every parameter of ``model`` in place from ``seed`` (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    residual_std = std / math.sqrt(2 * model.config.num_layers)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                s = residual_std if name.endswith(_RESIDUAL_OUT) else std
                p.copy_(torch.randn(p.shape, generator=gen) * s)
    return model


def new_model(hf_config: dict[str, Any], seed: int, std: float = 0.02,
              dtype: torch.dtype = torch.float32) -> DecoderModel:
    """A randomly initialised model of the architecture ``hf_config`` describes (a transformers
    ``config.json`` dict, e.g. ``LlamaConfig(...).to_dict()`` with ``architectures`` set)."""
    model = DecoderModel(ModelConfig.from_dict(hf_config), dtype)
    return init_weights_(model, seed, std)
