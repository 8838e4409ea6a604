"""Training the PRM: binary cross-entropy on step labels at step-end positions, plus an optional
supervised contrastive term, over packed rows, with the project's AdamW + cosine schedule.

Loss of one optimiser step over its rows' ``S`` labelled steps (logit ``l_k``, soft label ``y_k``)::

    L = (1 / S) sum_k BCE(l_k, y_k) + lambda * L_con
    BCE(l, y) = -(y log sigmoid(l) + (1 - y) log(1 - sigmoid(l)))        (torch's with-logits form)

``L_con`` is SupCon (Khosla et al. 2020, arXiv 2004.11362) on the unit-norm projections ``z_k`` of the
step states, classes ``c_k = [y_k >= 1/2]``, temperature ``tau``, over the anchors ``A`` (steps with
at least one other step of their class in the same row)::

    L_con = (1 / |A|) sum_{i in A} -(1 / |P(i)|) sum_{p in P(i)} log( exp(z_i.z_p / tau) /
                                                                      sum_{a != i} exp(z_i.z_a / tau) )

computed within each packed row (rows run forward and backward one at a time, as in
:func:`arkfast.train.train`). Each row's sums are divided by the step's totals ``S`` and ``|A|``, known
on the host from the labels before the step, so the accumulated gradient is exactly that of one batch.
The projection head is a parameter of the PRM, so it is in the optimiser and trains (AgentArk's public
code builds its projector outside the optimiser, so its contrastive term never trains anything).
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from arkfast.train import TrainConfig, learning_rate

from .data import StepRow
from .model import ProcessRewardModel, save_prm

__all__ = ["PRMTrainConfig", "PRMTrainResult", "evaluate_rows", "row_losses", "supcon_sum", "train_prm"]


@dataclasses.dataclass
class PRMTrainConfig(TrainConfig):
    """:class:`arkfast.train.TrainConfig` (steps, rows per step, schedule, clipping, seed, saving)
    plus the PRM's terms: ``contrastive_weight`` (lambda; 0: BCE only) and ``contrastive_temperature``
    (tau). Defaults suit the tiny model on the arith task (see ``docs/prm.md``)."""

    steps: int = 200
    batch_rows: int = 2
    lr: float = 3e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    eval_every: int = 100
    log_every: int = 25
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.contrastive_weight >= 0:
            raise ValueError(f"contrastive_weight must be >= 0, got {self.contrastive_weight}")
        if not self.contrastive_temperature > 0:
            raise ValueError(f"contrastive_temperature must be positive, got {self.contrastive_temperature}")


def supcon_sum(z: torch.Tensor, classes: torch.Tensor, temperature: float) -> torch.Tensor:
    """The sum over anchors of the SupCon loss (module docstring): ``z [S, P]`` unit-norm float32,
    ``classes [S]`` bool. Anchors without a positive contribute nothing."""
    sim = z @ z.T / temperature  # [S, S]
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    # log softmax over a != i: mask the diagonal out with -inf before the logsumexp
    log_prob = sim - torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1, keepdim=True)  # [S, S]
    positive = (classes[:, None] == classes[None, :]) & ~eye  # [S, S]
    n_pos = positive.sum(1)  # [S]
    per_anchor = -(log_prob * positive).sum(1) / n_pos.clamp(min=1)  # [S]
    return per_anchor.masked_fill(n_pos == 0, 0.0).sum()


def _num_anchors(row: StepRow) -> int:
    """How many of the row's steps have another step of their class in the row (host tensors)."""
    hard = row.labels >= 0.5
    n1 = int(hard.sum())
    n0 = row.total_steps - n1
    return (n1 if n1 > 1 else 0) + (n0 if n0 > 1 else 0)


