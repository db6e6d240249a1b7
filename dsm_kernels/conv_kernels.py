"""Triton implicit-GEMM convolutions for Mimi's SEANet at many columns (fp32 data, tensor-core products).

At many streams Mimi is compute-bound in its fp32 convolutions (run 2, H100, batch 400: encode 23 ms, decode 30 ms a
frame for ~0.5 GFLOP a stream, i.e. ~8 TFLOP/s), which cuDNN runs on the CUDA cores since TF32 would change the
codes. These kernels compute the same products on the tensor cores in three TF32 passes (``tf32x3``: each fp32
operand split into a TF32 head and a TF32 tail; the tail x tail term dropped), which keeps the result within a few
fp32 ulps of an fp32 product, with fp32 accumulation.

* :func:`conv1d_igemm_triton`: a valid conv1d (no groups, no dilation) as the GEMM ``W [C_out, C_in K] x
  im2col(x) [C_in K, B T_out]``, the im2col gathered on the fly (with an optional ELU of the input, the one that
  precedes every SEANet conv); bias and an optional residual added in the epilogue (a SEANet residual unit's
  ``x + conv1x1(elu(y))`` in one pass). A streaming causal conv reads its stored left context in place (the im2col
  gathers from ``[ctx[phase] | x]``) and extra programs of the launch write the context's other half
  (:func:`~dsm_kernels.reference.conv_context_input`), so no kernel copies the input first.
* :func:`conv_transpose1d_igemm_triton`: a transposed conv with ``K = J S`` as S interleaved J-tap convs: output
  ``q S + p`` is ``sum_j W[:, :, p + j S]^T x[q - j]``, one GEMM per phase p, written strided. Its weights are
  read phase-major (:func:`~dsm_kernels.reference.convtr_phase_weight`, made once by the caller), so that a tile's
  rows are contiguous.

Specifications: :func:`dsm_kernels.reference.conv1d_igemm_ref` and
:func:`dsm_kernels.reference.conv_transpose1d_igemm_ref` (torch's convolutions). Under ``TRITON_INTERPRET=1`` the
products run in plain fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import sm_count, triton_interpret
from .reference import convtr_phase_weight
from .triton_common import _ctx_gather, _ctx_update, _elu, ctx_args, ctx_plan, exact_elu, unit_stride


@triton.jit
def _conv_igemm_kernel(
    x_ptr, sxb, sxc, sxt,  # [B, C_in, T] fp32
    w_ptr,  # [C_out, C_in * KS] fp32, contiguous
    bias_ptr,  # [C_out] (unused without HAS_BIAS)
    res_ptr, srb, src, srt,  # [B, C_out, T_out] residual (unused without HAS_RES)
    out_ptr, sob, soc, sot,  # [B, C_out, T_out]
    C_out, KD, T_out, N, stride,
    ctx_ptr, sch, scb, scc, sct, phase_ptr, mask_ptr, first_ptr,  # CTX: [2, B, C_in, P], [1] int32, [B] bool x2
    C_in, T_in, P, N_TILES,  # CTX: x holds T_in new columns; grid columns >= N_TILES update the context
    KS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ELU: tl.constexpr, EXACT_ELU: tl.constexpr,
    PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    CTX: tl.constexpr = False, FIRST: tl.constexpr = False, BR: tl.constexpr = 1, BP: tl.constexpr = 1,
):  # fmt: skip
    if CTX:  # a streaming causal conv: its input is [ctx[phase] | x]; extra programs write ctx[1 - phase]
        if tl.program_id(1) >= N_TILES:
            if tl.program_id(0) == 0:
                rows = (tl.program_id(1) - N_TILES) * BR + tl.arange(0, BR)
                _ctx_update(x_ptr, sxb, sxc, sxt, ctx_ptr, sch, scb, scc, sct, first_ptr, mask_ptr,
                            tl.load(phase_ptr).to(tl.int64), rows, (N // T_out) * C_in, C_in, T_in, P, FIRST,
                            BP)  # fmt: skip
        else:
            _conv_igemm_tile(x_ptr, sxb, sxc, sxt, w_ptr, bias_ptr, res_ptr, srb, src, srt, out_ptr, sob, soc, sot,
                             C_out, KD, T_out, N, stride, ctx_ptr, sch, scb, scc, sct, first_ptr,
                             tl.load(phase_ptr).to(tl.int64), P, KS, HAS_BIAS, HAS_RES, ELU, EXACT_ELU, PREC, BM, BN,
                             BK, True, FIRST)  # fmt: skip
    else:
        _conv_igemm_tile(x_ptr, sxb, sxc, sxt, w_ptr, bias_ptr, res_ptr, srb, src, srt, out_ptr, sob, soc, sot,
                         C_out, KD, T_out, N, stride, ctx_ptr, sch, scb, scc, sct, first_ptr, 0, P, KS, HAS_BIAS,
                         HAS_RES, ELU, EXACT_ELU, PREC, BM, BN, BK, False, False)  # fmt: skip


@triton.jit
def _conv_igemm_tile(
    x_ptr, sxb, sxc, sxt, w_ptr, bias_ptr, res_ptr, srb, src, srt, out_ptr, sob, soc, sot,
    C_out, KD, T_out, N, stride, ctx_ptr, sch, scb, scc, sct, first_ptr, cur, P,
    KS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ELU: tl.constexpr, EXACT_ELU: tl.constexpr,
    PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CTX: tl.constexpr, FIRST: tl.constexpr,
):  # fmt: skip
    """One (output channels, columns) tile of :func:`_conv_igemm_kernel` (``CTX``: the input is [ctx[cur] | x])."""
    co = tl.program_id(0) * BM + tl.arange(0, BM)
    n = tl.program_id(1) * BN + tl.arange(0, BN)  # output column: batch row b, step t
    com, nm = co < C_out, n < N
    b = (n // T_out).to(tl.int64)
    t = n % T_out
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, KD, BK):
        kk = k0 + tl.arange(0, BK)  # reduction index: input channel kk // KS, tap kk % KS
        km = kk < KD
        a = tl.load(w_ptr + co[:, None] * KD + kk[None, :], mask=com[:, None] & km[None, :], other=0.0)
        src_t = t[None, :] * stride + (kk % KS)[:, None]
        xm = km[:, None] & nm[None, :]
        if CTX:
            xb = _ctx_gather(x_ptr, sxb, sxc, sxt, ctx_ptr, sch, scb, scc, sct, first_ptr, cur, P, b[None, :],
                             (kk // KS)[:, None], src_t, xm, FIRST)  # fmt: skip
        else:
            xb = tl.load(x_ptr + b[None, :] * sxb + (kk // KS)[:, None] * sxc + src_t * sxt, mask=xm, other=0.0)
        if ELU:  # elu(0) = 0: the masked elements stay out of the sum
            xb = _elu(xb, EXACT_ELU)
        acc = tl.dot(a, xb, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=com, other=0.0)[:, None]
    m = com[:, None] & nm[None, :]
    if HAS_RES:
        acc = tl.load(res_ptr + b[None, :] * srb + co[:, None] * src + t[None, :] * srt, mask=m, other=0.0) + acc
    tl.store(out_ptr + b[None, :] * sob + co[:, None] * soc + t[None, :] * sot, acc, mask=m)


@triton.jit
def _convtr_igemm_kernel(
    x_ptr, sxb, sxc, sxt,  # [B, C_in, T] fp32
    w_ptr,  # [S, C_out, J * C_in] fp32: convtr_phase_weight
    bias_ptr,  # [C_out] (unused without HAS_BIAS)
    out_ptr, sob, soc, sot,  # [B, C_out, Q * S]
    C_in, C_out, T, Q, N, S,
    J: tl.constexpr, HAS_BIAS: tl.constexpr, ELU: tl.constexpr, EXACT_ELU: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    co = tl.program_id(0) * BM + tl.arange(0, BM)
    n = tl.program_id(1) * BN + tl.arange(0, BN)  # output column of this phase: batch row b, step q
    p = tl.program_id(2)  # the phase: output positions q S + p
    com, nm = co < C_out, n < N
    b = (n // Q).to(tl.int64)
    q = n % Q
    KD = J * C_in
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, KD, BK):
        kk = k0 + tl.arange(0, BK)  # reduction index: tap j = kk // C_in, input channel kk % C_in
        km = kk < KD
        j, ci = kk // C_in, kk % C_in
        a = tl.load(w_ptr + (p * C_out + co[:, None]).to(tl.int64) * KD + kk[None, :],
                    mask=com[:, None] & km[None, :], other=0.0)  # fmt: skip
        src_t = q[None, :] - j[:, None]
        xm = km[:, None] & nm[None, :] & (src_t >= 0) & (src_t < T)
        xb = tl.load(x_ptr + b[None, :] * sxb + ci[:, None] * sxc + src_t * sxt, mask=xm, other=0.0)
        if ELU:
            xb = _elu(xb, EXACT_ELU)
        acc = tl.dot(a, xb, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=com, other=0.0)[:, None]
    o = q * S + p
    tl.store(out_ptr + b[None, :] * sob + co[:, None] * soc + o[None, :] * sot, acc, mask=com[:, None] & nm[None, :])


def _tiles(c_out: int, columns: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BM, BN, BK, warps): output channels x columns x reduction per program, and its warps. On a GPU, 64 columns
    a program where that still gives half the SMs a program, else 32 (one stream's convs have 96-1920 columns: wide
    tiles would leave most SMs idle), with 8 warps for 64 columns and 4 for 32: the tile configurations whose tf32x3
    products and gathers fit the registers (128 columns spilled 100-450 registers' worth in every k-step at 4 or 8
    warps, 64 columns at 4 warps; checked by tests/kernels/test_conv_igemm.py on the sm_90 SASS). Under the
    interpreter, which runs programs one after another at a fixed cost each, few large ones (numpy takes the
    tiles)."""
    bm = max(16, min(64, triton.next_power_of_2(c_out)))
    if triton_interpret():
        return bm, 1024, 128, 4
    m_tiles, want = triton.cdiv(c_out, bm), sm_count(device) // 2
    bn = 64 if m_tiles * triton.cdiv(columns, 64) >= want else 32
    return bm, bn, 32, 8 if bn == 64 else 4


