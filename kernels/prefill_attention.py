"""Prefill attention: varlen causal attention over packed sequences (kernel and torch reference).

Sequences are concatenated along the token dim; ``cu_seqlens [B + 1]`` (int32, starting at 0) marks
where each begins. No token attends across sequences. GQA: query head h reads KV head
``h // (Hq // Hkv)``. Scores and softmax in fp32; probabilities cast to the input dtype before the
multiply with V, as transformers' eager attention does.
"""
from __future__ import annotations

import torch

from ._dispatch import use_triton


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens: torch.Tensor, scale: float | None = None,
                               causal: bool = True) -> torch.Tensor:
    """``q [T, Hq, D]``, ``k/v [T, Hkv, D]``, ``cu_seqlens [B + 1]`` → ``out [T, Hq, D]``."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    scale = D ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()  # host loop over sequences: this is the reference, not a hot path
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1)  # [Hq, L, D]
        ks = k[start:end].transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)
        vs = v[start:end].transpose(0, 1).repeat_interleave(Hq // Hkv, dim=0)
        scores = (qs.float() @ ks.float().transpose(1, 2)) * scale  # [Hq, L, L]
        if causal:
            L = end - start
            mask = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
            scores.masked_fill_(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out[start:end] = (probs @ vs).transpose(0, 1)
    return out


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int | None = None, scale: float | None = None,
                     causal: bool = True) -> torch.Tensor:
    """Varlen (causal) attention over packed sequences; ``q [T, Hq, D]``, ``k/v [T, Hkv, D]``,
    ``cu_seqlens [B + 1]`` int32 → ``[T, Hq, D]``. ``max_seqlen`` (the longest sequence) lets the
    kernel size its grid without reading ``cu_seqlens`` on the host."""
    if use_triton(q, k, v):
        return _varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale, causal)
    return varlen_attention_reference(q, k, v, cu_seqlens, scale, causal)
