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

Under ``torchrun`` (``ranks``, :class:`arkfast.distill.ranks.Ranks`) every rank draws the same rows
and trains its contiguous share of each step's (``batch_rows`` a multiple of the ranks) through
PyTorch DDP with gradients summed, not averaged: the per-row losses are already divided by the
step's global ``S`` and ``|A|``, so the sum is one process's gradient. Rank 0 alone evaluates, logs
and saves; the saved state is the whole model's, so a run resumes on any number of ranks.

Every save (each ``save_every`` steps, at a time limit and at the end) writes the PRM folder with
``trainer_state.pt`` (optimiser moments, the row-order generator and the rest of the epoch's order,
the logged metrics) and ``trainer_state.json`` (the step and the settings that shape the loss curve).
``train_prm(..., resume=True)`` continues from it: the resumed run takes the same rows in the same
order with the same optimiser state, so its loss curve and final weights are those of the run that was
never stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from arkfast.train import TrainConfig, learning_rate

from .data import StepRow
from .model import ProcessRewardModel, save_prm

__all__ = [
    "TARGETS",
    "HeadFitConfig",
    "PRMTrainConfig",
    "PRMTrainResult",
    "evaluate_rows",
    "fit_head",
    "read_trainer_state",
    "row_losses",
    "step_targets",
    "supcon_sum",
    "train_prm",
]

TARGETS = ("soft", "hard")


def step_targets(labels: Sequence[float], targets: str) -> list[float]:
    """The training targets of one trajectory's step labels: ``soft`` keeps them (the fraction of
    Monte-Carlo rollouts that reached the gold answer); ``hard`` makes every label above 0 a 1 (some
    rollout from the step reached the gold answer, so the prefix can still be right). Outcome labels
    are 0 or 1 already and stay as they are."""
    if targets == "soft":
        return [float(v) for v in labels]
    if targets == "hard":
        return [1.0 if v > 0 else 0.0 for v in labels]
    raise ValueError(f"targets must be one of {', '.join(TARGETS)}, got {targets!r}")

STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
# Settings whose change alters the loss curve: a resumed run must use the same ones.
CURVE_KEYS = ("steps", "batch_rows", "lr", "min_lr_ratio", "warmup_ratio", "weight_decay", "betas", "eps",
              "grad_clip", "seed", "contrastive_weight", "contrastive_temperature", "device")


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
    h = prm.step_hidden(input_ids, positions, ctx, step_index, row.step_tokens(device))  # [S, D]
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


def _curve(cfg: PRMTrainConfig, data: dict | None) -> dict:
    settings = {k: getattr(cfg, k) for k in CURVE_KEYS}
    settings["betas"] = list(settings["betas"])
    return {"settings": settings, "data": data or {}}


def read_trainer_state(output: str | Path) -> dict | None:
    """The ``trainer_state.json`` of the PRM folder ``output`` (step, finished, settings, data), or
    None when there is none. ``ValueError`` naming the file when it is unreadable."""
    path = Path(output) / STATE_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e.msg}); delete {Path(output)} to start over") from None


class _RowLosses(torch.nn.Module):
    """:func:`row_losses` of the PRM as one module call (what DDP wraps)."""

    def __init__(self, prm: ProcessRewardModel, device: torch.device, temperature: float, contrastive: bool):
        super().__init__()
        self.prm, self.device, self.temperature, self.contrastive = prm, device, temperature, contrastive

    def forward(self, row: StepRow) -> tuple[torch.Tensor, torch.Tensor]:
        return row_losses(self.prm, row, self.device, self.temperature, self.contrastive)


