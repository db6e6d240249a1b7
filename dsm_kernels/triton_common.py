"""Device functions and host helpers shared by the Triton kernels: rounding to the model dtype as torch stores it,
torch's ELU, a streaming conv's input with its double-buffered stored context (gather and update), the depth
transformer's layer-input tile, the split-K arrival counter, the unit-stride copy of the launchers' inputs, the SM
count that sizes the grids."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import sm_count, triton_interpret

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _rnd(x, DT: tl.constexpr):
    """Round fp32 to the model dtype and back (where torch would store a model-dtype tensor). bf16 rounds to
    nearest-even by bit arithmetic: the interpreter's fp32->bf16 cast truncates, a bias that compounds over 4
    layers x 32 steps. Inputs are finite (NaN keeps a NaN payload)."""
    if DT == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    else:
        return x.to(DT).to(tl.float32)


@triton.jit
def _elu(x, EXACT: tl.constexpr):
    """ELU (alpha 1). ``EXACT`` (on a GPU): libdevice's ``expm1f``, the function torch's CUDA ELU calls, so the same
    bits (the encoder's codes depend on them); else (the interpreter, which has no libdevice) Kahan's accurate
    ``expm1`` = ``(u - 1) x / log u``, within an ulp or two."""
    if EXACT:
        em1 = libdevice.expm1(x)
    else:
        u = tl.exp(x)
        d = u - 1.0
        em1 = tl.where(d == 0.0, x, tl.where(d == -1.0, -1.0, d * x / tl.log(u)))
    return tl.where(x > 0.0, x, em1)


@triton.jit
def _ctx_gather(x_ptr, sxb, sxc, sxt, ctx_ptr, sch, scb, scc, sct, first_ptr, cur, P, b, c, src, m,
                FIRST: tl.constexpr):  # fmt: skip
    """Elements (b, c, src) (broadcast together; ``m`` their mask) of a streaming conv's input ``[ctx[cur] | x]``
    (:func:`~dsm_kernels.reference.conv_context_input`): column src < P from the stored context (``FIRST``: x's
    column 0 for rows whose first flag is set), the others from x. Masked elements are 0."""
    in_ctx = src < P
    # one load through a selected pointer (not two masked loads: a pipelined loop would stage both in shared memory)
    held = ctx_ptr + cur * sch + b * scb + c * scc + src * sct
    ptr = tl.where(in_ctx, held, x_ptr + b * sxb + c * sxc + (src - P) * sxt)
    if FIRST:
        f = tl.load(first_ptr + b + 0 * src, mask=m & in_ctx, other=0) != 0  # b broadcast to the block
        ptr = tl.where(in_ctx & f, x_ptr + b * sxb + c * sxc, ptr)
    return tl.load(ptr, mask=m, other=0.0)


@triton.jit
def _ctx_update(x_ptr, sxb, sxc, sxt, ctx_ptr, sch, scb, scc, sct, first_ptr, mask_ptr, cur, rows, R, C, T, P,
                FIRST: tl.constexpr, BP: tl.constexpr):  # fmt: skip
    """Half ``1 - cur`` of a streaming conv's stored context for the flat rows ``b * C + c`` in ``rows`` (< R): the
    last P columns of its input ``[ctx[cur] | x]`` (x [B, C, T]) where ``mask[b]``, half ``cur``'s elsewhere. Only
    half ``cur`` is read in a step: the conv's programs may still be reading it."""
    rm = rows < R
    b = (rows // C).to(tl.int64)[:, None]
    c = (rows % C)[:, None]
    j = tl.arange(0, BP)[None, :]
    m = rm[:, None] & (j < P)
    new = _ctx_gather(x_ptr, sxb, sxc, sxt, ctx_ptr, sch, scb, scc, sct, first_ptr, cur, P, b, c, T + j, m, FIRST)
    held = tl.load(ctx_ptr + cur * sch + b * scb + c * scc + j * sct, mask=m, other=0.0)
    active = tl.load(mask_ptr + b, mask=rm[:, None], other=0) != 0
    tl.store(ctx_ptr + (1 - cur) * sch + b * scb + c * scc + j * sct, tl.where(active, new, held), mask=m)


def ctx_args(ctx: torch.Tensor | None, phase, exec_mask, first, fallback: torch.Tensor) -> tuple:
    """The kernels' context arguments ``(ctx, sch, scb, scc, sct, phase, exec_mask, first)``: placeholders (any
    pointer, zero strides) without a context, so that one signature serves both."""
    if ctx is None:
        return (fallback, 0, 0, 0, 0, fallback, fallback, fallback)
    return (ctx, *ctx.stride(), phase, exec_mask, first if first is not None else exec_mask)


def ctx_plan(ctx: torch.Tensor | None) -> tuple[int, int, int]:
    """``(BR, BP, programs)`` of the context update (:func:`_ctx_update`) riding in a conv launch: BR context rows
    (b, c) of BP >= P columns a program, and the extra programs that take all of them (none without a context)."""
    bp = triton.next_power_of_2(ctx.shape[-1]) if ctx is not None else 1
    br = max(1, 1024 // bp)
    return br, bp, triton.cdiv(ctx.shape[1] * ctx.shape[2], br) if ctx is not None else 0


def exact_elu() -> bool:
    """The ``EXACT`` argument of :func:`_elu` for a launch: libdevice exists on a GPU, not in the interpreter."""
    return not triton_interpret()


@triton.jit
def _input_tile(x_ptr, proj_ptr, t1_ptr, t2_ptr, tok_ptr, rows, rmask, cols, cmask, B, DIM, LDP, vt,
                INPUT: tl.constexpr, DEMUX: tl.constexpr, DT: tl.constexpr):  # fmt: skip
    """[BM, BK] fp32 tile of the layer input: the residual stream, or (INPUT) ``proj + Emb(prev)`` built here."""
    m = rmask[:, None] & cmask[None, :]
    if INPUT:
        tok = tl.load(tok_ptr + rows, mask=rmask, other=-1)
        ids = tl.maximum(tok, 0)
        if DEMUX:  # text id packs two ids (DSM-SPEC §2.2)
            first = ids % vt
            second = ids // vt - 1
            e = tl.load(t1_ptr + first[:, None] * DIM + cols[None, :], mask=m, other=0.0).to(tl.float32)
            e2 = tl.load(t2_ptr + tl.maximum(second, 0)[:, None] * DIM + cols[None, :],
                         mask=m & (second >= 0)[:, None], other=0.0).to(tl.float32)  # fmt: skip
            e = _rnd(e + e2, DT)
        else:
            e = tl.load(t1_ptr + ids[:, None] * DIM + cols[None, :], mask=m, other=0.0).to(tl.float32)
        e = tl.where((tok >= 0)[:, None], e, 0.0)  # id -1 embeds to zeros
        p = tl.load(proj_ptr + rows[:, None] * LDP + cols[None, :], mask=m, other=0.0).to(tl.float32)
        return _rnd(p + e, DT)
    else:
        return tl.load(x_ptr + rows[:, None] * DIM + cols[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _arrive(cnt_ptr, tile, SPLIT: tl.constexpr):
    """Count this program's partial in; True for the last of the SPLIT programs of ``tile``, which re-arms the
    counter to 0 for the next launch. The barrier + acq_rel atomic publish the partial stores before the count."""
    tl.debug_barrier()
    prev = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
    last = prev == SPLIT - 1
    if last:
        tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")
    return last


def unit_stride(*ts: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``ts`` with a unit last stride (a copy where not, e.g. a strided or expanded [B] view; None stays None): the
    kernels read their [B]/[K]/[D] vectors and rows at unit stride, while the checks and the reference take any
    layout. A no-op, and no launch, for the tensors the model passes."""
    return tuple(t if t is None or t.stride(-1) == 1 else t.contiguous() for t in ts)


def _sms(device: torch.device) -> int:
    return sm_count(device) if device.type == "cuda" else 64
