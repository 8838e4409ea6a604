"""Compile every Triton kernel configuration of ``arkfast.kernels`` for Hopper (sm_90), no GPU needed.

    python -m arkfast.kernels                         # every kernel module
    python -m arkfast.kernels rms_norm prefill_attention --ptx-dir /tmp/ptx

Prints one JSON line per configuration (shared memory, whether the PTX has ``wgmma`` and 16-byte
vector loads) and exits non-zero if any configuration fails to compile. Run it without
``TRITON_INTERPRET=1``. See :mod:`arkfast.kernels._aot`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import os
import pathlib
import pkgutil
import sys

from ._aot import compile_sm90


def kernel_modules() -> list[str]:
    """Every module of this package that lists configurations with ``aot_specs()``."""
    package = importlib.import_module(__package__)
    names = [f"{__package__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)
             if not m.name.startswith("_")]
    return [n for n in names if hasattr(importlib.import_module(n), "aot_specs")]


def _compile_one(job: tuple[str, int, str | None]) -> dict:
    """Compile configuration ``index`` of ``module_name`` (run in a worker process)."""
    module_name, index, ptx_dir = job
    spec = importlib.import_module(module_name).aot_specs()[index]
    record = {"module": module_name, "name": spec.name}
    try:
        out = compile_sm90(spec)
    except Exception as exc:  # noqa: BLE001  (report every failing configuration, not just the first)
        return {**record, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    if ptx_dir:
        path = pathlib.Path(ptx_dir) / f"{spec.name}.ptx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(out.ptx)
    return {**record, "ok": True, "shared_bytes": out.shared_bytes, "seconds": round(out.seconds, 3),
            "wgmma": "wgmma" in out.ptx,
            "vector_loads": "ld.global.v4" in out.ptx or "ld.global.nc.v4" in out.ptx}


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arkfast.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*",
                        help="kernel modules, e.g. rms_norm or arkfast.kernels.rms_norm (default: all)")
    parser.add_argument("--ptx-dir", default=None, help="also write each configuration's PTX here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="configurations compiled in parallel (default: the CPU count)")
    args = parser.parse_args(argv)
    modules = [m if "." in m else f"{__package__}.{m}" for m in args.modules] or kernel_modules()
    jobs = [(name, i, args.ptx_dir) for name in modules
            for i in range(len(importlib.import_module(name).aot_specs()))]
    if args.jobs > 1 and len(jobs) > 1:
        # Compilation is single-threaded inside Triton; separate processes use every core.
        with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
            records = pool.map(_compile_one, jobs)
            failed = _print_records(records)
    else:
        failed = _print_records(map(_compile_one, jobs))
    return 1 if failed else 0


def _print_records(records) -> int:
    failed = 0
    for record in records:
        failed += not record["ok"]
        print(json.dumps(record), flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(_main())
