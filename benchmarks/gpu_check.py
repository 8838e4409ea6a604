"""The correctness pass before any timing: every kernel against its torch reference, in bf16 and fp16.

    python -m benchmarks.gpu_check            # on CUDA: real kernels (the interpreter must be off)
    python -m benchmarks.gpu_check --smoke    # CPU: the same checks through the Triton interpreter, tiny shapes

Each check draws fresh random inputs at awkward sizes (1, 17, 423, block boundaries), runs the public
op (the Triton kernel on CUDA tensors; forced through the interpreter on CPU with ``--smoke``) into
NaN-poisoned outputs where the op takes ``out=``, and compares with the op's reference run on the
same inputs upcast to float64. The figure is ``||out - ref|| / ||ref||``; a NaN anywhere fails.

Tolerance: ``4 u`` with ``u`` the unit roundoff of the dtype (bf16 ``2**-8``, fp16 ``2**-11``). The
output's own rounding is ``u / sqrt(3)`` in norm for uniformly distributed rounding errors; the
attention kernels also round the softmax probabilities to the input dtype before the PV product (at
most ``u`` more), and RMSNorm may round ``x * rstd`` once before the weight (``u``): ``4 u`` leaves
about twice the worst expected error. Exact ops (the KV-cache write) must match bit for bit.

One record per (kernel, case, dtype) goes to ``<results>/gpu_check.jsonl``; the exit status is 1 when
any check fails, so the suite reports it before any speed of that kernel.
"""
# The case generators below yield lambdas over their loop's tensors; run_checks calls each case before
# the generator advances, so the late binding B023 warns about is the intent here.
# ruff: noqa: B023
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

try:
    from benchmarks import harness
except ImportError:  # run as a script: python benchmarks/gpu_check.py
    import harness

UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
TOL_FACTOR = 4.0  # see the module docstring
# name, kernel(), reference(), exact. A case's callables are run before the next case is drawn.
Case = tuple[str, Callable[[], Any], Callable[[], Any], bool]


def _rand(gen: torch.Generator, *shape, dtype, device, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)


def _up(x):
    """float64 copy of a floating tensor (ints and None unchanged)."""
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _poison(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def rms_norm_cases(dtype, device, gen, smoke) -> Iterator[Case]:
    from arkfast.kernels.rms_norm import rms_norm, rms_norm_reference

    shapes = [(17, 64)] if smoke else [(1, 2048), (17, 4096), (423, 100), (4096, 8192)]
    for rows, H in shapes:
        x = _rand(gen, rows, H, dtype=dtype, device=device, scale=3.0)
        w = (1 + 0.5 * torch.randn(H, generator=gen, device=device)).to(dtype)
        r = _rand(gen, rows, H, dtype=dtype, device=device)
        yield f"{rows}x{H}", lambda: rms_norm(x, w, 1e-6), lambda: rms_norm_reference(_up(x), _up(w), 1e-6), False
        yield (f"{rows}x{H}+residual", lambda: rms_norm(x, w, 1e-6, r),
               lambda: rms_norm_reference(_up(x), _up(w), 1e-6, _up(r)), False)
        g = _rand(gen, rows, H, dtype=dtype, device=device)

        def grads(fn, x, w, g):
            xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()
            fn(xl, wl, 1e-6).backward(g)
            return xl.grad, wl.grad
        yield (f"{rows}x{H} backward", lambda: grads(rms_norm, x, w, g),
               lambda: grads(rms_norm_reference, _up(x), _up(w), _up(g)), False)


def rope_cases(dtype, device, gen, smoke) -> Iterator[Case]:
    from arkfast.kernels.rope import apply_rope, apply_rope_reference, rope_inv_freq

    shapes = [(5, 4, 2, 32)] if smoke else [(1, 32, 8, 128), (423, 32, 8, 128), (17, 14, 2, 64)]
    for T, Hq, Hkv, D in shapes:
        qkv = _rand(gen, T, (Hq + 2 * Hkv) * D, dtype=dtype, device=device).view(T, Hq + 2 * Hkv, D)
        q, k = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv]  # strided views, as the model passes them
        pos = torch.randint(0, 8192, (T,), generator=gen, device=device)
        inv_freq, scale = rope_inv_freq(D, 500000.0)
        inv_freq = inv_freq.to(device)
        yield (f"T{T} {Hq}/{Hkv} D{D}", lambda: apply_rope(q, k, pos, inv_freq, scale),
               lambda: apply_rope_reference(_up(q), _up(k), pos, inv_freq.double(), scale), False)
        gq = _rand(gen, T, Hq, D, dtype=dtype, device=device)
        gk = _rand(gen, T, Hkv, D, dtype=dtype, device=device)

        def grads(fn, q, k, gq, gk, freq):
            ql, kl = q.detach().requires_grad_(), k.detach().requires_grad_()
            out_q, out_k = fn(ql, kl, pos, freq, scale)
            torch.autograd.backward([out_q, out_k], [gq, gk])
            return ql.grad, kl.grad
        yield (f"T{T} {Hq}/{Hkv} D{D} backward", lambda: grads(apply_rope, q, k, gq, gk, inv_freq),
               lambda: grads(apply_rope_reference, _up(q), _up(k), _up(gq), _up(gk), inv_freq.double()), False)


