"""The interpreter's bounds check (tests/interpreter_bounds.py) catches a kernel that strays."""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the Triton interpreter")


def _copy_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def copy(src, dst, n, extra, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(src + offs, mask=offs < n + extra, other=0.0)
        tl.store(dst + offs, x, mask=offs < n)

    return copy


def test_in_bounds_and_masked_off_accesses_pass():
    src, dst = torch.arange(5, dtype=torch.float32), torch.full((5,), -1.0)
    _copy_kernel()[(1,)](src, dst, 5, 0, BLOCK=8)  # lanes 5..7 are masked off: never touched
    assert torch.equal(dst, src)


def test_a_load_past_the_end_fails():
    base = torch.arange(12, dtype=torch.float32)
    src, dst = base[:5].clone(), torch.full((5,), -1.0)  # a storage of exactly 5 elements
    with pytest.raises(Exception, match=r"load of 1 element\(s\) outside every tensor"):
        _copy_kernel()[(1,)](src, dst, 5, 1, BLOCK=8)
    view = base[2:7]  # a view: the rest of its storage is in bounds
    _copy_kernel()[(1,)](view, dst, 5, 1, BLOCK=8)
    assert torch.equal(dst, base[2:7])


def test_a_store_past_the_end_fails_before_writing():
    src, dst = torch.arange(8, dtype=torch.float32), torch.full((5,), -1.0)
    with pytest.raises(Exception, match=r"store of 3 element\(s\) outside"):
        _copy_kernel()[(1,)](src, dst, 8, 0, BLOCK=8)
