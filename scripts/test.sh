#!/usr/bin/env bash
# Set up everything (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/setup.sh"
set -euo pipefail
cd "$root"
python -m pytest "$@"
