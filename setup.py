"""Builds the one compiled extension, ``losa_deploy._C``.

CPU sources (``csrc/*.cpp``, ``csrc/cpu/**/*.cpp``) are always compiled. CUDA sources
(``csrc/cuda/**/*.cu``) are added only when torch is a CUDA build and a CUDA toolkit is found, so a
CPU-only machine builds a CPU-only extension. ``LOSA_BUILD_CUDA=0`` forces CPU-only.

Kernels pick their instruction set at run time (``__attribute__((target(...)))`` per function and
``__builtin_cpu_supports``), so the build never uses ``-march=native``: one binary runs on any x86-64.
"""

import os
from glob import glob

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(*patterns):
    found = []
    for pattern in patterns:
        found += glob(os.path.join("csrc", pattern), recursive=True)
    return sorted(found)


def _want_cuda():
    if os.environ.get("LOSA_BUILD_CUDA", "") == "0":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cxx = ["-O3", "-g0", "-std=c++20", "-fopenmp", "-Wall", "-Wno-unused-function"]
    sources = _sources("*.cpp", "cpu/**/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        sources += _sources("cuda/**/*.cu", "cuda/**/*.cpp")
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-DLOSA_WITH_CUDA"]
        return CUDAExtension(
            "losa_deploy._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DLOSA_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "losa_deploy._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    # ninja when present, plain distutils otherwise; both compile files in parallel.
    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=[_extension()], cmdclass={"build_ext": _build_ext()})
