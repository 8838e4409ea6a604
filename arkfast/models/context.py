"""The attention seam between the decoder and whatever runs attention for one forward pass.

The decoder never sees batch layout, KV caches or kernels. Each attention layer hands its new tokens'
q/k/v to a *context* object and gets the attention output back. A context implements
:class:`AttentionContext`:

``ctx.attention(layer_idx, q, k, v) -> out``
    ``q [T, Hq, D]`` and ``k/v [T, Hkv, D]`` are the step's T new tokens, after the q/k norm (Qwen3)
    and RoPE, in the model dtype; ``out [T, Hq, D]`` in ``q``'s dtype. The softmax scale is
    ``D ** -0.5`` for every supported architecture. Query head ``h`` reads KV head ``h // (Hq // Hkv)``.
    ``layer_idx`` lets a cache-backed context pick the layer's cache.

``ctx.max_seqlen``
    A host ``int``: an upper bound on any sequence's total key count in this step (cached prefix plus
    new tokens). The model compares it against a sliding window; kernels may size grids with it.

:class:`VarlenContext` is the packed-prefill / training context: the T tokens are whole sequences laid
end to end and attention is causal within each. A decode context (paged KV cache) follows the same
protocol: its ``attention`` writes ``k``/``v`` into the layer's cache slots for the new tokens, then
runs the (cascade) decode kernel over each sequence's cached keys; its per-step metadata (block tables,
slot mapping, lengths) is built once per step and reused by every layer.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from arkfast.kernels.prefill_attention import varlen_attention


@runtime_checkable
class AttentionContext(Protocol):
    """What the decoder needs from an attention context (see the module docstring)."""

    max_seqlen: int

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> torch.Tensor: ...


@dataclasses.dataclass
class VarlenContext:
    """Causal attention within each of B packed sequences.

    ``cu_seqlens [B + 1]`` int32 on the tokens' device: sequence ``b`` is tokens
    ``cu_seqlens[b]:cu_seqlens[b + 1]``, starting at 0 and ending at T. ``max_seqlen`` (host int) is the
    longest sequence. Build both, and the restarting positions, with :meth:`from_lengths`.
    """

    cu_seqlens: torch.Tensor  # [B + 1] int32
    max_seqlen: int

    def __post_init__(self) -> None:
        if self.cu_seqlens.dtype != torch.int32:
            raise TypeError(f"cu_seqlens must be int32, got {self.cu_seqlens.dtype}")
        if self.cu_seqlens.dim() != 1 or self.cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape "
                             f"{tuple(self.cu_seqlens.shape)}")
        if not isinstance(self.max_seqlen, int) or self.max_seqlen < 0:
            raise ValueError(f"max_seqlen must be a non-negative int, got {self.max_seqlen!r}")

    @classmethod
    def from_lengths(cls, lengths: Sequence[int],
                     device: torch.device | str | None = None) -> tuple[VarlenContext, torch.Tensor]:
        """The context and the int64 ``positions [T]`` (0, 1, ... restarting at each sequence) for
        sequences of the given lengths packed in that order.

        >>> ctx, positions = VarlenContext.from_lengths([1, 3])
        >>> ctx.cu_seqlens.tolist(), positions.tolist()
        ([0, 1, 4], [0, 0, 1, 2])
        """
        lengths = [int(n) for n in lengths]
        if not lengths:
            raise ValueError("lengths is empty; need at least one sequence")
        bad = [(i, n) for i, n in enumerate(lengths) if n < 0]
        if bad:
            raise ValueError(f"sequence lengths must be >= 0; lengths[{bad[0][0]}] = {bad[0][1]}")
        lens = torch.tensor(lengths, dtype=torch.int64)  # [B], built on the host from host ints
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        cu[1:] = lens.cumsum(0)
        # position of token t in its sequence = t - (start of its sequence)
        positions = torch.arange(sum(lengths)) - cu[:-1].repeat_interleave(lens)  # [T]
        ctx = cls(cu.to(device=device, dtype=torch.int32), max(lengths))
        return ctx, positions.to(device)

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor) -> torch.Tensor:
        """``q [T, Hq, D]``, ``k/v [T, Hkv, D]`` → ``[T, Hq, D]``, causal within each sequence."""
        return varlen_attention(q, k, v, self.cu_seqlens, max_seqlen=self.max_seqlen, causal=True)
