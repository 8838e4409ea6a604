"""The dispatch rule shared by every op in ``arkfast.kernels``.

On CUDA tensors the Triton kernel runs; on CPU tensors the torch reference runs. Tests force the
kernel onto CPU tensors through the Triton interpreter with :func:`force_triton` (which needs
``TRITON_INTERPRET=1`` in the environment before ``triton`` is first imported). :func:`force_reference`
does the opposite, e.g. to compare a CUDA model against its reference path.

The mode lives in a :class:`contextvars.ContextVar`, so it is scoped to the ``with`` block and to the
current thread/task; nothing here is module-level mutable state.

Under ``torch.compile`` the choice is made once, at trace time: Dynamo cannot read a ContextVar (the
read would break the graph at every op), so the mode is read through
``torch.compiler.assume_constant_result``, which Dynamo calls while tracing and bakes into the graph
as a constant, and the device is a property of the traced tensors. The kernels themselves are
``torch.library`` custom ops with fake implementations, opaque single nodes in the graph. A graph
keeps the mode it was traced under: after entering or leaving :func:`force_triton`, call
``torch._dynamo.reset()`` (or compile again) to trace with the new one.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("arkfast_kernel_mode", default="auto")


def interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@torch.compiler.assume_constant_result
def _current_mode() -> str:
    """``"auto"``, ``"triton"`` or ``"reference"``: a constant of the graph under ``torch.compile``."""
    return _MODE.get()


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op given ``tensors`` should launch its Triton kernel (else its torch reference)."""
    mode = _current_mode()
    if mode == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if mode == "triton":
        if not on_cuda and not interpreter_enabled():
            raise RuntimeError(
                "force_triton() on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
            )
        return True
    return on_cuda


def reference_forced() -> bool:
    """Whether :func:`force_reference` is in effect (callers with a faster path than the reference
    keep to the reference inside it)."""
    return _current_mode() == "reference"


@contextlib.contextmanager
def _mode(value: str) -> Iterator[None]:
    token = _MODE.set(value)
    try:
        yield
    finally:
        _MODE.reset(token)


def force_triton() -> contextlib.AbstractContextManager[None]:
    """Run Triton kernels even on CPU tensors (through the interpreter) inside the block."""
    return _mode("triton")


def force_reference() -> contextlib.AbstractContextManager[None]:
    """Run the torch references even on CUDA tensors inside the block."""
    return _mode("reference")
