#!/usr/bin/env bash
# Set up everything (scripts/setup.sh) and run the main job.
#
# With arguments, they go to `python -m arkfast.generate` (see its --help), e.g. a multi-agent debate on
# a local checkpoint and dataset: `bash scripts/run.sh --model DIR --dataset FILE`. Without arguments:
# the embedded default, 5 agents x 2 rounds of debate by the tiny model shipped in arkfast/zoo/tiny
# over the built-in arith task's test split, on the CPU in a few minutes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/setup.sh"
set -euo pipefail
cd "$root"
exec python -m arkfast.generate "$@"
