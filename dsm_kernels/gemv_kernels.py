"""Small-batch GEMV kernels (batch <= ``GEMV_MAX_B``), each over whole weight rows:

* ``_gemv_kernel`` (the ``dsm_kernels.gemv`` op): a linear layer with its RMSNorm or LayerNorm prologue and its
  residual or SiLU-gate epilogue. It runs the linears of the temporal step and of the depth transformer.
* ``_qkv_rope_gemv_kernel`` (``dsm_kernels.qkv_rope_gemv``): the temporal QKV projection, which also applies RoPE
  and writes k and v into the paged cache.
* ``_qkv_gemv_kernel``: the depth transformer's QKV projection, followed by its attention.

At batch 1 the split-K GEMMs of :mod:`dsm_kernels.depformer` are bound by latency, not bandwidth: H100 run 2 timed
6.4 µs per linear launch and 11.3 µs per QKV + attention launch, about 0.65 TB/s. Each of their programs makes
several dependent memory round trips one after the other:

1. the RMSNorm prologue, a loop over the row;
2. the split-K partial stores;
3. a counter;
4. the reads of the other programs' partials.

Here a program owns ``BN`` whole weight rows (all of K). It loads them at once, before and independently of the
input rows, and finishes its outputs itself. That is one round trip for the weights and no partials, and the
RMSNorm comes for free from the input row the GEMV loads anyway. Only the attention still waits on a counter: the
last of a head's QKV programs runs that head's attention.

On sm_90+ the kernels are launched as programmatic dependents of the kernel before them (``PDL``): each one starts
while its predecessor runs, issues its weight loads, and only then waits for the predecessor's outputs. That hides
the launch gap and the weights' DRAM latency, the two costs that dominate a batch-1 launch (a persistent kernel's
benefit, without a grid barrier). The norm weights, biases and scales are read before the wait too: like the
weights, they must be parameters, never outputs of the kernels just before (the AOT tests check which loads precede
the wait).

The rows of the batch are unrolled (``BB`` = next power of two of B, masked), so every load of a launch sits in
one basic block and can be issued early. Rounding points are those of :mod:`dsm_kernels.depformer` (the reference's);
only the order of each dot product's sum differs (a fixed tree, so graph replays reproduce bit for bit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import CONV_GEMV_MAX_COLUMNS, GEMV_MAX_B, triton_interpret
from .paged_attention import _round_e4m3, cache_saturation
from .pdl import launch_and_wait, use_pdl
from .sampling import _num_warps as _sampler_warps
from .sampling import _sample_rows
from .triton_common import (
    _TL_DTYPES,
    _arrive,
    _ctx_gather,
    _ctx_update,
    _elu,
    _input_tile,
    _rnd,
    _sms,
    ctx_args,
    ctx_plan,
    exact_elu,
    unit_stride,
)

# Up to GEMV_MAX_B rows the GEMV kernels run; above it tensor-core GEMMs (the row loop is unrolled, and tensor cores
# win once there are enough rows). bench_depformer times both sides of the boundary.

# Weight elements one program holds (registers): BN x next_pow2(K), twice for the gate/value pair.
_TILE_ELEMS = 16384


@triton.jit
def _norm_row(x, alpha, beta, kmask, K, eps, NORM: tl.constexpr, DT: tl.constexpr):
    """A GEMV's input row (fp32, masked lanes 0): x (NORM 0), RMSNorm(x) * alpha (1) or LayerNorm(x) * alpha + beta
    (2, with fp32 statistics as torch's layer_norm computes them for bf16), rounded to DT."""
    if NORM == 1:
        x = _rnd(x * (alpha * (1.0 / tl.sqrt(eps + tl.sum(x * x, axis=0) / K))), DT)
    if NORM == 2:
        xc = tl.where(kmask, x - tl.sum(x, axis=0) / K, 0.0)
        x = _rnd(xc * (1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / K + eps)) * alpha + beta, DT)
    return x


@triton.jit
def _normed_row_dot(x_ptr, k, kmask, live, w, alpha, beta, K, eps, NORM: tl.constexpr, DT: tl.constexpr):
    """One input row (all masked off unless ``live``) through :func:`_norm_row`, and its dot with each row of the
    weight tile ``w``, rounded to DT: returns ``(x', y)``."""
    x = tl.load(x_ptr + k, mask=kmask & live, other=0.0).to(tl.float32)
    x = _norm_row(x, alpha, beta, kmask, K, eps, NORM, DT)
    return x, _rnd(tl.sum(w.to(tl.float32) * x[None, :], axis=1), DT)


