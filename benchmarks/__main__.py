"""The whole benchmark suite in one budgeted run: correctness on the device first, then every benchmark.

    python -m benchmarks                       # a GPU machine: the GPU plan (8 minutes); else the CPU figures
    python -m benchmarks --plan                # print the plan and its budgets, run nothing
    python -m benchmarks --smoke               # CPU, tiny shapes, seconds (CI); records in runs/bench-smoke-<time>/
    python -m benchmarks --results /tmp/r --only decode_attention fused_loss

Modes: ``gpu`` (a CUDA device is present): the kernels checked against their references in bf16 and
fp16 (``benchmarks.gpu_check``), ``pytest -m gpu`` with the Triton interpreter off, then every
``benchmarks/bench_*.py``; ``cpu`` (no CUDA device, or ``--cpu``): the benchmarks that declare CPU
figures (``SUITE['cpu']``), real records; ``smoke`` (``--smoke``): everything at tiny shapes on CPU.
Each step runs in its own subprocess under its budget; the plan drops any step that would take the
total past ``--budget-s``, so it fits by construction. A step that fails or runs out of time is
recorded as such and the suite carries on. At the end: one table, ``<results>/summary.json``, and the
report (``python -m benchmarks.report``) of the results folder.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

from benchmarks import suite


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true",
                      help="CPU, tiny shapes, seconds: checks that every step runs (records are marked smoke)")
    mode.add_argument("--cpu", action="store_true",
                      help="the CPU figures even where a CUDA device is present")
    mode.add_argument("--gpu", action="store_true",
                      help="the GPU plan: with --plan it prints on any machine; running it needs CUDA "
                           "(default where a CUDA device is present)")
    parser.add_argument("--results", type=Path, default=None,
                        help="folder for the records, summary.json, logs and the report (default "
                             "benchmarks/results; runs/bench-smoke-<UTC time>/ with --smoke)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="total seconds for the whole run (default: "
                             + ", ".join(f"{m} {s:.0f}" for m, s in suite.DEFAULT_TOTAL_S.items()) + ")")
    parser.add_argument("--only", nargs="+", default=(), metavar="STEP",
                        help="run only these steps (names as --plan prints them, e.g. correctness rms_norm)")
    parser.add_argument("--skip", nargs="+", default=(), metavar="STEP", help="leave these steps out")
    parser.add_argument("--plan", action="store_true", help="print the plan and its budgets, run nothing")
    parser.add_argument("--jobs", type=int, default=None,
                        help="steps run at once (smoke only; default 2 with --smoke, else 1)")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="do not write the report at the end")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch  # after --help, which must not wait for it

    cuda = torch.cuda.is_available()
    mode = "smoke" if args.smoke else "gpu" if args.gpu else "cpu" if args.cpu or not cuda else "gpu"
    if mode == "gpu" and not cuda and not args.plan:
        parser.error("--gpu needs a CUDA device (torch.cuda.is_available() is False); --gpu --plan prints its plan")
    if args.results is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        args.results = Path("runs") / f"bench-smoke-{stamp}" if mode == "smoke" else suite.BENCH_DIR / "results"
    try:
        config = suite.SuiteConfig(
            mode=mode, results=args.results.resolve(), budget_s=suite.DEFAULT_TOTAL_S[mode] if args.budget_s is None else args.budget_s,
            only=tuple(args.only), skip=tuple(args.skip), cuda=cuda, report=args.report,
            jobs=args.jobs if args.jobs is not None else (2 if mode == "smoke" else 1))
        plan = suite.build_plan(config)
    except ValueError as exc:
        parser.error(str(exc))
    suite.print_plan(plan)
    if args.plan:
        return 0
    if not plan.steps:
        print("nothing to run", file=sys.stderr)
        return 1
    summary = suite.run_suite(config, plan)
    if config.report:
        from benchmarks import report

        report_path = report.default_output(config.results)
        report.write_report([config.results], report_path, include_smoke=mode == "smoke")
        print(f"report: {report_path}")
    return 0 if summary["counts"]["failed"] == 0 and summary["counts"]["timeout"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
