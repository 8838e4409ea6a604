"""The protocols (``single``, ``self-consistency``, ``debate``, ``self-refine``), the majority vote, and
the state and record of one problem's debate.

A protocol is N agents x R rounds: ``single`` is 1 x 1, ``self-consistency`` N x 1, ``debate`` N x R
(default 5 x 2) and ``self-refine`` 1 x 2. Round 1 agents answer independently; in round r each agent
sees its peers' round r-1 answers and revises. ``self-refine`` is one agent that drafts, then revises its
own draft with the debate's update request (the ``shared`` round prompt with one solution, its own):
two model calls per problem instead of the debate's ten. The final answer is the majority vote of the last round, or, with ``aggregator``,
the answer of one more call that reads every final solution (the vote when that call states none).
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from arkfast.tasks import Problem, Task

__all__ = ["LAYOUTS", "PROTOCOLS", "DebateConfig", "ProblemState", "majority_vote", "request_seed"]

PROTOCOLS = ("single", "self-consistency", "debate", "self-refine")
LAYOUTS = ("shared", "classic")


@dataclasses.dataclass
class DebateConfig:
    """How a debate runs. ``agents``/``rounds`` are what the user asked for; :attr:`num_agents` and
    :attr:`num_rounds` are what the protocol uses (``single`` is always 1 x 1, ``self-consistency``
    always one round, ``self-refine`` always 1 x 2, in the ``shared`` layout). Sampling: ``temperature`` (0 = greedy), ``top_p``, ``top_k`` (-1: off),
    ``max_tokens`` per completion; each request gets its own seed derived from ``seed``, the problem
    id, the round and the agent, so a problem's completions do not depend on what else runs."""

    protocol: str = "debate"
    agents: int = 5
    rounds: int = 2
    layout: str = "shared"
    aggregator: bool = False
    temperature: float = 0.5
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        for name in ("agents", "rounds", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        # Checked here, not first by SamplingParams inside the driver, where a bad value would turn
        # every problem into an error record instead of stopping the run before it starts.
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) \
                or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or a positive int, got {self.top_k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if self.aggregator and self.protocol in ("single", "self-refine"):
            raise ValueError("aggregator needs more than one agent; use protocol 'self-consistency' or 'debate'")
        if self.protocol == "self-refine" and self.layout != "shared":
            raise ValueError("self-refine revises with the shared round prompt (one solution, the agent's own); "
                             f"layout {self.layout!r} has no prompt for an agent without peers")

    @property
    def num_agents(self) -> int:
        return 1 if self.protocol in ("single", "self-refine") else self.agents

    @property
    def num_rounds(self) -> int:
        if self.protocol == "self-refine":
            return 2
        return self.rounds if self.protocol == "debate" else 1

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["agents"], out["rounds"] = self.num_agents, self.num_rounds
        return out


def request_seed(seed: int, problem_id: str, round_index: int, agent: int) -> int:
    """A 31-bit sampling seed for one request, stable across runs and schedules."""
    digest = hashlib.sha256(f"{seed}/{problem_id}/{round_index}/{agent}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def majority_vote(answers: Sequence[str | None], canonical: Callable[[str | None], str | None]) -> str | None:
    """The most common answer (answers with equal ``canonical`` forms count as one); ties go to the
    answer whose group appeared first; ``None`` answers do not vote. Returns the group's first raw
    answer, or ``None`` when nobody answered."""
    keys = [canonical(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    winner = next(i for i, k in enumerate(keys) if k is not None and counts[k] == best)
    return answers[winner]


class ProblemState:
    """One problem's debate in progress: every round's agent turns, the aggregator turn, the error
    (if any) and the per-problem cost, from the first submission to the completion."""

    def __init__(self, problem: Problem, task: Task, config: DebateConfig):
        self.problem = problem
        self.task = task
        self.config = config
        self.rounds: list[list[dict[str, Any] | None]] = []
        self.aggregator: dict[str, Any] | None = None
        self.error: str | None = None
        self.outstanding: set[str] = set()
        self.started: float | None = None
        self.seconds: float | None = None

    # -- progress ------------------------------------------------------------------------------------

    def start_round(self) -> int:
        """Open the next round; returns its 0-based index."""
        if self.started is None:
            self.started = time.perf_counter()
        self.rounds.append([None] * self.config.num_agents)
        return len(self.rounds) - 1

    def turn(self, output: Any, agent: int | None) -> dict[str, Any]:
        """Record a finished request (``agent`` None: the aggregator) and return its turn record."""
        completion = output.outputs[0]
        answer, correct = self.task.score(completion.text, self.problem)
        turn = {"agent": agent, "text": completion.text, "answer": answer, "correct": correct,
                "prompt_tokens": len(output.prompt_token_ids), "completion_tokens": len(completion.token_ids),
                "cached_tokens": int(output.num_cached_tokens), "finish_reason": completion.finish_reason}
        if agent is None:
            self.aggregator = turn
        else:
            self.rounds[-1][agent] = turn
        return turn

    def round_complete(self) -> bool:
        return bool(self.rounds) and all(t is not None for t in self.rounds[-1])

    def last_texts(self) -> list[str]:
        return [t["text"] for t in self.rounds[-1]]

    def history(self) -> list[list[str]]:
        return [[t["text"] for t in turns] for turns in self.rounds]

    def fail(self, message: str) -> None:
        self.error = message

    def finish(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()
        self.seconds = time.perf_counter() - self.started

    # -- the record ----------------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """The ``debates.jsonl`` record of this problem (call after :meth:`finish`)."""
        task, problem = self.task, self.problem
        complete = [turns for turns in self.rounds if all(t is not None for t in turns)]
        majorities = [majority_vote([t["answer"] for t in turns], task.canonical) for turns in complete]
        final = majorities[-1] if majorities and len(complete) == self.config.num_rounds else None
        if self.aggregator is not None and task.canonical(self.aggregator["answer"]) is not None:
            final = self.aggregator["answer"]
        turns = [t for ts in self.rounds for t in ts if t is not None]
        turns += [self.aggregator] if self.aggregator is not None else []
        record = {
            **problem.to_dict(),
            "task": task.name,
            "protocol": self.config.protocol,
            "layout": self.config.layout,
            "rounds": [[t for t in ts if t is not None] for ts in self.rounds],
            "round_majority": majorities,
            "round_majority_correct": [task.grade(a, problem) for a in majorities],
            "final_answer": final,
            "correct": self.error is None and task.grade(final, problem),
            "aggregator": self.aggregator,
            "cost": {
                "prompt_tokens": sum(t["prompt_tokens"] for t in turns),
                "completion_tokens": sum(t["completion_tokens"] for t in turns),
                "cached_prompt_tokens": sum(t["cached_tokens"] for t in turns),
                "seconds": round(self.seconds or 0.0, 6),
            },
            "error": self.error,
        }
        return record