def _data_parallel(prm: ProcessRewardModel, device: torch.device, cfg: PRMTrainConfig, contrastive: bool, ranks):
    """``(module, no_sync)``: the row-loss module (under DDP when ``ranks.world > 1``, gradients summed)
    and a context manager factory that keeps a non-final row's gradients local."""
    import contextlib

    module = _RowLosses(prm, device, cfg.contrastive_temperature, contrastive)
    if ranks is None or ranks.world == 1:
        return module, contextlib.nullcontext
    from torch.nn.parallel import DistributedDataParallel

    from arkfast.distill.parallel import sum_hook

    # Without the contrastive term the projection head takes no part in the loss.
    ddp = DistributedDataParallel(module, device_ids=None,
                                  find_unused_parameters=prm.projection is not None and not contrastive)
    ddp.register_comm_hook(None, sum_hook)
    return ddp, ddp.no_sync


def train_prm(prm: ProcessRewardModel, rows: Sequence[StepRow], cfg: PRMTrainConfig,
              eval_rows: Sequence[StepRow] = (), *, tokenizer=None,
              log: Callable[[str], None] | None = print, progress=None, resume: bool = False,
              data: dict | None = None, ranks=None) -> PRMTrainResult:
    """Train ``prm`` in place (module docstring); saves to ``cfg.output_dir`` (:func:`save_prm`, with
    ``metrics.jsonl`` and the trainer state) every ``save_every`` steps and at the end. ``progress``:
    called once per step taken. ``resume``: continue the run saved in ``cfg.output_dir`` (its weights
    replace ``prm``'s); ``ValueError`` when its settings or ``data`` (a fingerprint of the training
    set, recorded with the state) differ from this call's. ``ranks``: this process's
    :class:`arkfast.distill.ranks.Ranks` under torchrun (module docstring)."""
    from arkfast.distill.ranks import Ranks

    ranks = ranks or Ranks()
    if not rows:
        raise ValueError("no training rows")
    if cfg.batch_rows % ranks.world:
        raise ValueError(f"batch_rows ({cfg.batch_rows}) must be a multiple of the ranks ({ranks.world})")
    contrastive = cfg.contrastive_weight > 0
    if contrastive and prm.projection is None:
        raise ValueError("contrastive_weight > 0 needs a PRM with a projection head (projection_dim > 0)")
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    log = log if (log and ranks.main) else (lambda line: None)
    device = torch.device(cfg.device)
    prm.to(device).train()
    module, local = _data_parallel(prm, device, cfg, contrastive, ranks)
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

    curve = _curve(cfg, data)
    first = 0
    seconds_before = 0.0
    if resume:
        first, order, seconds_before, tokens = _restore(prm, opt, gen, metrics, evals, cfg, curve, device)
        log(f"resumed from step {first} of {cfg.steps} ({cfg.output_dir})")
    tokens_before = tokens

    def save(done: int) -> None:
        if cfg.output_dir is None or not ranks.main:
            return
        seconds = seconds_before + time.perf_counter() - start
        meta = {"step": done, "finished": done == cfg.steps, "seconds": seconds, "tokens": tokens, **curve}

        def write_state(folder: Path) -> None:
            torch.save({"optimizer": opt.state_dict(), "generator": gen.get_state(), "order": list(order),
                        "metrics": metrics, "evals": evals}, folder / STATE_PT)
            (folder / STATE_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

        save_prm(prm, cfg.output_dir, tokenizer=tokenizer, write_extra=write_state,
                 extra_files={"metrics.jsonl": "".join(json.dumps(m) + "\n" for m in metrics)})

    step = first - 1
    for step in range(first, last):
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
        mine = ranks.share(batch)
        for i, row in enumerate(mine):
            with local() if i < len(mine) - 1 else contextlib.nullcontext():  # the last row reduces
                bce, con = module(row)
                loss = bce / n_steps + cfg.contrastive_weight * con / n_anchors
                loss.backward()
            bce_total += bce.detach() / n_steps
            con_total += con.detach() / n_anchors
        tokens += sum(row.num_tokens for row in batch)
        ranks.sum_([bce_total, con_total])
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
                            "tokens_per_second": (tokens - tokens_before) / elapsed if elapsed > 0 else 0.0})
            log(f"step {done}/{last}  bce {bce_v:.4f}  contrastive {con_v:.4f}  lr {lr:.2e}  {elapsed:.0f}s")
        if eval_rows and cfg.eval_every and done % cfg.eval_every == 0 and done != last and ranks.main:
            evals.append((done, evaluate_rows(prm, eval_rows, device)))
            log(f"step {done}: held-out bce {evals[-1][1]:.4f}")
        if cfg.save_every and done % cfg.save_every == 0 and done != last:
            save(done)
        if cfg.time_limit_s is not None:
            over = torch.tensor(float(time.perf_counter() - start > cfg.time_limit_s), device=device)
            ranks.sum_([over])  # the ranks stop together: any rank over the limit stops them all
            if float(over) > 0:
                log(f"step {done}: time limit of {cfg.time_limit_s:.0f}s reached, stopping")
                break
    steps_done = max(step + 1, first)
    if eval_rows and (not evals or evals[-1][0] != steps_done) and ranks.main:
        evals.append((steps_done, evaluate_rows(prm, eval_rows, device)))
        log(f"step {steps_done}: held-out bce {evals[-1][1]:.4f}")
    save(steps_done)
    return PRMTrainResult(metrics=metrics, evals=evals, steps=steps_done,
                          seconds=seconds_before + time.perf_counter() - start)


