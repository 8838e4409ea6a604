"""The tiny model's training mix, built from the ``arith`` train split and the debate prompt builders.

Every prompt is made by :class:`arkfast.debate.PromptBuilder`, the code ``python -m arkfast.generate``
sends prompts through, so training and generation see the same token ids. The target is always the
problem's reference solution followed by ``<|im_end|>``, with the operands of its ``+`` and ``*`` steps
swapped at random (``Mix.swap``; the peers' solutions too). The mix:

``round1``
    the round-1 prompt (question + answer instruction) → the solution;
``shared``
    a round-2 prompt in the ``shared`` layout: the question and five peer solutions, a random agent's
    suffix → the correct solution. The peers mix correct solutions and wrong ones (see
    :func:`wrong_solution`), sometimes several peers sharing one mistake, so the model learns to
    recompute the steps and to side with a correct peer rather than to follow a crowd;
``classic``
    the same, in the ``classic`` layout (the agent's own previous turn, then four others);
``aggregator``
    the aggregator prompt over five final solutions → the correct solution;
``drill``
    arithmetic practice: the step lines of several train problems' solutions, one after another, with
    only each line's result (and the newline after it) as targets. The lines carry the arithmetic facts
    of the task at about three times the density of a solution under its question, the part of the
    task a small model learns slowest.
"""
from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence

from arkfast.debate import PromptBuilder, first_round_text
from arkfast.debate.prompts import (
    aggregator_text,
    classic_update_text,
    render_chat,
    shared_suffix,
    shared_transcript,
)
from arkfast.tasks import ArithTask, Problem
from arkfast.tasks.arith import apply_op
from arkfast.train import Example

_STEP_RE = re.compile(r"^(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)$")
MISTAKES = ("result", "operand", "operation", "skip", "answer")


@dataclasses.dataclass(frozen=True)
class Mix:
    """Relative weights of the example kinds (normalised when drawing), the number of agents whose
    answers a debate prompt shows, the lines of a drill, the probability ``swap`` of writing a ``+`` or
    ``*`` step with its operands swapped, and the range ``peer_accuracy`` the share of right peers of a
    debate prompt is drawn from."""

    round1: float = 0.3
    shared: float = 0.6
    classic: float = 0.05
    aggregator: float = 0.05
    drill: float = 0.0
    agents: int = 5
    drill_lines: int = 12
    swap: float = 0.5
    peer_accuracy: tuple[float, float] = (0.2, 1.0)

    def __post_init__(self) -> None:
        weights = (self.round1, self.shared, self.classic, self.aggregator, self.drill)
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"mix weights must be >= 0 with a positive sum, got {weights}")
        if self.agents < 2:
            raise ValueError(f"agents must be >= 2, got {self.agents}")
        low, high = self.peer_accuracy
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"peer_accuracy must be (low, high) with 0 <= low <= high <= 1, got {self.peer_accuracy}")
        if not 0.0 <= self.swap <= 1.0:
            raise ValueError(f"swap must be in [0, 1], got {self.swap}")
        if self.drill_lines < 1:
            raise ValueError(f"drill_lines must be >= 1, got {self.drill_lines}")

    def draw(self, rng: random.Random) -> str:
        kinds = ("round1", "shared", "classic", "aggregator", "drill")
        return rng.choices(kinds, weights=[getattr(self, k) for k in kinds])[0]


def parse_steps(solution: str) -> list[tuple[int, str, int]]:
    """``"7 + 5 = 12\\n12 - 3 = 9\\nAnswer: 9"`` → ``[(7, "+", 5), (12, "-", 3)]``."""
    steps = []
    for line in solution.splitlines()[:-1]:
        m = _STEP_RE.match(line.strip())
        if m is None:
            raise ValueError(f"not an arith solution step: {line!r}")
        steps.append((int(m.group(1)), m.group(2), int(m.group(3))))
    return steps


