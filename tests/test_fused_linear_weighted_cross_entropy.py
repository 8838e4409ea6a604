"""Fused linear + step-weighted cross-entropy (Triton kernel through the interpreter) against a float64
torch reference: loss, log-probabilities and every gradient, at awkward sizes and with forced chunking."""
import importlib

import pytest
import torch

from arkfast.kernels._dispatch import force_triton
from arkfast.kernels.fused_linear_weighted_cross_entropy import (
    FusedLinearWeightedCrossEntropy,
    fused_linear_weighted_cross_entropy,
    fused_linear_weighted_cross_entropy_reference,
)
from kernel_testing import MUL32, MUL64, TOLERANCES, assert_close, assert_compiles_sm90, sm90_ptx

# Numerically sensitive: CI also runs these under other ATen CPU capabilities (.ci/run).
pytestmark = pytest.mark.numerics

flce = importlib.import_module("arkfast.kernels.fused_linear_weighted_cross_entropy")

IGNORE = -100


# A 64-bit product of two registers (row * stride in int64) and a 32-bit one (the same product left
# in int32, which wraps past 2**31 elements) in sm_90 PTX; multiplies by constants are not matched.
@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the launcher allocates starts as NaN, so anything left unwritten shows up."""
    monkeypatch.setattr(flce, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                                  dtype=dtype, device=device))


def _chunks_of(monkeypatch, rows):
    monkeypatch.setattr(flce, "_chunk_rows", lambda n_rows, row_stride, elem_size: rows)


def _inputs(seed, N, H, V, dtype, *, bias=False, ignore_frac=0.15):
    """Random inputs; about ``ignore_frac`` of labels ignored, weights of both signs with some zeros."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * H ** -0.5 * 2).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignore_frac] = IGNORE
    token_weights = torch.randn(N, generator=g) + 0.5
    token_weights[torch.rand(N, generator=g) < 0.1] = 0.0
    return hidden, weight, b, labels, token_weights


