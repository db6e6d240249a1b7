"""Triton depth transformer: one frame's ``dep_q`` codebook steps (semantics: ``reference.depformer_frame_ref``).

The step is weight-streaming bound (92.6 MB of weights per codebook at the TTS shapes, M = batch <= 64), so every
GEMM is a skinny split-K GEMM spread over ~2 programs per SM so that batch 1 still fills the GPU, and everything
that is not a GEMM rides in a GEMM's prologue or epilogue:

* frame start (1 launch): the ``n_in`` distinct ``depformer_in`` projections of ``z`` in one GEMM (each set read
  once per frame instead of once per codebook: 46 MB instead of 134 MB at the TTS shapes, DSM-SPEC §10.3);
* per layer (4 launches):
  1. RMSNorm prologue + QKV GEMM, split over (head, K). The last program to finish a head (a counter per tile)
     sums the split-K partials in a fixed order (deterministic, graph-replay stable), appends K/V to the frame's
     cache and runs that head's attention over steps 0..k. Layer 0 also builds its input ``proj[k] + Emb_k(prev)``
     in the prologue (the token gather of the previous step's sample). Above ``ATTN_INLINE_ROWS`` rows the
     attention is a launch of its own over every (head, row): in the last program it runs row after row;
  2. out-projection GEMM + LayerScale + residual add (in place);
  3. RMSNorm prologue + ``linear_in`` GEMM + SiLU gate (gate and value rows in one program);
  4. ``linear_out`` GEMM + LayerScale + residual add;
* per codebook (2 launches): (optional RMSNorm) + head GEMM -> logits; the sampler of ``dsm_kernels.sampling``.

Each residual epilogue (2., 4.) also leaves the new rows' sums of squares per column tile, so that the next RMSNorm
prologue (1. past layer 0, 3., the head) is one small load instead of a loop over the row: a chain of dependent L2
round trips before the weights stream, in 8 of the 9 normed launches of a codebook.

Launches per codebook: ``4 * num_layers + 2`` (18 at the TTS shapes), 577 per 32-codebook frame, plus 3 tiny
setup ops; above ``ATTN_INLINE_ROWS`` rows ``5 * num_layers + 2`` (22, 705 a frame). Up to
``gemv_kernels.GEMV_MAX_B`` rows the same launches run GEMV kernels instead (whole weight rows per program, no
split-K partials: at batch 1 these GEMMs are latency-bound, see that module), chained by programmatic dependent
launch on sm_90+ so that each streams its weights while its predecessor runs. Everything has
static shapes and no host sync, so a frame is capturable in one CUDA graph.

Numerics follow the reference's rounding points: every GEMM accumulates in fp32 and its output is rounded to the
model dtype where torch's ``F.linear`` would round it; residual adds, LayerScale and the gate product are rounded
like the corresponding bf16 torch ops. Only the accumulation order and attention's internal precision differ.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import gemv_max_rows, triton_interpret
from .gemv_kernels import _qkv_gemv_kernel, gemv_plan, launch_gemv, launch_head_sample
from .pdl import use_pdl
from .reference import DepformerWeights
from .sampling import sample_tokens_triton
from .triton_common import _TL_DTYPES, _arrive, _input_tile, _rnd, _sms


@triton.jit
def _dot(a, w, acc, DT: tl.constexpr, DOT_F32: tl.constexpr):
    """acc += a @ w. fp32 operands (interpreter, fp32 models) use exact IEEE products, not TF32."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(DT), w.to(DT), acc)


