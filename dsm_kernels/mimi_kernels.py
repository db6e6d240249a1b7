"""Triton kernels of the Mimi codec's residual vector quantizer (fp32).

* :func:`rvq_encode_triton`: the split RVQ encode, one launch per level (plus one that writes the last codes). Each
  launch fuses the previous level's argmin resolution, the residual update and this level's distances and partial
  argmins over a slice of the codebook, so a 32-level encode is 32 launches instead of ~300 torch ops.
* :func:`rvq_decode_upsample_triton`: the sum of the codebook lookups of all levels (tables with the output projection
  folded in) and the depthwise transposed conv from 12.5 to 25 Hz with its overlap-add, one launch, written in the
  transformer's time-major layout.
* :func:`mimi_rope_kv_triton`: a transformer layer's RoPE of q and k and the write of k and v into the streaming KV
  ring, one launch (was a complex multiply and an ``index_put_``).
* :func:`mimi_conv_pad_triton`: a SEANet streaming conv's input (the stored left context prepended, ELU) and the
  update of that context, one launch, for the convolutions that cannot read the context themselves (torch's; the
  implicit-GEMM and GEMV conv kernels do).

* :func:`mimi_ring_attention_triton`: a transformer layer's attention of its few new queries over the KV ring, with
  the ring's mask computed in the kernel from the row's position (was the mask ops + SDPA).
* :func:`mimi_convtr_gemv_triton`: a transposed conv with few input columns as the GEMV of its taps (each (output
  channel, tap) row of weights streamed once) plus one kernel that places the taps, adds the bias and the stored
  tail and keeps the new tail.
* :func:`mimi_residual_out_triton`: the end of a SEANet residual unit, ``x + conv1x1(elu(y))``, one launch (was
  ``elu``, the conv and ``add``).
* :func:`mimi_convtr_overlap_triton`: a SEANet streaming transposed conv's overlap-add and the update of its stored
  tail, one launch (was ``add_``, ``sub`` and ``where``).
* :func:`mimi_rows_triton`: a streaming transformer step's per-row indices (RoPE positions, ring slots, window
  bounds), one launch (was eight index ops, dtype conversions included).

Specifications: :func:`dsm_kernels.reference.rvq_encode_ref`, :func:`dsm_kernels.reference.rvq_decode_upsample_ref`,
:func:`dsm_kernels.reference.mimi_rope_kv_ref`, :func:`dsm_kernels.reference.mimi_ring_attention_ref`,
:func:`dsm_kernels.reference.mimi_conv_pad_ref`, :func:`dsm_kernels.reference.mimi_convtr_overlap_ref`,
:func:`dsm_kernels.reference.mimi_convtr_gemv_ref`, :func:`dsm_kernels.reference.mimi_residual_out_ref` and
:func:`dsm_kernels.reference.mimi_rows_ref`.
Distances here are ``|c|^2 - 2 x.c`` (the reference adds ``|x|^2``, clamps and takes a square root, like
``torch.cdist``): the argmin may differ from the reference only where two candidates tie within fp32 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_interpret
from .pdl import launch_and_wait, use_pdl
from .triton_common import _ctx_gather, _ctx_update, _elu, ctx_args, exact_elu, unit_stride


@triton.jit
def _rvq_level_kernel(
    x_ptr, sxb, sxc, sxt,  # projected latents [B, G*D, T]
    books_ptr,  # [L, K, D + 2] rows [c, 1, |c|^2]
    lev_ptr,  # [G, 2] int32: first level, number of levels
    out_ptr, sob, sol, sot,  # codes [B, L, T] int64
    res_ptr,  # [2, G, N, D] fp32 scratch (residual after the previous level, ping-pong)
    pmin_ptr, pidx_ptr,  # [2, G, N, P] partial minima / their indices (ping-pong)
    level, N, T, K,
    D: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
):
    pk = tl.program_id(0)
    pn = tl.program_id(1)
    g = tl.program_id(2)
    G = tl.num_programs(2)
    off = tl.load(lev_ptr + 2 * g)
    n_lv = tl.load(lev_ptr + 2 * g + 1)
    # This level's codebook slice does not depend on the previous level: request it before waiting for that (PDL).
    d = tl.arange(0, D)
    k = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = (k < K) & (level < n_lv)
    crow = ((off + level) * K + k).to(tl.int64) * (D + 2)
    cb = tl.load(books_ptr + crow[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)  # [BLOCK_K, D]
    cn = tl.load(books_ptr + crow + D + 1, mask=k_ok, other=float("inf"))
    launch_and_wait(PDL)
    if level <= n_lv:
        rows = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        b = rows // T
        t = rows % T
        m2 = row_ok[:, None]
        if level == 0:
            r = tl.load(x_ptr + b[:, None] * sxb + (g * D + d[None, :]) * sxc + t[:, None] * sxt, mask=m2, other=0.0)
        else:
            # Resolve the previous level: smallest partial distance, lowest index among equal ones.
            prev = (level - 1) % 2
            p = tl.arange(0, P)
            pbase = (prev * G + g) * N * P + rows[:, None] * P + p[None, :]
            pm = tl.load(pmin_ptr + pbase, mask=m2, other=float("inf"))
            pi = tl.load(pidx_ptr + pbase, mask=m2, other=2147483647)
            best = tl.min(pm, axis=1)
            code = tl.min(tl.where(pm == best[:, None], pi, 2147483647), axis=1)
            code = tl.where(row_ok, code, 0)
            r = tl.load(res_ptr + ((prev * G + g) * N + rows[:, None]) * D + d[None, :], mask=m2, other=0.0)
            c = tl.load(books_ptr + ((off + level - 1) * K + code[:, None]).to(tl.int64) * (D + 2) + d[None, :],
                        mask=m2, other=0.0)
            r = r - c
            if pk == 0:
                tl.store(out_ptr + b * sob + (off + level - 1) * sol + t * sot, code.to(tl.int64), mask=row_ok)
        if level < n_lv:
            cur = level % 2
            if pk == 0:
                tl.store(res_ptr + ((cur * G + g) * N + rows[:, None]) * D + d[None, :], r, mask=m2)
            dot = tl.dot(r, tl.trans(cb), input_precision="ieee")  # [BLOCK_N, BLOCK_K]
            dist = cn[None, :] - 2.0 * dot
            dist = tl.where(k_ok[None, :], dist, float("inf"))
            m = tl.min(dist, axis=1)
            i = tl.min(tl.where(dist == m[:, None], k[None, :], 2147483647), axis=1)
            pout = (cur * G + g) * N * P + rows * P + pk
            tl.store(pmin_ptr + pout, m, mask=row_ok)
            tl.store(pidx_ptr + pout, i, mask=row_ok)


def rvq_encode_triton(x: torch.Tensor, codebooks_aug: torch.Tensor, group_levels: tuple[int, ...],
                      level_ranges: torch.Tensor, out: torch.Tensor | None = None, counters=None,
                      block_k: int | None = None) -> torch.Tensor:
    """See :func:`dsm_kernels.reference.rvq_encode_ref`.

    The kernel reads each group's levels from ``level_ranges`` (the caller's tensor, made once by
    :func:`dsm_kernels.reference.rvq_level_ranges`: a captured step builds no tensor here).
    Each launch spreads a level's codebook over ``K / block_k`` programs per 16 rows (default 32 codes each on a
    GPU; the whole codebook in one program under ``TRITON_INTERPRET=1``, where programs run one after another).
    ``counters``: the CUDA persistent kernel's barrier words, unused here."""
    del counters
    B, GD, T = x.shape
    G = len(group_levels)
    L, K, D2 = codebooks_aug.shape
    D = D2 - 2
    assert GD == G * D and sum(group_levels) <= L, (x.shape, codebooks_aug.shape, group_levels)
    if x.dtype != torch.float32 or codebooks_aug.dtype != torch.float32 or not codebooks_aug.is_contiguous():
        raise ValueError(f"rvq_encode: x ({x.dtype}) and codebooks_aug ({codebooks_aug.dtype}) must be float32, "
                         "codebooks_aug contiguous")  # fmt: skip
    if level_ranges.dtype != torch.int32 or not level_ranges.is_contiguous() or level_ranges.device != x.device:
        raise ValueError(f"rvq_encode: level_ranges ({level_ranges.dtype} on {level_ranges.device}) must be "
                         f"rvq_level_ranges(group_levels, {x.device}): contiguous int32 on x's device")
    n_q = sum(group_levels)
    if out is None:
        out = torch.empty(B, n_q, T, dtype=torch.int64, device=x.device)
    N = B * T
    if block_k is None:
        block_k = K if triton_interpret() else 32
    BLOCK_K = max(16, min(triton.next_power_of_2(block_k), triton.next_power_of_2(K)))
    P = triton.cdiv(K, BLOCK_K)
    assert P == triton.next_power_of_2(P), "K / BLOCK_K must be a power of two"
    BLOCK_N = 16
    res = torch.empty(2, G, N, D, dtype=torch.float32, device=x.device)
    pmin = torch.empty(2, G, N, P, dtype=torch.float32, device=x.device)
    pidx = torch.empty(2, G, N, P, dtype=torch.int32, device=x.device)
    grid = (P, triton.cdiv(N, BLOCK_N), G)
    pdl = use_pdl(x.device)  # each level launches while the previous one runs, its codebook slice already loading
    for level in range(max(group_levels) + 1):
        _rvq_level_kernel[grid](x, x.stride(0), x.stride(1), x.stride(2), codebooks_aug, level_ranges,
                out, out.stride(0), out.stride(1), out.stride(2), res, pmin, pidx, level, N, T, K,
                D=D, P=P, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PDL=pdl, launch_pdl=pdl)
    return out


