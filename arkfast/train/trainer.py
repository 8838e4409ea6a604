"""A lean training loop over packed rows: AdamW, cosine schedule with warm-up, gradient clipping,
periodic eval, atomic checkpoints.

One optimiser step sees ``batch_rows`` packed rows. Each row runs forward and backward on its own
(gradient accumulation), so the attention of one row never spans another. The loss of a step is the
token-weighted cross-entropy summed over every labelled position of its rows and divided by their
count, computed by :func:`arkfast.kernels.fused_linear_weighted_cross_entropy` straight from the
hidden states and the LM head (the ``[tokens, vocab]`` logits are never formed on GPU)::

    loss = sum_rows sum_t w_t * CE(h_t @ W^T, y_t) / sum_rows #{t : y_t != -100}

Dividing each row's ``"sum"`` loss by the step's total count (known on the host before the step, from
the host-side labels) makes the accumulated gradient exactly that of one big batch.

Everything random (row order) draws from a generator seeded by ``TrainConfig.seed``; with the same
model initialisation, data and thread count, two runs give bit-identical weights on CPU.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import torch

from arkfast.kernels.fused_linear_weighted_cross_entropy import fused_linear_weighted_cross_entropy
from arkfast.models import DecoderModel

from .checkpoint import save_checkpoint
from .data import IGNORE_INDEX, PackedRow


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train`.

    ``steps`` optimiser steps of ``batch_rows`` packed rows each. The learning rate warms up linearly
    over the first ``warmup_ratio`` of the steps to ``lr``, then follows a cosine down to
    ``lr * min_lr_ratio`` at the last step. ``grad_clip`` bounds the global gradient L2 norm (0: off).
    Weight decay applies to matrices only (not norms). Every ``eval_every`` steps (and at the end) the
    mean loss over the eval rows is measured; every ``save_every`` steps (0: only at the end) the model is
    saved to ``output_dir`` when one is given. ``stop_after`` ends the run (saving) after that many
    steps of the ``steps``-step schedule, reproducibly. ``time_limit_s`` stops early (saving) when the wall clock
    runs out; a run cut short that way is not reproducible step for step. ``num_threads`` sets
    ``torch.set_num_threads`` for the run (None: leave it). ``shuffle``: draw rows in a fresh random
    order each epoch; ``False`` visits them in the given order (cycling), for a curriculum.
    """

    steps: int = 1000
    batch_rows: int = 4
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 200
    log_every: int = 50
    save_every: int = 0
    output_dir: str | None = None
    seed: int = 0
    num_threads: int | None = None
    stop_after: int | None = None
    time_limit_s: float | None = None
    shuffle: bool = True
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("eval_every", "log_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int (0: off), got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0: off), got {self.grad_clip}")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads <= 0):
            raise ValueError(f"num_threads must be a positive int or None, got {self.num_threads!r}")
        if self.stop_after is not None and (not isinstance(self.stop_after, int)
                                            or not 1 <= self.stop_after <= self.steps):
            raise ValueError(f"stop_after must be an int in [1, steps={self.steps}] or None, got {self.stop_after!r}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be positive or None, got {self.time_limit_s}")

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup_ratio * self.steps)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimiser step ``step`` (0-based): linear warm-up from ``lr / warmup`` to
    ``lr`` over ``warmup_steps``, then ``min + (lr - min) * (1 + cos(pi * progress)) / 2`` with progress
    going from 0 (end of warm-up) to 1 (last step)."""
    warm = cfg.warmup_steps
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(cfg.steps - 1 - warm, 1)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + (cfg.lr - lo) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def row_loss_sum(model: DecoderModel, row: PackedRow, device: torch.device | str) -> torch.Tensor:
    """``sum_t w_t * CE_t`` over the labelled positions of one packed row (a 0-dim float32 tensor)."""
    input_ids, positions, labels, weights, ctx = row.to_device(device)
    hidden = model(input_ids, positions, ctx)  # [T, H]
    return fused_linear_weighted_cross_entropy(hidden, model.lm_head_weight, labels, weights,
                                               ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def evaluate(model: DecoderModel, rows: Sequence[PackedRow], device: torch.device | str = "cpu") -> float:
    """Mean weighted loss per labelled position over ``rows`` (one host sync at the end)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = sum(row.num_targets for row in rows)
    for row in rows:
        total += row_loss_sum(model, row, device).double()
    model.train(was_training)
    return float(total) / max(count, 1)


