"""Rotary position embedding, rotate-half convention (Llama / Qwen / Mistral in transformers).

For a head vector x of even size D, with i < D/2 and angle a_i = position * inv_freq[i]:
    out[i]       = x[i]       * cos(a_i) * s - x[i + D/2] * sin(a_i) * s
    out[i + D/2] = x[i + D/2] * cos(a_i) * s + x[i]       * sin(a_i) * s
where s is the scaling's attention factor (1.0 for default and llama3 scaling). Angles are computed in
fp32; cos/sin are cast to the input dtype before the multiply, as transformers does.
"""
from __future__ import annotations

import math

import torch

from ._dispatch import use_triton


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """The fp32 inverse frequencies ``[head_dim // 2]`` and the attention factor for a rope config.

    ``scaling`` is the config's ``rope_scaling`` / ``rope_parameters`` dict; supported types are
    ``default`` (or None) and ``llama3``. Anything else raises ``ValueError``.
    """
    if head_dim % 2:
        raise ValueError(f"rotary head_dim must be even, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) or "default"
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: default, llama3")
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by the factor, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                         inv_freq: torch.Tensor, attention_scaling: float = 1.0):
    """Torch reference. ``q [T, Hq, D]``, ``k [T, Hkv, D]``, ``positions [T]`` (int), ``inv_freq [D/2]``
    fp32. Returns new ``(q, k)`` in the input dtypes."""
    freqs = positions.float()[:, None] * inv_freq.float().to(positions.device)[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    cos = (emb.cos() * attention_scaling)[:, None, :]
    sin = (emb.sin() * attention_scaling)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)

    return rotate(q), rotate(k)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
               attention_scaling: float = 1.0):
    """Apply rotary embeddings to ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` at ``positions [T]``."""
    if use_triton(q, k):
        return _apply_rope_triton(q, k, positions, inv_freq, attention_scaling)
    return apply_rope_reference(q, k, positions, inv_freq, attention_scaling)
