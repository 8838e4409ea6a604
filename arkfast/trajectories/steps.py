"""Reasoning steps: character spans of a response, and the token ranges they map to.

A *step* is a half-open character span ``[start, end)`` of a response (Python ``str`` indices, so a
multi-byte character such as ``é``, an emoji or a CJK ideograph counts as one). Segmentation modes:

``line``
    One step per line (split at ``"\\n"``); the arith task's solutions are one equation per line.
``paragraph``
    One step per blank-line separated paragraph (a blank line holds only whitespace); GSM8K / MATH
    style solutions.
``regex:PATTERN``
    Each match of ``PATTERN`` (Python ``re``, ``re.MULTILINE``) separates two steps; e.g.
    ``regex:\\n(?=Step \\d)`` cuts before every ``Step N`` line.

Every step span is stripped of surrounding whitespace and steps left empty are dropped, so a step never
starts or ends with whitespace and the separators (newlines, blank lines, the regex matches) lie in
the gaps *between* the spans. Spans are sorted and disjoint.

Token ranges (:func:`encode_response`): the response is tokenized on its own (no special tokens)
with the fast tokenizer's offset mapping, and **a token belongs to the step holding its first
character** (its offset start). The gap after a step belongs to that step too: step ``k`` owns every
token whose first character lies in ``[steps[k].start, steps[k+1].start)`` (step 0 also owns the tokens
before its start, the last step every token after it). So the ranges tile the response's tokens, the
separator ``"\\n"`` after a step is that step's last token, and a token straddling a boundary (say
``"6\\n1"``) belongs to the step it starts in. The step's last token has therefore read the whole step:
it is where the process reward model reads its score.
"""
from __future__ import annotations

import bisect
import itertools
import re
from typing import Any

__all__ = ["DEFAULT_STEP_MODES", "STEP_MODES", "check_spans", "default_step_mode", "encode_response",
           "merge_tokenless_steps", "segment_steps", "token_starts", "validate_step_mode"]

STEP_MODES = ("line", "paragraph", "regex:PATTERN")
# Task name -> step mode; any task not named here is paragraph-segmented.
DEFAULT_STEP_MODES = {"arith": "line"}
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n\s*")


def default_step_mode(task_name: str) -> str:
    """The default segmentation of a task's solutions: ``"line"`` for ``arith``, else ``"paragraph"``."""
    return DEFAULT_STEP_MODES.get(task_name, "paragraph")


def validate_step_mode(mode: str) -> re.Pattern[str]:
    """The separator pattern of ``mode``; ``ValueError`` naming the mode when it is not one of
    ``line``, ``paragraph``, ``regex:PATTERN`` (with a valid, non-empty pattern)."""
    if mode == "line":
        return re.compile(r"\n")
    if mode == "paragraph":
        return _BLANK_LINE
    if isinstance(mode, str) and mode.startswith("regex:"):
        pattern = mode[len("regex:"):]
        if not pattern:
            raise ValueError("step mode 'regex:' needs a pattern after the colon, e.g. 'regex:\\n(?=Step)'")
        try:
            return re.compile(pattern, re.MULTILINE)
        except re.error as e:
            raise ValueError(f"step mode {mode!r}: bad regular expression ({e})") from None
    raise ValueError(f"unknown step mode {mode!r}; expected 'line', 'paragraph' or 'regex:PATTERN'")


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def segment_steps(text: str, mode: str) -> list[tuple[int, int]]:
    """The steps of ``text`` as sorted, disjoint ``[start, end)`` character spans (see the module
    docstring): pieces between separator matches, whitespace-stripped, empty ones dropped.

    >>> segment_steps("7 + 5 = 12\\n\\n12 - 3 = 9\\nAnswer: 9", "line")
    [(0, 10), (12, 22), (23, 32)]
    """
    sep = validate_step_mode(mode)
    spans, start = [], 0
    for m in sep.finditer(text):  # a zero-width match (a lookahead) cuts without consuming text
        spans.append(_strip(text, start, m.start()))
        start = m.end()
    spans.append(_strip(text, start, len(text)))
    return [(s, e) for s, e in spans if e > s]


def encode_response(tokenizer: Any, response: str,
                    steps: list[tuple[int, int]] | list[list[int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """``(token_ids, token_ranges)``: ``response`` tokenized alone (``add_special_tokens=False``), and
    per step its half-open token range ``[t0, t1)`` into ``token_ids``.

    A token belongs to the step holding its first character (its offset-mapping start, see
    :func:`token_starts`); the tokens between two steps (the separator) belong to the earlier one,
    those before the first step to the first, those after the last to the last. The ranges tile ``range(len(token_ids))``, so
    ``token_ranges[k][1] - 1`` is the last token of step ``k``, the one that has read all of it.

    Needs a fast tokenizer (``return_offsets_mapping``). ``ValueError`` when ``steps`` are not sorted
    disjoint non-empty spans inside ``response``, or when a step owns no token (it lies inside a token
    that starts in an earlier step; segment more coarsely, or :func:`merge_tokenless_steps`).
    """
    spans = [(int(s), int(e)) for s, e in steps]
    check_spans(spans, len(response))
    ids, firsts = token_starts(tokenizer, response)
    starts = [s for s, _ in spans]
    # owner[i]: the last step starting at or before token i's first character (0 when none does);
    # non-decreasing in i because firsts is
    owner = [max(bisect.bisect_right(starts, a) - 1, 0) for a in firsts]
    ranges, t = [], 0
    for k in range(len(spans)):
        t_end = bisect.bisect_right(owner, k)
        if t_end == t:
            raise ValueError(f"step {k} (characters {spans[k][0]}..{spans[k][1]}) owns no token: it lies "
                             f"inside a token that starts in the step before it")
        ranges.append((t, t_end))
        t = t_end
    if ranges:
        ranges[-1] = (ranges[-1][0], len(ids))
    return ids, ranges


def token_starts(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """``(token_ids, firsts)``: ``text`` tokenized without special tokens, and per token the character
    its first character is taken to be: its offset-mapping start, made non-decreasing (a token whose
    offset starts before the previous token's, such as a lone prefix piece some tokenizers give an empty
    ``(0, 0)`` span, counts as starting where the previous one does)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"token spans need a fast tokenizer (offset mapping); got {type(tokenizer).__name__}")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    firsts = list(itertools.accumulate((a for a, _ in enc["offset_mapping"]), max))
    return list(enc["input_ids"]), firsts


def merge_tokenless_steps(tokenizer: Any, response: str,
                          steps: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``steps`` with every step that would own no token (see :func:`encode_response`) merged into the
    step before it (a first step cannot be tokenless: it owns the response's first token)."""
    _, firsts = token_starts(tokenizer, response)
    merged: list[tuple[int, int]] = []
    for k, (s, e) in enumerate(steps):
        nxt = steps[k + 1][0] if k + 1 < len(steps) else len(response) + 1
        i = bisect.bisect_left(firsts, s)
        owns = i < len(firsts) and firsts[i] < nxt  # some token starts in [s, next step's start)
        if merged and not owns:
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return merged


def check_spans(spans: list[tuple[int, int]], length: int) -> None:
    """``ValueError`` unless ``spans`` are sorted, disjoint, non-empty ``[start, end)`` inside
    ``[0, length]``; the message names the first bad span."""
    prev = 0
    for k, (s, e) in enumerate(spans):
        if not 0 <= s < e <= length:
            raise ValueError(f"step {k} span [{s}, {e}) is empty or outside the response (length {length})")
        if s < prev:
            raise ValueError(f"step {k} span [{s}, {e}) overlaps or precedes the step before it (ends at {prev})")
        prev = e
