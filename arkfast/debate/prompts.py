"""Every prompt the debate protocols send, and how they become token ids.

All prompt text lives here. :data:`ANSWER_INSTRUCTIONS` says, per task kind (``Task.prompt_kind``), how
an agent must state its answer so the task's extractor finds it.

Layouts of a round r >= 2 prompt (one user turn each, rendered with the tokenizer's chat template and
``add_generation_prompt=True``):

``shared``
    ``[question][instruction][Agent 1's answer] ... [Agent N's answer][update request]`` is ONE
    transcript, identical for every agent of the problem, followed by a one-line suffix naming which
    answer was the agent's own. :meth:`PromptBuilder.shared_round` tokenizes the transcript part and
    the suffix part separately and concatenates the ids, so the transcript is a common token prefix of
    all N prompts whatever the tokenizer (the prefix cache stores and reads it once).
``classic``
    The original LLM-Debate conversation: the agent's own earlier turns as user/assistant messages, then
    a user turn with the other agents' latest answers that repeats the question.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from arkfast.tasks import Problem, Task

__all__ = ["ANSWER_INSTRUCTIONS", "PromptBuilder", "aggregator_text", "first_round_text", "render_chat"]

ANSWER_INSTRUCTIONS = {
    "arith": "End with a line 'Answer: <number>'.",
    "number": "Make sure to state your answer at the end, as a single number in the form \\boxed{answer}.",
    "math": "Make sure to state your final answer at the end, in the form \\boxed{answer}.",
    "choice": "Make sure to state your answer at the end, as the letter of one option in the form (X).",
    "text": "Make sure to state your answer at the end, in the form 'The answer is <answer>.'",
}

_PEERS_HEADER = "Solutions from the previous round:"
_SHARED_UPDATE = ("Using these solutions as additional advice, check each step and give an updated "
                  "solution.")
_SHARED_SUFFIX = "You are Agent {k}: the solution of Agent {k} above is your own."
_CLASSIC_PEERS_HEADER = "These are the solutions from the other agents:"
_CLASSIC_UPDATE = ("Using the reasoning of the other agents as additional advice, check your solution and "
                   "theirs step by step and give an updated solution to the problem.")
_AGGREGATOR_HEADER = "Final solutions from {n} agents:"
_AGGREGATOR_REQUEST = "Compare the solutions, decide which one is correct, and give the final answer."


def instruction(task: Task) -> str:
    try:
        return ANSWER_INSTRUCTIONS[task.prompt_kind]
    except KeyError:
        raise ValueError(f"task {task.name!r} has prompt_kind {task.prompt_kind!r}; expected one of "
                         f"{sorted(ANSWER_INSTRUCTIONS)}") from None


def first_round_text(task: Task, problem: Problem) -> str:
    """Round 1 (and single-agent) user message: the question, then how to state the answer."""
    return f"{task.question_text(problem)}\n{instruction(task)}"


def _solutions(label: str, texts: Sequence[str]) -> str:
    return "\n\n".join(f"{label.format(k=k)}\n{text.strip()}" for k, text in enumerate(texts, start=1))


def shared_transcript(task: Task, problem: Problem, previous: Sequence[str]) -> str:
    """The part of a ``shared`` round prompt every agent of the problem sees (it ends with a newline)."""
    return (f"{task.question_text(problem)}\n{instruction(task)}\n\n{_PEERS_HEADER}\n\n"
            f"{_solutions('Agent {k}:', previous)}\n\n{_SHARED_UPDATE} {instruction(task)}\n")


def shared_suffix(agent: int) -> str:
    """The per-agent end of a ``shared`` round prompt (``agent`` is 0-based; the text counts from 1)."""
    return _SHARED_SUFFIX.format(k=agent + 1)


def classic_update_text(task: Task, problem: Problem, others: Sequence[str]) -> str:
    """The user turn of a ``classic`` round: the other agents' answers, then the question again."""
    return (f"{_CLASSIC_PEERS_HEADER}\n\n{_solutions('One agent solution:', others)}\n\n{_CLASSIC_UPDATE}\n"
            f"The problem: {task.question_text(problem)}\n{instruction(task)}")


def aggregator_text(task: Task, problem: Problem, finals: Sequence[str]) -> str:
    """The aggregator's user message: the question and every agent's final solution ("Solution k")."""
    return (f"{task.question_text(problem)}\n\n{_AGGREGATOR_HEADER.format(n=len(finals))}\n\n"
            f"{_solutions('Solution {k}:', finals)}\n\n{_AGGREGATOR_REQUEST} {instruction(task)}")


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """``messages`` as prompt text: the tokenizer's chat template with the generation prompt, or,
    for a tokenizer without one, ``"<role>: <content>"`` lines ending in ``"assistant:"``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class PromptBuilder:
    """Builds the token ids of every prompt of a debate for one tokenizer and task."""

    def __init__(self, tokenizer: Any, task: Task):
        self.tokenizer = tokenizer
        self.task = task
        instruction(task)  # fail early on an unknown prompt kind

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def first_round(self, problem: Problem) -> list[int]:
        """Round 1 prompt ids; the same for every agent (they differ only by their sampling seed)."""
        return self.encode(render_chat(self.tokenizer, [{"role": "user",
                                                         "content": first_round_text(self.task, problem)}]))

    def shared_round(self, problem: Problem, previous: Sequence[str]) -> list[list[int]]:
        """One prompt per agent for a ``shared`` round after ``previous`` (every agent's last answer):
        ``ids(chat prefix + transcript) + ids(agent suffix + end of the chat template)``."""
        transcript = shared_transcript(self.task, problem, previous)
        prompts = []
        for agent in range(len(previous)):
            suffix = shared_suffix(agent)
            text = render_chat(self.tokenizer, [{"role": "user", "content": transcript + suffix}])
            cut = text.rfind(transcript + suffix) + len(transcript)
            if cut < len(transcript):
                raise ValueError("the chat template changed the message text; cannot split the shared prefix")
            prompts.append(self.encode(text[:cut]) + self.encode(text[cut:]))
        return prompts

    def classic_round(self, problem: Problem, history: Sequence[Sequence[str]], agent: int) -> list[int]:
        """Agent ``agent``'s ``classic`` prompt: ``history[r][a]`` is agent ``a``'s answer in round ``r``."""
        messages = [{"role": "user", "content": first_round_text(self.task, problem)}]
        for answers in history:
            messages.append({"role": "assistant", "content": answers[agent].strip()})
            others = [text for a, text in enumerate(answers) if a != agent]
            messages.append({"role": "user", "content": classic_update_text(self.task, problem, others)})
        return self.encode(render_chat(self.tokenizer, messages))

    def aggregator(self, problem: Problem, finals: Sequence[str]) -> list[int]:
        """The aggregator's prompt over the agents' final answers."""
        return self.encode(render_chat(self.tokenizer, [{"role": "user",
                                                         "content": aggregator_text(self.task, problem, finals)}]))
