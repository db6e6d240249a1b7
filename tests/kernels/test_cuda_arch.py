"""The CUDA backend is offered only on a GPU whose compute capability runs the machine code dsm_kernels._C was
built for (setup.py's DSM_CUDA_ARCH); elsewhere the Triton kernels run, and a request for "cuda" says why and how."""

import pytest

import dsm_kernels


@pytest.mark.parametrize(("arch", "capability", "runs"), [
    ("90a", (9, 0), True),  # H100, H200
    ("90a", (10, 0), False),  # an arch-specific build runs on its own capability only
    ("90a", (8, 0), False),
    ("90", (9, 0), True),
    ("80", (8, 6), True),  # same major, higher minor
    ("86", (8, 0), False),
    ("80", (9, 0), False),  # machine code only, no PTX: no newer major
    ("100a", (10, 0), True),
    ("100a", (10, 3), False),
    ("100f", (10, 3), True),
    ("120", (12, 1), True),
    ("sm_90", (9, 0), False),
    ("", (9, 0), False),
])  # fmt: skip
def test_arch_runs_on(arch, capability, runs):
    assert dsm_kernels.arch_runs_on(arch, capability) is runs


def _fake_gpu(monkeypatch, arch, capability):
    monkeypatch.setattr(dsm_kernels, "has_cuda_ext", lambda: True)
    monkeypatch.setattr(dsm_kernels, "cuda_ext_arch", lambda: arch)
    monkeypatch.setattr(dsm_kernels, "_capability", lambda index: capability)


def test_a_gpu_the_extension_was_not_built_for_runs_triton(monkeypatch):
    _fake_gpu(monkeypatch, "90a", (8, 0))
    assert "cuda" not in dsm_kernels.available_backends("cuda:0")
    assert dsm_kernels.default_backend("cuda:0") == "triton"
    why = dsm_kernels.cuda_ext_unavailable("cuda:0")
    assert why is not None and "built for sm_90a, and cuda:0 is sm_80" in why and "DSM_CUDA_ARCH=80 " in why
    with pytest.raises(RuntimeError, match="'cuda' is not available on cuda:0.*built for sm_90a.*DSM_CUDA_ARCH=80"):
        dsm_kernels.resolve("multistream_embed", "cuda", "cuda:0")
    _fake_gpu(monkeypatch, "90a", (10, 0))
    assert "DSM_CUDA_ARCH=100a " in dsm_kernels.cuda_ext_unavailable("cuda:0")


def test_the_gpu_it_was_built_for_runs_cuda(monkeypatch):
    _fake_gpu(monkeypatch, "90a", (9, 0))
    assert dsm_kernels.cuda_ext_unavailable("cuda:0") is None
    assert dsm_kernels.available_backends("cuda:0")[-1] == "cuda" and dsm_kernels.default_backend("cuda:0") == "cuda"
    _fake_gpu(monkeypatch, None, (7, 5))  # built before the extension recorded its arch: not refused on a guess
    assert dsm_kernels.cuda_ext_unavailable("cuda:0") is None


def test_without_the_extension_or_a_gpu(monkeypatch):
    assert "not on cpu" in dsm_kernels.cuda_ext_unavailable("cpu")
    # the request names the fix too (it said only "not available on cpu (available: reference, ...)")
    with pytest.raises(RuntimeError, match=r"'cuda' is not available on cpu \(available: .*\): the CUDA kernels run on "
                                           r"a GPU, not on cpu \(move the tensors to a CUDA device\)"):
        dsm_kernels.resolve("silu_mul", "cuda", "cpu")
    monkeypatch.setattr(dsm_kernels, "has_cuda_ext", lambda: False)
    assert "dsm_kernels._C is not built" in dsm_kernels.cuda_ext_unavailable("cuda:0")
    assert "cuda" not in dsm_kernels.available_backends("cuda:0")


@pytest.mark.gpu
def test_the_built_extension_names_its_arch_and_runs_here():
    """On the GPU the extension was built for (the H100/H200 of gpu_check.sh): it records its arch, and dsm uses it."""
    import torch

    assert dsm_kernels.has_cuda_ext(), "dsm_kernels._C is not built"
    arch = dsm_kernels.cuda_ext_arch()
    assert arch is not None and dsm_kernels.arch_runs_on(arch, torch.cuda.get_device_capability()), arch
    assert dsm_kernels.cuda_ext_unavailable("cuda") is None and dsm_kernels.default_backend("cuda") == "cuda"