def _near(rng: random.Random, value: int) -> int:
    """A plausible slip: off by one or two, by ten, or one digit changed; never ``value`` itself."""
    while True:
        kind = rng.random()
        if kind < 0.5:
            new = value + rng.choice((-2, -1, 1, 2))
        elif kind < 0.75:
            new = value + rng.choice((-10, 10))
        else:
            digits = list(str(value))
            i = rng.randrange(len(digits))
            digits[i] = str(rng.randrange(10))
            new = int("".join(digits))
        if new != value and new >= 0:
            return new


def write_solution(start: int, steps: Sequence[tuple[str, int]], *, slip_at: int = -1,
                   rng: random.Random | None = None, answer: int | None = None) -> str:
    """A solution applying ``steps`` (``(op, operand)``) from ``start``, every step computed from the
    line before it; at step ``slip_at`` the stated result is a near miss (and the next steps carry
    it on). ``answer`` overrides the number on the answer line."""
    lines, value = [], start
    for i, (op, b) in enumerate(steps):
        new = apply_op(op, value, b)
        if i == slip_at:
            new = _near(rng, new)
        lines.append(f"{value} {op} {b} = {new}")
        value = new
    lines.append(f"Answer: {value if answer is None else answer}")
    return "\n".join(lines)


def wrong_solution(problem: Problem, rng: random.Random) -> str:
    """A solution to ``problem`` with one typical mistake (a wrong result carried on, a misread or
    misplaced operand, a wrong operation, a skipped step, or an answer line that does not match the
    steps), whose final answer differs from the gold."""
    steps = parse_steps(problem.meta["solution"])
    start, ops = steps[0][0], [(op, b) for _, op, b in steps]
    gold = int(problem.gold)
    for _ in range(20):
        kind = rng.choice(MISTAKES)
        i = rng.randrange(len(ops))
        if kind == "result":
            text = write_solution(start, ops, slip_at=i, rng=rng)
        elif kind == "operand":  # a near miss, or another number of the question read in its place
            others = [b for _, b in ops if b != ops[i][1]] + [start]
            b = rng.choice(others) if rng.random() < 0.5 else _near(rng, ops[i][1]) or 1
            changed = list(ops)
            changed[i] = (ops[i][0], b)
            text = write_solution(start, changed)
        elif kind == "operation":
            swap = {"+": "-", "-": "+", "*": "+", "/": "*"}
            changed = list(ops)
            changed[i] = (swap[ops[i][0]], ops[i][1])
            text = write_solution(start, changed)
        elif kind == "skip" and len(ops) > 1:
            text = write_solution(start, ops[:i] + ops[i + 1:])
        else:
            text = write_solution(start, ops, answer=_near(rng, gold))
        if int(text.rsplit(" ", 1)[-1]) != gold:
            return text
    return write_solution(start, ops, answer=gold + 1)


def swap_operands(solution: str, rng: random.Random, p: float) -> str:
    """``solution`` with each ``a + b`` / ``a * b`` step written ``b + a`` / ``b * a`` with probability
    ``p``: two equally right ways to write a step, so a model trained on both samples either one and
    looks up a different arithmetic fact for each (its slips then differ from sample to sample)."""
    lines = solution.split("\n")
    for i, line in enumerate(lines):
        m = _STEP_RE.match(line)
        if m is not None and m.group(2) in "+*" and rng.random() < p:
            lines[i] = f"{m.group(3)} {m.group(2)} {m.group(1)} = {m.group(4)}"
    return "\n".join(lines)


def peer_solutions(problem: Problem, rng: random.Random, n: int,
                   accuracy: tuple[float, float] = (0.2, 1.0)) -> list[str]:
    """``n`` peer solutions: each correct with a probability drawn per problem (uniform in
    ``accuracy``), the wrong ones sometimes repeating one shared mistake."""
    p_correct = rng.uniform(*accuracy)
    shared_mistake = wrong_solution(problem, rng) if rng.random() < 0.3 else None
    peers = []
    for _ in range(n):
        if rng.random() < p_correct:
            peers.append(problem.meta["solution"])
        elif shared_mistake is not None and rng.random() < 0.5:
            peers.append(shared_mistake)
        else:
            peers.append(wrong_solution(problem, rng))
    return peers