@dataclasses.dataclass
class HeadFitConfig:
    """Fitting the head alone on a frozen backbone (a PRM whose features include ``logprobs``):
    ``l2`` (the penalty ``l2 * |w|^2`` on the head's weights, not its bias), ``max_iter`` (L-BFGS
    iterations), where to save, threads and device."""

    l2: float = 1e-3
    max_iter: int = 300
    output_dir: str | None = None
    num_threads: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.l2 >= 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"max_iter must be an int >= 1, got {self.max_iter!r}")


@torch.no_grad()
def _step_inputs(prm: ProcessRewardModel, rows: Sequence[StepRow], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(raw head inputs [S, D] float64, targets [S] float64)`` of all the rows' steps: the
    unstandardised log-probability features, then the hidden states (as ``config.features`` says)."""
    xs, ys = [], []
    for row in rows:
        input_ids, positions, ctx, step_index, labels = row.to_device(device)
        raw, h = prm.raw_step_inputs(input_ids, positions, ctx, step_index, row.step_tokens(device))
        xs.append(torch.cat([t for t in (raw, h) if t is not None], 1).double())
        ys.append(labels.double())
    return torch.cat(xs), torch.cat(ys)


def fit_head(prm: ProcessRewardModel, rows: Sequence[StepRow], cfg: HeadFitConfig,
             eval_rows: Sequence[StepRow] = (), *, tokenizer=None,
             log: Callable[[str], None] | None = print) -> PRMTrainResult:
    """Fit ``prm``'s head in place on the frozen backbone and save it to ``cfg.output_dir``.

    One no-grad pass over ``rows`` gives every labelled step's head input; the log-probability features'
    training mean and standard deviation become ``feature_mean`` / ``feature_std``; then full-batch
    L-BFGS (strong Wolfe line search, from zero weights, in float64) minimises the mean BCE of the
    steps plus ``l2 * |w|^2``, a convex problem, so the result does not depend on any seed. ``metrics``
    holds the BCE before (zero weights) and after; ``evals`` the held-out BCE after."""
    log = log or (lambda line: None)
    if not prm.config.uses_logprobs:
        raise ValueError("fit_head fits a head over log-probability features (config.features 'logprobs' or "
                         "'hidden+logprobs'); train a hidden-state PRM with train_prm")
    if not rows:
        raise ValueError("no training rows")
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    device = torch.device(cfg.device)
    prm.to(device).eval()
    prm.backbone.requires_grad_(False)
    start = time.perf_counter()
    x, y = _step_inputs(prm, rows, device)
    n_feat = prm.feature_mean.shape[0]
    mean = x[:, :n_feat].mean(0)
    std = x[:, :n_feat].std(0) if x.shape[0] > 1 else torch.ones_like(mean)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # a constant feature stays as it is
    with torch.no_grad():
        prm.feature_mean.copy_(mean.to(prm.feature_mean.dtype))
        prm.feature_std.copy_(std.to(prm.feature_std.dtype))
    z = x.clone()
    z[:, :n_feat] = (x[:, :n_feat] - mean) / std
    w = torch.zeros(z.shape[1], dtype=torch.float64, device=device, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=cfg.max_iter, line_search_fn="strong_wolfe")
    iterations = [0]

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y) + cfg.l2 * (w * w).sum()
        loss.backward()
        iterations[0] += 1
        return loss

    bce_before = float(F.binary_cross_entropy_with_logits(torch.zeros_like(y), y))
    opt.step(closure)
    with torch.no_grad():
        prm.head.weight.copy_(w.detach()[None].to(prm.head.weight.dtype))
        prm.head.bias.copy_(b.detach()[None].to(prm.head.bias.dtype))
        bce_after = float(F.binary_cross_entropy_with_logits(z @ w + b, y))
    tokens = sum(row.num_tokens for row in rows)
    seconds = time.perf_counter() - start
    metrics = [{"step": 0, "loss": bce_before, "bce": bce_before, "contrastive": 0.0, "lr": 0.0, "grad_norm": 0.0,
                "tokens": tokens, "tokens_per_second": tokens / seconds if seconds > 0 else 0.0},
               {"step": iterations[0], "loss": bce_after, "bce": bce_after, "contrastive": 0.0, "lr": 0.0,
                "grad_norm": float(torch.cat([w.grad.flatten(), b.grad.flatten()]).norm()), "tokens": tokens,
                "tokens_per_second": tokens / seconds if seconds > 0 else 0.0}]
    log(f"head fit: {x.shape[0]} steps, {iterations[0]} L-BFGS evaluations, bce {bce_before:.4f} -> {bce_after:.4f}")
    evals = []
    if eval_rows:
        evals.append((iterations[0], evaluate_rows(prm, eval_rows, device)))
        log(f"held-out bce {evals[-1][1]:.4f}")
    if cfg.output_dir is not None:
        save_prm(prm, cfg.output_dir, tokenizer=tokenizer,
                 extra_files={"metrics.jsonl": "".join(json.dumps(m) + "\n" for m in metrics)})
    return PRMTrainResult(metrics=metrics, evals=evals, steps=iterations[0], seconds=time.perf_counter() - start)


def _restore(prm, opt, gen, metrics, evals, cfg, curve, device) -> tuple[int, list[int], float, int]:
    """Load the run saved in ``cfg.output_dir`` into ``prm``, ``opt``, ``gen``, ``metrics`` and
    ``evals``; returns ``(step, rest of the epoch's order, seconds so far, tokens so far)``."""
    from .model import load_prm

    if cfg.output_dir is None:
        raise ValueError("resume needs an output folder")
    folder = Path(cfg.output_dir)
    meta = read_trainer_state(folder)
    if meta is None or not (folder / STATE_PT).is_file():
        raise ValueError(f"--resume: {folder} holds no trainer state ({STATE_JSON}, {STATE_PT}); "
                         f"train without --resume to start a run there")
    for part in ("settings", "data"):
        saved, now = meta.get(part, {}), curve[part]
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            k = diff[0]
            raise ValueError(f"--resume: {folder} was trained with {k}={saved.get(k)!r}, now {k}={now.get(k)!r}; "
                             f"use the same settings and labels, or another --output")
    saved = load_prm(folder, device=device)
    with torch.no_grad():
        for name, p in prm.named_parameters():
            p.copy_(dict(saved.named_parameters())[name])
    state = torch.load(folder / STATE_PT, map_location=device, weights_only=False)
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    metrics.extend(state["metrics"])
    evals.extend(tuple(e) for e in state["evals"])
    prm.train()
    return int(meta["step"]), list(state["order"]), float(meta["seconds"]), int(meta["tokens"])
