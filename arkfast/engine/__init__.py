"""The inference engine: ``LLM`` (continuous batching over a paged, prefix-cached KV cache with cascade
decode attention) and ``SamplingParams``, shaped like vLLM's offline API.

Example::

    from arkfast.engine import LLM, SamplingParams
    llm = LLM("path/to/checkpoint")
    out = llm.generate(["Question: 12 + 30 = ?"], SamplingParams(temperature=0.0, max_tokens=32))[0]
    out.outputs[0].text, out.outputs[0].token_ids, out.num_cached_tokens
"""
from .config import EngineConfig
from .llm import LLM
from .sampling_params import SamplingParams
from .sequence import CompletionOutput, RequestMetrics, RequestOutput

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "RequestMetrics", "RequestOutput", "SamplingParams"]
