"""``EngineConfig``: the engine options ``arkfast.LLM(model, **engine_options)`` accepts."""
from __future__ import annotations

import dataclasses
from typing import Any

CASCADE_MODES = ("auto", "on", "off")


@dataclasses.dataclass
class EngineConfig:
    """Engine options, validated on construction.

    ``block_size``: tokens per KV-cache block (a power of two >= 16). The cache size is, in order of
    precedence: ``num_kv_blocks`` blocks; ``kv_cache_memory`` bytes; on a GPU, what is left of
    ``gpu_memory_utilization`` x the device memory after the weights and a full-budget forward; on CPU,
    room for ``max_num_seqs`` sequences of ``max_model_len`` tokens, capped at ``cpu_kv_cache_memory``
    bytes. ``max_num_seqs``: sequences in flight at once. ``max_num_batched_tokens``: tokens one step
    computes (the chunked-prefill budget; decode tokens count too). ``enable_prefix_caching``: reuse the
    KV of full blocks whose token prefix was seen before. ``cascade``: decode attention reads each
    shared prefix once for its group (``"on"``), never (``"off"``), or when the cost model says it
    saves traffic (``"auto"``). ``enforce_eager``: no CUDA graphs. ``max_model_len``: longest sequence
    (prompt + output); defaults to, and may not exceed, what the model computes exactly.
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_memory: int = 1 << 30
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    enable_prefix_caching: bool = True
    cascade: str = "auto"
    enforce_eager: bool = False
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.block_size) or self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size!r}")
        for name in ("num_kv_blocks", "kv_cache_memory", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "cpu_kv_cache_memory"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.cascade not in CASCADE_MODES:
            raise ValueError(f"cascade must be one of {CASCADE_MODES}, got {self.cascade!r}")
        for name in ("enable_prefix_caching", "enforce_eager"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """Build from keyword options; an unknown one raises ``TypeError`` naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown engine option {unknown[0]!r}; valid options: {', '.join(sorted(known))}")
        return cls(**options)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
