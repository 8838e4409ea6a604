"""A request in flight (:class:`Sequence`) and what the engine hands back (:class:`RequestOutput`)."""
from __future__ import annotations

import dataclasses
import enum

from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # queued for (re)admission; holds no KV blocks
    RUNNING = "running"      # admitted: prefilling or decoding, holds KV blocks
    FINISHED = "finished"


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock times (``time.monotonic()`` seconds) of a request's milestones."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclasses.dataclass
class Logprob:
    """A token's log-probability (natural log) and its ``rank`` in the distribution (1: the most
    likely), vLLM's shape."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    """One generated completion: its token ids (an end-of-sequence token included when it ended the
    generation), the decoded text (special tokens skipped, a matched stop string cut off) and why it
    ended: ``"stop"`` (EOS or a stop string) or ``"length"`` (``max_tokens`` or the context window).

    With ``SamplingParams(logprobs=k)``: ``logprobs``, one ``{token_id: Logprob}`` dict per token of
    ``token_ids`` (the sampled token and the top k; see :class:`SamplingParams` for the distribution),
    and ``cumulative_logprob``, the sum of the sampled tokens' log-probabilities; else both ``None``."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None


@dataclasses.dataclass
class RequestOutput:
    """The result of one request, shaped like vLLM's: ``outputs[0].token_ids`` / ``outputs[0].text``.
    ``num_cached_tokens`` counts the prompt tokens served from the prefix cache."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int
    metrics: RequestMetrics


class Sequence:
    """The engine's state for one request: its tokens, its KV blocks and how many of them are computed.

    ``token_ids`` is prompt + output. ``num_computed_tokens`` tokens have their K/V in the cache (in
    ``block_table``'s blocks); the next step computes ``token_ids[num_computed_tokens:]`` (the whole
    remainder or a chunk of it). A preempted sequence drops its blocks and recomputes everything.
    """

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, arrival_time: float):
        self.request_id = request_id
        self.prompt = prompt
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.table_row = -1  # this block_table's row in the block manager's BlockTables (-1: no blocks)
        self.block_hashes: list[int] = []  # chained hash of each full block of token_ids (block manager's)
        self.num_computed_tokens = 0
        self.num_cached_tokens: int | None = None  # set at first admission
        self.finish_reason: str | None = None
        self.text = ""
        self.metrics = RequestMetrics(arrival_time)
        # one {token_id: Logprob} dict per output token when the request asked for logprobs
        self.output_logprobs: list[dict[int, Logprob]] | None = \
            [] if getattr(params, "logprobs", None) is not None else None

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def to_output(self) -> RequestOutput:
        cumulative = None
        if self.output_logprobs is not None:
            cumulative = sum(d[t].logprob for d, t in zip(self.output_logprobs, self.output_token_ids))
        completion = CompletionOutput(0, self.text, self.output_token_ids, self.finish_reason,
                                      self.output_logprobs, cumulative)
        return RequestOutput(self.request_id, self.prompt, self.token_ids[:self.num_prompt_tokens],
                             [completion], self.is_finished, self.num_cached_tokens or 0, self.metrics)
