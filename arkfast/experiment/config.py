"""The experiment's settings: one validated dataclass, built from the flags of ``python -m arkfast.experiment``.

Settings that shape the data or the training (the ``DATA_KEYS``) are stored in the experiment folder's
``config.json`` on the first run; a rerun with other values there is refused (it would mix two
experiments in one table). Seeds, evaluation seeds, the systems and the parallelism may change between
runs: more seeds add rows' samples, finished ones are reused.
"""
from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["ABLATIONS", "DATA_KEYS", "DISTILL_ARGV", "EXTRA_COMPARISONS", "REFINE_EVALS", "SPAN_WEIGHTS", "STUDENTS",
           "ExperimentConfig"]

# The trained systems: name -> (distill mode, what it is trained on).
STUDENTS = {
    "rsft": ("rsft", "R-SFT: one correct final-round debate trajectory per problem the committee got right"),
    "da": ("da", "DA: distinct correct debate trajectories, at most --max-per-problem per problem"),
    "pad": ("pad", "PAD: correct and incorrect debate trajectories, token weights from PRM step scores"),
    "rft-tokens": ("rsft", ("RFT matched to R-SFT in training tokens: distinct correct single-agent samples, "
                            "one per problem in turn, until R-SFT's token count is reached")),
    "rft-compute": ("da", ("RFT matched to DA in generation compute: agents x rounds single-agent samples per "
                           "problem, distinct correct ones kept as DA keeps them")),
    "graph": ("graph", ("graph-supervised (MAGDi): next-token loss on the right answers of pad.jsonl, margin "
                        "ranking and a correctness head on the pooled states of each problem's right vs wrong ones")),
    "graph-nt": ("graph", ("the graph rows with both terms off (--graph-margin-weight 0 --graph-node-weight 0): "
                           "next-token loss on the right answers only, the wrong ones context: the graph terms' control")),
    "correct": ("correct", ("R-SFT + self-correction: rsft.jsonl and the committee's revisions of its own drafts "
                            "into right answers (correct.jsonl: wrong -> right and right -> right); evaluated in "
                            "one pass and with self-refine")),
    "rsft-span": ("rsft", "R-SFT with span weights (reasoning steps and answer weighted apart, SPAN_WEIGHTS)"),
    "pad-online": ("grpo", ("PAD (online): the DA student of the same seed trained on by RL on the train problems, "
                            "engine rollouts rewarded by the outcome and the PRM's step scores (distill --mode grpo)")),
}

# The matched control of each debate-trained student.
CONTROLS = {"rsft": "rft-tokens", "da": "rft-compute", "pad": "rft-compute", "graph": "rft-compute",
            "correct": "rft-compute", "rsft-span": "rft-tokens", "pad-online": "rft-compute"}
# Paired differences that isolate one change: (method, reference).
ABLATIONS = (("rsft-span", "rsft"), ("correct-refine", "correct"), ("correct", "rsft"), ("graph", "graph-nt"),
             ("graph", "da"))
# Further comparisons of a row: online PAD against offline PAD and against DA, the student it starts from.
EXTRA_COMPARISONS = (("pad-online", "pad"), ("pad-online", "da"))
# The span weights of the rsft-span row (distill's --span-weights): the answer span twice the steps.
SPAN_WEIGHTS = "steps=1,answer=2"
# Systems also evaluated with generate --protocol self-refine (their row: "<system>-refine").
REFINE_EVALS = ("correct",)
# More distill flags per system. The self-correction student also learns to keep a right draft
# (continues): trained on corrections alone, it would learn that every draft it is shown is wrong.
DISTILL_ARGV = {"rsft-span": ["--span-weights", SPAN_WEIGHTS], "correct": ["--continues"],
                "graph-nt": ["--graph-margin-weight", "0", "--graph-node-weight", "0"]}

DATA_KEYS = ("model", "train_problems", "test_problems", "agents", "rounds", "sc_agents", "rft_samples",
             "temperature", "max_per_problem", "epochs", "lr", "row_tokens", "pad_weighting", "prm_label_limit",
             "prm_k", "prm_steps")


def _int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclasses.dataclass
class ExperimentConfig:
    """Every setting of one experiment (``python -m arkfast.experiment --help`` says what each does)."""

    output: str = "runs/experiment"
    model: str | None = None
    train_problems: int = 500
    test_problems: int = 500
    seeds: int = 3
    eval_seeds: int = 2
    agents: int = 5
    rounds: int = 2
    sc_agents: int = 5
    rft_samples: int | None = None
    temperature: float = 0.5
    max_per_problem: int = 4
    epochs: float = 2.0
    lr: float = 3e-4
    row_tokens: int = 1024
    pad_weighting: str = "min"
    prm_label_limit: int = 300
    prm_k: int = 4
    prm_steps: int = 100
    # online PAD (not data keys: they shape that row only, and its distill --resume checks them)
    online_steps: int = 100
    online_lr: float = 1e-4
    online_prm_coef: float = 0.25
    systems: tuple[str, ...] = tuple(STUDENTS)
    reuse_debates: str | None = None
    jobs: int = 2
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name, low in (("train_problems", 1), ("test_problems", 1), ("seeds", 1), ("eval_seeds", 1),
                          ("agents", 1), ("rounds", 1), ("sc_agents", 1), ("max_per_problem", 1),
                          ("row_tokens", 16), ("prm_label_limit", 1), ("prm_k", 1), ("prm_steps", 1), ("jobs", 1),
                          ("online_steps", 1)):
            _int(name, getattr(self, name), low)
        if self.rft_samples is None:
            self.rft_samples = self.agents * self.rounds  # as many samples as the debate's model calls
        _int("rft_samples", self.rft_samples, 1)
        if self.threads is not None:
            _int("threads", self.threads, 1)
        for name in ("epochs", "lr", "online_lr", "online_prm_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        from arkfast.distill import PAD_WEIGHTINGS

        if self.pad_weighting not in PAD_WEIGHTINGS:
            raise ValueError(f"pad_weighting must be one of {PAD_WEIGHTINGS}, got {self.pad_weighting!r}")
        self.systems = tuple(self.systems)
        unknown = [s for s in self.systems if s not in STUDENTS]
        if unknown or not self.systems:
            raise ValueError(f"systems must be some of {', '.join(STUDENTS)}, got {','.join(self.systems) or 'none'}")

    def data_settings(self, model: str) -> dict[str, Any]:
        """The settings a rerun must share with the experiment it continues (``model`` resolved)."""
        d = {**dataclasses.asdict(self), "model": model}
        return {k: d[k] for k in DATA_KEYS}

    def threads_per_job(self) -> int:
        """torch CPU threads of each parallel job: the given ``threads``, else the cores shared out."""
        import os

        return self.threads or max(1, (os.cpu_count() or 1) // self.jobs)