def _peers(problem: Problem, rng: random.Random, mix: Mix) -> list[str]:
    """The peer solutions a debate example shows, operands swapped as ``mix.swap`` says."""
    texts = peer_solutions(problem, rng, mix.agents, mix.peer_accuracy)
    return [swap_operands(t, rng, mix.swap) for t in texts] if mix.swap else texts


DRILL_PROMPT = "Work out each line."


def drill_example(builder: PromptBuilder, lines: Sequence[tuple[int, str, int]], eos: str) -> Example:
    """An arithmetic drill: ``lines`` (``(a, op, b)``) written ``a op b = c``, one per line, under the
    user message :data:`DRILL_PROMPT`; the targets are each line's result digits and the newline (or the
    end-of-turn token) after them, the rest is context."""
    completion: list[int] = []
    trained: list[bool] = []
    for i, (a, op, b) in enumerate(lines):
        end = "\n" if i + 1 < len(lines) else eos
        for text, target in ((f"{a} {op} {b} = ", False), (str(apply_op(op, a, b)), True), (end, True)):
            ids = builder.encode(text)
            completion += ids
            trained += [target] * len(ids)
    prompt = builder.encode(render_chat(builder.tokenizer, [{"role": "user", "content": DRILL_PROMPT}]))
    return Example(prompt, completion, trained=trained)


def build_examples(tokenizer, problems: Sequence[Problem], seed: int, mix: Mix = Mix(),
                   task: ArithTask | None = None) -> list[Example]:
    """One :class:`~arkfast.train.Example` per problem, of a kind drawn from ``mix`` (seeded)."""
    task = task or ArithTask()
    builder = PromptBuilder(tokenizer, task)
    rng = random.Random(seed)
    eos = tokenizer.eos_token
    examples = []
    for problem in problems:
        kind = mix.draw(rng)
        if kind == "round1":
            prompt = builder.first_round(problem)
        elif kind == "shared":
            prompt = builder.shared_round(problem, _peers(problem, rng, mix))[rng.randrange(mix.agents)]
        elif kind == "classic":
            prompt = builder.classic_round(problem, [_peers(problem, rng, mix)], rng.randrange(mix.agents))
        elif kind == "aggregator":
            prompt = builder.aggregator(problem, _peers(problem, rng, mix))
        else:
            picks = [problems[rng.randrange(len(problems))] for _ in range(mix.drill_lines)]
            lines = [step for p in picks for step in parse_steps(p.meta["solution"])]
            rng.shuffle(lines)
            examples.append(drill_example(builder, lines[:mix.drill_lines], eos))
            continue
        solution = problem.meta["solution"]
        if mix.swap:
            solution = swap_operands(solution, rng, mix.swap)
        examples.append(Example(prompt, builder.encode(solution + eos)))
    return examples


def tokenizer_corpus(problems: Sequence[Problem], seed: int, mix: Mix = Mix(),
                     task: ArithTask | None = None) -> list[str]:
    """Texts to train the BPE merges on: the messages of every prompt kind, weighted like ``mix``, cut
    at the special tokens as the chat template places them (BPE training does not split special tokens
    out of the text, so they are left out of it)."""
    task = task or ArithTask()
    rng = random.Random(seed)
    texts = []
    for problem in problems:
        kind = mix.draw(rng)
        peers = peer_solutions(problem, rng, mix.agents)
        if kind == "round1":
            user = first_round_text(task, problem)
        elif kind == "shared":
            user = shared_transcript(task, problem, peers) + shared_suffix(rng.randrange(mix.agents))
        elif kind == "classic":
            user = classic_update_text(task, problem, peers[1:])
        elif kind == "aggregator":
            user = aggregator_text(task, problem, peers)
        else:
            user = DRILL_PROMPT
        # "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{solution}<|im_end|>" in pieces
        texts += [f"user\n{user}", "\n", f"assistant\n{problem.meta['solution']}"]
    return texts