def swiglu_cases(dtype, device, gen, smoke) -> Iterator[Case]:
    from arkfast.kernels.swiglu import swiglu, swiglu_reference

    shapes = [(5, 64)] if smoke else [(1, 5632), (423, 100), (4096, 14336)]
    for T, I in shapes:
        gu = _rand(gen, T, 2 * I, dtype=dtype, device=device, scale=2.0)
        go = _rand(gen, T, I, dtype=dtype, device=device)
        yield f"{T}x{I}", lambda: swiglu(gu), lambda: swiglu_reference(_up(gu)), False

        def grad(fn, x, g):
            leaf = x.detach().requires_grad_()
            fn(leaf).backward(g)
            return leaf.grad
        yield (f"{T}x{I} backward", lambda: grad(swiglu, gu, go),
               lambda: grad(swiglu_reference, _up(gu), _up(go)), False)


def paged_kv_cases(dtype, device, gen, smoke) -> Iterator[Case]:
    from arkfast.kernels.paged_kv import write_kv_cache, write_kv_cache_reference

    T, Hkv, D, blocks, bs = (5, 2, 32, 4, 16) if smoke else (423, 8, 128, 64, 16)
    k = _rand(gen, T, Hkv, D, dtype=dtype, device=device)
    v = _rand(gen, T, Hkv, D, dtype=dtype, device=device)
    slots = torch.randperm(blocks * bs, generator=gen, device=device)[:T]
    slots[::7] = -1  # padding rows: nothing written

    def run(write):
        kc = torch.zeros(blocks, bs, Hkv, D, dtype=dtype, device=device)
        vc = torch.zeros_like(kc)
        write(k, v, kc, vc, slots)
        return kc, vc
    yield f"T{T} {Hkv}x{D}", lambda: run(write_kv_cache), lambda: run(write_kv_cache_reference), True


