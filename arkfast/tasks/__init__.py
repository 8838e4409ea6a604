"""Tasks: problems with gold answers, how to pose them, and how to grade an answer.

    from arkfast.tasks import load_problems
    task, problems = load_problems("gsm8k_test.jsonl")          # adapter detected from the fields
    answer, correct = task.score(completion_text, problems[0])

Built in: ``arith`` (generated multi-step arithmetic word problems, :mod:`arkfast.tasks.arith`).
Adapters for files and hub datasets: ``gsm8k``, ``math``, ``choice`` (multiple choice), ``generic``.
"""
from .adapters import ADAPTERS, ChoiceTask, GenericTask, GSM8KTask, MathTask, RecordTask, detect_adapter
from .arith import ArithConfig, ArithTask, arith_problems, arith_split_of
from .grading import (
    answers_match,
    canonical_answer,
    canonical_letter,
    canonical_math,
    canonical_number,
    canonical_text,
    extract_answer_is,
    extract_boxed,
    extract_final,
    extract_last_number,
    extract_letter,
    looks_like_latex,
    math_answers_match,
    parse_number,
)
from .loading import load_problems, load_records, validate_json_file
from .problem import Problem, Task

TASK_NAMES = ("arith", *ADAPTERS)

__all__ = [
    "ADAPTERS",
    "TASK_NAMES",
    "ArithConfig",
    "ArithTask",
    "ChoiceTask",
    "GSM8KTask",
    "GenericTask",
    "MathTask",
    "Problem",
    "RecordTask",
    "Task",
    "answers_match",
    "arith_problems",
    "arith_split_of",
    "canonical_answer",
    "canonical_letter",
    "canonical_math",
    "canonical_number",
    "canonical_text",
    "detect_adapter",
    "extract_answer_is",
    "extract_boxed",
    "extract_final",
    "extract_last_number",
    "extract_letter",
    "load_problems",
    "load_records",
    "looks_like_latex",
    "math_answers_match",
    "parse_number",
    "validate_json_file",
]
