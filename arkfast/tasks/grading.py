"""Answer extraction and grading: pull the final answer out of a completion, normalise it, compare.

Extractors return the *raw* answer text (or ``None`` when the completion states none); the
normalisers turn a raw answer into a canonical string, and two answers agree when their canonical
strings are equal. The same canonical string keys the majority vote, so "3/4", "0.75" and
"\\frac{3}{4}" are one vote.

>>> extract_final("so 12 + 30 = 42.\\nThe answer is $42$.")
'42'
>>> canonical_number("1,000.50"), canonical_number("3/4") == canonical_number("0.75")
('2001/2', True)
>>> extract_letter("Both look close, but the answer is (C).")
'C'
"""
from __future__ import annotations

import re
import threading
from fractions import Fraction

__all__ = [
    "answers_match", "canonical_answer", "canonical_letter", "canonical_math", "canonical_number",
    "canonical_text", "extract_after_hashes", "extract_answer_is", "extract_boxed", "extract_final",
    "extract_last_number", "extract_letter", "first_number", "looks_like_latex", "math_answers_match",
    "parse_number",
]

# A number as people write it: optional sign and currency sign, digits with or without thousands
# separators, optional decimals, an optional "/ denominator" and an optional percent sign. The
# look-behind keeps "x2" and "12-3" from yielding "2" and "-3".
_NUMBER_RE = re.compile(
    r"(?<![\w.])[-+\u2212]?\\?\$?\s?"
    r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:\s?/\s?\d+(?:\.\d+)?)?"
    r"(?:\s?\\?%)?"
)
_PLAIN_NUMBER_RE = re.compile(r"([-+]?)(\d+(?:\.\d*)?|\.\d+)(?:/(\d+(?:\.\d*)?|\.\d+))?")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?:/\d+)?")
_LATEX_FRAC_RE = re.compile(r"([-+]?)\\[dt]?frac\{?([^{}]+?)\}?\{([^{}]+)\}")
_LATEX_FRAC_SHORT_RE = re.compile(r"([-+]?)\\[dt]?frac(\d)(\d)")
_ANSWER_IS_RE = re.compile(r"(?i:answer)\s*(?:(?i:is)\s*:?|:|=)\s*(.+)")
_HASHES_RE = re.compile(r"####\s*(.+)")
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_LATEX_RE = re.compile(r"\\[A-Za-z]+|\\[{}]|[\^_{}]")
# Answers longer than this are not handed to sympy (pathological input, or not an answer at all).
MAX_MATH_CHARS = 1000

LETTERS = "ABCDE"


# ----------------------------------------------------------------------------------------------
# Extractors: completion text -> raw answer text or None
# ----------------------------------------------------------------------------------------------

def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces matched."""
    best = None
    for key in ("\\boxed", "\\fbox"):
        start = text.rfind(key)
        if start >= 0 and (best is None or start > best[0]):
            best = (start, key)
    if best is None:
        return None
    i = best[0] + len(best[1])
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # "\boxed 5": the answer runs to the next space or "$"
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
    return None  # unbalanced: the completion was cut off inside the box


def extract_after_hashes(text: str) -> str | None:
    """The rest of the line after the last ``####`` (GSM8K's answer marker)."""
    matches = _HASHES_RE.findall(text)
    return _strip_answer(matches[-1]) if matches else None


def extract_answer_is(text: str) -> str | None:
    """The rest of the line after the last "answer is" / "answer:" / "Answer =" (any case)."""
    matches = _ANSWER_IS_RE.findall(text)
    return _strip_answer(matches[-1]) if matches else None


def extract_last_number(text: str) -> str | None:
    """The last number written in ``text`` (with its sign, separators, fraction bar, % and $)."""
    matches = _NUMBER_RE.findall(text)
    return matches[-1].strip() if matches else None


def first_number(text: str) -> str | None:
    """The first number written in ``text``, or ``None``."""
    m = _NUMBER_RE.search(text)
    return m.group(0).strip() if m else None