def row_losses(prm: ProcessRewardModel, row: StepRow, device: torch.device | str,
               temperature: float, contrastive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(BCE summed over the row's steps, SupCon summed over its anchors)``, 0-dim float32 tensors
    (the second is 0 when ``contrastive`` is off)."""
    input_ids, positions, ctx, step_index, labels = row.to_device(device)
    h = prm.step_hidden(input_ids, positions, ctx, step_index)  # [S, H]
    bce = F.binary_cross_entropy_with_logits(prm.logits(h), labels, reduction="sum")
    con = supcon_sum(prm.embed(h), labels >= 0.5, temperature) if contrastive else bce.new_zeros(())
    return bce, con


@torch.no_grad()
def evaluate_rows(prm: ProcessRewardModel, rows: Sequence[StepRow], device: torch.device | str) -> float:
    """Mean BCE per labelled step over ``rows`` (one host sync at the end)."""
    was_training = prm.training
    prm.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for row in rows:
        total += row_losses(prm, row, device, 1.0, False)[0].double()
    prm.train(was_training)
    return float(total) / max(sum(r.total_steps for r in rows), 1)


@dataclasses.dataclass
class PRMTrainResult:
    """``metrics`` (one dict per logged step: step, loss, bce, contrastive, lr, grad_norm, tokens,
    tokens_per_second), ``evals`` as ``(step, mean BCE)``, ``steps`` taken, wall-clock ``seconds``."""

    metrics: list[dict]
    evals: list[tuple[int, float]]
    steps: int
    seconds: float


def train_prm(prm: ProcessRewardModel, rows: Sequence[StepRow], cfg: PRMTrainConfig,
              eval_rows: Sequence[StepRow] = (), *, tokenizer=None,
              log: Callable[[str], None] | None = print, progress=None) -> PRMTrainResult:
    """Train ``prm`` in place (module docstring); saves to ``cfg.output_dir`` (:func:`save_prm`, with
    ``metrics.jsonl``) every ``save_every`` steps and at the end. ``progress``: called once per step."""
    if not rows:
        raise ValueError("no training rows")
    contrastive = cfg.contrastive_weight > 0
    if contrastive and prm.projection is None:
        raise ValueError("contrastive_weight > 0 needs a PRM with a projection head (projection_dim > 0)")
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    log = log or (lambda line: None)
    device = torch.device(cfg.device)
    prm.to(device).train()
    params = [p for _, p in sorted(prm.named_parameters()) if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    metrics, evals = [], []
    start = time.perf_counter()
    tokens = 0
    last = cfg.stop_after or cfg.steps

    def save() -> None:
        if cfg.output_dir is not None:
            save_prm(prm, cfg.output_dir, tokenizer=tokenizer,
                     extra_files={"metrics.jsonl": "".join(json.dumps(m) + "\n" for m in metrics)})

    step = 0
    for step in range(last):
        batch = []
        for _ in range(cfg.batch_rows):
            if not order:  # a fresh seeded permutation of the rows per epoch
                order = torch.randperm(len(rows), generator=gen).tolist()
            batch.append(rows[order.pop()])
        n_steps = max(sum(r.total_steps for r in batch), 1)
        n_anchors = max(sum(_num_anchors(r) for r in batch), 1)
        lr = learning_rate(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        bce_total = torch.zeros((), device=device)
        con_total = torch.zeros((), device=device)
        for row in batch:
            bce, con = row_losses(prm, row, device, cfg.contrastive_temperature, contrastive)
            loss = bce / n_steps + cfg.contrastive_weight * con / n_anchors
            loss.backward()
            bce_total += bce.detach() / n_steps
            con_total += con.detach() / n_anchors
            tokens += row.num_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"),
                                                   foreach=False)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None:
            progress()
        done = step + 1
        if cfg.log_every and (done % cfg.log_every == 0 or done == 1 or done == last):
            # float() syncs with the device once per logged step, not per step.
            elapsed = time.perf_counter() - start
            bce_v, con_v = float(bce_total), float(con_total)
            metrics.append({"step": done, "loss": bce_v + cfg.contrastive_weight * con_v, "bce": bce_v,
                            "contrastive": con_v, "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens,
                            "tokens_per_second": tokens / elapsed if elapsed > 0 else 0.0})
            log(f"step {done}/{last}  bce {bce_v:.4f}  contrastive {con_v:.4f}  lr {lr:.2e}  {elapsed:.0f}s")
        if eval_rows and cfg.eval_every and done % cfg.eval_every == 0 and done != last:
            evals.append((done, evaluate_rows(prm, eval_rows, device)))
            log(f"step {done}: held-out bce {evals[-1][1]:.4f}")
        if cfg.save_every and done % cfg.save_every == 0 and done != last:
            save()
        if cfg.time_limit_s is not None and time.perf_counter() - start > cfg.time_limit_s:
            log(f"step {done}: time limit of {cfg.time_limit_s:.0f}s reached, stopping")
            break
    steps_done = step + 1
    if eval_rows:
        evals.append((steps_done, evaluate_rows(prm, eval_rows, device)))
        log(f"step {steps_done}: held-out bce {evals[-1][1]:.4f}")
    save()
    return PRMTrainResult(metrics=metrics, evals=evals, steps=steps_done, seconds=time.perf_counter() - start)
