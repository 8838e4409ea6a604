#!/usr/bin/env bash
# Set up everything (scripts/setup.sh) and run the main job: a multi-agent debate on the embedded
# default (the built-in arithmetic task and the tiny model the package ships). Extra arguments go to
# `python -m arkfast.generate` (see its --help), e.g. `bash scripts/run.sh --model DIR --dataset FILE`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/setup.sh"
set -euo pipefail
python -m arkfast.generate "$@"
