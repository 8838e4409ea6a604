"""Packing trajectories into fixed-length training rows: best-fit-decreasing, in C++.

Each training row holds ``capacity`` tokens; sequences of ``lengths[i]`` tokens are packed whole (never
split) into as few rows as best-fit-decreasing finds:

1. visit the items by length, longest first; equal lengths by index, lowest first;
2. put each item into the open bin with the least remaining space that still fits it (ties: the bin
   opened first); if none fits, open a new bin.

Bins are numbered in the order they were opened and list their items in the order they went in. A
zero-length item goes to the fullest open bin, as the rule says. BFD uses at most 11/9 OPT + 4 bins
(D. S. Johnson, 1973); on the long-tailed lengths of reasoning trajectories it is within a fraction of
a percent of the ``ceil(sum / capacity)`` lower bound (see ``benchmarks/bench_packing.py``).

>>> pack([5, 3, 5, 2, 0, 8, 1], capacity=8)
[[5, 4], [0, 1], [2, 3, 6]]

:func:`pack` returns Python lists; :func:`pack_bins` returns the same packing as numpy arrays
(``bin_of``, per-bin totals), cheap to build for a trainer. :func:`pack_reference` is a plain-Python
implementation of the same algorithm, used by the tests and the benchmark.
"""
from __future__ import annotations

import bisect
import dataclasses
import numbers
from collections.abc import Sequence

import numpy as np

from arkfast import _C

_INT64_MAX = np.iinfo(np.int64).max


@dataclasses.dataclass(frozen=True)
class BinPacking:
    """A packing of ``n`` items into ``B`` bins, all arrays int64 numpy.

    ``items [n]`` and ``offsets [B + 1]``: bin ``b`` holds ``items[offsets[b]:offsets[b + 1]]`` in
    insertion order. ``bin_of [n]``: the bin of item ``i``. ``totals [B]``: each bin's summed length.
    """

    items: np.ndarray
    offsets: np.ndarray
    bin_of: np.ndarray
    totals: np.ndarray
    capacity: int

    @property
    def num_bins(self) -> int:
        return len(self.totals)

    def efficiency(self) -> float:
        """Packed tokens over allocated slots, ``sum(totals) / (B * capacity)`` (1.0 when empty)."""
        return float(self.totals.sum()) / (self.num_bins * self.capacity) if self.num_bins else 1.0

    def tolist(self) -> list[list[int]]:
        """The bins as lists of Python ints, the form :func:`pack` returns."""
        return _C.bins_to_lists(self.items, self.offsets)


def _check_capacity(capacity) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral):
        raise TypeError(f"capacity must be an integer, got {type(capacity).__name__} {capacity!r}")
    capacity = int(capacity)
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    if capacity > _INT64_MAX:
        raise ValueError(f"capacity must fit in int64, got {capacity}")
    return capacity


def _first_non_integer(values: Sequence) -> tuple[int, object]:
    """Index and value of the first element that is not an integer (error path only)."""
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            return i, v
    raise AssertionError("no non-integer element")  # callers only ask when numpy saw one


def _as_lengths(lengths, capacity: int) -> np.ndarray:
    """Validate ``lengths`` against ``capacity``; return them as a contiguous int64 array [n]."""
    from_numpy = isinstance(lengths, np.ndarray)
    if not from_numpy and len(lengths) == 0:
        return np.zeros(0, dtype=np.int64)  # np.asarray([]) would be float64
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {arr.shape}")
    if arr.dtype == object and not from_numpy:
        # Python ints beyond int64 (or mixed objects): check the types, then the range below.
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in arr):
            i, v = _first_non_integer(arr)
            raise TypeError(f"lengths must be integers, got lengths[{i}] = {v!r} ({type(v).__name__})")
    elif arr.dtype.kind not in "iu":
        if from_numpy:
            raise TypeError(f"lengths must have an integer dtype, got {arr.dtype}")
        i, v = _first_non_integer(lengths)
        raise TypeError(f"lengths must be integers, got lengths[{i}] = {v!r} ({type(v).__name__})")
    # Vectorised range check; report the first offender. (An unsigned array is never negative.)
    negative = arr < 0
    if negative.any():
        i = int(np.argmax(negative))
        raise ValueError(f"lengths[{i}] = {arr[i]} is negative")
    over = arr > capacity
    if over.any():
        i = int(np.argmax(over))
        raise ValueError(f"lengths[{i}] = {arr[i]} exceeds capacity {capacity}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def pack_bins(lengths: Sequence[int] | np.ndarray, capacity: int) -> BinPacking:
    """Best-fit-decreasing packing of ``lengths`` into bins of ``capacity``, as numpy arrays.

    ``lengths``: a sequence of Python ints or a 1-D numpy array of any integer dtype, each in
    ``[0, capacity]``. Raises ``ValueError`` naming the index and value of a negative or over-capacity
    length, or for ``capacity <= 0``; ``TypeError`` for non-integer values or dtypes.
    """
    capacity = _check_capacity(capacity)
    arr = _as_lengths(lengths, capacity)
    items, offsets, bin_of, totals = _C.best_fit_decreasing(arr, capacity)
    return BinPacking(items=items, offsets=offsets, bin_of=bin_of, totals=totals, capacity=capacity)


def pack(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Pack item indices into bins of ``capacity`` by best-fit-decreasing (see the module docstring).

    Returns a list of bins in the order they were opened, each a list of indices into ``lengths`` in
    insertion order: every index appears exactly once and each bin's total length is
    ``<= capacity``. Empty ``lengths`` gives ``[]``. Errors as in :func:`pack_bins`.
    """
    return pack_bins(lengths, capacity).tolist()


def pack_reference(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Plain-Python best-fit-decreasing, the same rule as :func:`pack`; no validation.

    Open bins live in a sorted list of ``(remaining, bin id)``: ``bisect`` finds the least remaining
    space that fits, the earliest-opened bin among equals. O(n log n) comparisons, O(n * bins) moves.
    """
    lengths = [int(v) for v in lengths]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties by index
    bins: list[list[int]] = []
    open_bins: list[tuple[int, int]] = []  # sorted (remaining, bin id)
    for i in order:
        length = lengths[i]
        k = bisect.bisect_left(open_bins, (length, -1))
        if k == len(open_bins):
            bin_id, remaining = len(bins), capacity
            bins.append([])
        else:
            remaining, bin_id = open_bins.pop(k)
        bins[bin_id].append(i)
        bisect.insort(open_bins, (remaining - length, bin_id))
    return bins
