"""merge_states: the log-sum-exp merge of partial attention states against its torch reference and
against attention computed over all keys at once."""
import itertools

import pytest
import torch

from arkfast.kernels.merge_states import merge_partials, merge_state, merge_states, merge_states_reference
from kernel_testing import assert_close, assert_compiles_sm90, assert_int64_offsets, poison_like

# Numerically sensitive: CI also runs these under other ATen CPU capabilities (.ci/run).
pytestmark = pytest.mark.numerics


def _attention_state(q, k, v, scale):
    """(o [N, H, D], lse [N, H]) of q [N, H, D] over keys k/v [N, L, H, D]; lse = -inf when L = 0."""
    scores = torch.einsum("nhd,nlhd->nhl", q.double(), k.double()) * scale      # [N, H, L]
    if k.shape[1] == 0:
        return (torch.zeros_like(q, dtype=torch.float64),
                torch.full(q.shape[:2], float("-inf"), dtype=torch.float64))
    o = torch.einsum("nhl,nlhd->nhd", torch.softmax(scores, -1), v.double())
    return o, torch.logsumexp(scores, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,H,D,cuts", [(1, 1, 16, [0, 5]), (17, 3, 64, [0, 3, 3, 20]),
                                         (4, 12, 128, [0, 7, 30, 31])])
def test_merge_equals_attention_over_all_keys(triton_interp, dtype, N, H, D, cuts):
    """Split the keys at ``cuts`` (empty pieces included), attend to each piece, merge: equals
    attention over all keys."""
    torch.manual_seed(N * 1000 + D)
    L = cuts[-1]
    q, k, v = torch.randn(N, H, D), torch.randn(N, L, H, D), torch.randn(N, L, H, D)
    scale = D ** -0.5
    states = [_attention_state(q, k[:, lo:hi], v[:, lo:hi], scale) for lo, hi in itertools.pairwise(cuts)]
    vs = torch.stack([o for o, _ in states], 1).to(dtype)                      # [N, P, H, D]
    ss = torch.stack([s for _, s in states], 1).float()                        # [N, P, H]
    expected_o, expected_lse = _attention_state(q, k, v, scale)
    out = poison_like(torch.empty(N, H, D, dtype=dtype))
    got_o, got_lse = merge_states(vs, ss, out=out)
    assert got_o.data_ptr() == out.data_ptr()
    assert_close(got_o, expected_o, dtype=dtype, name="merged o")
    assert_close(got_lse, expected_lse, dtype=torch.float32, name="merged lse (natural log)")
    ref_o, ref_lse = merge_states_reference(vs, ss)
    assert_close(got_o, ref_o.double(), dtype=dtype, name="o vs reference")
    assert_close(got_lse, ref_lse, dtype=torch.float32, name="lse vs reference")


def test_empty_parts_are_ignored_even_with_garbage(triton_interp):
    """An empty part (lse = -inf) gets weight 0 even if its o is NaN; all parts empty gives o = 0 and
    lse = -inf, never NaN."""
    torch.manual_seed(1)
    N, P, H, D = 3, 3, 2, 32
    v = torch.randn(N, P, H, D)
    s = torch.randn(N, P, H)
    s[0, 1] = float("-inf")
    v[0, 1] = float("nan")            # row 0: middle part empty with garbage values
    s[1] = float("-inf")
    v[1] = float("nan")               # row 1: every part empty
    got_o, got_lse = merge_states(v, s)
    ref_o, ref_lse = merge_states_reference(v, s)
    assert torch.isfinite(got_o).all()
    assert torch.equal(got_o[1], torch.zeros(H, D))
    assert torch.isneginf(got_lse[1]).all()
    assert_close(got_o, ref_o, name="o")
    assert_close(got_lse[[0, 2]], ref_lse[[0, 2]], name="lse")
    keep = [0, 2]                     # dropping the empty part by hand gives the same row 0
    alone_o, alone_lse = merge_states(v[:1, keep], s[:1, keep])
    assert_close(got_o[:1], alone_o, name="o without the empty part")
    assert_close(got_lse[:1], alone_lse, name="lse without the empty part")


def test_merge_state_pair_and_reference_path():
    """The two-state form equals the P-state form, and without the interpreter (CPU dispatch to the
    reference) the numbers agree with the kernel's."""
    torch.manual_seed(2)
    v_a, v_b = torch.randn(5, 4, 64), torch.randn(5, 4, 64)
    s_a, s_b = torch.randn(5, 4) * 3, torch.randn(5, 4) * 3
    o_ref, lse_ref = merge_state(v_a, s_a, v_b, s_b)                          # CPU: reference path
    from arkfast.kernels._dispatch import force_triton
    with force_triton():
        o, lse = merge_state(v_a, s_a, v_b, s_b)
    assert_close(o, o_ref, name="o")
    assert_close(lse, lse_ref, name="lse")
    w_a = torch.sigmoid(s_a - s_b)[..., None]            # exp(s_a) / (exp(s_a) + exp(s_b))
    assert_close(o, w_a * v_a + (1 - w_a) * v_b, name="o vs closed form")
    assert_close(lse, torch.logaddexp(s_a, s_b), name="lse vs logaddexp")


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="N, P, H, D"):
        merge_states(torch.zeros(2, 3, 4), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="dtype"):
        merge_states(torch.zeros(1, 2, 1, 16, dtype=torch.int32), torch.zeros(1, 2, 1))
    with pytest.raises(ValueError, match="out must be"):
        merge_states(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1), out=torch.zeros(1, 1, 8))
    part_o, part_lse, out, lse = torch.zeros(4, 2, 16), torch.zeros(4, 2), torch.empty(2, 2, 16), torch.empty(2, 2)
    with pytest.raises(ValueError, match="part_ptr must be a contiguous"):   # read at part_ptr_ptr + n
        merge_partials(part_o, part_lse, torch.tensor([0, 9, 2, 9, 4], dtype=torch.int32)[::2], out, lse)
    with pytest.raises(ValueError, match="part_ptr is on meta"):            # a pointer of another device
        merge_partials(part_o, part_lse, torch.zeros(3, dtype=torch.int32, device="meta"), out, lse)


def test_compiles_for_sm90():
    assert_compiles_sm90("arkfast.kernels.merge_states")


def test_offsets_are_int64():
    """Row x out row stride is formed in 64 bits (num_heads, which also enters the head mask, is
    multiplied by an int64 slot index: read in the kernel)."""
    assert_int64_offsets("arkfast.kernels.merge_states", {
        name: ("stride_on",) for name in ("merge_partials_d128_bf16", "merge_partials_d16_fp32")})
