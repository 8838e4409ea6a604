"""The inference engine: ``LLM`` (continuous batching over a paged, prefix-cached KV cache with cascade
decode attention) and ``SamplingParams``, shaped like vLLM's offline API.

Example::

    from arkfast.engine import LLM, SamplingParams
    llm = LLM("path/to/checkpoint")
    out = llm.generate(["Question: 12 + 30 = ?"], SamplingParams(temperature=0.0, max_tokens=32))[0]
    out.outputs[0].text, out.outputs[0].token_ids, out.num_cached_tokens

RL rollouts (per-token log-probabilities, then the trainer's new weights)::

    out = llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=64, logprobs=0))
    out[0].outputs[0].logprobs[0]      # {token_id: Logprob(logprob=..., rank=...)} for the first token
    llm.update_weights(trained_model)  # in place; the prefix cache is emptied
"""
from .config import EngineConfig
from .llm import LLM
from .sampling_params import SamplingParams
from .sequence import CompletionOutput, Logprob, RequestMetrics, RequestOutput

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "Logprob", "RequestMetrics", "RequestOutput", "SamplingParams"]
