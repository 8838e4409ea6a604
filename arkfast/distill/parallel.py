"""Data parallelism of the trainer on PyTorch's own stack: DDP by default under ``torchrun``, FSDP2
(``torch.distributed.fsdp.fully_shard``) with ``--fsdp``.

The model and its loss are wrapped together (:class:`LossModule`): the fused loss reads
``lm_head.weight`` (the embedding when tied), and inside the wrapped module's ``forward`` FSDP has
gathered it whole (the root group holds the embedding, the final norm and the LM head; every decoder
layer is its own group), while DDP sees every use of every parameter.

Gradients are *summed* over the ranks, not averaged (a DDP communication hook, FSDP's gradient divide
factor 1): each rank's micro-batch losses are already divided by the step's global target count ``N``
(:mod:`arkfast.distill.loop`), so the sum is the gradient of one process training all the step's rows.
Micro-batches before a step's last accumulate locally (``no_sync`` / ``set_requires_gradient_sync``).

Under FSDP with ``bf16`` the fp32 sharded parameters are the master weights: the mixed-precision
policy gathers them in bf16 for the forward and backward and reduces gradients in fp32, so the
optimiser keeps no copies of its own. Checkpoints gather the full weights and the full optimiser state
with ``torch.distributed.checkpoint.state_dict`` (``full_state_dict=True``): one Hugging Face folder,
independent of the world size, so a run may resume on another number of ranks.

    torchrun --nproc-per-node 8 -m arkfast.distill --data rsft.jsonl --batch-rows 64 --fsdp
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from arkfast.models import DecoderModel
from arkfast.train import PackedRow

from .loop import micro_batch_loss_sum
from .ranks import Ranks

__all__ = ["Gathered", "LossModule", "Parallel", "sum_hook", "train_step", "wrap"]


class LossModule(nn.Module):
    """``forward(row)`` is :func:`arkfast.distill.loop.micro_batch_loss_sum` of ``model`` on ``row``:
    the forward, the LM head and the fused loss in one module call."""

    def __init__(self, model: DecoderModel, device: torch.device, gradient_checkpointing: bool = False):
        super().__init__()
        self.model = model
        self.device = device
        self.gradient_checkpointing = gradient_checkpointing

    def forward(self, row: PackedRow) -> torch.Tensor:
        return micro_batch_loss_sum(self.model, row, self.device, self.gradient_checkpointing)


def sum_hook(group, bucket):
    """DDP communication hook: all-reduce a bucket of gradients as a sum (DDP's default divides by
    the world size)."""
    import torch.distributed as dist

    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class Parallel:
    """The model as the ranks train it: ``loss_sum(row)`` per micro-batch inside ``accumulate(sync)``.

    ``kind`` is ``"single"`` (one process), ``"ddp"`` or ``"fsdp"``. :attr:`model` is the
    :class:`DecoderModel` (its parameters are ``DTensor`` shards under FSDP).
    """

    def __init__(self, model: DecoderModel, ranks: Ranks, device: torch.device, *, fsdp: bool = False,
                 precision: str = "fp32", cpu_offload: bool = False, gradient_checkpointing: bool = False,
                 module: nn.Module | None = None):
        if cpu_offload and not (fsdp and device.type == "cuda"):
            raise ValueError(f"cpu_offload needs fsdp on a GPU, got fsdp={fsdp}, device {device}")
        if fsdp and module is not None:
            raise ValueError("fsdp shards the plain loss module only (not a mode's own objective)")
        self.model, self.ranks, self.module_device = model, ranks, device
        # ``module``: a mode's own objective (the decoder among its submodules), called as module(row, *args)
        self.module: nn.Module = module if module is not None else LossModule(model, device, gradient_checkpointing)
        if fsdp:
            self.kind = "fsdp"
            self._shard(precision, cpu_offload)
        elif ranks.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.kind = "ddp"
            # device_ids=None: the module is on one device already and PackedRow moves itself there.
            # A mode's objective may leave a head out of a step's graph (a term weighted 0): let DDP find it.
            self.module = DistributedDataParallel(self.module, device_ids=None, find_unused_parameters=module is not None)
            self.module.register_comm_hook(None, sum_hook)
        else:
            self.kind = "single"

    def _shard(self, precision: str, cpu_offload: bool) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        # cast_forward_inputs=False: a layer's floating inputs include the rotary frequencies, which
        # must stay fp32 (DecoderModel._apply); the hidden states are bf16 already from the bf16 embedding.
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
              if precision == "bf16" else MixedPrecisionPolicy())
        offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
        for layer in self.model.layers:
            fully_shard(layer, mp_policy=mp, offload_policy=offload)
        fully_shard(self.module, mp_policy=mp, offload_policy=offload)  # embedding, final norm, LM head
        for m in (*self.model.layers, self.module):
            m.set_gradient_divide_factor(1.0)  # sums, see the module docstring
            # plain SUM collectives: with a factor FSDP would otherwise ask for PREMUL_SUM, which gloo lacks
            # (the switch is newer than FSDP2 itself; older releases do not ask for PREMUL_SUM on gloo)
            if hasattr(m, "set_force_sum_reduction_for_comms"):
                m.set_force_sum_reduction_for_comms(True)

    def optimizer_precision(self, precision: str) -> str:
        """The ``precision`` to give :class:`arkfast.distill.loop.Optimizer`: under FSDP the sharded
        fp32 parameters are the master weights (bf16 is the mixed-precision policy's)."""
        return "fp32" if self.kind == "fsdp" else precision

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        """Forward and backward of one micro-batch; ``sync=False`` (not the step's last micro-batch)
        keeps its gradients local, to be reduced with the last one's."""
        if self.kind == "ddp" and not sync:
            with self.module.no_sync():
                yield
            return
        if self.kind == "fsdp":
            self.module.set_requires_gradient_sync(sync)
            self.module.set_is_last_backward(sync)
        yield

    def loss_sum(self, row: PackedRow, *args) -> torch.Tensor:
        """``sum_t w_t CE_t`` of ``row`` (a 0-dim tensor); with a mode's own objective, what its forward
        returns for ``(row, *args)``."""
        return self.module(row, *args)

    # -- checkpoints ---------------------------------------------------------------------------------

    def full_weights(self) -> DecoderModel | None:
        """The whole model on rank 0 (``None`` elsewhere): :attr:`model` itself, or under FSDP a CPU
        :class:`DecoderModel` gathered from the shards (a collective: every rank must call this)."""
        if self.kind != "fsdp":
            return self.model if self.ranks.main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.ranks.main:
            return None
        with torch.device("meta"):
            model = DecoderModel(self.model.config)
        prefix = "model."
        model.load_state_dict({k.removeprefix(prefix): v for k, v in full.items()}, assign=True)
        return model

    def full_optimizer_state(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """Under FSDP: ``opt``'s state gathered whole and keyed by parameter name, on rank 0 (every rank
        must call this)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, opt,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_optimizer_state(self, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Under FSDP: shard a :meth:`full_optimizer_state` (every rank passes the same) onto ``opt``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.module, opt, state, options=StateDictOptions(full_state_dict=True))


def train_step(par: Parallel, optimizer, rows: list[PackedRow], count: int, micro_batch_rows: int, *,
               concat=None, objective_args: tuple | None = None) -> torch.Tensor:
    """Forward and backward of this rank's ``rows`` of a step, ``micro_batch_rows`` at a time, each
    micro-batch's loss divided by the step's global target count ``count``; returns the step's loss
    summed over the ranks (0-dim float64). The gradients are then reduced: the caller clips and steps.
    With a mode's own objective, ``concat`` joins its rows and each micro-batch's loss is
    ``loss_sum(micro, *objective_args)``, already normalised by the objective.

    Under DDP with bf16 master weights every micro-batch is reduced (the optimiser moves each one's
    bf16 gradients into its fp32 masters at once, so nothing accumulates in the DDP-managed ``.grad``);
    otherwise only the last one is."""
    from .data import concat_rows

    concat = concat or concat_rows
    step_loss = torch.zeros((), dtype=torch.float64, device=par.module_device)
    starts = range(0, len(rows), micro_batch_rows)
    for m in starts:
        sync = m == starts[-1] or (par.kind == "ddp" and optimizer.master is not None)
        with par.accumulate(sync):
            micro = concat(rows[m:m + micro_batch_rows])
            if objective_args is None:
                loss = par.loss_sum(micro) / count
            else:
                loss = par.loss_sum(micro, *objective_args)
            optimizer.backward(loss)
        step_loss += loss.detach().double()
    par.ranks.sum_([step_loss])
    return step_loss


def wrap(model: DecoderModel, ranks: Ranks, device: torch.device, *, fsdp: bool, precision: str, cpu_offload: bool,
         gradient_checkpointing: bool, objective: nn.Module | None = None, optimizer_cls=None,
         **adamw) -> tuple[Parallel, Any]:
    """``(parallel, optimizer)``: ``model`` over ``ranks`` (one process, DDP when ``ranks.world > 1``,
    FSDP2 with ``fsdp``) and its :class:`arkfast.distill.loop.Optimizer` (``adamw``: lr, betas, eps,
    weight_decay). Without FSDP the optimiser comes first (under bf16 it casts the model, which DDP
    must find in its final dtype); under FSDP it comes after, over the shards. ``objective``: a mode's
    own loss module holding ``model`` (and heads of its own), trained by ``optimizer_cls`` (an
    :class:`~arkfast.distill.loop.Optimizer` subclass) over all its parameters; not with ``fsdp``."""
    from .loop import Optimizer

    options = {"fsdp": fsdp, "precision": precision, "cpu_offload": cpu_offload,
               "gradient_checkpointing": gradient_checkpointing}
    if fsdp:
        if objective is not None:
            raise ValueError("--fsdp shards the plain next-token loss only; this mode's objective runs without it")
        par = Parallel(model, ranks, device, **options)
        return par, Optimizer(model, precision=par.optimizer_precision(precision), sharded=par, **adamw)
    optimizer = (optimizer_cls or Optimizer)(model if objective is None else objective, precision=precision, **adamw)
    return Parallel(model, ranks, device, **options, module=objective), optimizer


class Gathered:
    """An optimiser state already gathered (what :func:`arkfast.distill.checkpoints.save_state` reads
    on rank 0 after every rank took part in the gathering)."""

    def __init__(self, state: dict[str, Any]):
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state
