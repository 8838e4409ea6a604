"""The kernels as a drop-in for a loaded transformers Llama / Qwen2 / Qwen3 / Mistral model.

    model = AutoModelForCausalLM.from_pretrained(path)
    patch_hf_model(model)                 # RMSNorm, RoPE, SwiGLU, varlen attention, fused LM-head loss
    out = model(input_ids, labels=labels, token_weights=weights)      # out.loss; no [B, T, V] logits
    unpatch_hf_model(model)               # the model's own forwards again

The patch replaces the ``forward`` of *this* model's modules (instance attributes, nothing global: other
models of the same class are untouched, ``copy.deepcopy`` of the model is patched on its own modules,
and :func:`unpatch_hf_model` restores what was there):

- every ``*RMSNorm`` (the layer norms, the final norm, Qwen3's per-head q/k norms) → :func:`rms_norm`;
- every attention: the q/k rotation → :func:`apply_rope` on the positions (the model's own
  ``inv_freq`` and ``attention_scaling``); and for packed inputs (one row, several sequences,
  transformers' padding-free convention) → :func:`varlen_attention`. A row is packed when the call
  carries ``cu_seq_lens_q`` / ``max_length_q`` (``DataCollatorWithFlattening(return_flash_attn_kwargs=
  True)``, TRL's padding-free collator), or when it has ``position_ids``, no ``attention_mask`` and no
  KV cache: the boundaries are then read from the positions once per forward (a new sequence wherever
  a position is not the previous one plus 1, the rule transformers' masks use; one host sync). Other
  inputs keep the model's configured attention (eager, sdpa, ...) with its mask, as do a Mistral
  window shorter than the longest sequence and attention dropout in training;
- every MLP → :func:`swiglu` over ``cat(gate_proj(x), up_proj(x))`` (one [.., 2I] copy: the weights are
  left as they are, so optimisers, checkpoints and PEFT see the same parameters);
- the causal LM's ``forward``, when given ``labels`` (or ``shift_labels``) →
  :func:`fused_linear_weighted_cross_entropy` on the final hidden states and ``lm_head``, never
  forming the logits in training (``logits`` is None then; in eval mode they are computed too). It
  takes per-token weights: ``token_weights [B, T]`` aligned with ``labels`` (the weight of the token
  each label names; with ``shift_labels``, aligned with those). The loss is transformers': labels
  shifted by one, -100 ignored, the mean over non-ignored tokens, or the sum over
  ``num_items_in_batch`` when the trainer passes it (gradient accumulation).

A forward that fills a KV cache (``generate``) keeps transformers' own RoPE and attention; a loss
forward turns the cache off unless ``use_cache=True`` is passed. Kernels dispatch per the package
rule: Triton on CUDA tensors, the torch references on CPU (``force_triton()`` in tests).

transformers is imported only here, when a model is patched: ``arkfast.kernels`` itself needs only torch
and triton.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import sys
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .fused_linear_weighted_cross_entropy import fused_linear_weighted_cross_entropy
from .prefill_attention import varlen_attention
from .rms_norm import rms_norm
from .rope import apply_rope
from .swiglu import swiglu

__all__ = ["SUPPORTED_MODEL_TYPES", "patch_hf_model", "unpatch_hf_model"]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
# Rotary types whose frequencies change with the sequence length inside transformers' forward.
_DYNAMIC_ROPE = ("dynamic", "longrope")
_PATCH_ATTR = "_arkfast_patch"


class _Forward:
    """A replacement ``forward`` bound to one module: calls ``fn(module, refs, *args, **kwargs)``.

    Its references (the module, the model's rotary embedding, the forward it replaced) are attributes
    rather than closure cells, so ``copy.deepcopy`` of a patched model (a reference model for DPO, say)
    gives forwards bound to the copy's modules. Its signature is the replaced forward's (plus
    ``extra`` keyword parameters), which ``Trainer`` reads to keep dataset columns and ``generate`` to
    check its kwargs."""

    def __init__(self, fn: Callable, module: torch.nn.Module, refs: dict, extra: tuple[str, ...] = ()):
        self.fn, self.module, self.refs = fn, module, refs
        signature = inspect.signature(refs["previous"])
        params = list(signature.parameters.values())
        tail = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
        head = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD and p.name not in extra]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in extra]
        self.__signature__ = signature.replace(parameters=head + added + tail)

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, self.refs, *args, **kwargs)

    def __deepcopy__(self, memo):
        # Modules and bound methods follow the copy; functions, flags and names are shared.
        follow = (torch.nn.Module, types.MethodType, _Forward)
        refs = {k: copy.deepcopy(v, memo) if isinstance(v, follow) else v for k, v in self.refs.items()}
        clone = _Forward.__new__(_Forward)
        clone.fn, clone.module, clone.refs = self.fn, copy.deepcopy(self.module, memo), refs
        clone.__signature__ = self.__signature__
        memo[id(self)] = clone
        return clone


def patch_hf_model(model: torch.nn.Module, *, rms_norm: bool = True, rope: bool = True, swiglu: bool = True,
                   varlen_attention: bool = True, fused_loss: bool = True) -> torch.nn.Module:
    """Swap the kernels into a loaded transformers ``model`` (a ``*ForCausalLM`` or its bare ``*Model``)
    of model type llama, qwen2, qwen3 or mistral, in place; returns ``model``. Each flag turns one
    replacement on or off (``fused_loss`` needs a causal LM). See the module docstring for what each
    replaces and when. Undo with :func:`unpatch_hf_model`.

    Raises ``ValueError`` for another model type (naming it), a model patched already, a
    ``hidden_act`` other than silu with ``swiglu``, or a rotary type whose frequencies change per
    forward (dynamic, longrope) with ``rope``.

    Example::

        model = patch_hf_model(AutoModelForCausalLM.from_pretrained("path/to/Qwen3-0.6B"))
        loss = model(input_ids=ids, labels=labels, token_weights=step_scores).loss
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"patch_hf_model supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; got "
                         f"{model_type!r} ({type(model).__name__})")
    if getattr(model, _PATCH_ATTR, None) is not None:
        raise ValueError(f"{type(model).__name__} is patched already; call unpatch_hf_model(model) first")
    body = model if hasattr(model, "layers") else getattr(model, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "rotary_emb"):
        raise ValueError(f"{type(model).__name__} has no decoder with .layers and .rotary_emb to patch")
    head = getattr(model, "lm_head", None) if body is not model else None
    if fused_loss and head is None:
        raise ValueError(f"fused_loss=True needs a causal LM with an lm_head; {type(model).__name__} has "
                         f"none (patch the *ForCausalLM, or pass fused_loss=False)")
    if swiglu and config.hidden_act not in ("silu", "swish"):
        raise ValueError(f"swiglu=True needs hidden_act 'silu', got {config.hidden_act!r}")
    rope_type = _rope_type(config)
    if rope and rope_type in _DYNAMIC_ROPE:
        raise ValueError(f"rope_type {rope_type!r} recomputes its frequencies per forward; pass rope=False")

    saved: list[tuple[torch.nn.Module, bool, object]] = []  # (module, had its own forward, that forward)

    def bind(module: torch.nn.Module, fn: Callable, extra: tuple[str, ...] = (), **refs) -> None:
        own = "forward" in module.__dict__
        saved.append((module, own, module.__dict__.get("forward")))
        module.forward = _Forward(fn, module, {**refs, "previous": module.forward}, extra)

    if rms_norm:
        for module in body.modules():
            if type(module).__name__.endswith("RMSNorm"):
                bind(module, _rms_norm_forward)
    for layer in body.layers:
        if rope or varlen_attention:
            bind(layer.self_attn, _attention_forward, rotary=body.rotary_emb, model_type=model_type,
                 rope=rope, varlen=varlen_attention, modeling=type(layer.self_attn).__module__)
        if swiglu:
            bind(layer.mlp, _swiglu_forward)
    if varlen_attention:
        bind(body, _packing_forward)
    if fused_loss:
        output_cls, cache_fields = _causal_lm_output()
        bind(model, _loss_forward, extra=("token_weights",), body=body, output_cls=output_cls,
             cache_fields=cache_fields)
    setattr(model, _PATCH_ATTR, saved)
    return model


