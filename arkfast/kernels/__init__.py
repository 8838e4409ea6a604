"""Triton kernels with their torch references: ``arkfast.kernels``.

Usable on its own (it imports only torch and triton). Every op dispatches the same way: on CUDA
tensors the Triton kernel runs, on CPU tensors the torch reference; ``force_triton()`` runs the kernels
on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1``), ``force_reference()`` runs the
references on CUDA tensors. Triton launches on the current CUDA device: with several GPUs, call
``torch.cuda.set_device`` (or enter ``torch.cuda.device``) for the tensors' device first.

    from arkfast.kernels import fused_linear_weighted_cross_entropy
    loss = fused_linear_weighted_cross_entropy(hidden, lm_head.weight, labels, step_weights)

A loaded transformers Llama / Qwen2 / Qwen3 / Mistral model takes them all at once, undoably:
``patch_hf_model(model)`` / ``unpatch_hf_model(model)`` (:mod:`arkfast.kernels.hf_patch`). Every
training op launches its kernel as a ``torch.library`` custom op, so ``torch.compile(fullgraph=True)``
keeps each as one node.
"""
from ._dispatch import force_reference, force_triton, use_triton
from .cascade_attention import cascade_decode_attention, cascade_decode_attention_reference
from .cpu_decode_attention import cpu_decode_attention, plan_cpu_decode
from .decode_attention import (
    DecodePlan,
    decode_attention,
    paged_decode_attention,
    paged_decode_attention_reference,
    plan_decode,
)
from .decode_cost import DecodeCostModel
from .fused_linear_weighted_cross_entropy import (
    FusedLinearWeightedCrossEntropy,
    fused_linear_weighted_cross_entropy,
    fused_linear_weighted_cross_entropy_reference,
)
from .hf_patch import SUPPORTED_MODEL_TYPES, patch_hf_model, unpatch_hf_model
from .merge_states import merge_state, merge_states, merge_states_reference
from .paged_kv import allocate_kv_cache, gather_kv_reference, write_kv_cache, write_kv_cache_reference
from .plan_buffers import DecodePlanBuffers, PlanCapacityError
from .prefill_attention import (
    prefill_attention,
    prefill_attention_reference,
    varlen_attention,
    varlen_attention_reference,
)
from .rms_norm import rms_norm, rms_norm_reference
from .rope import apply_rope, apply_rope_reference, rope_inv_freq
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "DecodeCostModel",
    "DecodePlan",
    "DecodePlanBuffers",
    "FusedLinearWeightedCrossEntropy",
    "PlanCapacityError",
    "allocate_kv_cache",
    "apply_rope",
    "apply_rope_reference",
    "cascade_decode_attention",
    "cascade_decode_attention_reference",
    "cpu_decode_attention",
    "decode_attention",
    "force_reference",
    "force_triton",
    "fused_linear_weighted_cross_entropy",
    "fused_linear_weighted_cross_entropy_reference",
    "gather_kv_reference",
    "merge_state",
    "merge_states",
    "merge_states_reference",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "patch_hf_model",
    "plan_cpu_decode",
    "plan_decode",
    "prefill_attention",
    "prefill_attention_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope_inv_freq",
    "swiglu",
    "swiglu_reference",
    "unpatch_hf_model",
    "use_triton",
    "varlen_attention",
    "varlen_attention_reference",
    "write_kv_cache",
    "write_kv_cache_reference",
]
