#!/usr/bin/env bash
# Set up a virtual environment (default .venv) with arkfast installed editable, its C++ extension built,
# and the test tools. Source it to stay in the environment: `source scripts/setup.sh`.
#
# torch is installed only when the environment has none: the CPU build (torch==2.13.0) by default.
# For a GPU, create the environment first and install the CUDA build of torch that matches your driver
# into it; this script then keeps it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ARKFAST_VENV:-$root/.venv}"
if [[ ! -x "$venv/bin/python" ]]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install -q "torch==${ARKFAST_TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q -e "$root[dev]"
python -c "import arkfast, arkfast.kernels, arkfast._C, torch, triton; \
print(f'arkfast ready: torch {torch.__version__}, triton {triton.__version__}, cuda={torch.cuda.is_available()}')"
set +euo pipefail
