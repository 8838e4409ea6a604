"""Self-correction records (``correct.jsonl``): an agent's own draft, and what it made of it a round later.

For every agent and every pair of consecutive rounds ``(r, r + 1)`` of a debate record where both
turns are usable (not ``error``/``truncated``/``unfinished``/``no_answer``, the rules of
:mod:`.build`), the transition of its answer is read from the turns' ``correct`` labels:

``corrects``   round r wrong, round r + 1 right: the committee's real self-corrections;
``continues``  round r right, round r + 1 right: the agent kept (or re-derived) a right answer.

Each becomes one trajectory record (the schema of :mod:`.schema`, plus two fields)::

    prompt      [{"role": "user", "content": <the self-refine revision prompt>}]: the question, the
                agent's round-r text as the only solution of the previous round, marked as its own,
                and the debate's update request (``shared_transcript`` + ``shared_suffix(0)``: the
                prompt ``generate --protocol self-refine`` sends for the revision)
    response    the agent's round r + 1 text; ``source`` its round and agent
    draft       {"response", "answer", "correct", "round"}: the round-r turn
    transition  "corrects" or "continues"

Wrong -> wrong and right -> wrong transitions give no record: the target must be right. The round
r + 1 text was written after reading the peers' answers; the student learns to write it from its own
draft alone. Per problem, a repeat of an earlier ``(draft, response)`` pair of normalised texts is
counted as ``duplicate`` and left out.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from .build import _first_round_prompt, _skip_reason, _task, normalise
from .steps import default_step_mode, merge_tokenless_steps, segment_steps

__all__ = ["TRANSITION_KINDS", "correction_records", "revision_prompt", "revision_prompt_ids"]

TRANSITION_KINDS = ("corrects", "continues")


def revision_prompt(task: Any, record: dict[str, Any], draft: str) -> list[dict[str, str]]:
    """The self-refine revision prompt of ``record``'s problem around ``draft``, as chat messages."""
    from arkfast.debate.prompts import shared_suffix, shared_transcript
    from arkfast.tasks import Problem

    choices = record.get("choices")
    problem = Problem(record["id"], record["question"], record["gold"],
                      choices=tuple(choices) if choices is not None else None, meta=record.get("meta") or {})
    return [{"role": "user", "content": shared_transcript(task, problem, [draft]) + shared_suffix(0)}]


def revision_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The token ids the engine is given for a :func:`revision_prompt`: like
    :meth:`arkfast.debate.PromptBuilder.shared_round`, the rendered chat is tokenized in two pieces, cut
    where the agent's suffix begins (one text tokenized whole can merge across that cut: on the tiny
    model's tokenizer it gives 64 ids where the engine's prompt has 68)."""
    from arkfast.debate.prompts import render_chat, shared_suffix

    content = messages[-1]["content"]
    suffix = shared_suffix(0)
    if len(messages) != 1 or not content.endswith(suffix):
        raise ValueError(f"not a self-refine revision prompt (one user turn ending {suffix!r})")
    text = render_chat(tokenizer, messages)
    cut = text.rfind(content) + len(content) - len(suffix)

    def encode(piece: str) -> list[int]:
        return list(tokenizer.encode(piece, add_special_tokens=False))

    return encode(text[:cut]) + encode(text[cut:])


def correction_records(record: dict[str, Any], where: str, tokenizer: Any, fingerprint: str,
                       step_mode: str | None, counts: Counter, tasks: dict[str, Any]) -> list[dict[str, Any]]:
    """The self-correction records of one debate record (see the module docstring); ``counts``
    gathers ``correct.<transition>`` and ``correct.duplicate``."""
    task = _task(record["task"], where, tasks)
    mode = step_mode or default_step_mode(record["task"])
    _first_round_prompt(task, record)  # the same problem checks as the other sets
    out, seen = [], set()
    rounds = record["rounds"]
    for r in range(len(rounds) - 1):
        drafts = {t["agent"]: t for t in rounds[r]}
        for turn in rounds[r + 1]:
            draft = drafts.get(turn["agent"])
            if draft is None or _skip_reason(record, draft) or _skip_reason(record, turn) or not turn["correct"]:
                continue
            kind = "continues" if draft["correct"] else "corrects"
            key = (normalise(draft["text"]), normalise(turn["text"]))
            if key in seen:
                counts["correct.duplicate"] += 1
                continue
            seen.add(key)
            counts[f"correct.{kind}"] += 1
            steps = merge_tokenless_steps(tokenizer, turn["text"], segment_steps(turn["text"], mode))
            out.append({
                "id": f"{record['id']}/r{r + 2}/a{turn['agent']}", "problem_id": record["id"], "task": record["task"],
                "gold": record["gold"], "answer": turn["answer"], "correct": True,
                "source": {"round": r + 2, "agent": turn["agent"]},
                "prompt": revision_prompt(task, record, draft["text"]), "response": turn["text"],
                "steps": [list(s) for s in steps], "step_scores": None, "tokenizer": fingerprint,
                "meta": dict(record.get("meta") or {}),
                "draft": {"response": draft["text"], "answer": draft["answer"], "correct": draft["correct"],
                          "round": r + 1},
                "transition": kind,
            })
    return out
