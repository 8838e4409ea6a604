"""The policy update of online process-aware distillation (``--mode grpo``): the clipped surrogate with a
k3 KL penalty, on log-probabilities from the fused loss (no ``[tokens x vocab]`` logits).

A step's rollouts (:mod:`.rollout`) are laid end to end as one packed stream of ``prompt + response``
sequences; position ``t`` predicts token ``t + 1``, so the response tokens are the labels and the
prompt's are ignored, as in :mod:`arkfast.train.data`. Per labelled token ``t``:

    logp_t   = log softmax(z_t / T)[y_t]                    the policy being trained, temperature T
    old_t    = the engine's log-probability of y_t when it sampled it (same T: the rollout policy)
    ref_t    = the frozen reference's log softmax(z_t / T)[y_t]
    rho_t    = exp(logp_t - old_t)
    pg_t     = -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)          (PPO, eps = 0.2)
    kl_t     = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                 (k3: >= 0, unbiased for
                                                                            KL(pi || ref) under pi's samples)
    L        = sum_t (pg_t + beta kl_t) / N,   N = the labelled tokens of the update (all its sequences)

``A_t`` is the advantage of the step holding token ``t`` (:mod:`.rewards`). Normalisation is per
token over the whole update (DAPO's token-level mean): every sampled token weighs the same whatever
the length of its response, so a long wrong answer is not penalised less per token than a short one,
which the per-sequence mean of the original GRPO does. ``N`` is a host count: no device sync.

The temperature is applied identically on both sides: the engine's ``logprobs`` are
``log_softmax(logits / T)`` before any top-k/top-p truncation, and the trainer passes ``hidden / T`` to
:func:`~arkfast.kernels.fused_linear_weighted_cross_entropy` (``(h / T) W^T = (h W^T) / T``), whose
``return_logprobs`` output carries the gradient ``d logp_t / dz = onehot(y_t) - softmax(z_t / T)``
(times ``1 / T``). Rollouts use neither top-k nor top-p (there is no setting for them), so the
rollout policy is exactly ``softmax(z / T)`` and the ratio needs no truncation correction.

Gradient (what backpropagates into ``logp_t``), derived for the float64 test:
``d pg_t / d logp_t = -rho_t A_t`` where the unclipped term is the minimum (``rho_t A_t <=
clip(rho_t) A_t``) and 0 where the clipped one is (the clamp is flat there);
``d kl_t / d logp_t = 1 - exp(ref_t - logp_t)``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from arkfast.kernels.fused_linear_weighted_cross_entropy import fused_linear_weighted_cross_entropy
from arkfast.models import DecoderModel, VarlenContext
from arkfast.train import IGNORE_INDEX

from .rollout import Rollout

__all__ = ["PolicyBatch", "build_batch", "clipped_objective", "policy_logprobs"]


@dataclasses.dataclass(frozen=True)
class PolicyBatch:
    """Sequences laid end to end, each ``[T]``: ``input_ids``, ``labels`` (int64, -100 where no token is
    predicted), ``advantages`` and ``old_logprobs`` (float32, 0 off the labels), with ``lengths`` (host
    ints summing to T)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor
    lengths: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_targets(self) -> int:
        """Labelled positions (host int, from host tensors: no device sync)."""
        return int((self.labels != IGNORE_INDEX).sum())


def build_batch(rollouts: Sequence[Rollout], advantages: Sequence[Sequence[float]]) -> PolicyBatch:
    """The :class:`PolicyBatch` of ``rollouts``; ``advantages[i]`` holds one value per step of
    ``rollouts[i]`` (one value for all its tokens when it has no step)."""
    ids, labels, adv, old, lengths = [], [], [], [], []
    for r, a in zip(rollouts, advantages):
        p, c = len(r.prompt.prompt_ids), len(r.token_ids)
        per_token = [a[0]] * c
        for k, (t0, t1) in enumerate(r.steps):
            per_token[t0:t1] = [a[k]] * (t1 - t0)
        ids += list(r.prompt.prompt_ids) + r.token_ids
        # position p - 1 + i predicts response token i; the last position predicts nothing
        labels += [IGNORE_INDEX] * (p - 1) + r.token_ids + [IGNORE_INDEX]
        adv += [0.0] * (p - 1) + per_token + [0.0]
        old += [0.0] * (p - 1) + r.logprobs + [0.0]
        lengths.append(p + c)
    return PolicyBatch(torch.tensor(ids, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64),
                       torch.tensor(adv, dtype=torch.float32), torch.tensor(old, dtype=torch.float32),
                       tuple(lengths))


def policy_logprobs(model: DecoderModel, batch: PolicyBatch, temperature: float, device: torch.device,
                    ) -> torch.Tensor:
    """``logp [T]`` (fp32; fp64 for an fp64 model): ``log softmax(z / temperature)[label]`` at every
    labelled position, 0 elsewhere, differentiable into ``model`` through the fused loss."""
    ctx, positions = VarlenContext.from_lengths(batch.lengths, device=device)
    hidden = model(batch.input_ids.to(device), positions, ctx)                     # [T, H]
    if temperature != 1.0:
        hidden = hidden / temperature
    _, logp = fused_linear_weighted_cross_entropy(hidden, model.lm_head_weight, batch.labels.to(device),
                                                  reduction="sum", ignore_index=IGNORE_INDEX,
                                                  return_logprobs=True)
    return logp


def clipped_objective(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      *, count: int, clip: float, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(L, stats)`` of the module docstring over tokens where ``mask`` holds (every tensor ``[T]``).
    ``stats`` (detached 0-dim tensors, sums over the masked tokens): ``pg``, ``kl``, ``clipped`` (tokens
    whose clipped term is the smaller), ``ratio``, ``logp``."""
    m = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    pg = -torch.minimum(unclipped, clipped)
    per_token = pg
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1.0
        per_token = pg + kl_coef * kl
    loss = (per_token * m).sum() / max(count, 1)
    with torch.no_grad():
        stats = {"pg": (pg * m).sum(), "kl": (kl * m).sum(), "clipped": ((clipped < unclipped) & mask).sum(),
                 "ratio": (ratio * m).sum(), "logp": (logp * m).sum()}
    return loss, stats
