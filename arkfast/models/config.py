"""``ModelConfig``: the few numbers the arkfast decoder needs, read from a Hugging Face ``config.json``.

One decoder covers Llama 2/3, Qwen2/2.5, Qwen3 and Mistral; they differ only in which projections
carry a bias, whether q/k get a per-head RMSNorm, and the rotary scaling. Anything in a config that
would change the math and that the decoder does not implement raises ``ValueError`` naming the field
and its value, so an unsupported checkpoint fails at load time instead of producing wrong logits.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from .gguf import gguf_config_dict, gguf_file

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}

FAMILIES = {family: arch for arch, family in ARCHITECTURES.items()}  # model_type -> architecture

ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.float32`` / ``"bfloat16"`` / ``"bf16"`` / ``"torch.float16"`` → a ``torch.dtype``."""
    if value is None or isinstance(value, torch.dtype):
        if value is not None and value not in DTYPES.values():
            raise ValueError(f"unsupported dtype {value}; expected one of float32, bfloat16, float16")
        return value
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {value!r}; expected one of float32, bfloat16, float16")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder hyper-parameters. Build it with :meth:`from_pretrained` or :meth:`from_dict`.

    ``qkv_bias``/``o_bias``/``mlp_bias`` say which linear layers carry a bias; ``qk_norm`` turns on
    Qwen3's per-head RMSNorm of q and k before RoPE. ``rope_scaling`` is None or a dict with
    ``rope_type`` ``"llama3"`` and its four parameters. ``sliding_window`` (Mistral) is kept only when it
    is smaller than ``max_position_embeddings``; the model then refuses any sequence longer than the
    window (for those up to it, sliding-window and full causal attention are the same).
    ``eos_token_ids`` are every end-of-sequence id the checkpoint names; ``raw`` the original dict.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    dtype: torch.dtype | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    raw: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported architectures {self.architecture!r}; "
                             f"supported: {', '.join(ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"unsupported rope_scaling rope_type {rope_type!r}; supported: "
                                 f"{', '.join(ROPE_TYPES)}")
            missing = [k for k in LLAMA3_ROPE_KEYS if k not in self.rope_scaling]
            if rope_type == "llama3" and missing:
                raise ValueError(f"llama3 rope_scaling is missing {', '.join(missing)}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        parse_dtype(self.dtype)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def max_context(self) -> int:
        """The longest sequence the model computes exactly (the sliding window when there is one)."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.sliding_window, self.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read ``<path>/config.json`` (``path`` a checkpoint directory or the json file itself), or the
        metadata of a GGUF checkpoint (a ``.gguf`` file or a folder holding one, see
        :mod:`arkfast.models.gguf`).

        End-of-sequence ids listed in a ``generation_config.json`` beside it are added to
        ``eos_token_ids`` (Llama 3 instruct models list their end-of-turn tokens only there)."""
        path = Path(path)
        gguf = gguf_file(path)
        if gguf is not None:
            return cls.from_dict(gguf_config_dict(gguf))
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"no config.json at {path}")
        cfg = cls.from_dict(json.loads(file.read_text()))
        gen_file = file.parent / "generation_config.json"
        if gen_file.is_file():
            extra = _as_ids(json.loads(gen_file.read_text()).get("eos_token_id"))
            eos = cfg.eos_token_ids + tuple(i for i in dict.fromkeys(extra) if i not in cfg.eos_token_ids)
            cfg = dataclasses.replace(cfg, eos_token_ids=eos)
        return cfg

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Translate a Hugging Face config dict (transformers 4 or 5 layout) into a ``ModelConfig``. A dict
        naming only ``model_type`` (no ``architectures``) gets that type's causal LM, as transformers
        reads it."""
        archs = cfg.get("architectures") or []
        if not archs and "model_type" in cfg:  # as transformers reads it: the model type alone
            if cfg["model_type"] not in FAMILIES:
                raise ValueError(f"unsupported model_type {cfg['model_type']!r} (and no architectures); "
                                 f"supported: {', '.join(FAMILIES)}")
            archs = [FAMILIES[cfg["model_type"]]]
            cfg = {**cfg, "architectures": archs}
        if len(archs) != 1:
            raise ValueError(f"unsupported architectures {archs!r}; expected exactly one of "
                             f"{', '.join(ARCHITECTURES)}")
        arch = archs[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architectures {arch!r}; supported: {', '.join(ARCHITECTURES)}")
        family = ARCHITECTURES[arch]
        if cfg.get("model_type", family) != family:
            raise ValueError(f"model_type {cfg.get('model_type')!r} does not match architecture {arch!r}")
        _reject_unsupported(cfg, family)

        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        theta, scaling = _rope_settings(cfg)
        sliding = cfg.get("sliding_window") if family == "mistral" else None
        if sliding is not None and sliding >= cfg.get("max_position_embeddings", 2048):
            sliding = None  # a window at least as long as any sequence is no window
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and none on o_proj; Llama and Qwen3 put attention_bias on
            # all four projections; Mistral has none.
            qkv_bias=family == "qwen2" or (family in ("llama", "qwen3") and attention_bias),
            o_bias=family in ("llama", "qwen3") and attention_bias,
            mlp_bias=family == "llama" and bool(cfg.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            sliding_window=sliding,
            dtype=parse_dtype(cfg.get("dtype") or cfg.get("torch_dtype")),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_as_ids(cfg.get("eos_token_id")),
            raw=dict(cfg),
        )


def _as_ids(value: int | list[int] | None) -> tuple[int, ...]:
    """A config's ``eos_token_id`` (an int, a list or null) as a tuple."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


def _reject_unsupported(cfg: dict[str, Any], family: str) -> None:
    """Raise ``ValueError`` for config fields that would change the math in ways we don't implement."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}; only 'silu' (SwiGLU MLP) is implemented")
    if family in ("qwen2", "qwen3"):
        if cfg.get("use_sliding_window"):
            raise ValueError("unsupported use_sliding_window=True (per-layer sliding-window attention)")
        kinds = set(cfg.get("layer_types") or ["full_attention"])
        if kinds != {"full_attention"}:
            raise ValueError(f"unsupported layer_types {sorted(kinds)}; only 'full_attention' is implemented")
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(field):
            raise ValueError(f"unsupported {field} {cfg.get(field)!r}")


def _rope_settings(cfg: dict[str, Any]) -> tuple[float, dict | None]:
    """``(rope_theta, scaling)`` from either ``rope_theta`` + ``rope_scaling`` (transformers 4) or
    ``rope_parameters`` holding ``rope_theta`` (transformers 5). ``scaling`` is None for default rope."""
    params = dict(cfg.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"unsupported per-layer-type rope_parameters {sorted(params)}")
    params.update(cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    if "type" in params and "rope_type" not in params:  # transformers 4 spelled it "type"
        params["rope_type"] = params.pop("type")
    params.pop("type", None)
    prf = params.pop("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if prf not in (None, 1, 1.0):
        raise ValueError(f"unsupported partial_rotary_factor {prf!r}; only 1.0 is implemented")
    rope_type = params.get("rope_type") or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling rope_type {rope_type!r}; "
                         f"supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    params["rope_type"] = rope_type
    return theta, params
