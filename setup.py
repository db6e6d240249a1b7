"""Builds the optional CUDA extension `dsm_kernels._C` from csrc/ with ninja.

The extension is built only when a CUDA build of torch and nvcc are present, and never when
DSM_SKIP_CUDA_BUILD=1. Everything else (the package, the Triton kernels, the reference ops) is
pure Python, so a CPU machine installs the package without compiling anything.
"""

import glob
import os
import re

from setuptools import setup


def cuda_extensions():
    if os.environ.get("DSM_SKIP_CUDA_BUILD", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("dsm: no CUDA build of torch or no CUDA toolkit; skipping the CUDA extension")
        return [], {}
    os.environ.setdefault("MAX_JOBS", str(max(1, min(8, os.cpu_count() or 1))))
    arch = os.environ.get("DSM_CUDA_ARCH", "90a")
    if re.fullmatch(r"\d{2,3}[af]?", arch) is None:
        raise SystemExit(f"dsm: DSM_CUDA_ARCH={arch!r} is not a GPU architecture like 90a, 89 or 100a")
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}
    ext = CUDAExtension(
        name="dsm_kernels._C",
        sources=sources,
        extra_compile_args={
            # No -std here: torch's cpp_extension adds the standard its headers need (C++20 from torch 2.10 on).
            "cxx": ["-O3", f"-DDSM_CUDA_ARCH_NAME={arch}"],  # recorded as dsm_kernels._C.cuda_arch
            "nvcc": ["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
