"""Mimi's convolutions at many columns as implicit GEMMs (``dsm_kernels.conv1d_igemm``,
``conv_transpose1d_igemm``) against torch's convolutions, on fresh random inputs.

CPU: the Triton kernels under ``TRITON_INTERPRET=1`` (plain fp32 products there): within 1e-5 of the reference, over
shapes with ragged tiles, strided inputs, a residual, one output channel. GPU: Mimi's SEANet shapes at 64 streams,
where the products run in three TF32 passes: the error against an fp64 convolution at most 4x cuDNN's fp32 error.
"""

from __future__ import annotations

import re

import pytest
import torch

import dsm_kernels
from dsm_kernels.reference import conv1d_igemm_ref, conv_transpose1d_igemm_ref, convtr_phase_weight
from dsm_kernels.testing import aot_script_main, kernel_device


@pytest.fixture(autouse=True)
def fp32_convolutions(monkeypatch):
    """torch's convolutions on a GPU in fp32, not TF32 (cuDNN's default), so that they are a reference."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def tolerance(device: torch.device) -> float:
    """Plain fp32 products under the interpreter; on a GPU tf32x3 against cuDNN's fp32 (each a few ulps off)."""
    return 1e-5 if device.type == "cpu" else 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "NaN/inf never passes"
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def inputs(B, C_in, C_out, T, K, transposed=False, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C_in, T + 3, generator=g)[..., 2:-1]  # a strided view, as the padded conv inputs are
    shape = (C_in, C_out, K) if transposed else (C_out, C_in, K)
    w = torch.randn(*shape, generator=g) / (C_in * K) ** 0.5
    return x.to(device), w.to(device), torch.randn(C_out, generator=g).to(device)


CONV_CASES = [  # B, C_in, C_out, T, K, stride, bias, residual, elu
    (2, 1, 64, 37, 7, 1, True, False, False),  # the encoder's first conv (reduction of 7)
    (1, 64, 32, 50, 3, 1, True, False, False),  # a residual unit's k3 conv
    (3, 32, 64, 20, 1, 1, True, True, True),  # a residual unit's end: x + conv1x1(elu(y))
    (2, 64, 128, 41, 8, 4, True, False, True),  # a strided downsampling conv of an ELU
    (1, 40, 1, 33, 3, 1, False, False, False),  # one output channel, no bias (the decoder's last conv has a bias)
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "b{}-{}to{}-t{}-k{}s{}".format(*c[:6]))
def test_conv1d_igemm_matches_reference(case):
    B, C_in, C_out, T, K, S, has_bias, has_res, elu = case
    device = kernel_device("triton")
    x, w, bias = inputs(B, C_in, C_out, T, K, device=device)
    bias = bias if has_bias else None
    T_out = (T - K) // S + 1
    res = torch.randn(B, C_out, T_out).to(device) if has_res else None
    out = torch.full((B, C_out, T_out), float("nan"), device=device)  # poisoned: every element must be written
    got = dsm_kernels.conv1d_igemm(x, w, bias, S, residual=res, elu=elu, out=out, backend="triton")
    assert got is out
    assert rel(got, conv1d_igemm_ref(x, w, bias, S, residual=res, elu=elu)) < tolerance(device)


CONVTR_CASES = [  # B, C_in, C_out, T, K, stride, bias, elu
    (2, 64, 32, 9, 8, 4, True, True),
    (1, 32, 16, 5, 10, 5, True, False),
    (3, 16, 24, 7, 12, 6, False, True),
    (1, 48, 64, 3, 16, 8, True, False),
]


@pytest.mark.parametrize("case", CONVTR_CASES, ids=lambda c: "b{}-{}to{}-t{}-k{}s{}".format(*c[:6]))
def test_conv_transpose1d_igemm_matches_reference(case):
    B, C_in, C_out, T, K, S, has_bias, elu = case
    device = kernel_device("triton")
    x, w, bias = inputs(B, C_in, C_out, T, K, transposed=True, device=device)
    bias = bias if has_bias else None
    want = conv_transpose1d_igemm_ref(x, w, bias, S, elu=elu)
    for phase_weight in (None, convtr_phase_weight(w, S)):  # made per call, or once by the caller
        out = torch.full((B, C_out, (T - 1) * S + K), float("nan"), device=device)
        got = dsm_kernels.conv_transpose1d_igemm(x, w, bias, S, phase_weight=phase_weight, elu=elu, out=out,
                                                 backend="triton")  # fmt: skip
        assert rel(got, want) < tolerance(device)