@triton.jit
def _inv_rms(x_ptr, proj_ptr, t1_ptr, t2_ptr, tok_ptr, rows, rmask, B, DIM, LDP, vt, eps, INPUT: tl.constexpr,
             DEMUX: tl.constexpr, DT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """rsqrt(eps + mean(x^2)) of each row (fp32), over the whole row (every program of a launch recomputes it:
    B x dim reads, cheap next to the weight tile)."""
    ss = tl.zeros([BM], dtype=tl.float32)
    for k0 in range(0, DIM, BK):
        cols = k0 + tl.arange(0, BK)
        x = _input_tile(x_ptr, proj_ptr, t1_ptr, t2_ptr, tok_ptr, rows, rmask, cols, cols < DIM, B, DIM, LDP, vt,
                        INPUT, DEMUX, DT)  # fmt: skip
        ss += tl.sum(x * x, axis=1)
    return 1.0 / tl.sqrt(eps + ss / DIM)


@triton.jit
def _inv_rms_from_tiles(ssq_ptr, rows, rmask, B, DIM, eps, SS_T: tl.constexpr):
    """rsqrt(eps + mean(x^2)) of each row from the sums of squares that the residual epilogue that wrote ``x`` left
    per column tile ([SS_T, B], summed in tile order): one load instead of a loop over the row."""
    t = tl.arange(0, SS_T)
    ss = tl.load(ssq_ptr + t[None, :] * B + rows[:, None], mask=rmask[:, None], other=0.0)
    return 1.0 / tl.sqrt(eps + tl.sum(ss, axis=1) / DIM)


@triton.jit
def _partials_sum(ws_ptr, rows, cols, m, B, LDW, SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Sum of the SPLIT partial tiles in split order (deterministic); .cg loads read L2, not a stale L1."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for s in range(SPLIT):
        ptr = ws_ptr + (s * B + rows[:, None]).to(tl.int64) * LDW + cols[None, :]
        acc += tl.load(ptr, mask=m, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def _store_partial(ws_ptr, acc, rows, cols, m, B, LDW):
    s = tl.program_id(1)
    tl.store(ws_ptr + (s * B + rows[:, None]).to(tl.int64) * LDW + cols[None, :], acc, mask=m)


@triton.jit
def _qkv_attn_kernel(
    x_ptr, proj_ptr, t1_ptr, t2_ptr, tok_ptr, alpha_ptr, w_ptr, ws_ptr, cnt_ptr, ssq_ptr,
    q_ptr, kc_ptr, vc_ptr, a_ptr,
    B, DIM, LDP, HEAD_D, pos, vt, eps, scale,
    INPUT: tl.constexpr, DEMUX: tl.constexpr, DT: tl.constexpr, DOT_F32: tl.constexpr, SPLIT: tl.constexpr,
    K_PER_SPLIT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr,
    ATTN: tl.constexpr, SS_T: tl.constexpr,
):  # fmt: skip
    """Grid (heads, SPLIT, row blocks). Caches are [B, BP, DIM] (step-major); q/a scratch [B, DIM]. ``ATTN``: the
    last program of a head also runs its attention, one row after another (else :func:`_dep_attn_kernel` does)."""
    h, s, pm = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pm * BM + tl.arange(0, BM)
    rmask = rows < B
    d = tl.arange(0, BD)
    dmask = d < HEAD_D
    if SS_T > 0:  # the residual stream's sums of squares, left by the launch that wrote it
        inv = _inv_rms_from_tiles(ssq_ptr, rows, rmask, B, DIM, eps, SS_T)
    else:
        inv = _inv_rms(x_ptr, proj_ptr, t1_ptr, t2_ptr, tok_ptr, rows, rmask, B, DIM, LDP, vt, eps, INPUT, DEMUX,
                       DT, BM, BK)  # fmt: skip
    if INPUT:  # one program per row block materialises the residual stream for the later launches
        if (h == 0) & (s == 0):
            for k0 in range(0, DIM, BK):
                cols = k0 + tl.arange(0, BK)
                cm = cols < DIM
                x = _input_tile(x_ptr, proj_ptr, t1_ptr, t2_ptr, tok_ptr, rows, rmask, cols, cm, B, DIM, LDP, vt,
                                INPUT, DEMUX, DT)  # fmt: skip
                tl.store(x_ptr + rows[:, None] * DIM + cols[None, :], x.to(DT), mask=rmask[:, None] & cm[None, :])
    acc_q = tl.zeros([BM, BD], dtype=tl.float32)
    acc_k = tl.zeros([BM, BD], dtype=tl.float32)
    acc_v = tl.zeros([BM, BD], dtype=tl.float32)
    wrow = h * HEAD_D + d
    for k0 in range(s * K_PER_SPLIT, s * K_PER_SPLIT + K_PER_SPLIT, BK):
        cols = k0 + tl.arange(0, BK)
        cm = cols < DIM
        x = _input_tile(x_ptr, proj_ptr, t1_ptr, t2_ptr, tok_ptr, rows, rmask, cols, cm, B, DIM, LDP, vt,
                        INPUT, DEMUX, DT)  # fmt: skip
        alpha = tl.load(alpha_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        a = _rnd(x * (alpha[None, :] * inv[:, None]), DT)  # Norm's product order; its output is model dtype
        wm = cm[:, None] & dmask[None, :]
        wp = w_ptr + wrow[None, :].to(tl.int64) * DIM + cols[:, None]  # [BK, BD] = W^T tile
        acc_q = _dot(a, tl.load(wp, mask=wm, other=0.0), acc_q, DT, DOT_F32)
        acc_k = _dot(a, tl.load(wp + DIM * DIM, mask=wm, other=0.0), acc_k, DT, DOT_F32)
        acc_v = _dot(a, tl.load(wp + 2 * DIM * DIM, mask=wm, other=0.0), acc_v, DT, DOT_F32)
    m = rmask[:, None] & dmask[None, :]
    LDW = 3 * DIM
    _store_partial(ws_ptr, acc_q, rows, wrow, m, B, LDW)
    _store_partial(ws_ptr, acc_k, rows, DIM + wrow, m, B, LDW)
    _store_partial(ws_ptr, acc_v, rows, 2 * DIM + wrow, m, B, LDW)
    if _arrive(cnt_ptr, pm * tl.num_programs(0) + h, SPLIT):
        q = _partials_sum(ws_ptr, rows, wrow, m, B, LDW, SPLIT, BM, BD)
        k = _partials_sum(ws_ptr, rows, DIM + wrow, m, B, LDW, SPLIT, BM, BD)
        v = _partials_sum(ws_ptr, rows, 2 * DIM + wrow, m, B, LDW, SPLIT, BM, BD)
        tl.store(q_ptr + rows[:, None] * DIM + wrow[None, :], _rnd(q, DT).to(DT), mask=m)
        cache_off = (rows[:, None] * BP + pos).to(tl.int64) * DIM + wrow[None, :]
        tl.store(kc_ptr + cache_off, _rnd(k, DT).to(DT), mask=m)
        tl.store(vc_ptr + cache_off, _rnd(v, DT).to(DT), mask=m)
        if ATTN:
            tl.debug_barrier()  # this block's q/K/V stores are visible to its own threads below
            for i in range(BM):  # row by row: a [BP, BD] tile per row keeps the registers small
                b = pm * BM + i
                if b < B:
                    _attend_row(q_ptr, kc_ptr, vc_ptr, a_ptr, b, h, DIM, HEAD_D, pos, scale, DT, BD, BP)


@triton.jit
def _attend_row(q_ptr, kc_ptr, vc_ptr, a_ptr, b, h, DIM, HEAD_D, pos, scale, DT: tl.constexpr, BD: tl.constexpr,
                BP: tl.constexpr):  # fmt: skip
    """Head ``h`` of row ``b``: softmax(q K^T * scale) V over this frame's steps 0..pos, in fp32."""
    d = tl.arange(0, BD)
    dmask = d < HEAD_D
    wrow = h * HEAD_D + d
    p = tl.arange(0, BP)
    pmask = p <= pos
    qr = tl.load(q_ptr + b * DIM + wrow, mask=dmask, other=0.0).to(tl.float32)
    off = (b * BP + p[:, None]).to(tl.int64) * DIM + wrow[None, :]
    km = pmask[:, None] & dmask[None, :]
    kr = tl.load(kc_ptr + off, mask=km, other=0.0).to(tl.float32)
    vr = tl.load(vc_ptr + off, mask=km, other=0.0).to(tl.float32)
    sc = tl.where(pmask, tl.sum(kr * qr[None, :], axis=1) * scale, float("-inf"))
    e = tl.exp(sc - tl.max(sc, axis=0))
    o = tl.sum(vr * (e / tl.sum(e, axis=0))[:, None], axis=0)
    tl.store(a_ptr + b * DIM + wrow, _rnd(o, DT).to(DT), mask=dmask)


@triton.jit
def _dep_attn_kernel(q_ptr, kc_ptr, vc_ptr, a_ptr, DIM, HEAD_D, pos, scale, DT: tl.constexpr, BD: tl.constexpr,
                     BP: tl.constexpr):  # fmt: skip
    """Grid (heads, B): the attention of the split-K path above a few rows, every (head, row) in parallel. In the
    QKV kernel's last program it would run B rows one after another, each a dependent L2 round trip: ~1 us a row,
    tens of microseconds a launch at batch 64, 128 launches a frame."""
    _attend_row(q_ptr, kc_ptr, vc_ptr, a_ptr, tl.program_id(1), tl.program_id(0), DIM, HEAD_D, pos, scale, DT, BD,
                BP)


@triton.jit
def _linear_kernel(
    x_ptr, alpha_ptr, w_ptr, ws_ptr, cnt_ptr, out_ptr, scale_ptr, ssq_ptr,
    B, N, K, LDO, eps,
    NORM: tl.constexpr, EPI: tl.constexpr, HAS_SCALE: tl.constexpr, DT: tl.constexpr, DOT_F32: tl.constexpr,
    SPLIT: tl.constexpr, K_PER_SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    SS_T: tl.constexpr,
):  # fmt: skip
    """Grid (N tiles, SPLIT, row blocks); ``x`` [B, K], ``w`` [N(, +N gate values), K]. Epilogues:
    0: out = y (model dtype); 1: out += scale * y (residual, in place), and the new rows' sums of squares per column
    tile into ``ssq`` [N tiles, B] for the next RMSNorm; 2: out = silu(y_gate) * y_value. ``SS_T`` > 0: the RMSNorm
    prologue reads ``x``'s sums of squares from ``ssq`` ([SS_T, B]) instead of a loop over the row."""
    pn, s, pm = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pm * BM + tl.arange(0, BM)
    rmask = rows < B
    n = pn * BN + tl.arange(0, BN)
    nmask = n < N
    if NORM:
        if SS_T > 0:
            inv = _inv_rms_from_tiles(ssq_ptr, rows, rmask, B, K, eps, SS_T)
        else:
            inv = _inv_rms(x_ptr, x_ptr, x_ptr, x_ptr, x_ptr, rows, rmask, B, K, K, 1, eps, False, False, DT, BM, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc2 = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(s * K_PER_SPLIT, s * K_PER_SPLIT + K_PER_SPLIT, BK):
        cols = k0 + tl.arange(0, BK)
        cm = cols < K
        a = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
        if NORM:
            alpha = tl.load(alpha_ptr + cols, mask=cm, other=0.0).to(tl.float32)
            a = _rnd(a.to(tl.float32) * (alpha[None, :] * inv[:, None]), DT)
        wm = cm[:, None] & nmask[None, :]
        wp = w_ptr + n[None, :].to(tl.int64) * K + cols[:, None]
        acc = _dot(a, tl.load(wp, mask=wm, other=0.0), acc, DT, DOT_F32)
        if EPI == 2:
            acc2 = _dot(a, tl.load(wp + N * K, mask=wm, other=0.0), acc2, DT, DOT_F32)
    m = rmask[:, None] & nmask[None, :]
    LDW = 2 * N if EPI == 2 else N
    _store_partial(ws_ptr, acc, rows, n, m, B, LDW)
    if EPI == 2:
        _store_partial(ws_ptr, acc2, rows, N + n, m, B, LDW)
    if _arrive(cnt_ptr, pm * tl.num_programs(0) + pn, SPLIT):
        y = _rnd(_partials_sum(ws_ptr, rows, n, m, B, LDW, SPLIT, BM, BN), DT)
        optr = out_ptr + rows[:, None] * LDO + n[None, :]
        if EPI == 1:
            if HAS_SCALE:
                y = _rnd(tl.load(scale_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :] * y, DT)
            y = _rnd(tl.load(optr, mask=m, other=0.0).to(tl.float32) + y, DT)  # the stored value
            tl.store(ssq_ptr + pn * B + rows, tl.sum(tl.where(m, y * y, 0.0), axis=1), mask=rmask)
        if EPI == 2:
            u = _rnd(_partials_sum(ws_ptr, rows, N + n, m, B, LDW, SPLIT, BM, BN), DT)
            y = _rnd(y / (1.0 + tl.exp(-y)), DT) * u  # F.silu, rounded, times the value half
        tl.store(optr, _rnd(y, DT).to(DT), mask=m)  # exact: the value is representable


# Up to this many rows the split-K QKV kernel's last program of a head runs the head's attention itself (rows one
# after another); above, a separate launch runs every (head, row) at once.
ATTN_INLINE_ROWS = 4

# Shared memory the pipelined GEMM tiles may use: an H100 block gets at most 227 KiB, and Triton adds its own
# scratch (reductions, layout conversions) on top of the operand stages.
SMEM_BUDGET = 160 * 1024


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _gemm_plan(n_tiles: int, m_blocks: int, K: int, bk: int, split: int | None, sms: int) -> tuple[int, int]:
    """(SPLIT, K per split): enough programs for ~2 per SM (batch 1 must still stream at full bandwidth); one
    program per tile in the interpreter, whose cost grows with the number of programs."""
    chunks = triton.cdiv(K, bk)
    if split is not None:
        split = min(split, chunks)
    elif triton_interpret():
        split = 1
    else:
        split = min(chunks, max(1, 2 * sms // (n_tiles * m_blocks)))
    per = triton.cdiv(chunks, split) * bk
    return triton.cdiv(K, per), per


def frame_plan(B: int, dd: int, H: int, dq: int, n_in: int, d_model: int, hid: int, card: int, elem: int,
               interp: bool, split: int | None, sms: int):
    """Block sizes of one frame: (BM, row blocks, BD, BP, plans), where plans maps each GEMM shape to
    (N, K, partial columns, tiles, BN, BK, SPLIT, K per split)."""
    bm = max(16, min(64, _pow2(B)))
    mb = triton.cdiv(B, bm)
    bk_max, bn_max = (256, 256) if interp else (128, 64)
    bd, bp = max(16, _pow2(dd // H)), _pow2(dq)
    plans = {}
    for name, N, K, cols in (("proj", n_in * dd, d_model, n_in * dd), ("out", dd, dd, dd),
                             ("in", hid, dd, 2 * hid), ("ffo", dd, hid, dd), ("head", card, dd, card),
                             ("qkv", dd, dd, 3 * dd)):  # fmt: skip
        bn = bd if name == "qkv" else min(bn_max, _pow2(N))
        bk = min(_pow2(K), bk_max)
        if not interp:  # pipelined tiles (3 stages) of x [bm, bk] and the weights [bk, bn] (q, k and v for qkv)
            while bk > 16 and 3 * bk * (bm + (3 if name == "qkv" else 1) * bn) * elem > SMEM_BUDGET:
                bk //= 2
        tiles = H if name == "qkv" else triton.cdiv(N, bn)
        s_, per = _gemm_plan(tiles, mb, K, bk, split, sms)
        plans[name] = (N, K, cols, tiles, bn, bk, s_, per)
    return bm, mb, bd, bp, plans


def depformer_frame_triton(
    w: DepformerWeights,
    z: torch.Tensor,
    text_token: torch.Tensor,
    temperature: torch.Tensor,
    top_k: int,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    *,
    return_logits: bool = False,
    step_scale: int = 1,
    step_offset: int = 0,
    counters: torch.Tensor | None = None,
    split: int | None = None,
    path: str | None = None,
    pdl: bool | None = None,
):
    """Triton twin of :func:`~dsm_kernels.reference.depformer_frame_ref`. ``split`` forces the split-K factor;
    ``path`` picks the kernels: ``"gemv"`` (:mod:`dsm_kernels.gemv_kernels`) or ``"splitk"`` (this module's),
    by default GEMV up to :func:`~dsm_kernels.gemv_max_rows` rows; ``pdl``: chain the GEMV kernels by programmatic
    dependent launch (default: on sm_90+, see :func:`~dsm_kernels.pdl.use_pdl`); ``counters``: the CUDA persistent
    kernel's barrier words, unused here (the split-K kernels re-arm tile counters of their own)."""
    del counters
    if path not in (None, "gemv", "splitk"):
        raise ValueError(f"path must be 'gemv' or 'splitk', got {path!r}")
    if w.activation != "silu" or not w.norm_f32:
        raise NotImplementedError("Triton depformer: silu gating and rms_norm_f32 only")
    dev, dt = z.device, w.in_proj.dtype
    B, dd, H, dq, card = z.shape[0], w.dim, w.num_heads, w.dep_q, w.card
    if B == 0:  # the kernels' grids and plans assume rows
        tokens = torch.empty(0, dq, dtype=torch.int64, device=dev)
        return (tokens, torch.empty(0, dq, card, dtype=dt, device=dev)) if return_logits else tokens
    D = dd // H
    n_in, d_model = w.in_proj.shape[0], w.in_proj.shape[2]
    L = len(w.layers)
    hid = w.layers[0].linear_out[0].shape[1]
    DT, interp, sms = _TL_DTYPES[dt], triton_interpret(), _sms(dev)
    dot_f32 = interp or dt == torch.float32
    use_gemv = B <= gemv_max_rows() if path is None else path == "gemv"
    pdl = use_gemv and not interp and (use_pdl(dev) if pdl is None else pdl)
    bm, mb, bd, bp, plans = frame_plan(B, dd, H, dq, n_in, d_model, hid, card, w.in_proj.element_size(), interp,
                                       split, sms)
    # split-K partials (reused by every launch, in stream order) and tile counters (each launch re-arms its own)
    ws = torch.empty(max(p[6] * B * p[2] for p in plans.values()), dtype=torch.float32, device=dev)
    cnt = torch.zeros(max(p[3] for p in plans.values()) * mb, dtype=torch.int32, device=dev)
    # the residual stream's sums of squares per column tile of the residual epilogues ("out", "ffo": N = dim), read
    # by the next RMSNorm; padded to a power of two with rows that stay zero
    ss_t = _pow2(plans["out"][3])
    assert plans["ffo"][3] == plans["out"][3]
    ssq = torch.zeros(ss_t, B, dtype=torch.float32, device=dev)

    z = z.to(dt).contiguous()
    proj = torch.empty(B, n_in * dd, dtype=dt, device=dev)
    x = torch.empty(B, dd, dtype=dt, device=dev)
    qb, ab = torch.empty_like(x), torch.empty_like(x)
    hb = torch.empty(B, hid, dtype=dt, device=dev)
    kc = torch.empty(L, B, bp, dd, dtype=dt, device=dev)  # this frame's K/V, step-major; rows > k are never read
    vc = torch.empty_like(kc)
    logits = torch.empty(dq if return_logits else 1, B, card, dtype=dt, device=dev)
    toks = torch.empty(dq, B, dtype=torch.int64, device=dev)
    steps = steps.long().contiguous()
    temperature, seeds = temperature.float().contiguous(), seeds.long().contiguous()

    def linear(name, xin, wt, out, *, alpha=None, epi=0, scale=None):
        N, K, _, tiles, bn, bk, s_, per = plans[name]
        if use_gemv:
            launch_gemv(xin, wt, out, sms=sms, interp=interp, dt=DT, alpha=alpha, epi=epi, scale=scale, eps=w.norm_eps,
                 n_out=N, pdl=pdl)
            return
        _linear_kernel[(tiles, s_, mb)](
            xin, alpha if alpha is not None else xin, wt, ws, cnt, out, scale if scale is not None else xin, ssq,
            B, N, K, out.stride(0), w.norm_eps,
            NORM=alpha is not None, EPI=epi, HAS_SCALE=scale is not None, DT=DT, DOT_F32=dot_f32,
            SPLIT=s_, K_PER_SPLIT=per, BM=bm, BN=bn, BK=bk, SS_T=ss_t if alpha is not None else 0, num_warps=4,
        )  # fmt: skip

    linear("proj", z, w.in_proj.reshape(n_in * dd, d_model), proj)  # every distinct depformer_in of z at once
    t2 = w.text_emb2 if w.text_emb2 is not None else w.text_emb
    _, _, _, _, _, bk_q, s_q, per_q = plans["qkv"]
    bn_q, kp_q, warps_q = gemv_plan(3 * dd, dd, sms=sms, interp=interp, divides=D)
    inline_attn = B <= ATTN_INLINE_ROWS
    for k in range(dq):
        j = w.schedule[k]
        prev = text_token.long().contiguous() if k == 0 else toks[k - 1]
        table = w.text_emb if k == 0 else w.emb[k - 1]
        for i, lw in enumerate(w.layers):
            inp = i == 0
            demux = inp and k == 0 and w.text_emb2 is not None
            if use_gemv:
                _qkv_gemv_kernel[(3 * dd // bn_q,)](
                    x, proj[:, w.in_index[k] * dd :], table, t2, prev, lw.norm1, lw.in_proj[j], cnt,
                    qb, kc[i], vc[i], ab,
                    B, dd, proj.stride(0), k, table.shape[0], w.norm_eps, D**-0.5,
                    INPUT=inp, DEMUX=demux, DT=DT, BB=triton.next_power_of_2(B), BN=bn_q, KP=kp_q, HEAD_D=D, BD=bd,
                    BP=bp, PDL=pdl, num_warps=warps_q, launch_pdl=pdl,
                )  # fmt: skip
            else:
                _qkv_attn_kernel[(H, s_q, mb)](
                    x, proj[:, w.in_index[k] * dd :], table, t2, prev, lw.norm1, lw.in_proj[j], ws, cnt, ssq,
                    qb, kc[i], vc[i], ab,
                    B, dd, proj.stride(0), D, k, table.shape[0], w.norm_eps, D**-0.5,
                    INPUT=inp, DEMUX=demux, DT=DT, DOT_F32=dot_f32, SPLIT=s_q, K_PER_SPLIT=per_q, BM=bm, BD=bd,
                    BK=bk_q, BP=bp, ATTN=inline_attn, SS_T=0 if inp else ss_t, num_warps=4,
                )  # fmt: skip
                if not inline_attn:
                    _dep_attn_kernel[(H, B)](qb, kc[i], vc[i], ab, dd, D, k, D**-0.5, DT=DT, BD=bd, BP=bp)
            linear("out", ab, lw.out_proj[j], x, epi=1, scale=lw.scale1)
            linear("in", x, lw.linear_in[j], hb, alpha=lw.norm2, epi=2)
            linear("ffo", hb, lw.linear_out[j], x, epi=1, scale=lw.scale2)
        lg = logits[k if return_logits else 0]
        if use_gemv:  # the head's last program samples: one launch
            launch_head_sample(x, w.head_norms[k], w.heads[k], lg, cnt, temperature, seeds, steps, toks[k],
                               top_k=top_k, eps=w.norm_eps, sms=sms, interp=interp, dt=DT, pdl=pdl,
                               step_scale=step_scale, step_offset=step_offset + k)  # fmt: skip
            continue
        linear("head", x, w.heads[k], lg, alpha=w.head_norms[k])
        sample_tokens_triton(lg, temperature, top_k, seeds, steps, step_scale=step_scale,
                             step_offset=step_offset + k, out=toks[k], pdl=pdl)  # fmt: skip
    tokens = toks.t().contiguous()
    return (tokens, logits.permute(1, 0, 2).contiguous()) if return_logits else tokens
