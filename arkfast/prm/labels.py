"""Step labels for PRM training: Monte-Carlo rollouts on the engine (Math-Shepherd) or the outcome.

``monte-carlo`` (Wang et al. 2024, arXiv 2312.08935). From the prefix that ends with step ``k``
(the chat prompt ids, then the response's tokens up to step ``k``'s last token, the separator after
it included), ``K`` completions are sampled by :class:`arkfast.LLM`, each with its own seed; each
completed text (prefix + completion) is graded against the gold answer with the record's task. The
soft label of step ``k`` is the fraction of the ``K`` that reach the gold answer; the hard label
(``hard=True``) is 1 when any of them does. The last step's prefix is the whole response: nothing is
left to sample, its label is the trajectory's own correctness.

All ``K x (steps - 1)`` requests of a trajectory, and those of the next trajectories, are in the engine
together: the ``K`` copies of a prefix share all its KV blocks, and the prefixes of one trajectory
share the prompt and its earlier steps, so the prefix cache serves most prompt tokens
(:attr:`LabelStats.prefix_cache_hit_rate`, from each request's ``num_cached_tokens``, as
``python -m arkfast.generate`` reports it).

``outcome``: every step inherits its trajectory's correctness (AgentArk's granularity, the cheap
baseline).

A label record is the trajectory record (every field kept) plus ``step_labels`` (one float in [0, 1]
per step), ``label_source`` (``monte-carlo``, ``monte-carlo-hard`` or ``outcome``), and for
Monte-Carlo ``label_k`` and ``rollouts_correct`` (per step, how many of the ``K`` reached the gold).
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from arkfast.tasks import ArithTask, Problem, Task
from arkfast.tasks.adapters import make_adapter
from arkfast.trajectories import chat_prompt_ids, encode_response

__all__ = ["LABEL_METHODS", "LabelConfig", "LabelStats", "label_source", "monte_carlo_labels",
           "outcome_labels", "rollout_seed", "task_for"]

LABEL_METHODS = ("monte-carlo", "outcome")


@dataclasses.dataclass
class LabelConfig:
    """How Monte-Carlo labels are sampled: ``k`` completions per step prefix at ``temperature`` /
    ``top_p``, at most ``max_tokens`` each (``None``: the task's default completion budget), seeds
    derived from ``seed``; ``hard``: 1 when any completion is right instead of the fraction.
    ``max_active``: trajectories in flight at once (``None``: enough requests to fill the engine's
    batch twice)."""

    k: int = 8
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int | None = None
    hard: bool = False
    seed: int = 0
    max_active: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an int >= 1 or None, got {self.max_tokens!r}")
        if self.max_active is not None and (not isinstance(self.max_active, int) or self.max_active < 1):
            raise ValueError(f"max_active must be an int >= 1 or None, got {self.max_active!r}")


def label_source(method: str, hard: bool = False) -> str:
    """The ``label_source`` a record gets: ``outcome``, ``monte-carlo`` or ``monte-carlo-hard``."""
    if method not in LABEL_METHODS:
        raise ValueError(f"unknown label method {method!r}; expected one of {LABEL_METHODS}")
    return "monte-carlo-hard" if method == "monte-carlo" and hard else method


@dataclasses.dataclass
class LabelStats:
    """Engine work of a labelling run: requests, prompt tokens, of them served by the prefix cache,
    generated tokens and wall-clock seconds."""

    trajectories: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "prefix_cache_hit_rate": self.prefix_cache_hit_rate,
                "tokens_per_second": self.tokens_per_second}


def task_for(name: str) -> Task:
    """The grader of a record's ``task`` name (``arith`` or an adapter: gsm8k, math, choice, generic)."""
    return ArithTask() if name == "arith" else make_adapter(name)


def rollout_seed(seed: int, trajectory_id: str, step: int, sample: int) -> int:
    """A 31-bit seed for one rollout, stable across runs and schedules."""
    digest = hashlib.sha256(f"prm/{seed}/{trajectory_id}/{step}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def outcome_labels(records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Label records whose every step carries its trajectory's correctness (1.0 or 0.0)."""
    for record in records:
        value = 1.0 if record["correct"] else 0.0
        yield {**record, "step_labels": [value] * len(record["steps"]), "label_source": "outcome"}


@dataclasses.dataclass
class _Pending:
    """One trajectory's rollouts in flight: its grader, the response tokens up to each step's end,
    how many rollouts were right per step and how many are still running."""

    record: dict[str, Any]
    task: Task
    prefixes: list[list[int]]
    right: list[int]
    left: int


def monte_carlo_labels(llm: Any, records: Iterable[dict[str, Any]], cfg: LabelConfig,
                       stats: LabelStats | None = None) -> Iterator[dict[str, Any]]:
    """Label each record by rollouts on ``llm`` (an :class:`arkfast.LLM`; module docstring); yields
    label records in the order their trajectories finish. ``stats`` (optional) accumulates the work."""
    from arkfast import SamplingParams

    tokenizer = llm.tokenizer
    if tokenizer is None:
        raise ValueError("the rollout model has no tokenizer; prefixes are built with its chat template")
    stats = stats if stats is not None else LabelStats()
    max_active = cfg.max_active
    if max_active is None:  # fill the batch twice: a trajectory of ~5 steps asks for ~4 x k requests
        max_active = max(1, -(-2 * llm.config.max_num_seqs // (4 * cfg.k)))
    waiting = deque(records)
    in_flight: dict[str, tuple[_Pending, int]] = {}  # request id -> (trajectory, step)
    ready: deque[_Pending] = deque()
    active = 0
    counter = 0
    t0 = time.perf_counter()

    def start(record: dict[str, Any]) -> None:
        nonlocal active, counter
        task = task_for(record["task"])
        prompt = chat_prompt_ids(tokenizer, record["prompt"])
        ids, ranges = encode_response(tokenizer, record["response"], record["steps"])
        pending = _Pending(record, task, [ids[:t1] for _, t1 in ranges], [0] * len(ranges),
                           (len(ranges) - 1) * cfg.k)
        pending.right[-1] = cfg.k if record["correct"] else 0  # the whole response: its own outcome
        budget = cfg.max_tokens or task.default_max_tokens
        for step in range(len(ranges) - 1):
            prefix = prompt + pending.prefixes[step]
            for j in range(cfg.k):
                counter += 1
                rid = f"prm{counter}"
                params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=budget,
                                        seed=rollout_seed(cfg.seed, record["id"], step, j))
                llm.add_request(prefix, params, request_id=rid)
                in_flight[rid] = (pending, step)
        if pending.left == 0:
            ready.append(pending)
        else:
            active += 1

    def finish(pending: _Pending) -> dict[str, Any]:
        record = pending.record
        k = cfg.k
        labels = [(1.0 if r > 0 else 0.0) if cfg.hard else r / k for r in pending.right]
        stats.trajectories += 1
        stats.seconds = time.perf_counter() - t0
        return {**record, "step_labels": labels, "label_source": label_source("monte-carlo", cfg.hard),
                "label_k": k, "rollouts_correct": list(pending.right)}

    try:
        while waiting or in_flight or ready:
            while waiting and active < max_active:
                start(waiting.popleft())
            while ready:
                yield finish(ready.popleft())
            if not in_flight:
                continue
            for out in llm.step():
                entry = in_flight.pop(out.request_id, None)
                if entry is None:
                    continue
                pending, step = entry
                completion = out.outputs[0].token_ids
                stats.requests += 1
                stats.prompt_tokens += len(out.prompt_token_ids)
                stats.cached_prompt_tokens += out.num_cached_tokens
                stats.generated_tokens += len(completion)
                text = tokenizer.decode(pending.prefixes[step] + list(completion), skip_special_tokens=True)
                record = pending.record
                problem = Problem(record["problem_id"], "", record["gold"])
                pending.right[step] += pending.task.score(text, problem)[1]
                pending.left -= 1
                if pending.left == 0:
                    active -= 1
                    ready.append(pending)
    finally:  # an interrupt leaves none of our requests running in the engine
        for rid in list(in_flight):
            llm.abort_request(rid)
        stats.seconds = time.perf_counter() - t0
