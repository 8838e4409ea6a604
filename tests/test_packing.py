"""Best-fit-decreasing packing: the C++ packer against two plain-Python versions of the same rule."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arkfast import _C
from arkfast.packing import pack, pack_bins, pack_reference


def naive_bfd(lengths, capacity):
    """The rule read literally: linear scan over the bins for the least remaining space that fits."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, remaining = [], []
    for i in order:
        fits = [b for b in range(len(bins)) if remaining[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (remaining[b], b))
        else:
            b = len(bins)
            bins.append([])
            remaining.append(capacity)
        bins[b].append(i)
        remaining[b] -= lengths[i]
    return bins


def check_invariants(bins, lengths, capacity):
    flat = [i for b in bins for i in b]
    assert sorted(flat) == list(range(len(lengths))), "every index exactly once"
    totals = [sum(lengths[i] for i in b) for b in bins]
    assert all(t <= capacity for t in totals), f"bin over capacity {capacity}: max total {max(totals)}"
    assert all(len(b) > 0 for b in bins), "no empty bins"


def random_lengths(rng, n, capacity, kind):
    if kind == "uniform":
        return rng.integers(0, capacity + 1, n)
    if kind == "lognormal":  # long-tailed, like reasoning trajectories
        return np.clip(rng.lognormal(np.log(max(capacity, 2) / 8), 1.0, n), 0, capacity).astype(np.int64)
    if kind == "few_values":  # many ties
        return rng.choice(np.array([0, 1, capacity // 3, capacity // 2, capacity]), n)
    raise AssertionError(kind)


@pytest.mark.parametrize("lengths, capacity, expected", [
    ([], 8, []),
    ([3], 8, [[0]]),
    ([0], 8, [[0]]),
    ([8], 8, [[0]]),
    ([5, 3, 5, 2, 0, 8, 1], 8, [[5, 4], [0, 1], [2, 3, 6]]),
    ([1, 1, 1], 1, [[0], [1], [2]]),
    ([0, 0, 0], 1, [[0, 1, 2]]),
    ([4, 4, 4, 4], 8, [[0, 1], [2, 3]]),
    # 6 fills the bin left with 6 rather than the one left with 7; 4 and 1 then go to the latter.
    ([10, 9, 6, 4, 1], 16, [[0, 2], [1, 3, 4]]),
    # zero-length items join the fullest bin, the earliest among equally full ones.
    ([0, 3, 5, 0, 2], 5, [[2, 0, 3], [1, 4]]),
])
def test_known_packings(lengths, capacity, expected):
    assert naive_bfd(lengths, capacity) == expected
    assert pack_reference(lengths, capacity) == expected
    assert pack(lengths, capacity) == expected


@pytest.mark.parametrize("n", [1, 17, 423, 3000])
@pytest.mark.parametrize("capacity", [1, 7, 64, 8192])
@pytest.mark.parametrize("kind", ["uniform", "lognormal", "few_values"])
def test_matches_reference(n, capacity, kind):
    rng = np.random.default_rng([n, capacity, len(kind)])
    lengths = random_lengths(rng, n, capacity, kind)
    bins = pack(lengths, capacity)
    expected = pack_reference(lengths.tolist(), capacity)
    assert bins == expected
    check_invariants(bins, lengths.tolist(), capacity)
    if n <= 423:
        assert naive_bfd(lengths.tolist(), capacity) == expected


def test_large_capacity_path_matches_small():
    """Capacities above the per-value tables take the ordered-set path; scaling all sizes keeps the bins."""
    rng = np.random.default_rng(7)
    lengths = random_lengths(rng, 5000, 4096, "lognormal")
    small = pack(lengths, 4096)
    scale = 10**9 + 7
    big = pack(lengths * scale, 4096 * scale)
    assert big == small
    assert pack_reference((lengths * scale).tolist(), 4096 * scale) == small


def test_long_tailed_100k_matches_reference():
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(6.5, 1.0, 100_000), 16, 8192).astype(np.int64)
    packed = pack_bins(lengths, 8192)
    assert packed.tolist() == pack_reference(lengths.tolist(), 8192)
    lower_bound = -(-int(lengths.sum()) // 8192)
    assert packed.num_bins <= lower_bound * 1.01, (packed.num_bins, lower_bound)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 40).flatmap(
    lambda cap: st.tuples(st.lists(st.integers(0, cap), max_size=60), st.just(cap))))
def test_hypothesis_matches_naive(case):
    lengths, capacity = case
    bins = pack(lengths, capacity)
    assert bins == naive_bfd(lengths, capacity) == pack_reference(lengths, capacity)
    check_invariants(bins, lengths, capacity)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                                   np.uint64])
