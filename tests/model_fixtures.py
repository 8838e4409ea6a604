"""Tiny random-weight checkpoints of the supported architectures, saved the way transformers saves them.

    path = build_tiny_checkpoint("qwen3", tmp_path / "qwen3")      # config.json, safetensors, tokenizer
    path = build_tiny_checkpoint("llama", tmp_path / "l", tie_word_embeddings=True, shard_size="20KB")

Every parameter is redrawn from a seeded generator (matrices, the embedding included, ~ N(0, 1/fan_in);
norm weights ~ 1 + N(0, 0.1²); biases ~ N(0, 0.1²)) so norms and biases are not the identity/zero
transformers initialises them to, and logits are O(1). Each checkpoint carries a small byte-level BPE tokenizer with a ChatML template
whose ids fit the model's vocabulary.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
VOCAB_SIZE = 300
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
PAD_ID, EOS_ID = 0, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The committee of agents debates the answer, then one student learns from the debate.",
    "Question: what is 12 + 30? Answer: 42. Each step is scored by a reward model.",
    "Agent 1 says the answer is 7. Agent 2 disagrees and shows its work step by step.",
]

# head_dim 32 (hidden / heads): the smallest head size the Triton attention kernels take, so the same
# checkpoints run on a GPU.
_BASE = dict(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-5, pad_token_id=PAD_ID, bos_token_id=None, eos_token_id=EOS_ID)
# Per-architecture defaults on top of _BASE: Qwen3 gets an explicit head_dim != hidden / heads, Mistral
# a sliding window shorter than max_position_embeddings (the model refuses longer sequences).
_ARCH_DEFAULTS = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 64},
    "mistral": {"sliding_window": 16},
}


def tiny_hf_config(arch: str, **overrides):
    """A transformers config (``LlamaConfig`` …) for a tiny model of ``arch`` in :data:`ARCHS`."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}
    if arch not in classes:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHS}")
    return classes[arch](**{**_BASE, **_ARCH_DEFAULTS[arch], **overrides})


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter of a transformers model from ``seed`` (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                value = 1 + 0.1 * noise
            elif name.endswith("bias"):
                value = 0.1 * noise
            else:
                value = noise / math.sqrt(p.shape[-1])
            p.copy_(value)


def build_tiny_tokenizer(path: str | Path) -> Path:
    """Save a byte-level BPE tokenizer (at most :data:`VOCAB_SIZE` ids, ChatML template) to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)
    assert len(fast) <= VOCAB_SIZE and fast.eos_token_id == EOS_ID and fast.pad_token_id == PAD_ID
    fast.save_pretrained(str(path))
    return Path(path)


def build_tiny_checkpoint(arch: str, path: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                          shard_size: str | None = None, tokenizer: bool = True, **overrides) -> Path:
    """Build a random tiny ``arch`` model with transformers, ``save_pretrained`` it (safetensors; sharded
    with an index when ``shard_size`` like ``"20KB"`` is given) and return ``path``. ``overrides`` go to
    the transformers config (``tie_word_embeddings=True``, ``rope_scaling={...}``, ...)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = tiny_hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    model.to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(str(path), safe_serialization=True, **kwargs)
    if tokenizer:
        build_tiny_tokenizer(path)
    return path


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """The transformers model saved at ``path``, eager attention, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager")
    return model.eval()
