"""One optimiser step of distillation: micro-batches of packed rows, the step-normalised weighted loss,
mixed precision with fp32 master weights, clipping and AdamW.

Loss of a step over the rows ``R`` of all its micro-batches (and, with several processes, of all
ranks)::

    L = sum_{r in R} sum_t w_t * CE(h_t @ W^T, y_t)  /  N,     N = #{(r, t) : y_t != -100}

Each micro-batch ``m`` contributes ``L_m = sum_{t in m} w_t CE_t / N`` and backpropagates it at once;
gradients add, so ``sum_m dL_m = dL`` whatever the split. Normalising each micro-batch by its *own*
count instead (``mean`` per micro-batch, then averaged over k) weights a token of a short micro-batch
more than one of a long micro-batch: the gradient-accumulation bug transformers fixed in 2024. ``N``
comes from the host-side labels before the step, so it costs no device sync. ``w_t`` may be negative
(PAD's advantage rule); ``N`` counts targets, not weights, so the scale of a step does not depend on
its weights' sign.

Precision: ``fp32`` trains the model's own fp32 parameters. ``bf16`` (the default on CUDA) keeps the
model in bfloat16 for the forward and backward and an fp32 master copy of every parameter that the
optimiser updates: after each micro-batch the bf16 gradients are added into fp32 master gradients;
after the optimiser step the master weights are rounded into the model. The loss itself is computed
in fp32 by the fused kernel whatever the input dtype.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from arkfast.kernels.fused_linear_weighted_cross_entropy import fused_linear_weighted_cross_entropy
from arkfast.models import DecoderModel
from arkfast.train import IGNORE_INDEX, PackedRow

__all__ = ["Optimizer", "forward_hidden", "micro_batch_loss_sum", "step_target_count"]


def forward_hidden(model: DecoderModel, input_ids: torch.Tensor, positions: torch.Tensor, ctx,
                   gradient_checkpointing: bool = False) -> torch.Tensor:
    """``hidden [T, H]`` of ``model`` over a packed stream. With ``gradient_checkpointing`` each layer's
    activations are dropped after the forward and recomputed in the backward (the layer loop of
    :meth:`DecoderModel.forward`, each layer under :func:`torch.utils.checkpoint.checkpoint`): memory
    of one layer instead of all, for one more forward."""
    if not gradient_checkpointing or not torch.is_grad_enabled():
        return model(input_ids, positions, ctx)
    window = model.config.sliding_window
    if window is not None and ctx.max_seqlen > window:
        raise ValueError(f"a sequence of {ctx.max_seqlen} tokens exceeds the model's sliding_window ({window})")
    x = F.embedding(input_ids, model.embed_tokens)  # [T, H]
    residual = None
    for layer in model.layers:
        x, residual = checkpoint(layer, x, residual, positions, model.inv_freq, model.rope_scale, ctx,
                                 use_reentrant=False)
    x, _ = model.norm(x, residual)
    return x


def micro_batch_loss_sum(model: DecoderModel, row: PackedRow, device: torch.device,
                         gradient_checkpointing: bool = False) -> torch.Tensor:
    """``sum_t w_t * CE_t`` over the labelled positions of ``row`` (a 0-dim fp32 tensor, fp64 for an fp64
    model), from the hidden states and the LM head without forming the ``[T, V]`` logits."""
    input_ids, positions, labels, weights, ctx = row.to_device(device)
    hidden = forward_hidden(model, input_ids, positions, ctx, gradient_checkpointing)  # [T, H]
    if hidden.dtype == torch.float64:  # float64 tests: weights in the loss's dtype
        weights = weights.double()
    return fused_linear_weighted_cross_entropy(hidden, model.lm_head_weight, labels, weights,
                                               ignore_index=IGNORE_INDEX, reduction="sum")


def step_target_count(rows: Sequence[PackedRow]) -> int:
    """``N``: the labelled positions of a step's rows (host ints, no device sync)."""
    return sum(row.num_targets for row in rows)


