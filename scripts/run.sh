#!/usr/bin/env bash
# Set up everything (scripts/setup.sh) and run the main job.
#
# With arguments, they go to `python -m arkfast.generate` (see its --help): a multi-agent debate on a
# local checkpoint and dataset, e.g. `bash scripts/run.sh --model DIR --dataset FILE`. Without
# arguments it runs the debate on the embedded default (built-in arith task, the tiny model shipped in
# arkfast/zoo/tiny) once that model ships; until then, the packing benchmark, the most complete job
# that needs no model.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/setup.sh"
set -euo pipefail
cd "$root"
if [[ $# -gt 0 || -f arkfast/zoo/tiny/config.json ]]; then
    exec python -m arkfast.generate "$@"
fi
echo "No embedded default model is shipped yet: running the packing benchmark instead" \
     "(pass --model DIR --dataset FILE to run a debate)." >&2
exec python -m benchmarks.bench_packing --dists lognormal --no-save