def test_convtr_phase_weight_layout():
    w = torch.randn(5, 3, 12)
    pw = convtr_phase_weight(w, 4)  # J = 3 taps a phase
    for p, co, j, ci in ((0, 0, 0, 0), (3, 2, 2, 4), (1, 1, 2, 3), (2, 0, 1, 1)):
        assert pw[p, co, j * 5 + ci] == w[ci, co, p + j * 4]


def test_igemm_checks_its_inputs():
    x, w, _ = inputs(1, 8, 4, 10, 3)
    with pytest.raises(ValueError, match="conv1d_igemm: weight has shape"):
        dsm_kernels.conv1d_igemm(x, w[:, :5])
    with pytest.raises(ValueError, match="fewer than the kernel's span 3"):
        dsm_kernels.conv1d_igemm(x[..., :2], w)
    with pytest.raises(ValueError, match="conv1d_igemm: residual has shape"):
        dsm_kernels.conv1d_igemm(x, w, residual=torch.zeros(1, 4, 9))
    wt = torch.zeros(8, 4, 10)
    with pytest.raises(ValueError, match="kernel 10 is not a multiple of the stride 4"):
        dsm_kernels.conv_transpose1d_igemm(x, wt, None, 4)
    if dsm_kernels.has_triton():
        from dsm_kernels.conv_kernels import conv_transpose1d_igemm_triton

        with pytest.raises(ValueError, match="phase_weight"):
            conv_transpose1d_igemm_triton(x, wt, None, 5, phase_weight=torch.zeros(5, 4, 8))


