"""Test configuration shared by the whole suite.

Kernels run on CPU tensors through the Triton interpreter, which Triton reads when ``triton`` is first
imported; so it is switched on here, before anything imports triton. Ops still run their torch
references on CPU unless a test enters :func:`arkfast.kernels._dispatch.force_triton` (the ``triton_interp``
fixture). Every interpreted load and store is bounds-checked against the tensors of its launch
(``interpreter_bounds.py``): on CPU tensors a stray store would corrupt the heap silently.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ["TRITON_INTERPRET"] == "1":
    from interpreter_bounds import install as _install_bounds_check  # noqa: E402

    _install_bounds_check()  # every interpreted load and store must fall inside a tensor of its launch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_interp():
    """Force ops to launch their Triton kernels, through the interpreter on CPU tensors."""
    from arkfast.kernels._dispatch import force_triton

    with force_triton():
        yield


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
