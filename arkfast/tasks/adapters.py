"""Dataset adapters: turn the records of a dataset shape into :class:`Problem` s and grade answers.

==============  ==========================================================  =====================
adapter         record fields                                               gold
==============  ==========================================================  =====================
``gsm8k``       ``question``, ``answer`` ending in ``#### N``               the number ``N``
``math``        ``problem``, ``solution`` with ``\\boxed{}`` (or ``answer``)  the boxed expression
``choice``      ``question`` + ``options``/``choices`` list (or ``A``..``E``  a letter
                fields), ``answer``/``answerKey``/``label``: a letter, a
                0-based index or the option text
``generic``     ``--question-field``, ``--answer-field`` (or guessed)       the field's text
==============  ==========================================================  =====================

:func:`detect_adapter` picks one from a dataset's field names and first record.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .grading import (
    LETTERS,
    canonical_letter,
    canonical_math,
    canonical_text,
    extract_after_hashes,
    extract_boxed,
    extract_final,
    extract_letter,
    looks_like_latex,
    math_answers_match,
    parse_number,
)
from .problem import Problem, Task

__all__ = [
    "ADAPTERS",
    "ChoiceTask",
    "GSM8KTask",
    "GenericTask",
    "MathTask",
    "RecordTask",
    "detect_adapter",
    "make_adapter",
]

QUESTION_FIELDS = ("question", "problem", "prompt", "input", "query")
ANSWER_FIELDS = ("answer", "solution", "output", "target", "label", "gold")
ID_FIELDS = ("id", "unique_id", "idx", "problem_id", "task_id", "qid")


class RecordTask(Task):
    """A :class:`Task` whose problems come from dataset records (dicts of fields)."""

    question_field: str = "question"
    answer_field: str = "answer"

    def __init__(self, question_field: str | None = None, answer_field: str | None = None):
        if question_field is not None:
            self.question_field = question_field
        if answer_field is not None:
            self.answer_field = answer_field

    def required_fields(self) -> tuple[str, ...]:
        return (self.question_field, self.answer_field)

    def check_fields(self, fields: Sequence[str], source: str) -> None:
        """Raise ``ValueError`` naming the first required field missing from ``fields``."""
        for name in self.required_fields():
            if name not in fields:
                raise ValueError(f"{source}: the {self.name} adapter needs a field {name!r}, but the "
                                 f"records have only {sorted(fields)}")

    def from_record(self, record: Mapping[str, Any], problem_id: str) -> Problem:
        return Problem(problem_id, _text(record, self.question_field, problem_id),
                       self.gold_from(record, problem_id))

    def gold_from(self, record: Mapping[str, Any], problem_id: str) -> str:
        return _text(record, self.answer_field, problem_id).strip()


class GSM8KTask(RecordTask):
    """Grade-school math word problems: the gold is the number after ``####``; numeric grading."""

    name = "gsm8k"
    prompt_kind = "number"
    default_max_tokens = 512

    def from_record(self, record, problem_id):
        answer = _text(record, self.answer_field, problem_id)
        gold = extract_after_hashes(answer)
        if gold is None or parse_number(gold) is None:
            raise ValueError(f"problem {problem_id}: GSM8K answer field {self.answer_field!r} has no "
                             f"'#### <number>' line: {answer[-80:]!r}")
        rationale = answer[:answer.rfind("####")].strip()
        return Problem(problem_id, _text(record, self.question_field, problem_id), gold.replace(",", ""),
                       meta={"solution": rationale} if rationale else {})