def prefill_cases(dtype, device, gen, smoke) -> Iterator[Case]:
    from arkfast.kernels.paged_kv import write_kv_cache_reference
    from arkfast.kernels.prefill_attention import (
        prefill_attention,
        prefill_attention_reference,
        varlen_attention,
        varlen_attention_reference,
    )

    configs = [([1, 17], 4, 2, 32)] if smoke else [([1, 17, 128, 423], 32, 8, 128), ([300, 64], 14, 2, 64)]
    for lengths, Hq, Hkv, D in configs:
        T = sum(lengths)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        q = _rand(gen, T, Hq, D, dtype=dtype, device=device)
        k = _rand(gen, T, Hkv, D, dtype=dtype, device=device)
        v = _rand(gen, T, Hkv, D, dtype=dtype, device=device)
        dout = _rand(gen, T, Hq, D, dtype=dtype, device=device)
        name = f"{lengths} {Hq}/{Hkv} D{D}"
        yield (name, lambda: varlen_attention(q, k, v, cu, max_seqlen=max(lengths)),
               lambda: varlen_attention_reference(_up(q), _up(k), _up(v), cu), False)

        def grads(fn, q, k, v, dout):
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            fn(*leaves).backward(dout)
            return tuple(x.grad for x in leaves)
        yield (name + " backward", lambda: grads(lambda *a: varlen_attention(*a, cu, max_seqlen=max(lengths)),
                                                 q, k, v, dout),
               lambda: grads(lambda *a: varlen_attention_reference(*a, cu), _up(q), _up(k), _up(v), _up(dout)),
               False)
        # Paged prefix: the first ~half of each sequence already cached (block 16, shuffled blocks).
        bs = 16
        cached = [n // 2 for n in lengths]
        new = [n - c for n, c in zip(lengths, cached)]
        width = max(-(-c // bs) for c in cached) + 1
        num_blocks = len(lengths) * width
        perm = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)
        tables = perm.view(len(lengths), width)
        k_cache = torch.zeros(num_blocks, bs, Hkv, D, dtype=dtype, device=device)
        v_cache = torch.zeros_like(k_cache)
        starts = cu[:-1].tolist()
        keep = []
        for b, (s, c) in enumerate(zip(starts, cached)):
            pos = torch.arange(c, device=device)
            slots = tables[b, pos // bs].long() * bs + pos % bs
            write_kv_cache_reference(k[s:s + c], v[s:s + c], k_cache, v_cache, slots)
            keep.append(torch.arange(s + c, s + lengths[b], device=device))
        keep = torch.cat(keep)
        cu_new = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32, device=device)
        lens = torch.tensor(cached, dtype=torch.int32, device=device)
        qn, kn, vn = q[keep], k[keep], v[keep]
        yield (name + " paged prefix",
               lambda: prefill_attention(qn, kn, vn, cu_new, k_cache, v_cache, tables, lens, max_seqlen=max(new)),
               lambda: prefill_attention_reference(_up(qn), _up(kn), _up(vn), cu_new, _up(k_cache), _up(v_cache),
                                                   tables, lens), False)


def decode_cases(dtype, device, gen, smoke) -> Iterator[Case]:
    from arkfast.kernels.cascade_attention import cascade_decode_attention, cascade_decode_attention_reference
    from arkfast.kernels.decode_attention import (
        paged_decode_attention,
        paged_decode_attention_reference,
        plan_decode,
    )

    try:
        from benchmarks.bench_decode_attention import build_forest
    except ImportError:
        from bench_decode_attention import build_forest
    # (P problems, N agents, prefix, suffix, Hq, Hkv, D): a partial shared block, a long prefix.
    points = [(2, 3, 40, 8, 4, 2, 32)] if smoke else [(3, 5, 300, 17, 32, 8, 128), (8, 5, 2048, 64, 12, 2, 128)]
    for P, N, prefix, suffix, Hq, Hkv, D in points:
        seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen, device=device).item())
        k_cache, v_cache, tables, seq_lens, group_ids, prefix_lens = build_forest(
            P, N, prefix, suffix, Hkv, D, 16, dtype, device, seed=seed)
        q = _rand(gen, P * N, Hq, D, dtype=dtype, device=device)
        plan = plan_decode(tables, seq_lens, group_ids=group_ids, prefix_lens=prefix_lens, block_size=16,
                           num_kv_heads=Hkv, num_q_heads=Hq, head_dim=D, dtype=dtype, device=device,
                           mode="cascade")
        dev_tables = tables.to(device)
        name = f"{P}x{N} prefix {prefix} suffix {suffix} {Hq}/{Hkv} D{D}"
        yield (name + " plain", lambda: paged_decode_attention(q, k_cache, v_cache, plan=plan, out=_poison(q)),
               lambda: paged_decode_attention_reference(_up(q), _up(k_cache), _up(v_cache), dev_tables, seq_lens),
               False)
        yield (name + " cascade", lambda: cascade_decode_attention(q, k_cache, v_cache, plan, out=_poison(q)),
               lambda: cascade_decode_attention_reference(_up(q), _up(k_cache), _up(v_cache), dev_tables,
                                                          seq_lens, group_ids, prefix_lens), False)


