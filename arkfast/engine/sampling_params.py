"""``SamplingParams``: how one request's tokens are chosen and when its generation stops (vLLM's names)."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass
class SamplingParams:
    """Per-request sampling and stopping settings.

    ``temperature`` 0 is greedy (argmax); otherwise logits are divided by it, then filtered to the
    ``top_k`` most likely tokens (-1 or 0: no limit) and to the smallest set whose probability reaches
    ``top_p``, and a token is drawn from what remains. Generation stops at an end-of-sequence token
    (unless ``ignore_eos``), when the decoded text contains one of the ``stop`` strings (the text is cut
    before it), or after ``max_tokens`` tokens. A ``seed`` makes the draws reproducible: the same prompt
    and seed give the same tokens whatever else is in the batch.

    ``logprobs`` (``None``: off) asks for log-probabilities: per generated token, a ``{token_id:
    Logprob}`` dict with the sampled token and the ``logprobs`` most likely ones (0: the sampled token
    alone), in ``CompletionOutput.logprobs``. They are ``log_softmax(logits / temperature)`` over the
    whole vocabulary: after the temperature, *before* top-k / top-p truncation (the untempered
    distribution at temperature 0). Under top-k / top-p the tokens are drawn from the renormalised
    truncated distribution, so these are not the sampling probabilities; an RL trainer that needs the
    rollout policy's exact log-probabilities keeps ``top_k=-1, top_p=1``.

    >>> SamplingParams(temperature=0.0, max_tokens=16, stop="\\n\\n").stop
    ('\\n\\n',)
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 256
    stop: str | Sequence[str] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        self.temperature = float(self.temperature)
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) \
                or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        self.top_p = float(self.top_p)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (no limit) or a positive int, got {self.top_k!r}")
        if self.top_k == 0:
            self.top_k = -1
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {self.max_tokens!r}")
        if self.stop is None:
            self.stop = ()
        elif isinstance(self.stop, str):
            self.stop = (self.stop,)
        else:
            self.stop = tuple(self.stop)
        bad = [s for s in self.stop if not isinstance(s, str) or not s]
        if bad:
            raise ValueError(f"stop strings must be non-empty str, got {bad[0]!r}")
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or self.logprobs < 0):
            raise ValueError(f"logprobs must be None or an int >= 0 (top log-probabilities per token besides "
                             f"the sampled one), got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        """Whether tokens are the argmax (temperature 0)."""
        return self.temperature == 0.0
