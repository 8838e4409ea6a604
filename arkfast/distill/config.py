"""The distillation run's settings: one validated dataclass, built from flags, a config file, or code.

:class:`DistillConfig` holds every setting of ``python -m arkfast.distill``; its field names are the
flags' (``--row-tokens`` is ``row_tokens``), so a ``--config`` file (JSON, or YAML when PyYAML is
installed) uses the same keys. :meth:`DistillConfig.resolved` fills in the defaults that depend on
the machine or the working directory (device, precision, data files, output folder).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .weights import PAD_WEIGHTINGS

__all__ = ["MODES", "PRECISIONS", "DistillConfig", "default_data", "load_config_file", "parse_span_weights"]

MODES = ("rsft", "da", "pad", "correct", "graph", "grpo")
SPANS = ("steps", "answer")
PRECISIONS = ("fp32", "bf16")

# Settings whose change alters the loss curve: a resumed run must use the same ones.
CURVE_KEYS = ("mode", "model", "pad_weighting", "pad_clip", "epochs", "steps", "row_tokens", "batch_rows",
              "micro_batch_rows", "lr", "min_lr_ratio", "warmup_ratio", "weight_decay", "betas", "eps",
              "grad_clip", "seed", "precision", "gradient_checkpointing", "threads")
# ... and those of --mode grpo, part of its runs' settings only (other modes' checkpoints stay as they were)
GRPO_CURVE_KEYS = ("prm", "grpo_group", "grpo_prompts", "grpo_updates", "grpo_temperature", "grpo_max_tokens",
                   "grpo_credit", "grpo_softmin_temperature", "grpo_advantage", "grpo_clip", "grpo_kl",
                   "grpo_prm_coef", "grpo_outcome_coef")
GRPO_DEFAULT_STEPS = 100
# Curve settings added later: in a run's fingerprint only when they differ from their default, so runs
# made before they existed are still continued or reused.
OPTIONAL_CURVE_KEYS = {"span_weights": None, "continues": False, "graph_margin": 1.0, "graph_margin_weight": 0.1,
                       "graph_node_weight": 0.1}


def parse_span_weights(text: str) -> dict[str, float]:
    """``"steps=W1,answer=W2"`` (either part may be left out: weight 1) as ``{"steps": W1, "answer": W2}``;
    ``ValueError`` naming the bad part."""
    out = {name: 1.0 for name in SPANS}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, eq, value = part.partition("=")
        if not eq or name.strip() not in SPANS:
            raise ValueError(f"span weights {text!r}: expected steps=W1,answer=W2, got {part!r}")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"span weights {text!r}: {name.strip()} weight {value!r} is not a number") from None
    return out


def default_data(mode: str, root: str | Path | None = None) -> Path:
    """The default training file of ``mode`` under ``runs/arith-train/``: ``trajectories/<mode>.jsonl``
    for ``rsft``/``da``/``correct``, the PRM-scored ``prm/scored/pad.jsonl`` for ``pad``, the unscored
    ``trajectories/pad.jsonl`` for ``graph``, and for ``grpo`` (which reads only the problems: prompts
    and gold answers) ``trajectories/pad.jsonl`` too, every problem with a trajectory, right or wrong."""
    from arkfast.workflow import stage_dir

    if mode == "grpo":
        return stage_dir("trajectories", root) / "pad.jsonl"
    if mode == "pad":
        return stage_dir("prm", root) / "scored" / "pad.jsonl"
    if mode == "graph":  # right and wrong answers of each problem, unscored
        return stage_dir("trajectories", root) / "pad.jsonl"
    return stage_dir("trajectories", root) / f"{mode}.jsonl"


def _positive_int(name: str, value: Any, *, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}{' or null' if allow_none else ''}, got {value!r}")


def _number(name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + ("" if high == math.inf else f" and <= {high}")
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")


@dataclasses.dataclass
class DistillConfig:
    """Every setting of a distillation run (the flags of ``python -m arkfast.distill``; ``--help`` says
    what each does). ``None`` means "the default": see :meth:`resolved`."""

    data: list[str] | None = None
    mode: str = "rsft"
    model: str | None = None
    output: str | None = None
    pad_weighting: str = "min"
    pad_clip: float = 1.0
    span_weights: dict[str, float] | None = None
    continues: bool = False
    graph_margin: float = 1.0
    graph_margin_weight: float = 0.1
    graph_node_weight: float = 0.1
    epochs: float = 3.0
    steps: int | None = None
    stop_after: int | None = None
    row_tokens: int = 1024
    batch_rows: int = 1
    micro_batch_rows: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False
    eval_every: int = 0
    eval_limit: int = 500
    eval_at_start: bool = False
    eval_temperature: float = 0.5
    eval_seed: int = 0
    eval_dataset: str | None = None
    eval_split: str = "test"
    device: str | None = None
    precision: str | None = None
    gradient_checkpointing: bool = False
    fsdp: bool = False
    fsdp_cpu_offload: bool = False
    threads: int | None = None
    tensorboard: bool = True
    plot: bool = True
    progress: bool = True
    # --mode grpo (online RL on engine rollouts; arkfast.distill.grpo_run)
    prm: str | None = None
    grpo_group: int = 8
    grpo_prompts: int = 8
    grpo_updates: int = 2
    grpo_temperature: float = 1.0
    grpo_max_tokens: int | None = None
    grpo_credit: str = "min"
    grpo_softmin_temperature: float = 0.1
    grpo_advantage: str = "rloo"
    grpo_clip: float = 0.2
    grpo_kl: float = 0.001
    grpo_prm_coef: float = 1.0
    grpo_outcome_coef: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        if self.data is not None:
            if not isinstance(self.data, (list, tuple)) or not self.data:
                raise ValueError(f"data must be a non-empty list of files, got {self.data!r}")
            self.data = [str(p) for p in self.data]
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.pad_weighting not in PAD_WEIGHTINGS:
            raise ValueError(f"pad_weighting must be one of {PAD_WEIGHTINGS}, got {self.pad_weighting!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        _number("pad_clip", self.pad_clip, 0.0, low_open=True)
        if isinstance(self.span_weights, str):
            self.span_weights = parse_span_weights(self.span_weights)
        if self.span_weights is not None:
            if not isinstance(self.span_weights, dict) or set(self.span_weights) - set(SPANS):
                raise ValueError(f"span_weights must map {' and '.join(SPANS)} to weights, got {self.span_weights!r}")
            self.span_weights = {name: self.span_weights.get(name, 1.0) for name in SPANS}
            for name, w in self.span_weights.items():
                _number(f"span_weights {name}", w, 0.0)
        _number("graph_margin", self.graph_margin, 0.0)
        _number("graph_margin_weight", self.graph_margin_weight, 0.0)
        _number("graph_node_weight", self.graph_node_weight, 0.0)
        _number("epochs", self.epochs, 0.0, low_open=True)
        for name in ("row_tokens", "batch_rows", "micro_batch_rows", "keep_checkpoints"):
            _positive_int(name, getattr(self, name))
        for name in ("steps", "stop_after", "threads"):
            _positive_int(name, getattr(self, name), allow_none=True)
        for name in ("save_every", "eval_every", "eval_limit"):
            _positive_int(name, getattr(self, name), allow_zero=True)
        if self.batch_rows % self.micro_batch_rows:
            raise ValueError(f"batch_rows ({self.batch_rows}) must be a multiple of micro_batch_rows "
                             f"({self.micro_batch_rows}): a step is a whole number of micro-batches")
        _number("lr", self.lr, 0.0, low_open=True)
        _number("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _number("warmup_ratio", self.warmup_ratio, 0.0, 0.999999)
        _number("weight_decay", self.weight_decay, 0.0)
        _number("eps", self.eps, 0.0, low_open=True)
        _number("grad_clip", self.grad_clip, 0.0)
        _number("eval_temperature", self.eval_temperature, 0.0)
        self.betas = tuple(self.betas)
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        for b in self.betas:
            _number("betas", b, 0.0, 0.999999999)
        for name in ("seed", "eval_seed"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")  # noqa: TRY004 (bad input)
        for name in ("resume", "continues", "eval_at_start", "gradient_checkpointing", "fsdp", "fsdp_cpu_offload",
                     "tensorboard", "plot", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")  # noqa: TRY004
        from .rewards import check_grpo_settings

        check_grpo_settings(self)

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimiser step."""
        return self.batch_rows // self.micro_batch_rows

    def resolved(self) -> DistillConfig:
        """A copy with every machine- or folder-dependent default filled in: ``model`` (the embedded
        tiny model), ``data`` (:func:`default_data` of the mode), ``output``
        (``runs/arith-train/distill/<mode>``), ``device`` (cuda when present), ``precision`` (bf16 on
        CUDA with fp32 master weights, else fp32), ``threads`` (1 on CPU: bit-reproducible, and on a
        shared 2-core machine the tiny model trained at 1,389 tokens/s with one thread against 113
        with two, where the second thread's barrier waits on a busy core; torch's own on CUDA)."""
        import torch

        from arkfast.generate import default_model_path
        from arkfast.workflow import stage_dir

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        grpo = self.mode == "grpo"
        return dataclasses.replace(
            self,
            steps=self.steps or (GRPO_DEFAULT_STEPS if grpo else None),
            prm=self.prm or (str(stage_dir("prm") / "model") if grpo else None),
            model=self.model or str(default_model_path()),
            data=self.data or [str(default_data(self.mode))],
            output=self.output or str(stage_dir("distill") / self.mode),
            device=device,
            precision=self.precision or ("bf16" if torch.device(device).type == "cuda" else "fp32"),
            threads=self.threads or (1 if torch.device(device).type == "cpu" else None),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def curve_settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues (they shape the loss curve)."""
        d = self.to_dict()
        keys = CURVE_KEYS + (GRPO_CURVE_KEYS if self.mode == "grpo" else ())
        out = {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in keys}
        out.update({k: d[k] for k, default in OPTIONAL_CURVE_KEYS.items() if d[k] != default})
        return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a ``--config`` file: a JSON object (``.json``) or a YAML mapping (``.yaml`` /
    ``.yml``, needs PyYAML). Keys are :class:`DistillConfig` field names; ``-`` may stand for ``_``.
    ``ValueError`` naming the file (and line, for JSON) for a bad file or an unknown key."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: YAML config files need PyYAML (pip install pyyaml); "
                             f"or write the config as JSON") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise ValueError(f"{where}: malformed YAML ({getattr(e, 'problem', e)})") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(values).__name__}")  # noqa: TRY004
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise ValueError(f"{path}: unknown setting {key!r}; expected one of {sorted(fields)}")
        out[name] = value
    return out