def _run(fn, hidden, weight, bias, labels, token_weights, upstream, **kw):
    """Forward, then backward with the given upstream gradients; returns outputs and input grads."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (hidden, weight, bias, token_weights)]
    h, w, b, tw = leaves
    out = fn(h, w, labels, tw, bias=b, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward([o for o in outs], [u.to(o.dtype) for o, u in zip(outs, upstream)])
    return [o.detach() for o in outs], [t.grad if t is not None else None for t in leaves]


def _check(seed, N, H, V, dtype, reduction, *, bias=False, ignore_frac=0.15, **kw):
    hidden, weight, b, labels, tw = _inputs(seed, N, H, V, dtype, bias=bias, ignore_frac=ignore_frac)
    g = torch.Generator().manual_seed(seed + 1)
    upstream = [torch.randn(N if reduction == "none" else (), generator=g, dtype=torch.float64)]
    if kw.get("return_logprobs"):
        upstream.append(torch.randn(N, generator=g, dtype=torch.float64))
    with force_triton():
        got, got_grads = _run(fused_linear_weighted_cross_entropy, hidden, weight, b, labels, tw,
                              upstream, reduction=reduction, ignore_index=IGNORE, **kw)
    ref64 = [t.double() if t is not None else None for t in (hidden, weight, b, tw)]
    exp, exp_grads = _run(fused_linear_weighted_cross_entropy_reference, *ref64[:3], labels, ref64[3],
                          upstream, reduction=reduction, ignore_index=IGNORE, **kw)
    assert got[0].dtype == torch.float32 and got[0].shape == exp[0].shape
    for name, a, e in zip(("loss", "logp"), got, exp):
        assert_close(a, e, dtype=dtype, name=name)
    atol, rtol = TOLERANCES[dtype]
    for name, a, e, t in zip(("grad_hidden", "grad_weight", "grad_bias", "grad_token_weights"),
                             got_grads, exp_grads, (hidden, weight, b, tw)):
        if t is None:
            continue
        assert a.dtype == t.dtype, f"{name} dtype {a.dtype} != input dtype {t.dtype}"
        # Gradients are sums over tokens (or vocab): absolute tolerance on the scale of the largest entry.
        scale = e.abs().max().item() or 1.0
        assert_close(a, e, dtype=dtype, atol=atol * scale, rtol=rtol, name=name)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("N", [1, 423])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(triton_interp, dtype, N, reduction):
    _check(N * 31 + len(reduction), N, 64, 1000, dtype, reduction, bias=(N == 423))


def test_large_vocab(triton_interp):
    # 32003 = 7 full 4096-column blocks + a ragged one; the buffer row stride is padded to 32016.
    _check(7, 423, 32, 32003, torch.bfloat16, "mean")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_chunked_with_an_all_ignored_chunk(triton_interp, monkeypatch, reduction):
    _chunks_of(monkeypatch, 48)  # 183 rows = 3 full chunks + 39
    hidden, weight, b, labels, tw = _inputs(3, 183, 32, 517, torch.float32, bias=True)
    labels[48:96] = IGNORE  # the whole second chunk
    labels[-39:] = IGNORE  # and the ragged last one
    upstream = [torch.randn(183 if reduction == "none" else (), dtype=torch.float64)]
    with force_triton():
        got, got_grads = _run(fused_linear_weighted_cross_entropy, hidden, weight, b, labels, tw,
                              upstream, reduction=reduction, z_loss=1e-3)
    exp, exp_grads = _run(fused_linear_weighted_cross_entropy_reference, hidden.double(), weight.double(),
                          b.double(), labels, tw.double(), upstream, reduction=reduction, z_loss=1e-3)
    assert_close(got[0], exp[0], dtype=torch.float32, name="loss")
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias", "grad_tw"), got_grads, exp_grads):
        assert_close(a, e, dtype=torch.float32, name=name)
    assert torch.all(got_grads[0][48:96] == 0) and torch.all(got_grads[0][-39:] == 0)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_z_loss_softcap_and_logprobs(triton_interp, monkeypatch, dtype, reduction):
    _chunks_of(monkeypatch, 32)
    _check(11, 81, 32, 777, dtype, reduction, bias=True, z_loss=1e-2, softcap=4.0, return_logprobs=True)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_softcap_and_z_loss_precomputed_grads(triton_interp, reduction):
    # mean/sum without logprobs: grads formed in the forward and scaled by the upstream scalar.
    _check(13, 57, 32, 300, torch.float32, reduction, z_loss=1e-2, softcap=2.0)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_all_tokens_ignored(triton_interp, reduction):
    hidden, weight, _, labels, tw = _inputs(5, 17, 16, 100, torch.float32)
    labels[:] = IGNORE
    h = hidden.requires_grad_()
    w = weight.requires_grad_()
    with force_triton():
        loss, logp = fused_linear_weighted_cross_entropy(h, w, labels, tw, reduction=reduction,
                                                         return_logprobs=True)
    assert torch.all(loss == 0) and torch.all(logp == 0)  # "mean" of nothing is 0/0 := 0
    loss.sum().backward()
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_negative_infinite_logits(triton_interp, reduction, softcap):
    # A -inf bias masks the first 4100 vocabulary entries, so every row's first 4096-column block is all
    # -inf and the online max starts at -inf: exp(-inf - -inf) must not turn the sum into NaN. "sum"
    # forms the grads in the forward, "none" with logprobs recomputes them in backward.
    N, H, V = 9, 16, 4200
    hidden, weight, _, labels, tw = _inputs(17, N, H, V, torch.float32)
    bias = torch.randn(V, generator=torch.Generator().manual_seed(18))
    bias[:4100] = float("-inf")
    labels = torch.where(labels == IGNORE, IGNORE, 4100 + labels % 100)
    kw = {"reduction": reduction, "ignore_index": IGNORE, "softcap": softcap,
          "return_logprobs": reduction == "none"}
    g = torch.Generator().manual_seed(19)
    upstream = [torch.randn(N if reduction == "none" else (), generator=g, dtype=torch.float64),
                torch.randn(N, generator=g, dtype=torch.float64)][: 1 + kw["return_logprobs"]]
    with force_triton():
        got, got_grads = _run(fused_linear_weighted_cross_entropy, hidden, weight, bias, labels, tw,
                              upstream, **kw)
    exp, exp_grads = _run(fused_linear_weighted_cross_entropy_reference, hidden.double(), weight.double(),
                          bias.double(), labels, tw.double(), upstream, **kw)
    for name, a, e in zip(("loss", "logp"), got, exp):
        assert_close(a, e, dtype=torch.float32, name=name)
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias", "grad_tw"), got_grads, exp_grads):
        assert_close(a, e, dtype=torch.float32, name=name)
    assert torch.all(got_grads[2][:4100] == 0), "masked vocabulary entries got a bias gradient"


def test_float16_and_int32_labels(triton_interp):
    hidden, weight, _, labels, tw = _inputs(9, 33, 32, 250, torch.float16)
    with force_triton():
        got = fused_linear_weighted_cross_entropy(hidden, weight, labels.int(), tw.half())
    exp = fused_linear_weighted_cross_entropy_reference(hidden.double(), weight.double(), labels, tw.double())
    assert_close(got, exp, dtype=torch.float16, name="loss")


def test_gradcheck_float64_through_the_kernel(triton_interp):
    # float64 inputs run the kernel with float64 statistics, so finite differences are meaningful.
    g = torch.Generator().manual_seed(21)
    h = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(19, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(19, generator=g, dtype=torch.float64, requires_grad=True)
    tw = torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, IGNORE, 18, 0])

    def recomputed(h, w, b, tw):  # per-token upstream gradients: backward recomputes the logits
        return fused_linear_weighted_cross_entropy(h, w, labels, tw, bias=b, reduction="none",
                                                   z_loss=0.05, softcap=3.0, return_logprobs=True)

    def precomputed(h, w, b, tw):  # one upstream scalar: grads formed in the forward, then scaled
        return fused_linear_weighted_cross_entropy(h, w, labels, tw, bias=b, reduction="mean",
                                                   z_loss=0.05, softcap=3.0)

    assert torch.autograd.gradcheck(recomputed, (h, w, b, tw), fast_mode=True)
    assert torch.autograd.gradcheck(precomputed, (h, w, b, tw), fast_mode=True)


def test_module_matches_function_and_cpu_dispatch_runs_reference():
    hidden, weight, _, labels, tw = _inputs(2, 23, 16, 64, torch.float32)
    module = FusedLinearWeightedCrossEntropy(reduction="sum", z_loss=1e-3)
    with force_triton():
        kernel = module(hidden, weight, labels, tw)
    auto = module(hidden, weight, labels, tw)  # CPU tensors, no forcing: the torch reference
    expected = fused_linear_weighted_cross_entropy_reference(hidden, weight, labels, tw, reduction="sum",
                                                             z_loss=1e-3)
    assert torch.equal(auto, expected)
    assert_close(kernel, expected, name="module")


def test_torch_compile(triton_interp):
    # aot_eager: traces the op and its registered autograd without inductor's C++ compile time.
    hidden, weight, _, labels, tw = _inputs(4, 40, 16, 300, torch.float32)

    def step(h, w):
        return fused_linear_weighted_cross_entropy(torch.tanh(h), w, labels, tw, reduction="none").sum() * 2

    def run(fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    eager = run(step)
    compiled = run(torch.compile(step, backend="aot_eager"))
    for name, a, e in zip(("loss", "grad_hidden", "grad_weight"), compiled, eager):
        assert_close(a, e, name=name)

    # The custom op on its own traces without a graph break.
    def op_only(h, w):
        out = torch.ops.arkfast.fused_linear_weighted_ce(
            h, w, labels, tw, None, IGNORE, "mean", 0.0, 0.0, True, True, True, False)
        return out[0] * 3

    torch._dynamo.reset()
    compiled = run(torch.compile(op_only, backend="aot_eager", fullgraph=True))
    for name, a, e in zip(("loss", "grad_hidden", "grad_weight"), compiled, run(op_only)):
        assert_close(a, e, name=name)


@pytest.mark.parametrize("bad, error", [
    ({"hidden": torch.zeros(2, 3, 8)}, ValueError),
    ({"weight": torch.zeros(10, 7)}, ValueError),
    ({"weight": torch.zeros(10, 8, dtype=torch.float64)}, TypeError),
    ({"labels": torch.zeros(3, dtype=torch.int64)}, ValueError),
    ({"labels": torch.zeros(4)}, TypeError),
    ({"token_weights": torch.zeros(5)}, ValueError),
    ({"bias": torch.zeros(9)}, ValueError),
    ({"reduction": "avg"}, ValueError),
    ({"z_loss": -1.0}, ValueError),
    ({"softcap": 0.0}, ValueError),
])
def test_invalid_arguments(bad, error):
    args = {"hidden": torch.zeros(4, 8), "weight": torch.zeros(10, 8), "labels": torch.zeros(4, dtype=torch.int64),
            "token_weights": None, "bias": None, "reduction": "mean", "z_loss": 0.0, "softcap": None}
    args.update(bad)
    with pytest.raises(error):
        fused_linear_weighted_cross_entropy(
            args["hidden"], args["weight"], args["labels"], args["token_weights"], bias=args["bias"],
            reduction=args["reduction"], z_loss=args["z_loss"], softcap=args["softcap"])


def test_compiles_for_sm90():
    records = assert_compiles_sm90("arkfast.kernels.fused_linear_weighted_cross_entropy")
    # Every fp32/bf16/fp16 configuration streams the logits with 16-byte vector loads.
    assert all(r["vector_loads"] for r in records if "fp64" not in r["name"])


def test_row_offsets_are_64_bit():
    # A chunk row of the logits buffer starts at row * V_pad elements: 14k rows x 152k columns pass
    # 2**31, so the product must be formed in int64.
    ptx = sm90_ptx("arkfast.kernels.fused_linear_weighted_cross_entropy",
                    "weighted_ce_bf16_loss_grad_softcap", "weighted_ce_fp32_loss")
    for name, code in ptx.items():
        assert not MUL32.search(code), f"{name}: 32-bit offset product {MUL32.search(code).group()}"
        assert MUL64.search(code), name
