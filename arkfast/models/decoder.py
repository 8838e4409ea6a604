"""The arkfast decoder: one implementation of Llama 2/3, Qwen2/2.5, Qwen3 and Mistral.

It runs on a *packed* token stream: ``input_ids [T]`` holds any number of sequences (or the new tokens
of many decoding sequences) end to end, ``positions [T]`` their rotary positions, and an attention
context (:mod:`arkfast.models.context`) knows which tokens attend to which. There is no batch dim and no
padding. Every op goes through :mod:`arkfast.kernels`, so the same code runs the Triton kernels on CUDA
and the torch references on CPU.

Per layer, with the residual add fused into the next RMSNorm (``rms_norm(x, w, eps, residual)`` returns
``(norm(x + residual), x + residual)``), exactly as transformers computes it::

    x, r = rms_norm(x, input_norm, eps, r)                       # r: the residual stream [T, H]
    q, k, v = split(x @ qkv_proj.T + qkv_bias)                   # fused q/k/v projection
    q, k = q_norm(q), k_norm(k)                                  # Qwen3 only, per head, before RoPE
    q, k = apply_rope(q, k, positions)
    x = ctx.attention(layer, q, k, v) @ o_proj.T (+ o_bias)
    x, r = rms_norm(x, post_attention_norm, eps, r)
    x = swiglu(x @ gate_up_proj.T (+ bias)) @ down_proj.T (+ bias)   # fused gate/up projection
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from arkfast.kernels.rms_norm import rms_norm
from arkfast.kernels.rope import apply_rope, rope_inv_freq
from arkfast.kernels.swiglu import swiglu

from .config import ModelConfig
from .context import AttentionContext


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    # Uninitialised: every parameter is filled by the loader (or the caller).
    return nn.Parameter(torch.empty(*shape, dtype=dtype))


class Linear(nn.Module):
    """``y = x @ weight.T (+ bias)``; ``weight [out, in]``, ``bias [out]`` when ``bias``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype)
        self.bias = _param(out_features, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned ``weight [H]``; fuses the residual add when given one."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = _param(size, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    """Fused-qkv GQA attention; the attention itself is delegated to the context."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, cfg.qkv_bias, dtype)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, cfg.o_bias, dtype)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                rope_scale: float, ctx: AttentionContext) -> torch.Tensor:
        """``x [T, H]``, ``positions [T]`` int64 → ``[T, H]``."""
        T = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) D]
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                             self.num_kv_heads * self.head_dim], dim=-1)
        # Views into qkv, no copies: the head and last dims are contiguous, the token stride is
        # (Hq + 2 Hkv) D. The kernels take any token stride.
        q = q.view(T, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, k, positions, inv_freq, rope_scale)
        out = ctx.attention(self.layer_idx, q, k, v)  # [T, Hq, D]
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU MLP with ``gate_proj`` and ``up_proj`` fused into one ``gate_up_proj [2I, H]``."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, cfg.mlp_bias, dtype)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_up_proj(x)))  # [T, H] -> [T, 2I] -> [T, I] -> [T, H]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, layer_idx, dtype)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                inv_freq: torch.Tensor, rope_scale: float, ctx: AttentionContext):
        """``x [T, H]`` (this layer's input before the residual add) and ``residual [T, H]`` (None on
        the first layer) → the MLP output and the residual stream, both ``[T, H]``."""
        if residual is None:
            x, residual = self.input_norm(x), x
        else:
            x, residual = self.input_norm(x, residual)
        x = self.attn(x, positions, inv_freq, rope_scale, ctx)
        x, residual = self.post_attention_norm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    """A causal LM over packed tokens. Build it with :func:`arkfast.models.load_model`.

    ``model(input_ids, positions, ctx)`` returns the final-normed hidden states ``[T, H]``;
    :meth:`compute_logits` maps (a subset of) them to ``[N, V]`` logits. Training passes ``hidden`` and
    :attr:`lm_head_weight` straight to the fused loss instead, never forming the logits.

    Example::

        ctx, positions = VarlenContext.from_lengths([len(a), len(b)], device)
        hidden = model(torch.cat([a, b]), positions, ctx)        # [T, H]
        last = ctx.cu_seqlens[1:].long() - 1                     # each sequence's last token
        logits = model.compute_logits(hidden[last])              # [2, V]
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.embed_tokens = _param(config.vocab_size, config.hidden_size, dtype=dtype)  # [V, H]
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = (None if config.tie_word_embeddings
                        else _param(config.vocab_size, config.hidden_size, dtype=dtype))  # [V, H]
        inv_freq, self.rope_scale = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D/2] fp32

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output projection ``[V, H]``: the embedding matrix when the embeddings are tied."""
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        """``input_ids [T]`` and ``positions [T]`` (int64, same device as the model) → ``hidden [T, H]``
        after the final norm, in the model dtype. ``ctx`` says which tokens attend to which."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(f"input_ids and positions must both be [T]; got {tuple(input_ids.shape)} "
                             f"and {tuple(positions.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32) or positions.dtype not in (torch.int64,
                                                                                        torch.int32):
            raise TypeError(f"input_ids and positions must be integer tensors, got {input_ids.dtype} "
                            f"and {positions.dtype}")
        window = self.config.sliding_window
        if window is not None and ctx.max_seqlen > window:
            raise ValueError(f"a sequence of {ctx.max_seqlen} tokens exceeds the model's sliding_window "
                             f"({window}); sliding-window attention is only exact up to the window")
        x = F.embedding(input_ids, self.embed_tokens)  # [T, H]
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.inv_freq, self.rope_scale, ctx)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [N, H]`` → ``logits [N, V]`` in the model dtype."""
        return F.linear(hidden, self.lm_head_weight)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts floating buffers too; the rotary frequencies must stay fp32 (as in
        # transformers), so recompute them on the new device instead of keeping a rounded copy.
        super()._apply(fn, recurse)
        inv_freq, _ = rope_inv_freq(self.config.head_dim, self.config.rope_theta, self.config.rope_scaling)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self
