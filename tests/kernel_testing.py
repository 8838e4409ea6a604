"""Helpers for kernel tests: tolerances, poisoned outputs, error reports and sm_90 compilation."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import torch

# Unit roundoffs (half an ulp at 1.0): the relative error of one correctly rounded operation.
U64, U32, U16, UBF16 = 2.0 ** -53, 2.0 ** -24, 2.0 ** -11, 2.0 ** -8

# (atol, rtol) per input dtype, for a kernel's output compared against a float64 reference of the same
# op. Where they come from: a kernel accumulates in fp32 and its longest reduction in the kernel tests
# is n <= ~2k terms (attention over <= 2048 keys, a dot over <= 256 dims, a norm over <= 4096); the
# deterministic bound on such a sum's error is gamma_n = n * u_fp32 relative to the sum of |terms|,
# and its typical (ISA- and order-independent in distribution) size sqrt(n) * u. For outputs of O(1)
# -- softmax-weighted averages, normalised rows -- that gives an error ~sqrt(2048) * 6e-8 = 2.7e-6
# typical, 1.2e-4 at worst: fp32 atol 1e-5 sits above the typical size with margin, rtol 1e-4 at the
# worst-case bound for the large elements. fp16: one rounding of the output (u = 4.9e-4) plus fp16
# inputs whose rounding the reference sees too: 2e-3 = 4u. bf16: output rounding (u = 3.9e-3) and the
# Triton interpreter's fp32 -> bf16 truncation (where the GPU rounds to nearest), a full ulp 2u, plus
# fp32 accumulation: 2e-2 ~ 5u. fp16 conversions round correctly in the interpreter; tests that check
# rounding order bit for bit use fp16. float64: 1e-10 / 1e-8 is n * u64 for n ~ 10^5-10^7, far above
# any float64 reduction the tests do, so a float64 failure is a real difference in the maths.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}

POISON = float("nan")


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer filled with NaN (or the dtype's max for integers), so unwritten elements fail."""
    if t.dtype.is_floating_point:
        return torch.full_like(t, POISON)
    return torch.full_like(t, torch.iinfo(t.dtype).max)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 atol: float | None = None, rtol: float | None = None, name: str = "output") -> None:
    """``torch.testing.assert_close`` that also reports the max and mean absolute error."""
    default_atol, default_rtol = TOLERANCES[dtype or actual.dtype]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    err = (a - e).abs()
    finite = torch.isfinite(a).all().item()
    msg = (f"{name}: max abs err {err.max().item() if err.numel() else 0:.3e}, "
           f"mean abs err {err.mean().item() if err.numel() else 0:.3e}, all finite={finite}, "
           f"atol={atol}, rtol={rtol}")
    torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=msg, equal_nan=False)


def hf_float64_rtol(num_layers: int, hidden_size: int, max_len: int) -> float:
    """Relative bound on the difference between arkfast and transformers, both run in float64.

    transformers computes some steps in float32 even for a float64 model: ``LlamaRMSNorm`` (and its
    Qwen/Mistral copies) casts its input to float32 and sums the squares there; eager attention takes
    its softmax in float32. Each cast rounds by u_fp32 = 2^-24 relative and each fp32 sum of n terms is
    within gamma_n = n * u of exact (Higham, Accuracy and Stability, Thm. 3.1), whatever the order of
    summation, i.e. whatever vector ISA ATen picked. Per layer there are two norms over ``hidden_size``
    and one softmax over at most ``max_len`` keys, plus the final norm; a relative perturbation of an
    activation passes the residual stream with gain about 1, so the relative errors add:

        rtol = ((2 L + 1) (H + 2) + L (max_len + 2)) * u_fp32

    Everything else is float64 on both sides (its error is ~1e-16, negligible). Tests multiply it by the
    magnitude of what they compare (max |logit|, max |grad|)."""
    return ((2 * num_layers + 1) * (hidden_size + 2) + num_layers * (max_len + 2)) * U32


def poison_other_prefix_copies(k_cache, v_cache, tables, group_ids, prefix_lens, block_size):
    """NaN into every group member's copy of a partial last prefix block but the first member's: the
    shared prefix must be read through the first member's block-table row, as decode plans promise.
    ``tables [B, W]`` block tables, ``group_ids [B]``, ``prefix_lens [G]`` tokens."""
    seen = set()
    for b, g in enumerate(group_ids):
        prefix = prefix_lens[g]
        if g in seen and prefix % block_size:
            block = tables[b, prefix // block_size].item()
            for cache in (k_cache, v_cache):
                cache[block, :prefix % block_size] = float("nan")
        seen.add(g)


def dense_attention(q, keys, values, scale=None):
    """Float64 attention of ``q [B, Hq, D]`` over dense per-sequence K/V → (out, lse natural log): the
    decode tests' oracle."""
    B, Hq, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq), float("-inf"), dtype=torch.float64)
    for b in range(B):
        if keys[b].shape[0] == 0:
            continue
        gqa = Hq // keys[b].shape[1]
        k = keys[b].double().repeat_interleave(gqa, 1)                          # [L, Hq, D]
        v = values[b].double().repeat_interleave(gqa, 1)
        scores = torch.einsum("hd,lhd->hl", q[b].double(), k) * scale          # [Hq, L]
        out[b] = torch.einsum("hl,lhd->hd", torch.softmax(scores, -1), v)
        lse[b] = torch.logsumexp(scores, -1)
    return out, lse


