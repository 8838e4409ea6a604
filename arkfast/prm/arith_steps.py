"""The exact step checker of the built-in ``arith`` task: which steps of a solution are right.

An ``arith`` solution is one equation per line and a final answer line (see
:mod:`arkfast.tasks.arith`)::

    7 + 5 = 12
    12 - 3 = 9
    Answer: 9

Step ``k`` of a response (its ``k``-th step span, 0-based) is **right** when

* it is an equation ``a op b = c`` (``op`` one of ``+ - * /``, integers) that holds (``/`` is exact
  integer division: ``b != 0`` and ``a == b * c``), the reference solution has an equation at line
  ``k``, and ``c`` equals the reference's result at line ``k`` (operands may come in either order and
  the equation may be written differently, only its value must agree); or
* it is the answer line ``Answer: N`` and ``N`` equals the reference's answer (wherever it stands).

Anything else is wrong: a line that parses as neither, an equation that does not hold, a result that
differs from the reference's at that step, an equation beyond the reference's last one. The *first
error* of a response is its first step that is not right (``None`` when every step is right).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from arkfast.tasks.arith import ANSWER_PREFIX

__all__ = ["ReferenceSolution", "check_steps", "first_error", "parse_equation", "reference_solution"]

_INT = r"([-+]?\d+)"
_EQUATION_RE = re.compile(rf"{_INT}\s*([-+*/])\s*{_INT}\s*=\s*{_INT}\.?")
_ANSWER_RE = re.compile(rf"{re.escape(ANSWER_PREFIX.strip())}\s*{_INT}\.?")


def parse_equation(line: str) -> tuple[int, str, int, int] | None:
    """``(a, op, b, c)`` for a line ``"a op b = c"`` (surrounding whitespace ignored), else ``None``."""
    m = _EQUATION_RE.fullmatch(line.strip())
    if m is None:
        return None
    return int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))


def _parse_answer(line: str) -> int | None:
    m = _ANSWER_RE.fullmatch(line.strip())
    return None if m is None else int(m.group(1))


def _holds(a: int, op: str, b: int, c: int) -> bool:
    if op == "/":
        return b != 0 and a == b * c
    return {"+": a + b, "-": a - b, "*": a * b}[op] == c


class ReferenceSolution:
    """A reference solution read into ``values`` (each equation line's result, in order) and
    ``answer`` (the ``Answer:`` line's number). ``ValueError`` for a text that is not one."""

    def __init__(self, text: str):
        lines = [line for line in text.strip().splitlines() if line.strip()]
        if not lines:
            raise ValueError("the reference solution is empty")
        answer = _parse_answer(lines[-1])
        if answer is None:
            raise ValueError(f"the reference solution's last line is not {ANSWER_PREFIX!r}N: {lines[-1]!r}")
        values = []
        for i, line in enumerate(lines[:-1]):
            eq = parse_equation(line)
            if eq is None or not _holds(*eq):
                raise ValueError(f"line {i + 1} of the reference solution is not a true equation: {line!r}")
            values.append(eq[3])
        self.values: tuple[int, ...] = tuple(values)
        self.answer: int = answer


def reference_solution(text: str) -> ReferenceSolution:
    """The :class:`ReferenceSolution` of ``text`` (an arith problem's ``meta["solution"]``)."""
    return ReferenceSolution(text)


def check_steps(response: str, steps: Sequence[Sequence[int]], solution: str | ReferenceSolution) -> list[bool]:
    """Per step span ``[start, end)`` of ``response``, whether it is right (see the module docstring).

    >>> check_steps("7 + 5 = 12\\n12 - 3 = 8\\nAnswer: 8", [(0, 10), (11, 21), (22, 31)],
    ...             "7 + 5 = 12\\n12 - 3 = 9\\nAnswer: 9")
    [True, False, False]
    """
    ref = solution if isinstance(solution, ReferenceSolution) else ReferenceSolution(solution)
    out = []
    for k, (start, end) in enumerate(steps):
        text = response[start:end]
        eq = parse_equation(text)
        if eq is not None:
            out.append(k < len(ref.values) and _holds(*eq) and eq[3] == ref.values[k])
        else:
            out.append(_parse_answer(text) == ref.answer)
    return out


def first_error(step_right: Sequence[bool]) -> int | None:
    """The index of the first ``False`` in ``step_right``, or ``None`` when there is none."""
    return next((k for k, ok in enumerate(step_right) if not ok), None)