def merge_states_cases(dtype, device, gen, smoke) -> Iterator[Case]:
    from arkfast.kernels.merge_states import merge_states, merge_states_reference

    N, P, H, D = (5, 3, 2, 32) if smoke else (423, 3, 8, 128)
    v = _rand(gen, N, P, H, D, dtype=dtype, device=device)
    s = torch.randn(N, P, H, generator=gen, device=device) * 4
    s[0, 1] = float("-inf")  # an empty partial state
    yield f"{N}x{P}x{H}x{D}", lambda: merge_states(v, s), lambda: merge_states_reference(_up(v), s.double()), False


def fused_loss_cases(dtype, device, gen, smoke) -> Iterator[Case]:
    from arkfast.kernels.fused_linear_weighted_cross_entropy import (
        fused_linear_weighted_cross_entropy as fused,
    )
    from arkfast.kernels.fused_linear_weighted_cross_entropy import (
        fused_linear_weighted_cross_entropy_reference as reference,
    )

    N, H, V = (37, 16, 103) if smoke else (423, 1024, 32003)
    h = _rand(gen, N, H, dtype=dtype, device=device)
    W = _rand(gen, V, H, dtype=dtype, device=device, scale=H ** -0.5)
    y = torch.randint(0, V, (N,), generator=gen, device=device)
    y[::5] = -100
    w = torch.rand(N, generator=gen, device=device) * 2 - 0.5

    def grads(fn, h, W):
        hl, Wl = h.detach().requires_grad_(), W.detach().requires_grad_()
        loss = fn(hl, Wl, y, w.to(hl.dtype) if hl.dtype == torch.float64 else w, reduction="sum")
        loss.backward()
        return loss.detach(), hl.grad, Wl.grad
    yield (f"N{N} H{H} V{V} none", lambda: fused(h, W, y, w, reduction="none"),
           lambda: reference(_up(h), _up(W), y, w.double(), reduction="none"), False)
    yield f"N{N} H{H} V{V} sum+grads", lambda: grads(fused, h, W), lambda: grads(reference, _up(h), _up(W)), False


CHECKS = {
    "rms_norm": rms_norm_cases, "rope": rope_cases, "swiglu": swiglu_cases, "paged_kv": paged_kv_cases,
    "prefill_attention": prefill_cases, "decode_attention": decode_cases, "merge_states": merge_states_cases,
    "fused_loss": fused_loss_cases,
}


def _flatten(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for item in x for t in _flatten(item)]


def relative_error(got, expected) -> float:
    """``||got - expected|| / ||expected||`` over every tensor of (possibly nested tuples of) outputs,
    in float64; NaN when any output element is NaN or Inf where the reference is finite."""
    num = den = 0.0
    for g, e in zip(_flatten(got), _flatten(expected), strict=True):
        if g.shape != e.shape:
            raise ValueError(f"output shape {tuple(g.shape)} != reference shape {tuple(e.shape)}")
        g, e = g.detach().double(), e.detach().double()
        finite = torch.isfinite(e)
        if not torch.equal(torch.isfinite(g), finite) or not torch.equal(g[~finite], e[~finite]):
            return float("nan")
        num += (g[finite] - e[finite]).pow(2).sum().item()
        den += e[finite].pow(2).sum().item()
    return (num ** 0.5) / den ** 0.5 if den > 0 else num ** 0.5


