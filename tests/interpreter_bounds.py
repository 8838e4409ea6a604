"""Bounds checking for kernels run through the Triton interpreter.

On CPU tensors the interpreter loads and stores through raw addresses into the tensors' own memory, so a
kernel that reads or writes past a tensor's storage does not fail: a stray load returns whatever lies
there, a stray store corrupts the heap, and the process crashes later somewhere unrelated (or not at
all, depending on the allocator's layout). :func:`install` wraps the interpreter so that every launch
records the byte ranges of the storages passed to it, and every load and store whose mask is on must
fall inside one of them; otherwise the launch fails with an :class:`OutOfBoundsAccess` naming the
kernel, the access and the first offending address. It is installed for the whole suite by
``conftest.py``.
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = ["OutOfBoundsAccess", "install"]


class OutOfBoundsAccess(AssertionError):
    """A kernel under the interpreter touched memory outside every tensor passed to its launch."""


_ranges: list[tuple[str, np.ndarray, np.ndarray]] = []  # (kernel name, sorted starts, ends) per active launch


def _storages(arg, out: dict[int, int]) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    if isinstance(arg, (tuple, list)):
        for a in arg:
            _storages(a, out)
    elif isinstance(arg, TensorDescriptor):
        _storages(arg.base, out)
    elif hasattr(arg, "untyped_storage"):
        storage = arg.untyped_storage()
        if storage.nbytes():
            out[storage.data_ptr()] = storage.nbytes()


def _check(kind: str, ptrs, mask) -> None:
    if not _ranges:
        return
    name, starts, ends = _ranges[-1]
    addrs = np.asarray(ptrs.data, dtype=np.uint64)
    if mask is not None:
        addrs = addrs[np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)]
    addrs = addrs.reshape(-1)
    if addrs.size == 0:
        return
    from triton.runtime.interpreter import _get_np_dtype

    size = np.uint64(np.dtype(_get_np_dtype(ptrs.get_element_ty())).itemsize)
    slot = np.searchsorted(starts, addrs, side="right") - 1
    ok = slot >= 0
    ok[ok] = addrs[ok] + size <= ends[slot[ok]]
    if not ok.all():
        bad = int(addrs[~ok][0])
        nearest = int(np.argmin(np.abs(starts.astype(np.int64) - bad)))
        raise OutOfBoundsAccess(
            f"kernel {name}: {kind} of {int((~ok).sum())} element(s) outside every tensor passed to the launch "
            f"(first at address {bad:#x}, {bad - int(starts[nearest]):+d} bytes from the start of a "
            f"{int(ends[nearest] - starts[nearest])}-byte storage)")


def install() -> None:
    """Wrap the interpreter's launches, loads and stores with the bounds check (idempotent)."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_arkfast_bounds_checked", False):
        return
    executor_call = interpreter.GridExecutor.__call__

    @functools.wraps(executor_call)
    def call(self, *args, **kwargs):
        found: dict[int, int] = {}
        _storages(args, found)
        _storages(tuple(kwargs.values()), found)
        starts = np.array(sorted(found), dtype=np.uint64)
        ends = starts + np.array([found[s] for s in sorted(found)], dtype=np.uint64)
        _ranges.append((getattr(self.fn, "__name__", "?"), starts, ends))
        try:
            return executor_call(self, *args, **kwargs)
        finally:
            _ranges.pop()

    builder = type(interpreter.interpreter_builder)
    load, store = builder.create_masked_load, builder.create_masked_store
    rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        _check("load", ptrs, mask)
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        _check("store", ptrs, mask)
        return store(self, ptrs, value, mask, cache_policy)

    def atomic_rmw(self, op, ptr, val, mask, sem, scope):
        _check("atomic", ptr, mask)
        return rmw(self, op, ptr, val, mask, sem, scope)

    def atomic_cas(self, ptr, cmp, val, sem, scope):
        _check("atomic", ptr, None)
        return cas(self, ptr, cmp, val, sem, scope)

    interpreter.GridExecutor.__call__ = call
    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    builder.create_atomic_rmw, builder.create_atomic_cas = atomic_rmw, atomic_cas
    interpreter._arkfast_bounds_checked = True
