"""Grading as mathematics (math-verify) in the ``math`` and ``generic`` adapters: a table of hard cases,
positive and negative, and the AgentArk failure mode (a gold cut to its last integer)."""
from __future__ import annotations

import threading
import time

import pytest

from arkfast.tasks import GenericTask, GSM8KTask, MathTask, Problem, looks_like_latex, math_answers_match

pytest.importorskip("math_verify")

# (gold, predicted answer, equal?)
HARD_CASES = [
    # fractions, decimals and roots written several ways
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("\\frac{\\sqrt2}{2}", "\\sqrt{2}/2", True),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\frac{1}{3}", "0.333", False),
    ("\\pi", "3.14", False),
    ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("2\\sqrt{3}", "3\\sqrt{2}", False),
    # expressions
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2+2x+1", "(x-1)^2", False),
    ("y = 2x", "2x", True),
    # intervals, sets, tuples
    ("[1, 3)", "[1,3)", True),
    ("(1, 3]", "[1, 3)", False),
    ("(-\\infty, 2]", "(-\\infty,2]", True),
    ("\\{1, 2\\}", "\\{2, 1\\}", True),
    ("\\{1, 2\\}", "\\{1, 3\\}", False),
    ("(1, 2)", "(2, 1)", False),
    # units and \text{}
    ("10\\text{ cm}", "10", True),
    ("90^\\circ", "90", True),
    ("\\text{(B)}", "B", True),
    ("\\text{Evelyn}", "Evelyn", True),
    ("\\text{Evelyn}", "Alice", False),
    # the exact numeric path decides between two numbers
    ("1,000", "1000", True),
    ("-3/4", "-0.75", True),
    ("3", "3.0", True),
    ("0.1", "0.10000001", False),
    # no answer
    ("5", None, False),
    ("\\frac{1}{2}", "", False),
]


@pytest.mark.parametrize("gold, pred, equal", HARD_CASES)
def test_hard_cases(gold, pred, equal):
    assert math_answers_match(pred, gold) is equal
    task, problem = MathTask(), Problem("p", "q", gold)
    assert task.grade(pred, problem) is equal


# AgentArk reduces a GSM8K / MATH gold to its last integer, losing signs, decimals and thousands: a
# gold of -3 then accepts 3, 2.5 accepts 5, and 1,000 accepts 000. Each row: the gold, answers that are
# right, answers the cut gold would accept that are wrong.
CUT_GOLDS = [
    ("-3", ["-3", "−3", "$-3$", "-3.0", "\\boxed{-3}"], ["3", "+3"]),
    ("2.5", ["2.5", "5/2", "\\frac{5}{2}", "2.50"], ["5", "2", "25"]),
    ("1,000", ["1000", "1,000", "1000.0", "$1,000$"], ["000", "1", "0"]),
]


@pytest.mark.parametrize("gold, right, wrong", CUT_GOLDS)
def test_a_gold_is_never_cut_to_its_last_integer(gold, right, wrong):
    problem = Problem("p", "q", gold)
    for task in (MathTask(), GenericTask(), GSM8KTask()):
        for answer in right:
            completion = f"Working it out step by step.\nThe answer is {answer}."
            extracted, correct = task.score(completion, problem)
            assert correct, (task.name, gold, answer, extracted)
        for answer in wrong:
            completion = f"Working it out step by step.\nThe answer is {answer}."
            extracted, correct = task.score(completion, problem)
            assert not correct, (task.name, gold, answer, extracted)


def test_math_task_scores_boxed_completions():
    problem = Problem("p", "q", "\\frac{\\sqrt{3}}{2}")
    task = MathTask()
    assert task.score("so $\\sin 60^\\circ = \\boxed{\\sqrt{3}/2}$", problem) == ("\\sqrt{3}/2", True)
    assert task.score("so the value is \\boxed{\\frac{1}{2}}", problem) == ("\\frac{1}{2}", False)


def test_generic_task_grades_latex_golds_as_math():
    task = GenericTask()
    assert looks_like_latex("\\frac{1}{2}") and looks_like_latex("x^2") and not looks_like_latex("Paris")
    assert task.grade("0.5", Problem("p", "q", "\\frac{1}{2}"))
    assert task.grade("[1,3)", Problem("p", "q", "[1, 3)")) is False  # no LaTeX markup: text match
    assert task.grade("paris", Problem("p", "q", "Paris"))  # plain text: normalised exact match


def test_time_limit_stops_a_pathological_comparison():
    tower = "2^{2^{2^{2^{2^{2^{10}}}}}}"
    start = time.monotonic()
    assert math_answers_match("1", tower, timeout_seconds=1) is False
    assert time.monotonic() - start < 10  # each of the two parses and the comparison stops after 1 s


def test_outside_the_main_thread_grading_still_works():
    results = []
    thread = threading.Thread(target=lambda: results.append(
        (math_answers_match("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"), math_answers_match("3", "-3"))))
    thread.start()
    thread.join()
    assert results == [(True, False)]
