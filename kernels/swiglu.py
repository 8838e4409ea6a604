"""SwiGLU activation: ``silu(gate) * up`` for a fused gate/up projection output.

``gate_up [..., 2 * I]`` holds the gate in its first half and the up projection in its second (the
model concatenates ``gate_proj`` and ``up_proj`` weights at load time), and the result is ``[..., I]``,
computed in the input dtype like transformers' ``act_fn(gate_proj(x)) * up_proj(x)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import use_triton


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """Torch reference: ``silu(gate_up[..., :I]) * gate_up[..., I:]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` over the two halves of the last dim of ``gate_up [..., 2 * I]``."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even (gate and up halves), got {gate_up.shape[-1]}")
    if use_triton(gate_up):
        return _swiglu_triton(gate_up)
    return swiglu_reference(gate_up)
