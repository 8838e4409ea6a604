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


def _gguf_permute(w, n_head: int):
    """llama.cpp's layout for q/k rows: each head's rotate-half pairs (i, i + D/2) stored interleaved
    as (2i, 2i + 1); transformers' GGUF loader undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_tiny_gguf(checkpoint: str | Path, path: str | Path, name: str = "tiny-llama") -> Path:
    """Write the Llama checkpoint folder ``checkpoint`` (from :func:`build_tiny_checkpoint`) as one
    float32 GGUF file at ``path``, laid out as llama.cpp's converter lays it out (tensor names, q/k
    permutation, ``llama.*`` metadata, the byte-level BPE tokenizer as ``tokenizer.ggml.*``)."""
    import json

    import gguf
    from safetensors.torch import load_file

    checkpoint, path = Path(checkpoint), Path(path)
    cfg = json.loads((checkpoint / "config.json").read_text())
    if cfg["model_type"] != "llama":
        raise ValueError(f"build_tiny_gguf writes Llama checkpoints, got model_type {cfg['model_type']!r}")
    tensors = {k: v.float().numpy() for k, v in load_file(checkpoint / "model.safetensors").items()}
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(cfg["hidden_size"] // heads)
    writer.add_rope_freq_base(float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 1e4))))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    tok = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [f"[PAD{i}]" for i in range(len(vocab), cfg["vocab_size"])]
    special = {t["content"] for t in tok["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_eos_token_id(EOS_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for hf_name, value in tensors.items():
        if hf_name in names:
            gguf_name = names[hf_name]
        else:
            _, _, i, rest = hf_name.split(".", 3)  # model.layers.<i>.<part>.weight
            part, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{i}.{parts[part]}.{kind}"
        if gguf_name.endswith("attn_q.weight"):
            value = _gguf_permute(value, heads)
        elif gguf_name.endswith("attn_k.weight"):
            value = _gguf_permute(value, kv_heads)
        writer.add_tensor(gguf_name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
