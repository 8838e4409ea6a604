"""Ahead-of-time compilation of Triton kernels for Hopper (sm_90), with no GPU present.

The Triton interpreter accepts code the GPU compiler rejects (``tl.dot`` with K < 16, say), so every
configuration a launcher can choose is also compiled here for ``GPUTarget("cuda", 90, 32)``; the result
gives the PTX (to read for ``wgmma`` and vector loads), the cubin and the block's shared-memory use.

Each kernel module lists its configurations in a function ``aot_specs() -> list[KernelSpec]``.
``python -m arkfast.kernels [MODULE ...]`` (``arkfast/kernels/__main__.py``) compiles them all and prints one
JSON line per configuration; the tests run it in a subprocess without ``TRITON_INTERPRET`` (under the
interpreter ``@triton.jit`` returns objects the compiler cannot take).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

# The opt-in maximum dynamic shared memory per thread block on H100 and H200 (227 KiB).
HOPPER_MAX_SHARED_BYTES = 232_448


@dataclass
class KernelSpec:
    """One launch configuration of one ``@triton.jit`` kernel.

    ``signature`` maps every argument name to a Triton type string (``"*fp32"``, ``"*bf16"``,
    ``"i32"``, ``"fp32"``) or ``"constexpr"``; ``constexprs`` gives the value of each constexpr.
    ``aligned`` names the pointer (and integer) arguments the launcher guarantees are multiples of 16
    (bytes for pointers), as the JIT specialises them at run time; without it the compiler cannot
    emit vector loads.
    """

    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    aligned: tuple[str, ...] = ()


@dataclass
class CompiledKernel:
    name: str
    shared_bytes: int
    num_regs: int | None
    ptx: str
    seconds: float


def compile_sm90(spec: KernelSpec) -> CompiledKernel:
    """Compile ``spec`` for sm_90 (Hopper) and return its PTX and shared-memory use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    names = list(spec.signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec.aligned}
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    return CompiledKernel(
        name=spec.name,
        shared_bytes=int(compiled.metadata.shared),
        num_regs=getattr(compiled, "n_regs", None),
        ptx=compiled.asm["ptx"],
        seconds=time.perf_counter() - start,
    )