@triton.jit
def _rvq_decode_upsample_kernel(
    codes_ptr, scb, scl, sct,  # [B, L, T] int
    tab_ptr,  # [Lt, K, C] fp32, contiguous
    w_ptr, swc, swk,  # [C, 1, 2 S] fp32
    part_ptr, spb, spc, spj,  # [B, C, S] fp32, updated in place
    mask_ptr,  # [B] bool
    out_ptr, sob, sot, soc,  # [B, T S, C] fp32
    L, T, K, C,
    S: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (B, C / BLOCK_C): a row's channels over its T frames in order, the transposed conv's tail carried in
    registers from frame to frame (the stored one before the first)."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    j = tl.arange(0, BLOCK_S)[None, :]
    m = (c < C)[:, None] & (j < S)
    w_head = tl.load(w_ptr + c[:, None] * swc + j * swk, mask=m, other=0.0)  # taps 0..S-1: this frame's columns
    w_tail = tl.load(w_ptr + c[:, None] * swc + (S + j) * swk, mask=m, other=0.0)  # taps S..2S-1: the next frame's
    pp = part_ptr + b * spb + c[:, None] * spc + j * spj
    tail = tl.load(pp, mask=m, other=0.0)
    for t in range(T):
        x = tl.zeros([BLOCK_C], dtype=tl.float32)
        for lvl in range(L):  # in level order from an exact zero, as the reference sums
            code = tl.load(codes_ptr + b * scb + lvl * scl + t * sct).to(tl.int64)
            x += tl.load(tab_ptr + (lvl * K + code) * C + c, mask=c < C, other=0.0)
        # the conv's output columns plus the tail that overlaps them
        tl.store(out_ptr + b * sob + (t * S + j) * sot + c[:, None] * soc, x[:, None] * w_head + tail, mask=m)
        tail = x[:, None] * w_tail
    active = tl.load(mask_ptr + b) != 0
    tl.store(pp, tail, mask=m & active)


def rvq_decode_upsample_triton(codes: torch.Tensor, tables: torch.Tensor, weight: torch.Tensor,
                               partial: torch.Tensor, exec_mask: torch.Tensor,
                               out: torch.Tensor | None = None) -> torch.Tensor:
    """See :func:`dsm_kernels.reference.rvq_decode_upsample_ref`. One launch (was the lookups' kernel, cuDNN's
    depthwise transposed conv and the overlap-add kernel); each program owns its slice of ``partial``."""
    B, L, T = codes.shape
    _, K, C = tables.shape
    S = weight.shape[-1] // 2
    if not tables.is_contiguous():  # too large to copy per call
        raise ValueError(f"rvq_decode_upsample: tables {tuple(tables.shape)} with strides {tables.stride()} must be "
                         "contiguous")
    if out is None:
        out = torch.empty(B, T * S, C, dtype=torch.float32, device=tables.device)
    (exec_mask,) = unit_stride(exec_mask)
    BLOCK_C = min(128, triton.next_power_of_2(C))
    _rvq_decode_upsample_kernel[(B, triton.cdiv(C, BLOCK_C))](
        codes, codes.stride(0), codes.stride(1), codes.stride(2), tables, weight, weight.stride(0), weight.stride(2),
        partial, partial.stride(0), partial.stride(1), partial.stride(2), exec_mask,
        out, out.stride(0), out.stride(1), out.stride(2), L, T, K, C, S=S, BLOCK_S=triton.next_power_of_2(S),
        BLOCK_C=BLOCK_C)
    return out.transpose(1, 2)


@triton.jit
def _mimi_rope_kv_kernel(
    qkv_ptr, sxb, sxt, sx3, sxh,  # [B, T, 3, H, D] fp32, last dim contiguous
    rot_ptr, srb, srt, sr3,  # [B, T, 3, 1, D/2, 2] fp32 (cos, sin), last two dims contiguous
    cache_ptr, scr, sck, sch, scs,  # [R, 2, H, S, D] fp32, last dim contiguous
    rows_ptr, srow,  # [B] int64 cache row
    slots_ptr, ssb, sst,  # [B, T] int64 ring slot
    q_ptr, sqb, sqh, sqt,  # [B, H, T, D] fp32, last dim contiguous
    T, H, P,
    BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    n = tl.program_id(0)
    b = n // T
    t = n % T
    h = tl.arange(0, BLOCK_H)
    p = tl.arange(0, BLOCK_P)
    m = (h < H)[:, None] & (p < P)[None, :]
    row = tl.load(rows_ptr + b * srow).to(tl.int64)
    slot = tl.load(slots_ptr + b * ssb + t * sst).to(tl.int64)
    x = qkv_ptr + b.to(tl.int64) * sxb + t * sxt + h[:, None] * sxh + 2 * p[None, :]
    r = rot_ptr + b.to(tl.int64) * srb + t * srt + 2 * p
    c = cache_ptr + row * scr + h[:, None] * sch + slot * scs + 2 * p[None, :]
    # q and k: (x0 cos - x1 sin, x0 sin + x1 cos); v: copied (its factor is exactly 1)
    for j in tl.static_range(3):
        x0 = tl.load(x + j * sx3, mask=m, other=0.0)
        x1 = tl.load(x + j * sx3 + 1, mask=m, other=0.0)
        if j < 2:
            cs = tl.load(r + j * sr3, mask=p < P, other=0.0)[None, :]
            sn = tl.load(r + j * sr3 + 1, mask=p < P, other=0.0)[None, :]
            y0 = x0 * cs - x1 * sn
            y1 = x0 * sn + x1 * cs
        else:
            y0 = x0
            y1 = x1
        if j == 0:
            o = q_ptr + b.to(tl.int64) * sqb + h[:, None] * sqh + t * sqt + 2 * p[None, :]
            tl.store(o, y0, mask=m)
            tl.store(o + 1, y1, mask=m)
        else:
            tl.store(c + (j - 1) * sck, y0, mask=m)
            tl.store(c + (j - 1) * sck + 1, y1, mask=m)


def mimi_rope_kv_triton(qkv: torch.Tensor, rot: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor,
                        slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """See :func:`dsm_kernels.reference.mimi_rope_kv_ref`; returns q ``[B, H, T, D]`` (a transposed view of a
    ``[B, T, H, D]`` tensor, or ``out``).
    One program per token, all heads: launches nothing but the kernel (graph capturable, no host sync)."""
    B, T, three, H, D = qkv.shape
    assert three == 3 and D % 2 == 0 and qkv.dtype == cache.dtype == torch.float32
    assert rot.dtype == torch.complex64 and rot.shape == (B, T, 3, 1, D // 2), rot.shape
    assert cache.shape[1:3] == (2, H) and cache.shape[4] == D, (cache.shape, qkv.shape)
    assert rows.shape[0] == B and rows.numel() == B and slots.shape == (B, T)
    assert qkv.stride(4) == 1 and cache.stride(4) == 1
    rr = torch.view_as_real(rot)  # [B, T, 3, 1, D/2, 2]
    assert rr.stride(5) == 1 and rr.stride(4) == 2
    if out is None:
        # [B, T, H, D] memory (like the reference's view), so the attention output reshapes to [B*T, C] for free
        out = torch.empty(B, T, H, D, dtype=qkv.dtype, device=qkv.device).transpose(1, 2)
    assert out.shape == (B, H, T, D) and out.stride(3) == 1
    _mimi_rope_kv_kernel[(B * T,)](
        qkv, qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3),
        rr, rr.stride(0), rr.stride(1), rr.stride(2),
        cache, cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
        rows, rows.stride(0), slots, slots.stride(0), slots.stride(1),
        out, out.stride(0), out.stride(1), out.stride(2),
        T, H, D // 2, BLOCK_H=triton.next_power_of_2(H), BLOCK_P=triton.next_power_of_2(D // 2))
    return out


@triton.jit
def _mimi_conv_pad_kernel(
    x_ptr, sxb, sxc, sxt,  # [B, C, T] fp32
    ctx_ptr, sch, scb, scc, sct,  # [2, B, C, P] fp32: half ``phase`` read, the other written
    phase_ptr, mask_ptr, first_ptr,  # [1] int32, [B] bool, [B] bool (unused without FIRST)
    out_ptr, sob, soc, sot,  # [B, C, P + T] fp32
    C, T, P,
    ELU: tl.constexpr, FIRST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
    EXACT_ELU: tl.constexpr = False,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cur = tl.load(phase_ptr).to(tl.int64)
    for t0 in range(0, P + T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)[None, :]
        m = (c < C)[:, None] & (t < P + T)
        v = _ctx_gather(x_ptr, sxb, sxc, sxt, ctx_ptr, sch, scb, scc, sct, first_ptr, cur, P, b, c[:, None], t, m,
                        FIRST)  # fmt: skip
        if ELU:
            v = _elu(v, EXACT_ELU)
        tl.store(out_ptr + b * sob + c[:, None] * soc + t * sot, v, mask=m)
    _ctx_update(x_ptr, sxb, sxc, sxt, ctx_ptr, sch, scb, scc, sct, first_ptr, mask_ptr, cur, b * C + c, b * C + C, C,
                T, P, FIRST, BLOCK_P)  # fmt: skip


def mimi_conv_pad_triton(x: torch.Tensor, ctx: torch.Tensor, phase: torch.Tensor, exec_mask: torch.Tensor,
                         elu: bool = False, first: torch.Tensor | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """See :func:`dsm_kernels.reference.mimi_conv_pad_ref`. One program per row and block of channels, which writes
    that slice of the context's other half (graph capturable, no host sync)."""
    B, C, T = x.shape
    P = ctx.shape[-1]
    assert ctx.shape == (2, B, C, P) and P >= 1 and exec_mask.shape == (B,) and exec_mask.dtype == torch.bool
    assert x.dtype == ctx.dtype == torch.float32
    if out is None:
        out = torch.empty(B, C, P + T, dtype=x.dtype, device=x.device)
    assert out.shape == (B, C, P + T)
    if B == 0 or C == 0:
        return out
    args = ctx_args(ctx, *unit_stride(phase, exec_mask, first), fallback=x)
    BLOCK_T = min(triton.next_power_of_2(P + T), 128)
    BLOCK_C = max(1, min(triton.next_power_of_2(C), 2048 // BLOCK_T))
    _mimi_conv_pad_kernel[(B, triton.cdiv(C, BLOCK_C))](
        x, x.stride(0), x.stride(1), x.stride(2), *args, out, out.stride(0), out.stride(1), out.stride(2), C, T,
        P, ELU=elu, FIRST=first is not None, BLOCK_C=BLOCK_C, BLOCK_T=BLOCK_T, BLOCK_P=triton.next_power_of_2(P),
        EXACT_ELU=exact_elu())  # fmt: skip
    return out


@triton.jit
def _mimi_convtr_overlap_kernel(
    y_ptr, syb, syc, syt,  # [B, C, N] fp32, updated in place
    part_ptr, spb, spc, spt,  # [B, C, P] fp32, updated in place
    bias_ptr, mask_ptr,  # [C] fp32 (unused without HAS_BIAS), [B] bool
    C, N, P,
    HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    j = tl.arange(0, BLOCK_P)[None, :]
    m = (c < C)[:, None] & (j < P)
    pp = part_ptr + b * spb + c[:, None] * spc + j * spt
    yp = y_ptr + b * syb + c[:, None] * syc
    old = tl.load(pp, mask=m, other=0.0)
    tl.store(yp + j * syt, tl.load(yp + j * syt, mask=m, other=0.0) + old, mask=m)
    tail = tl.load(yp + (N - P + j) * syt, mask=m, other=0.0)
    if HAS_BIAS:
        tail = tail - tl.load(bias_ptr + c, mask=c < C, other=0.0)[:, None]
    active = tl.load(mask_ptr + b) != 0
    tl.store(pp, tail, mask=m & active)  # the same lanes read ``old`` above


def mimi_convtr_overlap_triton(y: torch.Tensor, partial: torch.Tensor, bias: torch.Tensor | None,
                               exec_mask: torch.Tensor) -> torch.Tensor:
    """See :func:`dsm_kernels.reference.mimi_convtr_overlap_ref`. One program per row and block of channels, which
    owns that slice of ``partial`` (graph capturable, no host sync)."""
    B, C, N = y.shape
    P = partial.shape[-1]
    assert partial.shape == (B, C, P) and N >= 2 * P and exec_mask.shape == (B,) and exec_mask.dtype == torch.bool
    assert y.dtype == partial.dtype == torch.float32 and (bias is None or bias.shape == (C,))
    bias, exec_mask = unit_stride(bias, exec_mask)
    BLOCK_P = triton.next_power_of_2(P)
    BLOCK_C = max(1, min(triton.next_power_of_2(C), 2048 // BLOCK_P))
    _mimi_convtr_overlap_kernel[(B, triton.cdiv(C, BLOCK_C))](
        y, y.stride(0), y.stride(1), y.stride(2), partial, partial.stride(0), partial.stride(1), partial.stride(2),
        bias if bias is not None else y, exec_mask, C, N, P,
        HAS_BIAS=bias is not None, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P)
    return y[..., : N - P]


@triton.jit
def _mimi_ring_attention_kernel(
    q_ptr, sqb, sqt, sqh,  # [B, T, H, D] fp32, last dim contiguous
    cache_ptr, scr, sck, sch, scs,  # [R, 2, H, S, D] fp32, last dim contiguous
    pos_ptr,  # [B] int64
    out_ptr, sob, sot, soh,  # [B, T, H, D] fp32, last dim contiguous
    T, H, S, scale,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Grid (B * H,): one row's head, all of the row's T queries, the ring in chunks of BLOCK_S slots with an online
    softmax (fp32)."""
    b = (tl.program_id(0) // H).to(tl.int64)
    h = tl.program_id(0) % H
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    tmask = t < T
    q = tl.load(q_ptr + b * sqb + t[:, None] * sqt + h * sqh + d[None, :], mask=tmask[:, None], other=0.0)
    pos = tl.load(pos_ptr + b)
    last = pos + T - 1
    pos_q = pos + t
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, D], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < S
        kv = cache_ptr + b * scr + h * sch + s[:, None] * scs + d[None, :]
        k = tl.load(kv, mask=smask[:, None], other=0.0)  # [BLOCK_S, D]
        v = tl.load(kv + sck, mask=smask[:, None], other=0.0)
        # The position the slot holds; a slot past ``last`` was never written: a truncating % (GPU) makes it a
        # future position, a floor mod (interpreter, torch.remainder) a negative one, and the mask hides both.
        pos_k = last - (last - s) % S
        ok = (pos_q[:, None] >= pos_k[None, :]) & (pos_k >= 0)[None, :] & smask[None, :]
        sc = tl.where(ok, tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale, float("-inf"))  # [BLOCK_T, BLOCK_S]
        m_new = tl.maximum(m, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a chunk with no visible slot yet
        p = tl.exp(sc - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        den = den * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    tl.store(out_ptr + b * sob + t[:, None] * sot + h * soh + d[None, :], acc / den[:, None], mask=tmask[:, None])


def mimi_ring_attention_triton(q: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor,
                               out: torch.Tensor | None = None, block_s: int | None = None) -> torch.Tensor:
    """See :func:`dsm_kernels.reference.mimi_ring_attention_ref`. For the few queries of a streaming step: one
    program per row and head, over the ring in chunks of ``block_s`` slots (default 64 on a GPU, the whole ring
    under ``TRITON_INTERPRET=1``); graph capturable, no host sync."""
    B, T, H, D = q.shape
    S = cache.shape[3]
    assert q.dtype == cache.dtype == torch.float32 and cache.shape[0] >= B and cache.shape[1:3] == (2, H)
    assert cache.shape[4] == D and q.stride(3) == 1 and cache.stride(4) == 1 and pos.shape == (B,), (
        q.shape, cache.shape, pos.shape)
    assert T <= 16 and D == triton.next_power_of_2(D), "a streaming step's few queries, a power-of-two head_dim"
    if out is None:
        out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
    assert out.shape == (B, T, H, D) and out.stride(3) == 1
    if block_s is None:
        block_s = 64 if not triton_interpret() else triton.next_power_of_2(S)
    (pos,) = unit_stride(pos)
    _mimi_ring_attention_kernel[(B * H,)](
        q, q.stride(0), q.stride(1), q.stride(2), cache, cache.stride(0), cache.stride(1), cache.stride(2),
        cache.stride(3), pos, out, out.stride(0), out.stride(1), out.stride(2), T, H, S, D**-0.5,
        D=D, BLOCK_T=triton.next_power_of_2(T), BLOCK_S=triton.next_power_of_2(block_s), num_warps=8)
    return out


@triton.jit
def _mimi_convtr_place_kernel(
    c_ptr, scb, scr, sct,  # [B, C * K, T] fp32: tap k of output channel c from input column t, row c * K + k
    part_ptr, spb, spc, spt,  # [B, C, S] fp32 (K = 2 S), updated in place
    bias_ptr, mask_ptr,  # [C] fp32 (unused without HAS_BIAS), [B] bool
    out_ptr, sob, soc, sot,  # [B, C, T * S] fp32
    C, T, S, K,
    HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Grid (B, C blocks): output column u = t S + j sums tap j of input column t and tap j + S of column t - 1 (the
    stored tail for t = 0), plus the bias; then the tail keeps taps S..K-1 of the last column (no bias)."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = (c < C)[:, None]
    bias = tl.load(bias_ptr + c, mask=(c < C) & HAS_BIAS, other=0.0)[:, None]
    taps = c_ptr + b * scb + (c * K)[:, None] * scr
    for u0 in range(0, T * S, BLOCK_U):
        u = u0 + tl.arange(0, BLOCK_U)[None, :]
        m = cm & (u < T * S)
        t, j = u // S, u % S
        cur = tl.load(taps + j * scr + t * sct, mask=m, other=0.0)
        prev = tl.load(taps + (j + S) * scr + (t - 1) * sct, mask=m & (t > 0), other=0.0)
        old = tl.load(part_ptr + b * spb + c[:, None] * spc + j * spt, mask=m & (t == 0), other=0.0)
        tl.store(out_ptr + b * sob + c[:, None] * soc + u * sot, cur + tl.where(t > 0, prev, old) + bias, mask=m)
    jj = tl.arange(0, BLOCK_S)[None, :]
    jm = cm & (jj < S)
    tail = tl.load(taps + (jj + S) * scr + (T - 1) * sct, mask=jm, other=0.0)
    active = tl.load(mask_ptr + b) != 0
    tl.debug_barrier()  # every thread has read the old tail before any overwrites it
    tl.store(part_ptr + b * spb + c[:, None] * spc + jj * spt, tail, mask=jm & active)


def mimi_convtr_gemv_triton(x: torch.Tensor, w_rows: torch.Tensor, bias: torch.Tensor | None, stride: int,
                            partial: torch.Tensor, exec_mask: torch.Tensor, elu: bool = False) -> torch.Tensor:
    """See :func:`dsm_kernels.reference.mimi_convtr_gemv_ref`, for at most ``CONV_GEMV_MAX_COLUMNS`` input columns
    in all (batch rows x steps) and ``K = 2 S`` (Mimi's): the taps are a 1x1 conv with ``C_out K`` output channels
    (:func:`~dsm_kernels.gemv_kernels.conv1d_gemv_triton`, weights streamed once, the ELU applied as x loads),
    placed by one more kernel."""
    from .gemv_kernels import conv1d_gemv_triton

    B, C_in, T = x.shape
    C, K, C_w = w_rows.shape
    S = stride
    assert C_w == C_in and K == 2 * S and partial.shape == (B, C, K - S) and exec_mask.shape == (B,), (
        x.shape, w_rows.shape, partial.shape, stride)
    assert x.dtype == partial.dtype == torch.float32 and (bias is None or bias.shape == (C,))
    bias, exec_mask = unit_stride(bias, exec_mask)
    taps = conv1d_gemv_triton(x, w_rows.view(C * K, C_in, 1), elu=elu)  # [B, C * K, T]
    out = torch.empty(B, C, T * S, dtype=x.dtype, device=x.device)
    BLOCK_S = triton.next_power_of_2(S)
    BLOCK_U = min(triton.next_power_of_2(T * S), 256)
    BLOCK_C = max(1, min(triton.next_power_of_2(C), 4096 // BLOCK_U))
    _mimi_convtr_place_kernel[(B, triton.cdiv(C, BLOCK_C))](
        taps, taps.stride(0), taps.stride(1), taps.stride(2), partial, partial.stride(0), partial.stride(1),
        partial.stride(2), bias if bias is not None else x, exec_mask, out, out.stride(0), out.stride(1),
        out.stride(2), C, T, S, K, HAS_BIAS=bias is not None, BLOCK_C=BLOCK_C, BLOCK_U=BLOCK_U, BLOCK_S=BLOCK_S)
    return out


@triton.jit
def _mimi_residual_out_kernel(
    y_ptr, syb, syc, syt,  # [B, C_in, T] fp32
    w_ptr, b_ptr,  # [C_out, C_in] fp32 (contiguous), [C_out] (unused without HAS_BIAS)
    x_ptr, sxb, sxc, sxt,  # [B, C_out, T] fp32
    out_ptr, sob, soc, sot,  # [B, C_out, T] fp32
    C_IN, C_OUT, T,
    HAS_BIAS: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_T: tl.constexpr,
    EXACT_ELU: tl.constexpr = False,
):
    """Grid (B, C_out blocks, T blocks): ``out = x + bias + W @ elu(y)`` on a [BLOCK_CO, BLOCK_T] tile (fp32 dot)."""
    b = tl.program_id(0).to(tl.int64)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    com, tm = co < C_OUT, t < T
    acc = tl.zeros([BLOCK_CO, BLOCK_T], dtype=tl.float32)
    for c0 in range(0, C_IN, BLOCK_CI):
        ci = c0 + tl.arange(0, BLOCK_CI)
        cim = ci < C_IN
        w = tl.load(w_ptr + co[:, None] * C_IN + ci[None, :], mask=com[:, None] & cim[None, :], other=0.0)
        v = tl.load(y_ptr + b * syb + ci[:, None] * syc + t[None, :] * syt, mask=cim[:, None] & tm[None, :],
                    other=0.0)  # fmt: skip
        acc += tl.dot(w, _elu(v, EXACT_ELU), input_precision="ieee")
    m = com[:, None] & tm[None, :]
    out = acc + tl.load(x_ptr + b * sxb + co[:, None] * sxc + t[None, :] * sxt, mask=m, other=0.0)
    if HAS_BIAS:
        out += tl.load(b_ptr + co, mask=com, other=0.0)[:, None]
    tl.store(out_ptr + b * sob + co[:, None] * soc + t[None, :] * sot, out, mask=m)


def mimi_residual_out_triton(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
                             interp: bool | None = None) -> torch.Tensor:
    """See :func:`dsm_kernels.reference.mimi_residual_out_ref` (graph capturable, no host sync). ``interp``: the
    interpreter's tiles (default: when ``TRITON_INTERPRET=1``); False gives the GPU's, for tests."""
    B, C_in, T = y.shape
    C_out = weight.shape[0]
    assert weight.shape == (C_out, C_in, 1) and weight.is_contiguous() and x.shape == (B, C_out, T), (
        y.shape, weight.shape, x.shape)
    assert y.dtype == x.dtype == weight.dtype == torch.float32 and (bias is None or bias.shape == (C_out,))
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    (bias,) = unit_stride(bias)
    # fp32 dot tiles that fit the registers of 4 warps (151, no spill on sm_90; 64 x 32 x 64 spills); the
    # interpreter, whose cost grows with the number of programs, takes whole rows
    interp = triton_interpret() if interp is None else interp
    BLOCK_CO = min(512 if interp else 32, max(16, triton.next_power_of_2(C_out)))
    BLOCK_CI = min(512, max(16, triton.next_power_of_2(C_in))) if interp else 16
    BLOCK_T = min(2048 if interp else 64, max(16, triton.next_power_of_2(T)))
    _mimi_residual_out_kernel[(B, triton.cdiv(C_out, BLOCK_CO), triton.cdiv(T, BLOCK_T))](
        y, y.stride(0), y.stride(1), y.stride(2), weight, bias if bias is not None else weight,
        x, x.stride(0), x.stride(1), x.stride(2), out, out.stride(0), out.stride(1), out.stride(2),
        C_in, C_out, T, HAS_BIAS=bias is not None, BLOCK_CO=BLOCK_CO, BLOCK_CI=BLOCK_CI, BLOCK_T=BLOCK_T,
        EXACT_ELU=exact_elu())
    return out


@triton.jit
def _mimi_rows_kernel(pos_ptr, exec_ptr, positions_ptr, slots_ptr, lens_ptr, starts_ptr, B, tokens, capacity,
                      ADVANCE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """A lane a stream: its rows ``b * tokens + j``, then (ADVANCE) its position moved on by the lane that read it."""
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = b < B
    pos = tl.load(pos_ptr + b, mask=m, other=0).to(tl.int64)
    live = tl.load(exec_ptr + b, mask=m, other=0).to(tl.int32) != 0
    for j in range(tokens):
        r = b * tokens + j
        p = pos + j
        tl.store(positions_ptr + r, (pos.to(tl.float32) + j).to(tl.int64), mask=m)  # as moshi rounds
        tl.store(slots_ptr + r, tl.where(live, b.to(tl.int64) * capacity + p % capacity, -1), mask=m)
        tl.store(lens_ptr + r, (p + 1).to(tl.int32), mask=m)
        tl.store(starts_ptr + r, (p + tokens - capacity - j).to(tl.int32), mask=m)
    if ADVANCE:
        tl.store(pos_ptr + b, pos + tl.where(live, tokens, 0), mask=m)


def mimi_rows_triton(pos: torch.Tensor, exec_mask: torch.Tensor, tokens: int, capacity: int, advance: bool = False):
    """Triton twin of :func:`~dsm_kernels.reference.mimi_rows_ref`."""
    B = pos.shape[0]
    n = B * tokens
    dev = pos.device
    positions, slots = (torch.empty(n, dtype=torch.int64, device=dev) for _ in range(2))
    seq_lens, starts = (torch.empty(n, dtype=torch.int32, device=dev) for _ in range(2))
    if n:
        if advance and pos.stride(0) != 1:  # unit_stride would advance a copy
            raise ValueError(f"mimi_rows: pos with stride {pos.stride(0)} cannot be advanced in place")
        block = min(1024, triton.next_power_of_2(B))
        pos, exec_mask = unit_stride(pos, exec_mask)
        _mimi_rows_kernel[(triton.cdiv(B, block),)](pos, exec_mask, positions, slots, seq_lens, starts, B, tokens,
                                                    capacity, ADVANCE=advance, BLOCK=block, num_warps=1)  # fmt: skip
    return positions, slots, seq_lens, starts