def unpatch_hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the forwards :func:`patch_hf_model` replaced (in reverse order); returns ``model``.
    Raises ``ValueError`` when ``model`` is not patched."""
    saved = getattr(model, _PATCH_ATTR, None)
    if saved is None:
        raise ValueError(f"{type(model).__name__} is not patched by patch_hf_model")
    for module, own, previous in reversed(saved):
        if own:
            module.__dict__["forward"] = previous
        else:
            module.__dict__.pop("forward", None)
    delattr(model, _PATCH_ATTR)
    return model


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"


# ------------------------------------------------------------------------------------------------
# The replacement forwards (bound to one module each)
# ------------------------------------------------------------------------------------------------

def _rms_norm_forward(self, refs, hidden_states: torch.Tensor) -> torch.Tensor:
    # transformers' RMSNorm: fp32 statistics, normalised row cast to the input dtype, then * weight.
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_forward(self, refs, x: torch.Tensor) -> torch.Tensor:
    gate_up = torch.cat((self.gate_proj(x), self.up_proj(x)), dim=-1)  # [..., 2I]
    return self.down_proj(swiglu(gate_up))  # [..., I] -> [..., H]


def _attention_forward(self, refs, hidden_states, position_embeddings=None, attention_mask=None, *args,
                       **kwargs):
    """One transformers attention module: projections, (Qwen3) q/k norms, RoPE, then the packed varlen
    kernel or the model's configured attention."""
    modeling = sys.modules[refs["modeling"]]  # the model's own eager attention, rotate_half, registry
    rotary, model_type, config = refs["rotary"], refs["model_type"], self.config
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    position_ids = kwargs.get("position_ids")
    if args or cache is not None or position_ids is None:  # decoding with a cache: transformers' path
        return refs["previous"](hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    B, S = hidden_states.shape[:2]
    T, D = B * S, self.head_dim
    q = self.q_proj(hidden_states).view(B, S, -1, D)  # [B, S, Hq, D]
    k = self.k_proj(hidden_states).view(B, S, -1, D)  # [B, S, Hkv, D]
    v = self.v_proj(hidden_states).view(B, S, -1, D)
    if getattr(self, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before the rotation
        q, k = self.q_norm(q), self.k_norm(k)
    Hq, Hkv = q.shape[2], k.shape[2]
    if refs["rope"]:
        positions = position_ids.expand(B, S).reshape(T)
        q, k = apply_rope(q.reshape(T, Hq, D), k.reshape(T, Hkv, D), positions, rotary.inv_freq,
                          float(rotary.attention_scaling))  # [T, Hq, D], [T, Hkv, D]
    else:  # transformers' rotation with its cos/sin [B, S, D]
        cos, sin = (t.unsqueeze(2) for t in position_embeddings)
        q = (q * cos + modeling.rotate_half(q) * sin).reshape(T, Hq, D)
        k = (k * cos + modeling.rotate_half(k) * sin).reshape(T, Hkv, D)
    v = v.reshape(T, Hkv, D)
    window = getattr(self, "sliding_window", None)
    if model_type == "mistral":
        window = getattr(config, "sliding_window", None)
    cu_seqlens, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    dropout = self.attention_dropout if self.training else 0.0
    if (refs["varlen"] and cu_seqlens is not None and max_len is not None and B == 1 and not dropout
            and (window is None or int(max_len) <= window)):
        out = varlen_attention(q, k, v, cu_seqlens.to(device=q.device, dtype=torch.int32),
                               max_seqlen=int(max_len), scale=self.scaling)  # [T, Hq, D]
        return self.o_proj(out.reshape(B, S, Hq * D)), None
    impl = config._attn_implementation
    interface = (modeling.eager_attention_forward if impl in (None, "eager")
                 else modeling.ALL_ATTENTION_FUNCTIONS[impl])
    if model_type != "llama":
        kwargs["sliding_window"] = window
    out, weights = interface(self, q.view(B, S, Hq, D).transpose(1, 2), k.view(B, S, Hkv, D).transpose(1, 2),
                             v.view(B, S, Hkv, D).transpose(1, 2), attention_mask, dropout=dropout,
                             scaling=self.scaling, **kwargs)  # out [B, S, Hq, D]
    return self.o_proj(out.reshape(B, S, Hq * D).contiguous()), weights


def _packed_boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``cu_seqlens [B + 1]`` int32 and the longest length of the sequences packed in one row of
    ``position_ids [1, S]``: a sequence starts at token 0 and wherever a position is not the previous
    one plus 1 (transformers' rule for packed masks)."""
    pos = position_ids[0]  # [S]
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    cu = torch.cat((starts.nonzero()[:, 0], pos.new_tensor([pos.numel()]))).to(torch.int32)
    # One host sync per forward (not per layer): the kernel sizes its grid by the longest sequence.
    return cu, int((cu[1:] - cu[:-1]).max().item())


def _packing_forward(self, refs, *args, **kwargs):
    """The decoder's forward: adds the varlen boundaries of a packed row to the layers' kwargs."""
    position_ids, inputs = kwargs.get("position_ids"), kwargs.get("input_ids", args[0] if args else None)
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(self.config, "use_cache", False)
    if ("cu_seq_lens_q" not in kwargs and position_ids is not None and kwargs.get("attention_mask") is None
            and cache is None and not use_cache and inputs is not None
            and inputs.shape[0] == 1 and len(args) <= 1):
        cu, max_len = _packed_boundaries(position_ids)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
    return refs["previous"](*args, **kwargs)


def _causal_lm_output() -> tuple[type, list[str]]:
    """transformers' CausalLMOutputWithPast and its cache field ("cache" in newer releases,
    "past_key_values" before), read once at patch time: Dynamo cannot trace dataclasses.fields."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = [f.name for f in dataclasses.fields(CausalLMOutputWithPast)]
    return CausalLMOutputWithPast, [n for n in names if n in ("cache", "past_key_values")]


def _loss_forward(self, refs, input_ids=None, attention_mask=None, position_ids=None, *args, labels=None,
                  shift_labels=None, token_weights=None, num_items_in_batch=None, logits_to_keep=0, **kwargs):
    """The causal LM's forward: with labels, the fused weighted loss on the decoder's hidden states."""
    if args or (labels is None and shift_labels is None):
        if token_weights is not None:
            raise ValueError("token_weights need labels (or shift_labels) to weight")
        extra = {k: v for k, v in (("shift_labels", shift_labels), ("num_items_in_batch", num_items_in_batch))
                 if v is not None}
        return refs["previous"](input_ids, attention_mask, position_ids, *args, labels=labels,
                                logits_to_keep=logits_to_keep, **extra, **kwargs)
    kwargs.setdefault("use_cache", False)  # a loss needs no KV cache
    outputs = refs["body"](input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           **kwargs)
    hidden = outputs.last_hidden_state  # [B, S, H]
    if shift_labels is None:  # position t predicts label t + 1; the last position predicts nothing
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        if token_weights is not None:
            token_weights = F.pad(token_weights, (0, 1), value=0.0)[..., 1:]
    if token_weights is not None and token_weights.shape != shift_labels.shape:
        raise ValueError(f"token_weights must be shaped like the labels {tuple(shift_labels.shape)}, got "
                         f"{tuple(token_weights.shape)}")
    head = self.lm_head
    h = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    w = None if token_weights is None else token_weights.reshape(-1).to(h.device)
    loss = fused_linear_weighted_cross_entropy(
        h, head.weight, shift_labels.reshape(-1).to(h.device), w, bias=head.bias,
        reduction="mean" if num_items_in_batch is None else "sum")
    if num_items_in_batch is not None:
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                       else num_items_in_batch)
    logits = None
    if not self.training:
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = head(hidden[:, keep, :])
    cache = {name: getattr(outputs, name, None) for name in refs["cache_fields"]}
    return refs["output_cls"](loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                              attentions=outputs.attentions, **cache)
