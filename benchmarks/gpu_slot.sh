#!/usr/bin/env bash
# One GPU slot, one command: install arkfast from this checkout (editable, no network, the C++
# extension built for the machine's Python), run the whole suite under its budget, write the report,
# and pack records, summary, logs, report and plots into one archive.
#
#   bash benchmarks/gpu_slot.sh [OUT_DIR] [extra python -m benchmarks flags...]
#
# OUT_DIR defaults to $OUT (the lent machine's return folder), else ./runs/gpu-slot. The archive
# OUT_DIR/bench.tgz unpacks to bench/ (merge it with `python -m benchmarks.report --results bench
# benchmarks/results`, or append its *.jsonl to benchmarks/results/ to commit the records).
# ARKFAST_SKIP_INSTALL=1 skips the install (a machine where arkfast is installed already).
# Time: about 40 s to install, the suite's --budget-s (default 480 s), about 10 s for the report.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/gpu-slot}}"
shift || true
py="${PYTHON:-python3}"
mkdir -p "$out"
work="$(mktemp -d)/bench"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
start=$SECONDS
if [[ -z "${ARKFAST_SKIP_INSTALL:-}" ]]; then  # set it where arkfast is installed already
    if ! "$py" -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3 \
            || ! "$py" -c "import arkfast.kernels, arkfast._C" 2>/dev/null; then
        # No editable install (an old setuptools, say): build the extension in place and map the
        # kernels package the way pyproject's package-dir does, in this throwaway copy.
        echo "pip install -e failed; building in place"
        "$py" setup.py -q build_ext --inplace
        [[ -e arkfast/kernels ]] || ln -s ../kernels arkfast/kernels
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
"$py" -c "import torch, triton, arkfast._C, arkfast.kernels; print('torch', torch.__version__, 'triton', \
triton.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
echo "installed in $((SECONDS - start)) s"
status=0
"$py" -m benchmarks --results "$work" "$@" 2>&1 | tee "$out/suite.log" || status=$?
tar czf "$out/bench.tgz" -C "$(dirname "$work")" bench
echo "archive: $out/bench.tgz ($(du -h "$out/bench.tgz" | cut -f1)); whole slot command took $((SECONDS - start)) s"
exit "$status"
