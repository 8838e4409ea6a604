"""Triton kernels with their torch references (installed as ``arkfast.kernels``)."""