def _named_groups(named: list[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not norms, not biases), parameters in name order."""
    named = sorted(named, key=lambda kv: kv[0])
    return [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]


class Optimizer:
    """AdamW over a model's parameters (``fp32``) or over fp32 master copies of them (``bf16``).

    ``backward(loss)`` after each micro-batch, then ``grad_norm()`` (the pre-clipping global L2 norm)
    and ``step(lr, grad_clip, norm)`` once per optimiser step. ``fused`` AdamW on CUDA,
    the single-tensor loop on CPU (bit-reproducible for a given thread count).
    """

    def __init__(self, model: DecoderModel, *, precision: str, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, sharded=None):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.model = model
        self.sharded = sharded  # an FSDP arkfast.distill.parallel.Parallel: its state is gathered whole
        if precision == "bf16":
            model.to(torch.bfloat16)
        named = sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad), key=lambda kv: kv[0])
        self.params = [p for _, p in named]
        self.master = None
        if precision == "bf16":
            self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
            named = [(n, m) for (n, _), m in zip(named, self.master)]
        groups = _named_groups(named, weight_decay)
        on_cuda = self.params[0].is_cuda
        kind = {"fused": True} if on_cuda else {"foreach": False}
        self.opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kind)

    @property
    def trained(self) -> list[torch.Tensor]:
        """The tensors the optimiser updates (the master copies under bf16)."""
        return self.params if self.master is None else self.master

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.master is not None:  # accumulate in fp32, not in the bf16 .grad
            for p, m in zip(self.params, self.master):
                if p.grad is not None:
                    g = p.grad.float()
                    m.grad = g if m.grad is None else m.grad.add_(g)
                    p.grad = None

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the accumulated gradients (a 0-dim tensor; no host sync). Under FSDP
        the norm of the shards' norms, all-reduced (a replicated value on every rank)."""
        grads = [t.grad for t in self.trained if t.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=False) if grads else torch.zeros(())
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def step(self, lr: float, grad_clip: float, norm: torch.Tensor | None = None) -> None:
        """Clip the gradients to ``grad_clip`` (0: off) given their ``norm`` (:meth:`grad_norm`), take
        the AdamW step at learning rate ``lr`` and clear the gradients."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        if grad_clip > 0:
            norm = self.grad_norm() if norm is None else norm
            # g *= min(1, clip / (norm + 1e-6)), the rule of clip_grad_norm_
            torch.nn.utils.clip_grads_with_norm_([t for t in self.trained if t.grad is not None], grad_clip, norm,
                                                 foreach=False)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.master is not None:
            with torch.no_grad():
                for p, m in zip(self.params, self.master):
                    p.copy_(m)

    def discard(self) -> None:
        """Drop the gradients of a step that will not be taken (a non-finite loss)."""
        self.opt.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        """The state to save; under FSDP gathered whole (by parameter name) on rank 0, a collective
        every rank must enter."""
        if self.sharded is not None:
            return {"optimizer": self.sharded.full_optimizer_state(self.opt), "master": None, "layout": "fsdp"}
        return {"optimizer": self.opt.state_dict(),
                "master": None if self.master is None else [m.detach().clone() for m in self.master]}

    def load_state_dict(self, state: dict) -> None:
        saved, now = state.get("layout", "plain"), "plain" if self.sharded is None else "fsdp"
        if saved != now:
            raise ValueError(f"the checkpoint's optimiser state was saved {'with' if saved == 'fsdp' else 'without'} "
                             f"--fsdp; resume {'with' if saved == 'fsdp' else 'without'} it (any number of ranks)")
        if self.sharded is not None:
            self.sharded.load_full_optimizer_state(self.opt, state["optimizer"])
            return
        self.opt.load_state_dict(state["optimizer"])
        if (state["master"] is None) != (self.master is None):
            raise ValueError("the checkpoint was saved with another precision (fp32 vs bf16 master weights)")
        if self.master is not None:
            with torch.no_grad():
                for p, m, saved in zip(self.params, self.master, state["master"]):
                    m.copy_(saved)
                    p.copy_(saved)