class MathTask(RecordTask):
    """Competition math: the gold is the last ``\\boxed{}`` of the solution (or an ``answer`` field).
    Answers compare exactly as numbers when both read as numbers, else as mathematics through
    ``math-verify`` (:func:`~arkfast.tasks.grading.math_answers_match`); votes group answers by their
    lightly normalised LaTeX (:func:`~arkfast.tasks.grading.canonical_math`)."""

    name = "math"
    prompt_kind = "math"
    default_max_tokens = 1024
    question_field = "problem"
    answer_field = "solution"

    def from_record(self, record, problem_id):
        solution = _text(record, self.answer_field, problem_id)
        gold = record.get("answer") if self.answer_field != "answer" else None
        if not isinstance(gold, str) or not gold.strip():
            gold = extract_boxed(solution)
        if gold is None:
            raise ValueError(f"problem {problem_id}: MATH solution field {self.answer_field!r} has no "
                             f"\\boxed{{...}} answer and there is no 'answer' field")
        meta = {"solution": solution}
        for key in ("level", "subject", "type"):
            if isinstance(record.get(key), (str, int)):
                meta[key] = record[key]
        return Problem(problem_id, _text(record, self.question_field, problem_id), gold.strip(), meta=meta)

    def extract(self, completion, problem=None):
        return extract_final(completion, numeric=False)

    def canonical(self, answer):
        return canonical_math(answer)

    def grade(self, answer, problem):
        return math_answers_match(answer, problem.gold)


class ChoiceTask(RecordTask):
    """Multiple choice: options from a list field (``options``/``choices``, or ``choices.text`` as in
    ARC) or from letter fields ``A``..``E``; the gold is a letter."""

    name = "choice"
    prompt_kind = "choice"
    default_max_tokens = 512

    def __init__(self, question_field=None, answer_field=None, options_field: str | None = None):
        super().__init__(question_field, answer_field)
        self.options_field = options_field
        self._answer_field_given = answer_field is not None

    def check_fields(self, fields, source):
        if self.question_field not in fields:
            raise ValueError(f"{source}: the choice adapter needs a field {self.question_field!r}, but the "
                             f"records have only {sorted(fields)}")
        if self.options_field is None:
            self.options_field = next((f for f in ("options", "choices") if f in fields), None)
        if self.options_field is None and not {"A", "B", "C", "D"} <= set(fields):
            raise ValueError(f"{source}: the choice adapter needs an 'options' or 'choices' field or "
                             f"fields 'A'..'D', but the records have only {sorted(fields)}")
        if self.options_field is not None and self.options_field not in fields:
            raise ValueError(f"{source}: no field {self.options_field!r}; fields: {sorted(fields)}")
        if not self._answer_field_given:
            self.answer_field = next((f for f in ("answer", "answerKey", "label", "correct") if f in fields),
                                     "answer")
        if self.answer_field not in fields:
            raise ValueError(f"{source}: the choice adapter needs an answer field "
                             f"{self.answer_field!r}, but the records have only {sorted(fields)}")

    def _options(self, record, problem_id) -> tuple[str, ...]:
        if self.options_field is None:
            options = [record[k] for k in LETTERS if record.get(k) not in (None, "")]
        else:
            options = record.get(self.options_field)
            if isinstance(options, Mapping):  # ARC: {"text": [...], "label": [...]}
                options = options.get("text")
        if not isinstance(options, (list, tuple)) or not 2 <= len(options) <= len(LETTERS):
            raise ValueError(f"problem {problem_id}: expected 2..{len(LETTERS)} options, got {options!r}")
        return tuple(str(o) for o in options)

    def from_record(self, record, problem_id):
        options = self._options(record, problem_id)
        raw = record.get(self.answer_field)
        letters = LETTERS[:len(options)]
        if isinstance(raw, bool) or raw is None:
            gold = None
        elif isinstance(raw, int):
            gold = letters[raw] if 0 <= raw < len(options) else None
        else:
            raw = str(raw).strip()
            gold = canonical_letter(raw, letters) if len(raw) <= 3 else None
            if gold is None and raw.isdigit() and int(raw) < len(options):
                gold = letters[int(raw)]
            if gold is None:
                matches = [i for i, o in enumerate(options) if canonical_text(o) == canonical_text(raw)]
                gold = letters[matches[0]] if matches else None
        if gold is None:
            raise ValueError(f"problem {problem_id}: answer {record.get(self.answer_field)!r} is not a letter "
                             f"in {letters}, a 0-based option index, or an option's text")
        return Problem(problem_id, _text(record, self.question_field, problem_id), gold, choices=options)

    def question_text(self, problem):
        lines = [problem.question.rstrip()]
        lines += [f"{LETTERS[i]}. {option}" for i, option in enumerate(problem.choices or ())]
        return "\n".join(lines)

    def extract(self, completion, problem=None):
        letters = LETTERS[:len(problem.choices)] if problem is not None and problem.choices else LETTERS
        letter = extract_letter(completion, letters)
        if letter is None and problem is not None and problem.choices:
            # No letter: accept the text of exactly one option stated as the answer.
            stated = canonical_text(extract_final(completion, numeric=False))
            matches = [i for i, o in enumerate(problem.choices) if canonical_text(o) == stated]
            letter = letters[matches[0]] if len(matches) == 1 else None
        return letter

    def canonical(self, answer):
        return canonical_letter(answer)