def _precision() -> str:
    return "ieee" if triton_interpret() else "tf32x3"


def conv1d_igemm_triton(x, weight, bias=None, stride=1, residual=None, elu=False, out=None, ctx=None, phase=None,
                        exec_mask=None, first=None):  # fmt: skip
    """See :func:`dsm_kernels.reference.conv1d_igemm_ref`. With ``ctx``, the stored context is read in place and
    its other half written by extra programs of the same launch (no input copy)."""
    B, C, T = x.shape
    C_out, C_w, KS = weight.shape
    P = 0 if ctx is None else ctx.shape[-1]
    T_out = (P + T - KS) // stride + 1
    if C_w != C or T_out < 1 or torch.float32 != x.dtype or torch.float32 != weight.dtype:
        raise ValueError(f"conv1d_igemm: x {tuple(x.shape)} {x.dtype} against weight {tuple(weight.shape)} "
                         f"{weight.dtype} (fp32, no groups)")  # fmt: skip
    weight = weight.contiguous()
    if out is None:
        out = torch.empty(B, C_out, T_out, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    bias, phase, exec_mask, first = unit_stride(bias, phase, exec_mask, first)
    N = B * T_out
    BM, BN, BK, warps = _tiles(C_out, N, x.device)
    n_tiles = triton.cdiv(N, BN)
    BR, BP, state_tiles = ctx_plan(ctx)
    res = residual if residual is not None else out
    _conv_igemm_kernel[(triton.cdiv(C_out, BM), n_tiles + state_tiles)](
        x, x.stride(0), x.stride(1), x.stride(2), weight, bias if bias is not None else weight,
        res, res.stride(0), res.stride(1), res.stride(2), out, out.stride(0), out.stride(1), out.stride(2),
        C_out, C * KS, T_out, N, stride, *ctx_args(ctx, phase, exec_mask, first, fallback=x), C, T, P, n_tiles,
        KS=KS, HAS_BIAS=bias is not None, HAS_RES=residual is not None, ELU=elu, EXACT_ELU=exact_elu(),
        PREC=_precision(), BM=BM, BN=BN, BK=BK, CTX=ctx is not None, FIRST=first is not None, BR=BR,
        BP=BP, num_warps=warps, num_stages=3,
    )  # fmt: skip
    return out


def conv_transpose1d_igemm_triton(x, weight, bias=None, stride=1, phase_weight=None, elu=False, out=None):
    """See :func:`dsm_kernels.reference.conv_transpose1d_igemm_ref`; the kernel size must be a multiple of the
    stride (Mimi's are twice it). ``phase_weight``: :func:`convtr_phase_weight` of ``weight``, made once (else made
    here, a copy per call)."""
    B, C, T = x.shape
    C_w, C_out, K = weight.shape
    if C_w != C or K % stride or torch.float32 != x.dtype or torch.float32 != weight.dtype:
        raise ValueError(f"conv_transpose1d_igemm: x {tuple(x.shape)} {x.dtype} against weight "
                         f"{tuple(weight.shape)} {weight.dtype} (fp32, no groups, kernel a multiple of the stride "
                         f"{stride})")  # fmt: skip
    J = K // stride
    if phase_weight is None:
        phase_weight = convtr_phase_weight(weight, stride)
    if phase_weight.shape != (stride, C_out, J * C) or not phase_weight.is_contiguous():
        raise ValueError(f"conv_transpose1d_igemm: phase_weight {tuple(phase_weight.shape)} is not "
                         f"convtr_phase_weight(weight {tuple(weight.shape)}, {stride})")  # fmt: skip
    Q = T + J - 1
    if out is None:
        out = torch.empty(B, C_out, Q * stride, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    (bias,) = unit_stride(bias)
    N = B * Q
    BM, BN, BK, warps = _tiles(C_out, N * stride, x.device)  # the S phases are programs too
    _convtr_igemm_kernel[(triton.cdiv(C_out, BM), triton.cdiv(N, BN), stride)](
        x, x.stride(0), x.stride(1), x.stride(2), phase_weight, bias if bias is not None else phase_weight,
        out, out.stride(0), out.stride(1), out.stride(2), C, C_out, T, Q, N, stride,
        J=J, HAS_BIAS=bias is not None, ELU=elu, EXACT_ELU=exact_elu(), PREC=_precision(), BM=BM, BN=BN,
        BK=BK, num_warps=warps, num_stages=3,
    )  # fmt: skip
    return out