def extract_final(text: str, *, numeric: bool = True) -> str | None:
    """The final answer of a free-form completion, trying in order: the last ``\\boxed{}``, ``####
    x``, "answer is x", and then the last number (``numeric``) or the last non-empty line.

    With ``numeric``, an answer found by a marker is reduced to the number inside it ("42 apples"
    -> "42") when it is not a number already.
    """
    for extractor in (extract_boxed, extract_after_hashes, extract_answer_is):
        found = extractor(text)
        if found:
            if numeric and parse_number(found) is None:
                found = first_number(found) or (found if extractor is extract_boxed else None)
            if found:
                return found
    if numeric:
        return extract_last_number(text)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return _strip_answer(lines[-1]) if lines else None


def extract_letter(text: str, letters: str = LETTERS) -> str | None:
    """A multiple-choice letter: "answer is C" / "Answer: (c)", then ``\\boxed{B}``, then the last
    "(B)", then a line holding only the letter ("B." / "**B**"), then "option B"; the last match of
    the first pattern that matches wins. A bare lower-case letter counts only at the end of a line
    after "answer is" ("the answer is a bit" is not a choice)."""
    ls = re.escape(letters)
    lo = re.escape(letters.lower())
    patterns = [
        (rf"(?i:answer)\s*(?:(?i:is)\s*:?|:)\s*(?:\*\*)?\s*"
         rf"(?:\(([{ls}{lo}])\)|([{ls}])(?![\w'])|([{lo}])(?=[.)*]*\s*$))"),
        rf"\\boxed\{{\s*(?:\\text\{{)?([{ls}{lo}])\b",
        rf"\(([{ls}])\)",
        rf"(?m)^\s*(?:\*\*)?\(?([{ls}])\)?[.:)]?(?:\*\*)?\s*$",
        rf"(?i:option|choice)\s+\(?([{ls}])\b",
    ]
    for pattern in patterns:
        matches = re.findall(pattern, text, flags=re.MULTILINE)
        if matches:
            last = matches[-1]
            letter = next(g for g in last if g) if isinstance(last, tuple) else last
            return letter.upper()
    return None


def _strip_answer(s: str) -> str:
    """Trim an extracted answer: whitespace, bold markers, final full stops, wrapping ``$...$``."""
    s = s.strip().strip("*").strip().rstrip(". ")
    if len(s) >= 2 and s.startswith("$") and s.endswith("$") and s.count("$") == 2:
        s = s[1:-1].strip().rstrip(". ")
    return s.strip()


# ----------------------------------------------------------------------------------------------
# Normalisers: raw answer -> canonical string (or None when it cannot be read)
# ----------------------------------------------------------------------------------------------

def parse_number(s: str) -> Fraction | None:
    """``s`` as an exact number, or ``None``: "1,234" = 1234, "-3/4" = "-0.75", "$5" = "5%" = "5.0" =
    5, "\\frac{3}{4}" = 3/4. Commas must be thousands separators ("1,5" is not a number)."""
    t = s.strip().replace("\u2212", "-")
    for junk in ("\\$", "$", "\\%", "%", "\\!", "\\,", "{,}", "\\ "):
        t = t.replace(junk, "")
    t = t.replace(" ", "").rstrip(".")
    t = _LATEX_FRAC_SHORT_RE.sub(r"\1\2/\3", t)
    m = _LATEX_FRAC_RE.fullmatch(t)
    if m:
        t = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    if "," in t:
        if not _THOUSANDS_RE.fullmatch(t):
            return None
        t = t.replace(",", "")
    m = _PLAIN_NUMBER_RE.fullmatch(t)
    if m is None:
        return None
    sign, num, den = m.groups()
    value = Fraction(num)
    if den is not None:
        den_value = Fraction(den)
        if den_value == 0:
            return None
        value /= den_value
    return -value if sign == "-" else value


def canonical_number(s: str | None) -> str | None:
    """``s`` parsed by :func:`parse_number` and written back as "n" or "p/q" (lowest terms)."""
    if s is None:
        return None
    value = parse_number(s)
    if value is None:
        return None
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def canonical_text(s: str | None) -> str | None:
    """Case-folded, whitespace-collapsed, without wrapping quotes/``$``/``\\text{}`` or a final stop."""
    if s is None:
        return None
    t = _TEXT_WRAPPER_RE.sub(r"\1", s.strip())
    t = t.strip().strip("$").strip("\"'`*").strip()
    t = t.rstrip(".").strip()
    t = " ".join(t.split()).casefold()
    return t or None