def test_numpy_integer_dtypes(dtype):
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 101, 257).astype(dtype)
    expected = pack_reference(lengths.tolist(), 100)
    assert pack(lengths, 100) == expected
    assert pack(lengths[::2], np.int32(100)) == pack_reference(lengths[::2].tolist(), 100)  # strided


def test_pack_bins_arrays_agree_with_lists():
    rng = np.random.default_rng(4)
    lengths = random_lengths(rng, 1000, 512, "lognormal")
    packed = pack_bins(lengths, 512)
    bins = pack(lengths, 512)
    assert packed.num_bins == len(bins)
    for array in (packed.items, packed.offsets, packed.bin_of, packed.totals):
        assert array.dtype == np.int64
    np.testing.assert_array_equal(packed.offsets, np.cumsum([0] + [len(b) for b in bins]))
    np.testing.assert_array_equal(packed.items, [i for b in bins for i in b])
    np.testing.assert_array_equal(packed.totals, [int(lengths[b].sum()) for b in bins])
    np.testing.assert_array_equal(packed.bin_of[packed.items],
                                  np.repeat(np.arange(len(bins)), [len(b) for b in bins]))
    assert packed.efficiency() == pytest.approx(lengths.sum() / (len(bins) * 512))
    empty = pack_bins([], 10)
    assert empty.num_bins == 0 and empty.items.size == 0 and empty.offsets.tolist() == [0]


@pytest.mark.parametrize("lengths, capacity, error, message", [
    ([3, 1, 4, -5, 2], 10, ValueError, r"lengths\[3\] = -5 is negative"),
    (np.array([3, -1], dtype=np.int16), 10, ValueError, r"lengths\[1\] = -1 is negative"),
    ([3, 11, 4], 10, ValueError, r"lengths\[1\] = 11 exceeds capacity 10"),
    (np.array([0, 300], dtype=np.uint16), 255, ValueError, r"lengths\[1\] = 300 exceeds capacity 255"),
    ([1, 2**70], 10, ValueError, r"lengths\[1\] = 1180591620717411303424 exceeds capacity 10"),
    ([1, 2], 0, ValueError, r"capacity must be positive, got 0"),
    ([1, 2], -1, ValueError, r"capacity must be positive, got -1"),
    ([1, 2], 2**64, ValueError, r"capacity must fit in int64"),
    ([1, 2], 2.5, TypeError, r"capacity must be an integer, got float 2.5"),
    ([1, 2], True, TypeError, r"capacity must be an integer, got bool"),
    ([1, 2.5, 3], 10, TypeError, r"lengths\[1\] = 2.5 \(float\)"),
    ([1, "7"], 10, TypeError, r"lengths\[1\] = '7' \(str\)"),
    ([1, 2**70, 0.5], 10, TypeError, r"lengths\[2\] = 0.5"),
    (np.array([1.0, 2.0]), 10, TypeError, r"integer dtype, got float64"),
    (np.array([True, False]), 10, TypeError, r"integer dtype, got bool"),
    (np.array([1, 2], dtype=object), 10, TypeError, r"integer dtype, got object"),
    (np.zeros((2, 3), dtype=np.int64), 10, ValueError, r"1-D, got shape \(2, 3\)"),
])
def test_errors_name_the_bad_value(lengths, capacity, error, message):
    with pytest.raises(error, match=message):
        pack(lengths, capacity)


def test_binding_takes_only_contiguous_int64():
    with pytest.raises(TypeError):
        _C.best_fit_decreasing(np.array([1, 2], dtype=np.int32), 10)
    with pytest.raises(TypeError):
        _C.best_fit_decreasing(np.arange(10, dtype=np.int64)[::2], 10)
    with pytest.raises(ValueError, match=r"\[0, capacity\]"):  # memory-safety re-check in C++
        _C.best_fit_decreasing(np.array([1, 11], dtype=np.int64), 10)
    with pytest.raises(ValueError, match="capacity must be positive"):
        _C.best_fit_decreasing(np.array([1], dtype=np.int64), 0)
    with pytest.raises(ValueError, match="offsets"):
        _C.bins_to_lists(np.arange(3, dtype=np.int64), np.array([0, 5], dtype=np.int64))


@settings(max_examples=150, deadline=None)
@given(st.integers(2**17, 2**40).flatmap(
    lambda cap: st.tuples(st.lists(st.sampled_from([0, 1, cap // 7, cap // 3, cap // 2, cap - 1, cap]),
                                   max_size=40), st.just(cap))))
def test_hypothesis_large_capacity_matches_naive(case):
    lengths, capacity = case
    assert pack(lengths, capacity) == naive_bfd(lengths, capacity)