def compile_sm90(*modules: str) -> list[dict]:
    """Compile every configuration listed by ``aot_specs()`` of ``modules`` for sm_90, in a subprocess
    without the interpreter; returns one record per configuration."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "arkfast.kernels", *modules],
                          capture_output=True, text=True, env=env, timeout=1800)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if not records:
        raise AssertionError(f"no configuration compiled (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return records


def assert_compiles_sm90(*modules: str) -> list[dict]:
    """Every configuration compiles for sm_90 within the Hopper per-block shared-memory limit."""
    from arkfast.kernels._aot import HOPPER_MAX_SHARED_BYTES

    records = compile_sm90(*modules)
    for r in records:
        print(f"{r['module']}:{r['name']}: ok={r['ok']} shared={r.get('shared_bytes')} B "
              f"wgmma={r.get('wgmma')} v4={r.get('vector_loads')}")
    failed = [r for r in records if not r["ok"]]
    assert not failed, "\n".join(f"{r['name']}: {r['error']}" for r in failed)
    over = [r for r in records if r["shared_bytes"] > HOPPER_MAX_SHARED_BYTES]
    assert not over, "over the sm_90 shared-memory limit: " + ", ".join(
        f"{r['name']} ({r['shared_bytes']} B)" for r in over)
    return records


# 64-bit address products (``mul.lo.s64`` or ``mul.wide.s32`` into an ``%rd`` register) and 32-bit
# register-by-register products, in PTX. Offsets ``row * stride`` must be the former: a packed batch of
# 256k tokens x 8192 hidden already passes 2**31 elements.
MUL64 = re.compile(r"(?:mul|mad)\.(?:lo\.[su]64|wide\.[su]32)\s+%rd\d+,\s*%rd?\d+,\s*%rd?\d+")
MUL32 = re.compile(r"(?:mul|mad)\.lo\.[su]32\s+%r\d+,\s*%r\d+,\s*%r\d+")


def sm90_ptx(module: str, *names: str) -> dict[str, str]:
    """PTX of the named ``aot_specs()`` configurations of ``module``, compiled for sm_90 in a
    subprocess without the interpreter."""
    code = ("import importlib, json, sys; from arkfast.kernels._aot import compile_sm90; "
            "specs = {s.name: s for s in importlib.import_module(sys.argv[1]).aot_specs()}; "
            "print(json.dumps({n: compile_sm90(specs[n]).ptx for n in sys.argv[2:]}))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code, module, *names], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


# Front end only (AST -> TTIR after Triton's canonicalisation), no PTX: a fraction of a second a kernel.
_TTIR_USES = r"""
import importlib, json, re, sys
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend

wanted = json.loads(sys.argv[2])
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
report = {}
for spec in importlib.import_module(sys.argv[1]).aot_specs():
    if spec.name not in wanted:
        continue
    names = list(spec.signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec.aligned}
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    options = backend.parse_options({"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options),
                         backend.get_module_map(), context)
    stages = {}
    backend.add_stages(stages, options, src.language)
    lines = [line.strip() for line in str(stages["ttir"](module, {"target": target})).splitlines()
             if "tt.func" not in line]
    report[spec.name] = {arg: [line for line in lines if re.search(rf"%{arg}(?!\w)", line)]
                         for arg in wanted[spec.name]}
print(json.dumps(report))
"""


def assert_int64_offsets(module: str, args_by_spec: dict[str, tuple[str, ...]]) -> None:
    """Each named i32 argument (a stride or size multiplied by a token, block or slot index) of each
    named ``aot_specs()`` configuration is only ever sign-extended to i64 in the kernel's TTIR, so every
    product it enters is formed in 64 bits. A stride used in a 32-bit product wraps past 2**31 elements
    (a 100+ GiB cache, a long packed batch), which only a GPU with that much memory could show at run
    time. Compiled in a subprocess without the interpreter (``@triton.jit`` bodies are needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _TTIR_USES, module, json.dumps(args_by_spec)],
                          check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert set(report) == set(args_by_spec), f"configurations not found: {set(args_by_spec) - set(report)}"
    for name, uses_by_arg in report.items():
        for arg, uses in uses_by_arg.items():
            assert uses, f"{name}: argument {arg} is never used"
            narrow = [u for u in uses if not re.search(rf"= arith\.extsi %{arg} : i32 to i64", u)]
            assert not narrow, f"{name}: {arg} enters 32-bit arithmetic: {narrow}"
