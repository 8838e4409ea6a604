"""The decoder models arkfast runs and trains (Llama 2/3, Qwen2/2.5, Qwen3, Mistral).

Example::

    model = load_model("path/to/checkpoint", dtype="bfloat16", device="cuda")
    ctx, positions = VarlenContext.from_lengths([5, 3], device="cuda")
    hidden = model(input_ids, positions, ctx)          # input_ids [8] -> hidden [8, H]
    logits = model.compute_logits(hidden)              # [8, V]
"""
from .config import ARCHITECTURES, ModelConfig
from .context import AttentionContext, VarlenContext
from .decoder import DecoderModel
from .loader import load_model, load_tokenizer, save_model

__all__ = [
    "ARCHITECTURES", "AttentionContext", "DecoderModel", "ModelConfig", "VarlenContext",
    "load_model", "load_tokenizer", "save_model",
]