def test_igemm_path_follows_its_switch(monkeypatch):
    """Off the reference backend Mimi's wide convolutions take these kernels (counted in test_mimi_kernels.py's
    pinned launch counts); ``DSM_CONV_IGEMM=0`` hands them back to cuDNN."""
    from dsm.mimi_modules import igemm_path

    cpu = torch.device("cpu")
    assert igemm_path("triton", cpu) and not igemm_path("reference", cpu)
    monkeypatch.setenv("DSM_CONV_IGEMM", "0")
    assert not igemm_path("triton", cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("transposed", [False, True])
def test_gpu_igemm_mimi_shapes_within_4x_cudnn_fp32_error(transposed):
    """Mimi's SEANet convs at 64 streams and one frame (the encoder's at 1920..96 columns a stream, the decoder's
    transposed convs): tf32x3 products stay within 4x the error of cuDNN's fp32 convolution, both against fp64."""
    cases = ([(64, 128, 485, 10, 5), (128, 256, 100, 12, 6), (64, 64, 1922, 3, 1), (32, 64, 1920, 1, 1),
              (1, 64, 1926, 7, 1)] if not transposed else
             [(512, 256, 16, 12, 6), (256, 128, 96, 10, 5), (128, 64, 480, 8, 4)])  # fmt: skip
    for C_in, C_out, T, K, S in cases:
        x, w, bias = inputs(64, C_in, C_out, T, K, transposed=transposed, seed=T, device="cuda")
        if transposed:
            exact = conv_transpose1d_igemm_ref(x.double(), w.double(), bias.double(), S)
            ref, got = conv_transpose1d_igemm_ref(x, w, bias, S), dsm_kernels.conv_transpose1d_igemm(x, w, bias, S)
        else:
            exact = conv1d_igemm_ref(x.double(), w.double(), bias.double(), S)
            ref, got = conv1d_igemm_ref(x, w, bias, S), dsm_kernels.conv1d_igemm(x, w, bias, S)
        ref_err = rel(ref, exact)
        assert rel(got, exact) <= 4 * ref_err + 1e-7, ((C_in, C_out, T, K, S), rel(got, exact), ref_err)


def test_triton_aot_compiles_for_sm90(aot_output):
    """Both kernels compile for an H100 with tf32x3 products on the tensor cores (wgmma at 64-channel tiles, mma
    at 16: the decoder's one-channel last conv; 32-column tiles: one stream's convs), the conv also reading its
    stored context in place, and at every tile configuration the launcher picks none spills to local memory."""
    out = aot_output(__file__)
    assert out.count("mma tf32") == 5 and "13 tile configurations without local memory" in out


def test_tiles_keep_to_the_configurations_checked_for_spills(monkeypatch):
    """The launcher's tiles on a GPU are those ``_aot`` compiles and checks for local memory: 16-64 channels x 32
    columns on 4 warps or x 64 columns on 8 (half the SMs given a program where 64 columns allow it)."""
    from dsm_kernels import conv_kernels

    monkeypatch.setattr(conv_kernels, "triton_interpret", lambda: False)
    monkeypatch.setattr(conv_kernels, "sm_count", lambda device: 132)
    seen = {conv_kernels._tiles(c_out, cols, "cuda") for c_out in (1, 16, 32, 64, 512) for cols in (96, 1920, 10**6)}
    assert {(bm, bn, warps) for bm, bn, _, warps in seen} <= set(AOT_TILES)
    assert conv_kernels._tiles(512, 400 * 1920, "cuda")[1:] == (64, 32, 8)  # many streams: 64 columns, 8 warps
    assert conv_kernels._tiles(64, 96, "cuda")[1:] == (32, 32, 4)  # one stream's 12.5 Hz conv


# (BM, BN, warps): every tile configuration the launcher picks on a GPU (see conv_kernels._tiles)
AOT_TILES = [(bm, bn, 8 if bn == 64 else 4) for bm in (16, 32, 64) for bn in (32, 64)]


def _aot() -> None:
    from dsm_kernels.conv_kernels import _conv_igemm_kernel, _convtr_igemm_kernel
    from dsm_kernels.testing import aot_compile, local_memory_ops

    f32 = "*fp32"
    conv = {"x_ptr": f32, "w_ptr": f32, "bias_ptr": f32, "res_ptr": f32, "out_ptr": f32}
    ctx = dict(conv, ctx_ptr=f32, phase_ptr="*i32", mask_ptr="*i1", first_ptr="*i1")
    variants = [
        (_conv_igemm_kernel, conv, {"KS": 3, "HAS_BIAS": True, "HAS_RES": True, "ELU": True, "EXACT_ELU": True}),
        (_convtr_igemm_kernel, {"x_ptr": f32, "w_ptr": f32, "bias_ptr": f32, "out_ptr": f32},
         {"J": 2, "HAS_BIAS": True, "ELU": True, "EXACT_ELU": True}),
        # a streaming conv reading its stored context in place (a residual unit's k3 conv, the heaviest gather), its
        # context programs
        (_conv_igemm_kernel, ctx, {"KS": 3, "HAS_BIAS": True, "HAS_RES": False, "ELU": True, "EXACT_ELU": True,
                                   "CTX": True, "FIRST": False, "BR": 128, "BP": 8}),
    ]  # fmt: skip
    n_compiled = 0
    for bm, bn, warps in AOT_TILES:
        for kernel, types, consts in variants:
            if (bm, bn) != (64, 64) and kernel is _convtr_igemm_kernel:
                continue  # the transposed conv's gather is the lightest: its largest tile stands for the others
            cc = aot_compile(kernel, types, {**consts, "PREC": "tf32x3", "BM": bm, "BN": bn, "BK": 32},
                             num_warps=warps)
            ptx = cc.asm["ptx"]
            assert "sm_90" in ptx
            n_mma = len(re.findall(r"mma[a-z0-9_.]*\.tf32", ptx))
            assert n_mma >= 3, f"{kernel.fn.__name__}: {n_mma} tf32 MMA instructions"  # three passes at least
            # a spill would sit in the k-loop: 100-450 local loads and stores at 128 columns before
            spills = local_memory_ops(cc.asm["cubin"])
            assert spills == 0, f"{kernel.fn.__name__} {bm}x{bn} on {warps} warps: {spills} local loads/stores"
            n_compiled += 1
            if (bm, bn) in ((64, 64), (16, 32)):
                print(f"{kernel.fn.__name__} {bm}x{bn}: mma tf32 x{n_mma}, {len(cc.asm['cubin'])} B cubin, "
                      f"{cc.metadata.shared} B smem")
    print(f"{n_compiled} tile configurations without local memory")


if __name__ == "__main__":
    aot_script_main(_aot, __file__)