class GenericTask(RecordTask):
    """Any question/answer fields; numeric grading when the gold is a number, grading as mathematics
    (``math-verify``, as the ``math`` adapter) when the gold looks like LaTeX, else normalised exact
    match. A gold with a ``#### N`` line is reduced to ``N``."""

    name = "generic"
    prompt_kind = "text"

    def gold_from(self, record, problem_id):
        gold = _text(record, self.answer_field, problem_id)
        return (extract_after_hashes(gold) or gold).strip()

    def extract(self, completion, problem=None):
        numeric = problem is None or parse_number(problem.gold) is not None
        return extract_final(completion, numeric=numeric)

    def grade(self, answer, problem):
        if parse_number(problem.gold) is None and looks_like_latex(problem.gold):
            return math_answers_match(answer, problem.gold)
        return super().grade(answer, problem)


ADAPTERS = {"gsm8k": GSM8KTask, "math": MathTask, "choice": ChoiceTask, "generic": GenericTask}


def make_adapter(name: str, question_field: str | None = None, answer_field: str | None = None) -> RecordTask:
    """The adapter called ``name`` (a key of :data:`ADAPTERS`), with optional field overrides."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(ADAPTERS)} or 'arith'")
    return ADAPTERS[name](question_field, answer_field)


def detect_adapter(fields: Sequence[str], first: Mapping[str, Any] | None, source: str, *,
                   question_field: str | None = None, answer_field: str | None = None) -> RecordTask:
    """Pick the adapter for a dataset from its field names and first record.

    MATH when there are ``problem`` and ``solution``; multiple choice when there is a question and
    ``options``/``choices`` or ``A``..``D``; GSM8K when ``answer`` has a ``####`` line; otherwise the
    generic adapter, on the given fields or the first of :data:`QUESTION_FIELDS` / :data:`ANSWER_FIELDS`
    present.
    """
    fields = list(fields)
    fs = set(fields)
    if question_field is None and answer_field is None:
        if {"problem", "solution"} <= fs:
            return MathTask()
        if "question" in fs and (fs & {"options", "choices"} or {"A", "B", "C", "D"} <= fs):
            return ChoiceTask()
        if {"question", "answer"} <= fs and first is not None and "####" in str(first.get("answer", "")):
            return GSM8KTask()
    q = question_field or next((f for f in QUESTION_FIELDS if f in fs), None)
    a = answer_field or next((f for f in ANSWER_FIELDS if f in fs), None)
    if q is None or a is None:
        raise ValueError(f"{source}: cannot tell the task from the fields {sorted(fields)}; pass --task "
                         f"or --question-field/--answer-field")
    task = GenericTask(q, a)
    task.check_fields(fields, source)
    return task


def problem_ids(records: Sequence[Mapping[str, Any]], prefix: str) -> list[str]:
    """Each record's own id when an id field holds unique values, else ``"<prefix><index>"``."""
    if records:
        for name in ID_FIELDS:
            values = [r.get(name) for r in records]
            if all(isinstance(v, (str, int)) and not isinstance(v, bool) and str(v) for v in values):
                ids = [str(v) for v in values]
                if len(set(ids)) == len(ids):
                    return ids
    return [f"{prefix}{i}" for i in range(len(records))]


def _text(record: Mapping[str, Any], field: str, problem_id: str) -> str:
    value = record.get(field)
    if value is None:
        raise ValueError(f"problem {problem_id}: field {field!r} is empty")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, "g") if isinstance(value, float) else str(value)
    if not isinstance(value, str):
        raise TypeError(f"problem {problem_id}: field {field!r} should be text, got {type(value).__name__}")
    return value
