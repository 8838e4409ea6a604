"""RMSNorm, optionally with the residual add fused in front of it.

    h   = x + residual                      (when a residual is given; in the input dtype, as HF does)
    out = weight * (h / sqrt(mean(h**2) + eps))   (statistics in fp32, cast to the input dtype before
                                                   the weight multiply, like transformers' LlamaRMSNorm)
"""
from __future__ import annotations

import torch

from ._dispatch import use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                       residual: torch.Tensor | None = None):
    """Torch reference. ``x [..., H]``, ``weight [H]``, optional ``residual`` shaped like ``x``.

    Returns ``out`` or, with a residual, ``(out, h)`` where ``h = x + residual`` is the new residual.
    """
    h = x if residual is None else x + residual
    h32 = h.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(x.dtype)
    return out if residual is None else (out, h)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             residual: torch.Tensor | None = None):
    """RMSNorm over the last dim (see the module docstring); dispatches per the package rule."""
    if use_triton(x, weight):
        return _rms_norm_triton(x, weight, eps, residual)
    return rms_norm_reference(x, weight, eps, residual)