@triton.jit
def _gemv_kernel(
    x_ptr, alpha_ptr, beta_ptr, w_ptr, out_ptr, scale_ptr,
    B, N, K, LDX, LDO, eps,
    NORM: tl.constexpr, EPI: tl.constexpr, HAS_SCALE: tl.constexpr, DT: tl.constexpr,
    BB: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Grid (N tiles,): ``out[b, n] = epi(x'[b] . w[n])`` for rows b < B, with x' = :func:`_norm_row` (x). Epilogues:
    0 store; 1 ``out += scale * y`` in place; 2 ``silu(y_gate) * y_value`` with the value rows at ``w + N * K`` (as
    ``depformer._linear_kernel``); 3 ``gelu(y)`` (erf form, torch's default)."""
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    nmask = n < N
    k = tl.arange(0, KP)
    kmask = k < K
    wm = nmask[:, None] & kmask[None, :]
    wp = w_ptr + n[:, None].to(tl.int64) * K + k[None, :]
    w = tl.load(wp, mask=wm, other=0.0)  # issued first: the weights are the launch's only large read
    if EPI == 2:
        wv = tl.load(wp + N * K, mask=wm, other=0.0)
    alpha = tl.load(alpha_ptr + k, mask=kmask & (NORM > 0), other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + k, mask=kmask & (NORM == 2), other=0.0).to(tl.float32)
    if HAS_SCALE:
        sc = tl.load(scale_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    launch_and_wait(PDL)  # the weights are in flight
    for i in tl.static_range(BB):
        live = i < B
        x, y = _normed_row_dot(x_ptr + i * LDX, k, kmask, live, w, alpha, beta, K, eps, NORM, DT)
        om = nmask & live
        optr = out_ptr + i * LDO + n
        if EPI == 1:
            if HAS_SCALE:
                y = _rnd(sc * y, DT)
            y = tl.load(optr, mask=om, other=0.0).to(tl.float32) + y
        if EPI == 2:
            u = _rnd(tl.sum(wv.to(tl.float32) * x[None, :], axis=1), DT)
            y = _rnd(y / (1.0 + tl.exp(-y)), DT) * u  # F.silu, rounded, times the value half
        if EPI == 3:
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))  # F.gelu
        tl.store(optr, _rnd(y, DT).to(DT), mask=om)


@triton.jit(do_not_specialize=["step_scale", "step_offset"])  # one compile for every codebook
def _head_sample_kernel(
    x_ptr, alpha_ptr, w_ptr, logits_ptr, cnt_ptr, temp_ptr, seed_ptr, step_ptr, tok_ptr,
    B, N, K, eps, top_k, step_scale, step_offset,
    NORM: tl.constexpr, DT: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr,
    NPROG: tl.constexpr, BLOCK_V: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Grid (NPROG = N tiles,): an output head (``_gemv_kernel`` with its RMSNorm prologue if NORM, logits stored to
    ``logits`` [B, N]), and the last program to finish samples every row's token from them (``_sample_rows``: the
    sampler's own code), which saves the sampler's launch after each head."""
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    nmask = n < N
    k = tl.arange(0, KP)
    kmask = k < K
    w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
    alpha = tl.load(alpha_ptr + k, mask=kmask & (NORM > 0), other=0.0).to(tl.float32)
    launch_and_wait(PDL)  # the weights are in flight
    for i in tl.static_range(BB):
        live = i < B
        _, y = _normed_row_dot(x_ptr + i * K, k, kmask, live, w, alpha, alpha, K, eps, NORM, DT)
        tl.store(logits_ptr + i * N + n, y.to(DT), mask=nmask & live)
    if _arrive(cnt_ptr, 0, NPROG):
        for i in tl.static_range(BB):
            _sample_rows(logits_ptr, logits_ptr, temp_ptr, seed_ptr, step_ptr, tok_ptr, i + tl.arange(0, 1), B, N,
                         top_k, 1.0, N, N, step_scale, step_offset, False, BLOCK_V, True)  # fmt: skip


@triton.jit
def _attend_head(q_ptr, kc_ptr, vc_ptr, a_ptr, B, DIM, wrow, dmask, pos, scale, DT: tl.constexpr,
                 BB: tl.constexpr, BP: tl.constexpr):  # fmt: skip
    """One head's attention (columns ``wrow``) of rows b < B over this frame's steps 0..pos. Other programs wrote
    q/K/V: .cg loads read L2, where the counter's release made them visible."""
    p = tl.arange(0, BP)
    pmask = p <= pos
    km = pmask[:, None] & dmask[None, :]
    for b in tl.static_range(BB):
        live = b < B
        qr = tl.load(q_ptr + b * DIM + wrow, mask=dmask & live, other=0.0, cache_modifier=".cg").to(tl.float32)
        off = (b * BP + p[:, None]).to(tl.int64) * DIM + wrow[None, :]
        kr = tl.load(kc_ptr + off, mask=km & live, other=0.0, cache_modifier=".cg").to(tl.float32)
        vr = tl.load(vc_ptr + off, mask=km & live, other=0.0, cache_modifier=".cg").to(tl.float32)
        s = tl.where(pmask, tl.sum(kr * qr[None, :], axis=1) * scale, float("-inf"))
        e = tl.exp(s - tl.max(s, axis=0))
        o = tl.sum(vr * (e / tl.sum(e, axis=0))[:, None], axis=0)
        tl.store(a_ptr + b * DIM + wrow, _rnd(o, DT).to(DT), mask=dmask & live)


@triton.jit
def _qkv_gemv_kernel(
    x_ptr, proj_ptr, t1_ptr, t2_ptr, tok_ptr, alpha_ptr, w_ptr, cnt_ptr,
    q_ptr, kc_ptr, vc_ptr, a_ptr,
    B, DIM, LDP, pos, vt, eps, scale,
    INPUT: tl.constexpr, DEMUX: tl.constexpr, DT: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr,
    KP: tl.constexpr, HEAD_D: tl.constexpr, BD: tl.constexpr, BP: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Grid (3 * DIM / BN,): program p computes rows [p * BN, (p + 1) * BN) of the fused QKV projection (BN divides
    HEAD_D, so a program serves one head of one of q, k, v) of RMSNorm(x) * alpha, stores them to q or this frame's
    K/V cache at step ``pos``, and the last of the head's ``3 * HEAD_D / BN`` programs runs its attention. Layer 0
    (INPUT) builds its input ``proj + Emb(prev)`` here; program 0 stores it as the residual stream."""
    p = tl.program_id(0)
    r0 = p * BN
    part = r0 // DIM  # 0: q, 1: k, 2: v
    col = r0 - part * DIM + tl.arange(0, BN)
    k = tl.arange(0, KP)
    kmask = k < DIM
    w = tl.load(w_ptr + (r0 + tl.arange(0, BN))[:, None].to(tl.int64) * DIM + k[None, :], mask=kmask[None, :],
                other=0.0)  # fmt: skip
    alpha = tl.load(alpha_ptr + k, mask=kmask, other=0.0).to(tl.float32)
    launch_and_wait(PDL)  # the weights are in flight
    for i in tl.static_range(BB):
        live = i < B
        rows = i + tl.arange(0, 1)
        rmask = rows < B
        x = _input_tile(x_ptr, proj_ptr, t1_ptr, t2_ptr, tok_ptr, rows, rmask, k, kmask, B, DIM, LDP, vt,
                        INPUT, DEMUX, DT)  # fmt: skip  # [1, KP]
        if INPUT:
            if p == 0:
                tl.store(x_ptr + rows[:, None] * DIM + k[None, :], x.to(DT), mask=rmask[:, None] & kmask[None, :])
        inv = 1.0 / tl.sqrt(eps + tl.sum(x * x, axis=1) / DIM)  # [1]
        a = _rnd(x * (alpha[None, :] * inv[:, None]), DT)
        y = _rnd(tl.sum(w.to(tl.float32) * a, axis=1), DT).to(DT)
        cache = (i * BP + pos).to(tl.int64) * DIM + col
        if part == 0:
            tl.store(q_ptr + i * DIM + col, y, mask=live)
        elif part == 1:
            tl.store(kc_ptr + cache, y, mask=live)
        else:
            tl.store(vc_ptr + cache, y, mask=live)
    h = (r0 - part * DIM) // HEAD_D
    if _arrive(cnt_ptr, h, 3 * HEAD_D // BN):
        d = tl.arange(0, BD)
        dmask = d < HEAD_D
        _attend_head(q_ptr, kc_ptr, vc_ptr, a_ptr, B, DIM, h * HEAD_D + d, dmask, pos, scale, DT, BB, BP)


@triton.jit
def _qkv_rope_gemv_kernel(
    x_ptr, alpha_ptr, beta_ptr, w_ptr, pos_ptr, f_ptr, slot_ptr, q_ptr, kc_ptr, vc_ptr,
    B, K, LDX, eps, H, HKV, NR, page_size, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    NORM: tl.constexpr, DT: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, KP: tl.constexpr, D: tl.constexpr,
    SAT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Grid (rows of the fused q|k|v projection / (2 BH),): program p computes BH interleaved RoPE pairs (rows r and
    r + 1, r even) from :func:`_norm_row` (x) (NORM 1: RMSNorm, 2: LayerNorm), rotates the q and k pairs at each
    row's position, and stores q to ``q`` and k, v into the row's cache slot (skipped where the slot is -1), as
    ``rope_append_kv`` would from the stored projection. The two rows of a pair come from two weight tiles, so no
    register shuffle is needed; a program may span heads (each lane finds its own). Cache heads may be strided
    (Mimi's ring is [row, head, slot, D])."""
    r = tl.program_id(0) * 2 * BH + 2 * tl.arange(0, BH)
    rmask = r < NR
    head = r // D  # [0, H): q, [H, H + HKV): k, then v
    col = r - head * D
    k = tl.arange(0, KP)
    kmask = k < K
    wm = rmask[:, None] & kmask[None, :]
    wp = w_ptr + r[:, None].to(tl.int64) * K + k[None, :]
    w0 = tl.load(wp, mask=wm, other=0.0)
    w1 = tl.load(wp + K, mask=wm, other=0.0)
    alpha = tl.load(alpha_ptr + k, mask=kmask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + k, mask=kmask & (NORM == 2), other=0.0).to(tl.float32)
    is_q, is_k = rmask & (head < H), rmask & (head >= H) & (head < H + HKV)
    is_v = rmask & (head >= H + HKV)
    kdst = kc_ptr + (head - H) * stride_kh + col
    vdst = vc_ptr + (head - H - HKV) * stride_vh + col
    launch_and_wait(PDL)  # the weights are in flight
    # the frequencies after the wait: the model builds them on the device just before its first step
    f = tl.load(f_ptr + col // 2, mask=rmask, other=0.0)
    for i in tl.static_range(BB):
        live = i < B
        x = tl.load(x_ptr + i * LDX + k, mask=kmask & live, other=0.0).to(tl.float32)
        a = _norm_row(x, alpha, beta, kmask, K, eps, NORM, DT)
        y0 = _rnd(tl.sum(w0.to(tl.float32) * a[None, :], axis=1), DT)
        y1 = _rnd(tl.sum(w1.to(tl.float32) * a[None, :], axis=1), DT)
        # q and k pairs rotate, rounded as rope_append_kv rounds; v passes
        angle = f * tl.load(pos_ptr + i, mask=live, other=0).to(tl.float32)
        c, s = tl.cos(angle), tl.sin(angle)
        y0, y1 = tl.where(is_v, y0, _rnd(y0 * c - y1 * s, DT)), tl.where(is_v, y1, _rnd(y0 * s + y1 * c, DT))
        qdst = q_ptr + (i * H + head) * D + col
        tl.store(qdst, y0.to(DT), mask=live & is_q)
        tl.store(qdst + 1, y1.to(DT), mask=live & is_q)
        slot = tl.load(slot_ptr + i, mask=live, other=-1).to(tl.int64)
        page, off = slot // page_size, slot % page_size
        if SAT > 0:  # fp8 e4m3 cache
            y0, y1 = _round_e4m3(y0, SAT), _round_e4m3(y1, SAT)
        y0, y1 = y0.to(kc_ptr.dtype.element_ty), y1.to(kc_ptr.dtype.element_ty)
        ok = live & (slot >= 0)
        kd = kdst + page * stride_kp + off * stride_ks
        vd = vdst + page * stride_vp + off * stride_vs
        tl.store(kd, y0, mask=ok & is_k)
        tl.store(kd + 1, y1, mask=ok & is_k)
        tl.store(vd, y0, mask=ok & is_v)
        tl.store(vd + 1, y1, mask=ok & is_v)


@triton.jit
def _conv_gemv_kernel(
    x_ptr, sxb, sxc, sxt, w_ptr, b_ptr, out_ptr, sob, soc, sot,
    R, N, K, T_OUT, STRIDE, DIL,
    ctx_ptr, sch, scb, scc, sct, phase_ptr, mask_ptr, first_ptr,  # CTX: [2, B, C_in, P], [1] int32, [B] bool x2
    C_in, T_in, P, N_TILES,  # CTX: x holds T_in new columns; programs >= N_TILES update the context
    KS: tl.constexpr, HAS_BIAS: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr,
    PDL: tl.constexpr, ELU: tl.constexpr = False, EXACT_ELU: tl.constexpr = False,
    CTX: tl.constexpr = False, FIRST: tl.constexpr = False, BR: tl.constexpr = 1, BP: tl.constexpr = 1,
):  # fmt: skip
    """Grid (N tiles (+ context tiles),): a valid conv1d (fp32) with few output columns as a GEMV: weight row n is
    ``w[n]`` ([C_in, KS] contiguous, K = C_in * KS values); output row i < R is column ``t = i % T_OUT`` of batch row
    ``i // T_OUT``, whose input patch ``x[b, c, t * STRIDE + j * DIL]`` is gathered in the weight row's (c, j) order
    (``ELU``: of ``elu(x)``; ``CTX``: of the input ``[ctx[phase] | x]``, the context's other half written by the
    programs past N_TILES). The weight tile stays in registers while the columns go by, BB at a time."""
    if CTX:
        if tl.program_id(0) >= N_TILES:
            launch_and_wait(PDL)  # x and the phase come from earlier kernels
            rows = (tl.program_id(0) - N_TILES) * BR + tl.arange(0, BR)
            _ctx_update(x_ptr, sxb, sxc, sxt, ctx_ptr, sch, scb, scc, sct, first_ptr, mask_ptr,
                        tl.load(phase_ptr).to(tl.int64), rows, (R // T_OUT) * C_in, C_in, T_in, P, FIRST,
                        BP)  # fmt: skip
        else:
            _conv_gemv_rows(x_ptr, sxb, sxc, sxt, w_ptr, b_ptr, out_ptr, sob, soc, sot, R, N, K, T_OUT, STRIDE, DIL,
                            ctx_ptr, sch, scb, scc, sct, phase_ptr, first_ptr, P, KS, HAS_BIAS, BB, BN, KP, PDL, ELU,
                            EXACT_ELU, True, FIRST)  # fmt: skip
    else:
        _conv_gemv_rows(x_ptr, sxb, sxc, sxt, w_ptr, b_ptr, out_ptr, sob, soc, sot, R, N, K, T_OUT, STRIDE, DIL,
                        ctx_ptr, sch, scb, scc, sct, phase_ptr, first_ptr, P, KS, HAS_BIAS, BB, BN, KP, PDL, ELU,
                        EXACT_ELU, False, False)  # fmt: skip


@triton.jit
def _conv_gemv_rows(
    x_ptr, sxb, sxc, sxt, w_ptr, b_ptr, out_ptr, sob, soc, sot, R, N, K, T_OUT, STRIDE, DIL,
    ctx_ptr, sch, scb, scc, sct, phase_ptr, first_ptr, P,
    KS: tl.constexpr, HAS_BIAS: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, KP: tl.constexpr,
    PDL: tl.constexpr, ELU: tl.constexpr, EXACT_ELU: tl.constexpr, CTX: tl.constexpr, FIRST: tl.constexpr,
):  # fmt: skip
    """The output rows of one weight tile of :func:`_conv_gemv_kernel`."""
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    nmask = n < N
    k = tl.arange(0, KP)
    kmask = k < K
    w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
    bias = tl.load(b_ptr + n, mask=nmask & HAS_BIAS, other=0.0)
    launch_and_wait(PDL)  # the weights are in flight
    tap = (k // KS) * sxc + (k % KS) * DIL * sxt
    if CTX:
        cur = tl.load(phase_ptr).to(tl.int64)
    for r0 in range(0, R, BB):
        for j in tl.static_range(BB):
            i = r0 + j
            live = i < R
            b, t = i // T_OUT, i % T_OUT
            if CTX:
                x = _ctx_gather(x_ptr, sxb, sxc, sxt, ctx_ptr, sch, scb, scc, sct, first_ptr, cur, P, b.to(tl.int64),
                                k // KS, t * STRIDE + (k % KS) * DIL, kmask & live, FIRST)  # fmt: skip
            else:
                x = tl.load(x_ptr + b.to(tl.int64) * sxb + t * STRIDE * sxt + tap, mask=kmask & live, other=0.0)
            if ELU:  # elu(0) = 0: the masked elements stay out of the sum
                x = _elu(x, EXACT_ELU)
            y = tl.sum(w * x[None, :], axis=1) + bias
            tl.store(out_ptr + b.to(tl.int64) * sob + n * soc + t * sot, y, mask=nmask & live)


def gemv_plan(N: int, K: int, *, gate: bool = False, sms: int, interp: bool, divides: int | None = None):
    """(BN, KP, num_warps) of a GEMV launch: whole rows of K per program; ~1 program per SM on a GPU (fewer,
    larger programs in the interpreter, whose cost grows with their number); ``divides``: BN must divide it."""
    kp = triton.next_power_of_2(K)
    cap = max(1, (64 * _TILE_ELEMS if interp else _TILE_ELEMS) // (kp * (2 if gate else 1)))
    want = triton.next_power_of_2(N) if interp else max(1, triton.next_power_of_2(N // max(1, (3 * sms) // 4)) // 2)
    bn = max(1, min(cap, want, triton.next_power_of_2(N)))
    if divides is not None:
        while divides % bn:
            bn //= 2
    elems = bn * kp * (2 if gate else 1)
    return bn, kp, 4 if elems <= 8192 else 8


def launch_gemv(x, w, out, *, sms: int, interp: bool, dt, alpha=None, beta=None, epi: int = 0, scale=None,
                eps: float = 0.0, n_out: int | None = None, pdl: bool = False) -> None:
    """``out[:B] (epi)= x[:B] @ w.T`` by :func:`_gemv_kernel` (``w`` [N(, +N values), K]; ``n_out``: N when the
    gate/value pair doubles w's rows; ``alpha``: RMSNorm prologue, LayerNorm with ``beta``; ``pdl``: launch as a
    programmatic dependent of the previous kernel)."""
    B, K = x.shape
    N = n_out or w.shape[0]
    bn, kp, warps = gemv_plan(N, K, gate=epi == 2, sms=sms, interp=interp)
    _gemv_kernel[(triton.cdiv(N, bn),)](
        x, alpha if alpha is not None else x, beta if beta is not None else x, w, out,
        scale if scale is not None else x, B, N, K, x.stride(0), out.stride(0), eps,
        NORM=0 if alpha is None else (2 if beta is not None else 1), EPI=epi, HAS_SCALE=scale is not None, DT=dt,
        BB=triton.next_power_of_2(B), BN=bn, KP=kp, PDL=pdl, num_warps=warps, launch_pdl=pdl,
    )  # fmt: skip


def gemv_triton(x, weight, *, alpha=None, beta=None, eps=0.0, residual=None, scale=None, gate=False, out=None,
                gelu=False):  # fmt: skip
    """Triton twin of :func:`~dsm_kernels.reference.gemv_ref` for ``B <= GEMV_MAX_B`` rows (the row loop is
    unrolled), chained by programmatic dependent launch on sm_90+."""
    B, K = x.shape
    if B > GEMV_MAX_B:
        raise ValueError(f"gemv: {B} rows; the GEMV kernel takes at most {GEMV_MAX_B} (use F.linear above)")
    if weight.shape[1] != K or x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError(f"gemv: x {tuple(x.shape)} (row-contiguous) against weight {tuple(weight.shape)} (contiguous)")
    if beta is not None and alpha is None:
        raise ValueError("gemv: a LayerNorm bias (beta) needs its weight (alpha)")
    if gelu and (gate or residual is not None):
        raise ValueError("gemv: the GELU epilogue goes without the gate and the residual")
    N = weight.shape[0] // 2 if gate else weight.shape[0]
    if residual is not None:
        if gate or residual.shape != (B, N) or residual.stride(1) != 1 or residual.dtype != x.dtype:
            raise ValueError(f"gemv: residual {tuple(residual.shape)} {residual.dtype} must be [{B}, {N}] {x.dtype}, "
                             "row-contiguous, without gate")  # fmt: skip
        if out is not None:
            raise ValueError("gemv: the residual is the output; no out= with it")
        out, epi = residual, 1
    else:
        if out is None:
            out = torch.empty(B, N, dtype=x.dtype, device=x.device)
        elif out.shape != (B, N) or out.stride(1) != 1 or out.dtype != x.dtype:
            raise ValueError(f"gemv: out {tuple(out.shape)} {out.dtype} must be [{B}, {N}] {x.dtype}, row-contiguous")
        epi = 2 if gate else (3 if gelu else 0)
    alpha, beta, scale = unit_stride(alpha, beta, scale)
    launch_gemv(x, weight, out, sms=_sms(x.device), interp=triton_interpret(), dt=_TL_DTYPES[x.dtype], alpha=alpha,
                beta=beta, epi=epi, scale=scale, eps=eps, n_out=N, pdl=use_pdl(x.device))  # fmt: skip
    return out


def qkv_rope_gemv_triton(x, weight, alpha, eps, positions, inv_freq, k_cache, v_cache, slot_mapping, num_heads,
                         num_kv_heads, out=None, beta=None):  # fmt: skip
    """Triton twin of :func:`~dsm_kernels.reference.qkv_rope_gemv_ref` for ``B <= GEMV_MAX_B`` rows."""
    B, K = x.shape
    D = 2 * inv_freq.shape[0]
    rows = (num_heads + 2 * num_kv_heads) * D
    if B > GEMV_MAX_B:
        raise ValueError(f"qkv_rope_gemv: {B} rows; the GEMV kernel takes at most {GEMV_MAX_B}")
    if weight.shape != (rows, K) or not weight.is_contiguous() or x.stride(1) != 1:
        raise ValueError(f"qkv_rope_gemv: weight {tuple(weight.shape)} must be contiguous [{rows}, {K}] against x "
                         f"{tuple(x.shape)} (row-contiguous)")  # fmt: skip
    if k_cache.shape[2:] != (num_kv_heads, D) or v_cache.shape != k_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"qkv_rope_gemv: caches {tuple(k_cache.shape)} must be [pages, page, {num_kv_heads}, {D}]")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("qkv_rope_gemv: the caches' head_dim must be contiguous")
    if beta is not None and beta.numel() != K:
        raise ValueError(f"qkv_rope_gemv: LayerNorm bias of {beta.numel()} values against {K} input features")
    q = torch.empty(B, num_heads, D, dtype=x.dtype, device=x.device) if out is None else out
    if q.shape != (B, num_heads, D) or not q.is_contiguous():
        raise ValueError(f"qkv_rope_gemv: out {tuple(q.shape)} with strides {q.stride()} must be a contiguous "
                         f"[{B}, {num_heads}, {D}]")  # fmt: skip
    bn, kp, warps = gemv_plan(rows, K, sms=_sms(x.device), interp=triton_interpret())
    bn = max(bn, 2)  # whole pairs (rows is even)
    pdl = use_pdl(x.device)
    alpha, beta, positions, inv_freq, slot_mapping = unit_stride(alpha.reshape(-1), beta, positions, inv_freq,
                                                                 slot_mapping)  # fmt: skip
    _qkv_rope_gemv_kernel[(triton.cdiv(rows, bn),)](
        x, alpha, alpha if beta is None else beta.reshape(-1), weight, positions, inv_freq, slot_mapping, q, k_cache,
        v_cache, B, K, x.stride(0), float(eps), num_heads, num_kv_heads, rows, k_cache.shape[1],
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), NORM=1 if beta is None else 2, DT=_TL_DTYPES[x.dtype], BB=triton.next_power_of_2(B),
        BH=bn // 2, KP=kp, D=D, SAT=cache_saturation(k_cache.dtype), PDL=pdl, num_warps=warps, launch_pdl=pdl,
    )  # fmt: skip
    return q


def conv1d_gemv_triton(x, weight, bias=None, stride=1, dilation=1, out=None, elu=False, ctx=None, phase=None,
                       exec_mask=None, first=None):  # fmt: skip
    """Triton twin of :func:`~dsm_kernels.reference.conv1d_gemv_ref` for at most ``CONV_GEMV_MAX_COLUMNS`` output
    columns in all (batch rows x output steps): each weight row is read once, at bandwidth, where a conv library's
    tiles would leave most of the GPU idle on a [C_out, C_in * K] x [C_in * K, 2 .. 64] product. ``elu``: the conv
    of ``elu(x)``, applied as x loads (on a GPU torch's bits, see :func:`~dsm_kernels.triton_common._elu`). With
    ``ctx``, the stored context is read in place and its other half written by extra programs of the launch."""
    B, C, T = x.shape
    N, C_w, KS = weight.shape
    P = 0 if ctx is None else ctx.shape[-1]
    T_out = (P + T - dilation * (KS - 1) - 1) // stride + 1
    if C_w != C or T_out < 1 or not weight.is_contiguous() or torch.float32 != x.dtype or torch.float32 != weight.dtype:
        raise ValueError(f"conv1d_gemv: x {tuple(x.shape)} {x.dtype} against weight {tuple(weight.shape)} "
                         f"{weight.dtype} (fp32, contiguous, no groups)")  # fmt: skip
    if B * T_out > CONV_GEMV_MAX_COLUMNS:
        raise ValueError(f"conv1d_gemv: {B * T_out} output columns; the kernel takes at most {CONV_GEMV_MAX_COLUMNS}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"conv1d_gemv: bias {tuple(bias.shape)} against {N} output channels")
    if out is None:
        out = torch.empty(B, N, T_out, dtype=x.dtype, device=x.device)
    if out.shape != (B, N, T_out):
        raise ValueError(f"conv1d_gemv: out has shape {tuple(out.shape)}, expected {(B, N, T_out)}")
    if out.numel() == 0:
        return out
    bias, phase, exec_mask, first = unit_stride(bias, phase, exec_mask, first)
    bn, kp, warps = gemv_plan(N, C * KS, sms=_sms(x.device), interp=triton_interpret())
    n_tiles = triton.cdiv(N, bn)
    br, bp, state_tiles = ctx_plan(ctx)
    pdl = use_pdl(x.device)
    _conv_gemv_kernel[(n_tiles + state_tiles,)](
        x, x.stride(0), x.stride(1), x.stride(2), weight, bias if bias is not None else weight, out,
        out.stride(0), out.stride(1), out.stride(2), B * T_out, N, C * KS, T_out, stride, dilation,
        *ctx_args(ctx, phase, exec_mask, first, fallback=x), C, T, P, n_tiles,
        KS=KS, HAS_BIAS=bias is not None, BB=min(GEMV_MAX_B, triton.next_power_of_2(B * T_out)), BN=bn, KP=kp, PDL=pdl,
        ELU=elu, EXACT_ELU=elu and exact_elu(), CTX=ctx is not None, FIRST=first is not None, BR=br, BP=bp,
        num_warps=warps, launch_pdl=pdl,
    )  # fmt: skip
    return out


def launch_head_sample(x, alpha, w, logits, cnt, temperature, seeds, steps, tokens, *, top_k: int, eps: float,
                       sms: int, interp: bool, dt, pdl: bool = False, step_scale: int = 1,
                       step_offset: int = 0) -> None:  # fmt: skip
    """``logits[:B] = RMSNorm(x) * alpha @ w.T`` (``x @ w.T`` without ``alpha``) and ``tokens[:B]`` sampled from
    them (as :func:`~dsm_kernels.sampling.sample_tokens_triton`, noise counters ``steps * step_scale +
    step_offset``) by :func:`_head_sample_kernel`, one launch.
    ``cnt``: an int32 counter at 0 (the launch re-arms it); ``logits`` [B, N] contiguous."""
    B, K = x.shape
    N = w.shape[0]
    assert x.is_contiguous() and logits.is_contiguous() and logits.shape == (B, N) and B <= GEMV_MAX_B
    bn, kp, warps = gemv_plan(N, K, sms=sms, interp=interp)
    block_v = triton.next_power_of_2(N)
    nprog = triton.cdiv(N, bn)
    _head_sample_kernel[(nprog,)](
        x, x if alpha is None else alpha, w, logits, cnt, temperature, seeds, steps, tokens, B, N, K, eps,
        int(top_k), int(step_scale), int(step_offset),
        NORM=0 if alpha is None else 1, DT=dt, BB=triton.next_power_of_2(B), BN=bn, KP=kp, NPROG=nprog,
        BLOCK_V=block_v, PDL=pdl, num_warps=max(warps, _sampler_warps(block_v)), launch_pdl=pdl,
    )  # fmt: skip
