"""Several processes (``torchrun``): each rank trains its share of every step's rows; rank 0 logs and
writes.

Every rank builds all the rows (the data is small next to the model) and computes the step's target
count ``N`` over *all* the step's rows from host-side labels, so each rank's micro-batch losses are
already divided by the global ``N`` with no communication. Summing the ranks' gradients (DDP or FSDP2,
:mod:`arkfast.distill.parallel`) then gives exactly the gradient of one process training every row:
``sum_ranks sum_m dL_m = dL``. With one process nothing here communicates.

    torchrun --nproc_per_node 2 -m arkfast.distill --data rsft.jsonl --batch-rows 8
"""
from __future__ import annotations

import atexit
import dataclasses
import os
from collections.abc import Sequence

import torch

__all__ = ["Ranks", "init_ranks"]


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's ``rank`` among ``world`` processes (0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, saves and evaluates."""
        return self.rank == 0

    def share(self, items: Sequence) -> list:
        """This rank's contiguous share of a step's rows (``len(items)`` a multiple of ``world``)."""
        k = len(items) // self.world
        return list(items[self.rank * k:(self.rank + 1) * k])

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """In-place sum of each tensor over the ranks."""
        if self.world > 1:
            import torch.distributed as dist

            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def init_ranks(device: str, *, group: bool = False) -> tuple[Ranks, str]:
    """``(ranks, device)`` from torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``): the
    process group is started (nccl on CUDA, gloo on CPU) and, on CUDA, each rank takes the GPU of its
    local rank. Without torchrun: ``(Ranks(), device)`` unchanged. ``group`` (FSDP) starts the group
    for one rank too, and needs torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if group and "MASTER_ADDR" not in os.environ:
        raise ValueError("--fsdp runs under torchrun (torchrun --nproc-per-node K -m arkfast.distill ... --fsdp)")
    if world <= 1 and not group:
        return Ranks(), device
    import torch.distributed as dist

    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        # Torn down while the interpreter is still whole: a gloo group left alive until the process's
        # static destructors run can abort it at exit ("terminate called without an active exception").
        atexit.register(_destroy_group)
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