def canonical_math(s: str | None) -> str | None:
    """A LaTeX answer in a light canonical form: a number if it reads as one, else without spaces,
    ``\\left``/``\\right``, ``\\dfrac``/``\\tfrac`` (as ``\\frac``), ``\\text{}`` wrappers, ``^{2}`` -> ``^2``."""
    if s is None:
        return None
    number = canonical_number(s)
    if number is not None:
        return number
    t = _TEXT_WRAPPER_RE.sub(r"\1", s.strip())
    for old, new in (("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
                     ("\\!", ""), ("\\,", ""), ("\\;", ""), ("$", "")):
        t = t.replace(old, new)
    t = re.sub(r"\^\{(\w)\}", r"^\1", t)
    t = "".join(t.split()).rstrip(".")
    return t or None


def canonical_letter(s: str | None, letters: str = LETTERS) -> str | None:
    """A choice letter in upper case, from "b", "(B)", "B." or a sentence ("the answer is B")."""
    if s is None:
        return None
    t = s.strip().strip("*").strip()
    m = re.fullmatch(rf"\(?([{letters}{letters.lower()}])\)?[.:)]?", t)
    if m:
        return m.group(1).upper()
    return extract_letter(t, letters)


def canonical_answer(s: str | None) -> str | None:
    """A number's canonical form if ``s`` reads as one, else :func:`canonical_text`."""
    number = canonical_number(s) if s is not None else None
    return number if number is not None else canonical_text(s)


def looks_like_latex(s: str | None) -> bool:
    """Whether ``s`` holds LaTeX markup (a ``\\command``, an escaped brace, ``^``, ``_`` or braces)."""
    return s is not None and _LATEX_RE.search(s) is not None


def math_answers_match(pred: str | None, gold: str | None, *, timeout_seconds: int = 5) -> bool:
    """Whether two extracted answers are the same mathematics.

    Numbers are compared exactly first (:func:`parse_number`: "1,000" = 1000, "-3/4" = -0.75,
    "\\frac{1}{2}" = 0.5): when both answers read as numbers, that decides. Otherwise equal canonical
    forms (:func:`canonical_math`) match, and the rest goes to ``math-verify``, which parses LaTeX and
    plain expressions into sympy and compares them as expressions, intervals, sets, tuples, equations
    (``y = 2x`` vs ``2x``), with ``\\text{}`` and units stripped: ``\\sqrt{2}/2`` =
    ``\\frac{\\sqrt2}{2}``, ``[1, 3)`` = ``[1,3)``, ``\\{1, 2\\}`` = ``\\{2, 1\\}``.

    Each parse and comparison is limited to ``timeout_seconds`` (math-verify's SIGALRM guard; a
    pathological ``2^{2^{2^{...}}}`` is then unequal). Signals exist only in the main thread: in any
    other thread math-verify runs without its time limit, and answers over :data:`MAX_MATH_CHARS`
    characters are never handed to sympy. Raises ``ImportError`` when math-verify is needed but not
    installed.
    """
    p, g = canonical_math(pred), canonical_math(gold)
    if p is None or g is None:
        return False
    if p == g:
        return True
    if parse_number(pred) is not None and parse_number(gold) is not None:
        return False  # two numbers: the exact comparison above is the answer
    if len(pred) > MAX_MATH_CHARS or len(gold) > MAX_MATH_CHARS:
        return False
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    except ImportError as e:
        raise ImportError("grading LaTeX answers needs math-verify: pip install math-verify") from e
    limit = timeout_seconds if threading.current_thread() is threading.main_thread() else None
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    # The answers are already extracted: "$...$" makes math-verify read each as one LaTeX expression.
    gold_parsed = parse(f"${gold.strip()}$", config, parsing_timeout=limit)
    pred_parsed = parse(f"${pred.strip()}$", config, parsing_timeout=limit)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=limit))


def answers_match(pred: str | None, gold: str | None) -> bool:
    """Whether two free-form answers agree: numerically if both are numbers, else as normalised text."""
    p, g = canonical_answer(pred), canonical_answer(gold)
    return p is not None and p == g
