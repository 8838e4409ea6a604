"""``arith``: the built-in verifiable task, short multi-step arithmetic word problems.

Small and regular on purpose, so a ~1M-parameter character-level model can learn it on a CPU::

    Tom has 7 apples. He buys 5 more. He gives away 3. How many apples does he have now?

with the reference solution, one step per line, ending in the answer line every prompt asks for::

    7 + 5 = 12
    12 - 3 = 9
    Answer: 9

Problems are drawn from a seeded stream; each goes to ``train`` or ``test`` by a hash of its text
(so the splits never share a problem text, whatever the seed or sizes) and repeated texts are dropped,
so ``arith_problems("test", 100)`` is the first 100 of the stream's test problems: asking for more
extends the list without changing its head.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random

from .grading import canonical_number, extract_final
from .problem import Problem, Task

__all__ = ["ARITH_OPS", "ArithConfig", "ArithTask", "apply_op", "arith_problems", "arith_split_of",
           "make_arith_problem"]

ARITH_OPS = ("+", "-", "*", "/")
ANSWER_PREFIX = "Answer: "

_PEOPLE = (("Tom", "he", "his"), ("Ana", "she", "her"), ("Ben", "he", "his"), ("Mia", "she", "her"),
           ("Sam", "he", "his"), ("Eva", "she", "her"), ("Max", "he", "his"), ("Lea", "she", "her"))
_ITEMS = ("apples", "pens", "coins", "books", "cards", "eggs", "cups", "stamps")
# One sentence per operation; {n} is the operand, {P} the capitalised pronoun.
_STEP_TEMPLATES = {
    "+": ("{P} buys {n} more.", "{P} finds {n} more.", "{P} gets {n} more."),
    "-": ("{P} gives away {n}.", "{P} loses {n}.", "{P} sells {n}."),
    "*": ("Then {p} has {n} times as many.",),
    "/": ("{P} splits them into {n} equal piles and keeps one pile.",),
}


@dataclasses.dataclass(frozen=True)
class ArithConfig:
    """Knobs of the ``arith`` generator.

    Each problem starts from a value in ``[2, max_operand]`` and applies ``min_steps..max_steps``
    operations from ``ops``: ``+``/``-`` with operands in ``[1, max_operand]``, ``*``/``/`` with factors
    in ``[2, max_factor]`` (division only when exact); every intermediate value stays in
    ``[0, max_value]``. ``test_fraction`` of the problem texts (by hash) form the test split.
    ``num_train``/``num_test``: split sizes when none is asked for.
    """

    min_steps: int = 4
    max_steps: int = 5
    max_operand: int = 30
    max_factor: int = 5
    max_value: int = 99
    ops: tuple[str, ...] = ("+", "-", "*")
    test_fraction: float = 0.2
    seed: int = 0
    num_train: int = 5000
    num_test: int = 500

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_operand < 2:
            raise ValueError(f"max_operand must be >= 2, got {self.max_operand}")
        if self.max_factor < 2:
            raise ValueError(f"max_factor must be >= 2, got {self.max_factor}")
        if self.max_value < max(self.max_operand, 2 * self.max_factor):
            raise ValueError(f"max_value ({self.max_value}) must be >= max_operand ({self.max_operand}) "
                             f"and >= 2 * max_factor ({2 * self.max_factor})")
        bad = [op for op in self.ops if op not in ARITH_OPS]
        if bad or not self.ops:
            raise ValueError(f"ops must be a non-empty subset of {ARITH_OPS}, got {self.ops!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.num_train < 0 or self.num_test < 0:
            raise ValueError(f"split sizes must be >= 0, got {self.num_train}, {self.num_test}")


def arith_split_of(text: str, test_fraction: float) -> str:
    """``"test"`` or ``"train"``, from the first 8 bytes of the SHA-256 of the problem text."""
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return "test" if h < test_fraction * 2 ** 64 else "train"


def apply_op(op: str, a: int, b: int) -> int:
    """``a op b`` for one of :data:`ARITH_OPS` (``/`` is integer division: the task divides exactly)."""
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]


def _choices(op: str, value: int, cfg: ArithConfig) -> list[int]:
    """The operands ``op`` may take from ``value`` keeping the result in ``[0, max_value]``."""
    if op == "+":
        return list(range(1, min(cfg.max_operand, cfg.max_value - value) + 1))
    if op == "-":
        return list(range(1, min(cfg.max_operand, value) + 1))
    if op == "*":
        return [b for b in range(2, cfg.max_factor + 1) if value * b <= cfg.max_value]
    return [b for b in range(2, cfg.max_factor + 1) if value % b == 0 and value > 0]


def make_arith_problem(rng: random.Random, cfg: ArithConfig) -> tuple[str, str, int]:
    """Draw one problem: ``(question, reference solution, answer)``."""
    name, pronoun, _ = rng.choice(_PEOPLE)
    item = rng.choice(_ITEMS)
    value = rng.randint(2, cfg.max_operand)
    sentences = [f"{name} has {value} {item}."]
    lines = []
    for _ in range(rng.randint(cfg.min_steps, cfg.max_steps)):
        options = [(op, c) for op in cfg.ops if (c := _choices(op, value, cfg))]
        op, operands = rng.choice(options)  # "+" or "-" always has an operand: value is in [0, max]
        b = rng.choice(operands)
        new = apply_op(op, value, b)
        template = rng.choice(_STEP_TEMPLATES[op])
        sentences.append(template.format(n=b, p=pronoun, P=pronoun.capitalize()))
        lines.append(f"{value} {op} {b} = {new}")
        value = new
    sentences.append(f"How many {item} does {pronoun} have now?")
    lines.append(f"{ANSWER_PREFIX}{value}")
    return " ".join(sentences), "\n".join(lines), value


def arith_problems(split: str = "test", n: int | None = None, config: ArithConfig | None = None) -> list[Problem]:
    """The first ``n`` problems of ``split`` (``"train"`` or ``"test"``) of the seeded stream.

    ``n`` defaults to ``config.num_train`` / ``config.num_test``. Each problem's ``meta`` holds the
    reference ``solution`` and its number of ``steps``; ids are ``arith-<split>-<index>``.
    """
    cfg = config or ArithConfig()
    if split not in ("train", "test"):
        raise ValueError(f"arith split must be 'train' or 'test', got {split!r}")
    n = (cfg.num_test if split == "test" else cfg.num_train) if n is None else n
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(cfg.seed)
    seen: set[str] = set()
    out: list[Problem] = []
    draws, max_draws = 0, 200 * n + 10_000
    while len(out) < n:
        draws += 1
        if draws > max_draws:
            raise ValueError(f"could not draw {n} distinct {split} problems in {max_draws} tries; widen "
                             f"the ArithConfig ranges or ask for fewer")
        question, solution, answer = make_arith_problem(rng, cfg)
        if question in seen or arith_split_of(question, cfg.test_fraction) != split:
            continue
        seen.add(question)
        out.append(Problem(f"arith-{split}-{len(out)}", question, str(answer),
                           meta={"solution": solution, "steps": solution.count("\n")}))
    return out


class ArithTask(Task):
    """Grades ``arith`` completions: the last "Answer: N" line (else the last number) against gold."""

    name = "arith"
    prompt_kind = "arith"
    default_max_tokens = 96

    def __init__(self, config: ArithConfig | None = None):
        self.config = config or ArithConfig()

    def extract(self, completion, problem=None):
        return extract_final(completion, numeric=True)

    def canonical(self, answer):
        return canonical_number(answer)
