"""Tables, constants and host helpers shared by the kernel modules (one definition each).

* :data:`DTYPES` / :data:`TRITON_TYPE`: the activation and cache dtypes the kernels take, and each one's
  Triton type name (``"fp32"``, ``"bf16"``, ``"fp16"``) for the AOT signatures of :mod:`._aot`.
* :data:`HEAD_DIMS`: the head dims the paged-cache kernels (cache write, decode, merge) compile for.
* :data:`LOG2_E` / :data:`LN_2`: the base changes of the base-2 online softmax. Kernels do
  ``exp(x) = 2^(x * log2 e)`` with ``exp2`` (the hardware instruction) and turn a base-2 log-sum-exp
  back into the natural log by ``ln(s) = log2(s) * ln 2``. Host code uses the floats;
  ``@triton.jit`` code uses :data:`JIT_LOG2_E` / :data:`JIT_LN_2` (a jit function may only read
  ``tl.constexpr`` globals). Same values to the last bit: ``log2(e) = 1.4426950408889634``,
  ``ln 2 = 0.6931471805599453``.
* :func:`upload`: host index lists to device tensors in one host-to-device copy.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import triton.language as tl

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
HEAD_DIMS = (16, 32, 64, 128, 256)

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
JIT_LOG2_E = tl.constexpr(LOG2_E)
JIT_LN_2 = tl.constexpr(LN_2)


def cdiv(n: int, d: int) -> int:
    """``ceil(n / d)`` for host ints (``triton.cdiv`` is a jit-able function, ~10 us a call: too slow
    for planning loops)."""
    return -(-n // d)


def round_up(n: int, multiple: int) -> int:
    return cdiv(n, multiple) * multiple


def upload(parts: Sequence[Sequence[int] | torch.Tensor], dtype: torch.dtype,
           device: torch.device | str, *, align: int = 16) -> list[torch.Tensor]:
    """Host integer data → tensors of ``dtype`` on ``device``, in one host-to-device copy.

    ``parts``: lists of ints (each becomes a 1-D tensor) or CPU tensors (each keeps its shape). They
    are packed into one flat host buffer (pinned when ``device`` is CUDA, so the copy is
    asynchronous), each part starting at a multiple of ``align`` bytes so every view handed to a
    kernel has an aligned base pointer, copied once, and returned as views of the device buffer in
    the order given. On a CPU ``device`` the views are of the host buffer (no copy).
    """
    device = torch.device(device)
    step = max(1, align // dtype.itemsize)
    sizes = [p.numel() if isinstance(p, torch.Tensor) else len(p) for p in parts]
    offsets = list(itertools.accumulate((round_up(n, step) for n in sizes), initial=0))
    flat = torch.zeros(offsets[-1], dtype=dtype, pin_memory=device.type == "cuda")
    for part, off, n in zip(parts, offsets, sizes):
        if n:
            flat[off:off + n] = torch.as_tensor(part, dtype=dtype).reshape(-1)
    if device.type != "cpu":
        flat = flat.to(device, non_blocking=True)
    shapes = [p.shape if isinstance(p, torch.Tensor) else (n,) for p, n in zip(parts, sizes)]
    return [flat[off:off + n].view(shape) for off, n, shape in zip(offsets, sizes, shapes)]
