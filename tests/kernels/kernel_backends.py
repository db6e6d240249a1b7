"""The backends the kernel tests run: the package's, plus ``cuda_emu``, the CUDA C++ kernels of ``csrc/`` executed
on the CPU (``cuda_emu.py``), so that CPU CI runs their logic where the GPU's ``cuda`` backend is skipped."""

from __future__ import annotations

import cuda_emu
import pytest
import torch

import dsm_kernels
from dsm_kernels import testing

BACKENDS = [pytest.param("triton"), pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("cuda_emu")]


def kernel_device(backend: str) -> torch.device:
    return torch.device("cpu") if backend == "cuda_emu" else testing.kernel_device(backend)


def resolve(op: str, backend: str, device):
    return cuda_emu.OPS[op] if backend == "cuda_emu" else dsm_kernels.resolve(op, backend, device)
