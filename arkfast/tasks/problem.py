"""What a task is: a :class:`Problem` (question + gold answer) and a :class:`Task` that knows how to
ask it, read an answer out of a completion, and grade that answer."""
from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from typing import Any

from .grading import canonical_answer, extract_final

__all__ = ["Problem", "Task"]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem of a task.

    ``id`` is unique within its dataset and stable across runs (``--resume`` keys on it); ``gold`` is
    the reference answer as text (a number, a LaTeX expression or a choice letter); ``choices`` the
    option texts of a multiple-choice problem (letter ``A`` is ``choices[0]``); ``meta`` anything else
    worth keeping (a reference solution, a subject, a level), JSON-serialisable.
    """

    id: str
    question: str
    gold: str
    choices: tuple[str, ...] | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"Problem.id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.question, str):
            raise TypeError(f"Problem {self.id}: question must be a string, got {type(self.question).__name__}")
        if not isinstance(self.gold, str):
            raise TypeError(f"Problem {self.id}: gold must be a string, got {type(self.gold).__name__}")

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "question": self.question, "gold": self.gold}
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.meta:
            out["meta"] = dict(self.meta)
        return out


class Task(abc.ABC):
    """How to pose, answer-extract and grade the problems of one dataset shape.

    ``prompt_kind`` keys the prompt templates (``arkfast.debate.prompts``): ``"arith"``, ``"number"``,
    ``"math"``, ``"choice"`` or ``"text"``. ``default_max_tokens`` is a completion budget that fits
    the task's usual solutions.
    """

    name: str = "task"
    prompt_kind: str = "text"
    default_max_tokens: int = 512

    def question_text(self, problem: Problem) -> str:
        """The question as the agents read it (multiple choice appends the lettered options)."""
        return problem.question

    def extract(self, completion: str, problem: Problem | None = None) -> str | None:
        """The final answer stated in ``completion`` (raw text), or ``None`` when there is none."""
        return extract_final(completion, numeric=True)

    def canonical(self, answer: str | None) -> str | None:
        """The canonical form of an answer: equal canonical forms are the same answer (and one vote)."""
        return canonical_answer(answer)

    def grade(self, answer: str | None, problem: Problem) -> bool:
        """Whether ``answer`` agrees with ``problem.gold``."""
        key = self.canonical(answer)
        return key is not None and key == self.canonical(problem.gold)

    def score(self, completion: str, problem: Problem) -> tuple[str | None, bool]:
        """``(extracted answer, correct)`` for one completion."""
        answer = self.extract(completion, problem)
        return answer, self.grade(answer, problem)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