def run_checks(names: list[str], dtypes: list[torch.dtype], device: torch.device, smoke: bool,
               seed: int = 0, on_kernel: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every case of every named check in every dtype; one row each (``ok`` False on error too).
    ``on_kernel`` receives each (kernel, dtype)'s rows as soon as they are known."""
    rows = []
    for dtype in dtypes:
        gen = torch.Generator(device=device).manual_seed(seed)
        tol = TOL_FACTOR * UNIT_ROUNDOFF[dtype]
        for kernel in names:
            first = len(rows)
            # Each case runs before its generator draws the next one: the lambdas see this case's tensors.
            cases = CHECKS[kernel](dtype, device, gen, smoke)
            while True:
                try:
                    case, kernel_fn, reference_fn, exact = next(cases)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 -- an input builder that breaks is a failed check
                    rows.append({"kernel": kernel, "case": "(inputs)", "dtype": str(dtype).removeprefix("torch."),
                                 "rel_err": None, "tol": tol, "ok": False,
                                 "error": f"{type(exc).__name__}: {exc}"[:300]})
                    break
                row = {"kernel": kernel, "case": case, "dtype": str(dtype).removeprefix("torch."),
                       "tol": 0.0 if exact else tol}
                try:
                    err = relative_error(kernel_fn(), reference_fn())
                    row.update(rel_err=err, ok=err <= row["tol"])  # NaN compares False: fails
                except Exception as exc:  # noqa: BLE001 -- report and carry on with the other checks
                    row.update(rel_err=None, ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
                rows.append(row)
            if on_kernel is not None:
                on_kernel(rows[first:])
    return rows


@contextlib.contextmanager
def _kernel_mode(device: torch.device):
    if device.type == "cuda":
        yield  # CUDA tensors launch the kernels by the dispatch rule
        return
    from arkfast.kernels._dispatch import force_triton

    with force_triton():
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny shapes, kernels through the Triton interpreter (the default without CUDA)")
    parser.add_argument("--kernels", nargs="+", choices=sorted(CHECKS), default=None,
                        help="checks to run (default: all)")
    parser.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float16"], default=["bfloat16", "float16"],
                        help="input dtypes (default: bfloat16 float16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--no-save", action="store_true", help="do not append records to <results>/gpu_check.jsonl")
    args = parser.parse_args(argv)
    interpret = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    cuda = torch.cuda.is_available() and not args.smoke
    if cuda and interpret:
        parser.error("TRITON_INTERPRET is on: the GPU check must launch real kernels; unset it")
    if not cuda and not interpret:
        # The interpreter is read when triton is first imported: re-run this module with it on.
        import subprocess

        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.call([sys.executable, "-m", "benchmarks.gpu_check", *(argv or sys.argv[1:]),
                                *([] if args.smoke else ["--smoke"])], env=env)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    smoke = not cuda
    dtypes = [getattr(torch, d) for d in args.dtypes]
    names = args.kernels or list(CHECKS)
    print(f"correctness on {device} ({'real kernels' if cuda else 'Triton interpreter, tiny shapes'}): "
          f"{len(names)} kernels x {len(dtypes)} dtypes", file=sys.stderr, flush=True)
    save = not args.no_save and (cuda or os.environ.get(harness.SMOKE_ENV) == "1")

    def done(kernel_rows: list[dict]) -> None:  # saved kernel by kernel: a run cut short keeps them
        passed = sum(r["ok"] for r in kernel_rows)
        if kernel_rows:
            print(f"  {kernel_rows[0]['kernel']} {kernel_rows[0]['dtype']}: {passed}/{len(kernel_rows)} ok",
                  file=sys.stderr, flush=True)
        for row in kernel_rows if save else ():
            harness.append_result("gpu_check", row, device=device)
    with _kernel_mode(device):
        rows = run_checks(names, dtypes, device, smoke, seed=args.seed, on_kernel=done)
    harness.print_table(rows, columns=["kernel", "case", "dtype", "rel_err", "tol", "ok", "error"])
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} checks passed" +
          (f"; FAILED: {', '.join(sorted({r['kernel'] for r in failed}))}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