@dataclasses.dataclass
class TrainResult:
    """What a run did: per-step ``losses`` (logged steps only), ``evals`` as ``(step, loss)``, the
    number of ``steps`` taken and the wall-clock ``seconds``."""

    losses: list[tuple[int, float]]
    evals: list[tuple[int, float]]
    steps: int
    seconds: float
    stopped_early: bool = False


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for _, p in sorted(model.named_parameters()) if p.requires_grad and p.dim() >= 2]
    no_decay = [p for _, p in sorted(model.named_parameters()) if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _row_order(num_rows: int, generator: torch.Generator, shuffle: bool):
    """An endless stream of row indices: a fresh permutation of all rows per epoch, or 0, 1, ... again."""
    while True:
        yield from (torch.randperm(num_rows, generator=generator).tolist() if shuffle else range(num_rows))


def train(model: DecoderModel, train_rows: Sequence[PackedRow], cfg: TrainConfig,
          eval_rows: Sequence[PackedRow] = (), *, tokenizer=None,
          extra_files: dict[str, str] | None = None,
          log: Callable[[str], None] | None = print) -> TrainResult:
    """Train ``model`` in place on ``train_rows`` (see the module docstring); returns a :class:`TrainResult`.

    When ``cfg.output_dir`` is set, checkpoints go there with :func:`save_checkpoint` (``tokenizer``
    and ``extra_files`` included). ``log`` receives one line per ``log_every`` steps and per eval.
    """
    if not train_rows:
        raise ValueError("train_rows is empty")
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    log = log or (lambda line: None)
    device = torch.device(cfg.device)
    model.to(device).train()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                            eps=cfg.eps, foreach=False)
    order = _row_order(len(train_rows), torch.Generator().manual_seed(cfg.seed), cfg.shuffle)
    losses, evals = [], []
    start = time.perf_counter()
    stopped_early = False

    def save(step: int) -> None:
        if cfg.output_dir is not None:
            save_checkpoint(model, cfg.output_dir, tokenizer=tokenizer, extra_files=extra_files)
            log(f"step {step}: saved {cfg.output_dir}")

    last = cfg.stop_after or cfg.steps  # the final step evaluates and saves after the loop
    step = 0
    for step in range(cfg.steps):
        rows = [train_rows[next(order)] for _ in range(cfg.batch_rows)]
        count = max(sum(row.num_targets for row in rows), 1)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, cfg)
        step_loss = torch.zeros((), device=device)
        for row in rows:
            loss = row_loss_sum(model, row, device) / count
            loss.backward()
            step_loss += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=False)
        opt.step()
        opt.zero_grad(set_to_none=True)

        done = step + 1
        if cfg.log_every and (done % cfg.log_every == 0 or done == 1):
            # float() syncs with the device once per logged step, not per step.
            losses.append((done, float(step_loss)))
            log(f"step {done}/{cfg.steps}  loss {losses[-1][1]:.4f}  lr {learning_rate(step, cfg):.2e}  "
                f"{time.perf_counter() - start:.0f}s")
        if eval_rows and cfg.eval_every and done % cfg.eval_every == 0 and done != last:
            evals.append((done, evaluate(model, eval_rows, device)))
            log(f"step {done}: eval loss {evals[-1][1]:.4f}")
        if cfg.save_every and done % cfg.save_every == 0 and done != last:
            save(done)
        if cfg.stop_after is not None and done >= cfg.stop_after:
            stopped_early = done < cfg.steps
            break
        if cfg.time_limit_s is not None and time.perf_counter() - start > cfg.time_limit_s:
            stopped_early = done < cfg.steps
            if stopped_early:
                log(f"step {done}: time limit of {cfg.time_limit_s:.0f}s reached, stopping")
            break
    steps_done = step + 1
    if eval_rows:
        evals.append((steps_done, evaluate(model, eval_rows, device)))
        log(f"step {steps_done}: eval loss {evals[-1][1]:.4f}")
    save(steps_done)
    return TrainResult(losses=losses, evals=evals, steps=steps_done, seconds=time.perf_counter() - start,
                       stopped_early=stopped_early)

