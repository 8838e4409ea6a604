"""Builds the C++ extension ``arkfast._C``; everything else is declared in pyproject.toml."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "arkfast._C",
        sources=["csrc/bindings.cpp", "csrc/packing.cpp", "csrc/decode_attention_cpu.cpp"],
        include_dirs=["csrc"],
        cxx_std=17,
        # -fopenmp-simd: the simd pragmas only (no OpenMP runtime is linked). -Wno-psabi: the 64-byte vectors
        # of the CPU decode attention are passed between inlined functions only, never across an ABI.
        extra_compile_args=["-O3", "-fopenmp-simd", "-Wno-psabi"],
    ),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
