"""Triton sampler: CFG mix, per-slot temperature, top-k and an exp-race draw with counter-based noise, one pass.

Semantics: :func:`dsm_kernels.reference.sample_tokens_ref`. A program owns ``ROWS`` whole rows held in registers
(one row on a GPU; many rows in the interpreter, where cost scales with the number of programs). No sort:

* top-k keeps the tokens whose logit is ``>=`` the k-th largest logit, found exactly with a fixed trip count. At
  batch 1 the kernel is latency-bound and a block-wide reduction (shuffles, shared memory, barriers) costs ~0.3 µs,
  so the search is built to need few: a radix-``R`` search over the order-preserving int32 image ("key") of the
  logits, each pass testing ``R`` thresholds in ONE reduction and shrinking the range ``R``-fold: 8 passes cover the
  2^32 keys at R=16 (bisection took 33). bf16 logits without CFG are bf16 values in fp32, whose low 16 bits are
  zero, so their keys shifted right by 16 are exact and order-preserving and 4 passes cover the 2^16 range (fp16: 13
  zero bits, 5 passes). R=16 up to 4096 columns, 8 above (11 / 6 / 7 passes), to bound the compares per thread.
  Exact ties at the threshold keep every tied token (``torch.topk`` would keep an arbitrary subset of them).
* the softmax max is ``max(x) / t``, equal to ``max(x / t)`` bit for bit (correctly rounded division by ``t > 0`` is
  monotone), and comes with the greedy argmax's reduction. A sampled call makes ``passes + 3`` block-wide reductions:
  7 for bf16 without CFG and 11 for fp32 up to 4096 columns, 9 and 14 above (39 with the bisection).
* the draw is ``argmax(p / -log(u))`` over kept tokens with ``u`` the reference's hash of (seed, step, row, token),
  so every backend and every CUDA-graph replay draws the same token. ``temperature <= 0`` gives the argmax.

Floating-point operations follow the reference's order (a true division by ``t``; no FMA contraction), so tokens
agree with the reference except on near-exact ties of two scores (last-bit differences of exp/log). NaN logits are
not supported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_interpret
from .pdl import launch_and_wait, use_pdl
from .triton_common import unit_stride

_MAX_SEARCH_ELEMS = 128  # [R, BLOCK_V] compare elements per thread the launch allows (registers)


@triton.constexpr_function
def _key_shift(dtype, has_null) -> int:
    """Low bits of the fp32 image that are zero for every value of ``dtype`` (and so dropped from the keys): 16 for
    bf16, 13 for fp16 (subnormals included: at most 11 significant bits), 0 for fp32 or after the CFG mix."""
    if has_null:
        return 0
    if dtype == tl.bfloat16:
        return 16
    if dtype == tl.float16:
        return 13
    return 0


@triton.constexpr_function
def _radix(block_v) -> int:
    """Thresholds tested per pass: 16 up to 4096 columns, 8 above, fewer where even 32 warps would hold more than
    ``_MAX_SEARCH_ELEMS`` compares per thread."""
    r = 16 if block_v <= 4096 else 8
    while r > 2 and r * block_v > _MAX_SEARCH_ELEMS * 32 * 32:
        r //= 2
    return r


@triton.constexpr_function
def _passes(radix, key_shift) -> int:
    """Fixed pass count of the radix search (proof in ``_kth_largest_key``): the least n with radix**n >= 2**bits,
    bits = 32 - key_shift the width of the key range. R=16: 8 (fp32), 4 (bf16), 5 (fp16); R=8: 11, 6, 7."""
    n = 0
    while radix**n < 2 ** (32 - key_shift):
        n += 1
    return n


def _num_warps(block_v: int) -> int:
    """Enough warps that the [R, BLOCK_V] compare holds <= _MAX_SEARCH_ELEMS elements per thread (at most 32)."""
    need = triton.cdiv(_radix(block_v) * block_v, 32 * _MAX_SEARCH_ELEMS)
    return min(32, max(4, triton.next_power_of_2(need)))


@triton.jit
def _hash32(x):
    """lowbias32 on uint32 (wrapping multiplies), as ``reference._hash32``."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _order_key(x, mask, KEY_SHIFT: tl.constexpr):
    """Order-preserving int32 image of fp32 (flip the magnitude bits of negatives), arithmetic-shifted right by
    ``KEY_SHIFT`` (exact where those bits are zero for the input dtype: negatives then have them all one, so the
    floor division by 2**KEY_SHIFT stays injective). -0 gets +0's key: the two compare equal, so a top-k threshold at
    zero keeps both (a tie). Padding gets the least key."""
    bits = tl.where(x == 0.0, 0, x.to(tl.int32, bitcast=True))
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF) >> KEY_SHIFT
    return tl.where(mask, key, -0x80000000 >> KEY_SHIFT)


@triton.jit
def _kth_largest_key(key, top_k, KEY_SHIFT: tl.constexpr, RADIX: tl.constexpr):
    """Per row, the ``top_k``-th largest of ``key`` ([ROWS, BLOCK_V], padding at the least key), 1 <= top_k < V.

    Invariant: count(key >= lo) >= k > count(key >= hi). It holds for the whole key range lo = -2**(31-s),
    hi = 2**(31-s) (s = KEY_SHIFT; padding is counted only at the initial lo, which needs no test). A pass counts
    the keys >= mid_j = lo + j * step, j < R, step = ceil((hi - lo) / R), in one reduction; the new lo is the
    largest mid_j < hi with count >= k (j = 0 always qualifies; counts fall with j) and hi = min(hi, lo + step):
    the invariant holds and the width W = hi - lo becomes <= ceil(W / R). As ceil(ceil(a/b)/c) = ceil(a/(bc)),
    n passes from W0 = 2**(32-s) leave W <= ceil(W0 / R**n) = 1 once R**n >= W0 (``_passes``); W >= 1 always, and at
    W = 1 lo is the largest value with count >= k, i.e. exactly the k-th largest key (and later passes keep it).
    """
    # Everything in the key's 3D shape ([ROWS, R, 1] thresholds against [ROWS, 1, BLOCK_V] keys), so the compiler
    # keeps one layout: the per-row scalars then need no layout conversion (shared memory, barrier) per pass.
    ROWS: tl.constexpr = key.shape[0]
    k3 = tl.reshape(key, [ROWS, 1, key.shape[1]])
    lo = tl.full([ROWS, 1, 1], -(2**31) >> KEY_SHIFT, tl.int64)
    hi = tl.full([ROWS, 1, 1], 2**31 >> KEY_SHIFT, tl.int64)
    j = tl.reshape(tl.arange(0, RADIX), [1, RADIX, 1]).to(tl.int64)
    for _ in range(_passes(RADIX, KEY_SHIFT)):
        step = (hi - lo + (RADIX - 1)) // RADIX
        mids = lo + step * j  # [ROWS, R, 1]
        # mids >= hi count < k keys: clamped into int32 for the compare, and excluded by `ok` below
        m32 = tl.minimum(mids, 2**31 - 1).to(tl.int32)
        cnt = tl.sum((k3 >= m32).to(tl.int32), axis=2, keep_dims=True)  # the pass's one block-wide reduction
        ok = (cnt >= top_k) & (mids < hi)
        lo = tl.max(tl.where(ok, mids, lo), axis=1, keep_dims=True)  # in registers: each thread holds all R counts
        hi = tl.minimum(hi, lo + step)
    return tl.reshape(lo, [ROWS, 1]).to(tl.int32)


@triton.jit
def _sample_rows(
    logits_ptr, null_ptr, temp_ptr, seed_ptr, step_ptr, out_ptr, rows,
    B, V, top_k, cfg_coef, stride_l, stride_n, step_scale, step_offset,
    HAS_NULL: tl.constexpr, BLOCK_V: tl.constexpr, CG: tl.constexpr = False,
):  # fmt: skip
    """Sample the ``rows`` ([ROWS] indices; those >= B are skipped) into ``out``; row b's noise counter is
    ``steps[b] * step_scale + step_offset``. ``CG``: read the logits from L2 (written by other programs of the same
    launch, published by an acq_rel counter)."""
    KEY_SHIFT: tl.constexpr = _key_shift(logits_ptr.dtype.element_ty, HAS_NULL)
    CACHE: tl.constexpr = ".cg" if CG else ""
    cols = tl.arange(0, BLOCK_V)
    rmask = rows < B
    mask = rmask[:, None] & (cols[None, :] < V)
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_l + cols[None, :], mask=mask, other=0.0,
                cache_modifier=CACHE)  # fmt: skip
    x = x.to(tl.float32)
    if HAS_NULL:
        n = tl.load(null_ptr + rows[:, None].to(tl.int64) * stride_n + cols[None, :], mask=mask, other=0.0,
                    cache_modifier=CACHE)  # fmt: skip
        n = n.to(tl.float32)
        x = n + (x - n) * cfg_coef
    x = tl.where(mask, x, float("-inf"))
    # greedy token (lowest index on ties, like torch) and the row max, in one reduction
    xmax, greedy = tl.max(x, axis=1, return_indices=True, return_indices_tie_break_left=True)

    keep = mask
    if (top_k > 0) & (top_k < V):
        key = _order_key(x, mask, KEY_SHIFT)
        keep = mask & (key >= _kth_largest_key(key, top_k, KEY_SHIFT, _radix(BLOCK_V)))

    t = tl.load(temp_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    # greedy where max(x) / t overflows (a tiny t): its limit, as the reference (the softmax of inf - inf was NaN)
    sample = (t > 0) & (tl.abs(xmax / tl.where(t > 0, t, 1.0)) < float("inf"))
    t = tl.where(sample, t, 1.0)
    xs = x / t[:, None]  # a true division, as the reference's CPU `x / t`
    e = tl.exp(xs - (xmax / t)[:, None])  # max(x) / t == max(x / t): correctly rounded division by t > 0 is monotone
    den = tl.sum(e, axis=1)
    p = e / tl.where(den > 0, den, 1.0)[:, None]  # den == 0 only on padding rows

    seed = tl.load(seed_ptr + rows, mask=rmask, other=0).to(tl.uint32)  # low 32 bits, as the reference masks
    step = (tl.load(step_ptr + rows, mask=rmask, other=0).to(tl.int64) * step_scale + step_offset).to(tl.uint32)
    h = _hash32(_hash32(seed) ^ step)
    r = _hash32(h[:, None] ^ cols[None, :].to(tl.uint32)) >> 8
    u = (r.to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    # -log(u) as log(u) * -1: Triton's unary minus is 0 - x, which turns log(1) = 0 into +0 (a score of +inf, a sure
    # win), where the reference's -0 gives -inf (u rounds to 1.0 for 24 bits of 1s)
    score = tl.where(keep, p / (tl.log(u) * -1.0), -1.0)
    sampled = tl.argmax(score, axis=1)
    tok = tl.where(sample, sampled, greedy)
    # a NaN logit makes every score NaN: should the compiled argmax then land on a padding column, token 0, never an
    # id past the vocabulary for the next step's embedding gather (which reads it unchecked)
    tok = tl.where(tok < V, tok, 0)
    tl.store(out_ptr + rows, tok.to(tl.int64), mask=rmask)


@triton.jit(do_not_specialize=["step_scale", "step_offset"])  # one compile for every stream of a frame
def _sample_kernel(
    logits_ptr, null_ptr, temp_ptr, seed_ptr, step_ptr, out_ptr,
    B, V, top_k, cfg_coef, stride_l, stride_n, step_scale, step_offset,
    HAS_NULL: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    launch_and_wait(PDL)  # the logits come from the kernel before
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    _sample_rows(logits_ptr, null_ptr, temp_ptr, seed_ptr, step_ptr, out_ptr, rows, B, V, top_k, cfg_coef,
                 stride_l, stride_n, step_scale, step_offset, HAS_NULL, BLOCK_V)  # fmt: skip


def _rows_per_program(B: int, block_v: int) -> int:
    if triton_interpret():  # the [ROWS, R, BLOCK_V] compare: <= 2**20 elements
        return min(triton.next_power_of_2(max(B, 1)), max(1, 2**20 // (_radix(block_v) * block_v)))
    return 1


def sample_tokens_triton(
    logits, temperature, top_k, seeds, steps, *, step_scale=1, step_offset=0, null_logits=None, cfg_coef=1.0,
    out=None, pdl=None,
) -> torch.Tensor:
    """Triton twin of :func:`~dsm_kernels.reference.sample_tokens_ref`; ``out`` ([B] int64) may be preallocated;
    ``pdl``: launch as a programmatic dependent of the previous kernel (default :func:`~dsm_kernels.pdl.use_pdl`).

    ``temperature``: [B] fp32 tensor; ``top_k``: Python int (0 = all); ``seeds``/``steps``: [B] int64 tensors.
    """
    B, V = logits.shape
    # the kernel reads rows and [B] vectors with unit stride; the reference takes any layout
    logits, null_logits, temperature, seeds, steps = unit_stride(logits, null_logits, temperature, seeds, steps)
    if out is None:
        out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    nl = null_logits if null_logits is not None else logits
    block_v = triton.next_power_of_2(V)
    rows = _rows_per_program(B, block_v)
    pdl = use_pdl(logits.device) if pdl is None else bool(pdl)
    _sample_kernel[(triton.cdiv(B, rows),)](
        logits, nl, temperature, seeds, steps, out,
        B, V, int(top_k), float(cfg_coef), logits.stride(0), nl.stride(0), int(step_scale), int(step_offset),
        HAS_NULL=null_logits is not None, ROWS=rows, BLOCK_V=block_v, PDL=pdl, num_warps=_num_warps(block_v),
        enable_fp_fusion=False,  # keep the reference's rounding: no FMA in the CFG mix
        launch_pdl=pdl,
    )  # fmt: skip
    return out


@triton.jit
def _kth_key_kernel(
    x_ptr, k_ptr, out_ptr, B, V, stride,
    KEY_SHIFT: tl.constexpr, RADIX: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_V)
    mask = (rows < B)[:, None] & (cols[None, :] < V)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    k = tl.reshape(tl.load(k_ptr + rows, mask=rows < B, other=1), [ROWS, 1, 1])  # per-row k (the sampler: a scalar)
    thr = _kth_largest_key(_order_key(x, mask, KEY_SHIFT), k, KEY_SHIFT, RADIX)
    tl.store(out_ptr + rows[:, None], thr, mask=(rows < B)[:, None])


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def kth_largest_key_triton(logits: torch.Tensor, top_k, *, key_shift=None, radix=None) -> torch.Tensor:
    """The sampler's top-k threshold search on its own (for tests): per row the ``top_k``-th largest order key
    ([B] int32, keys shifted right by ``key_shift``, by default the sampler's choice for the dtype without CFG).
    ``top_k``: an int or a [B] tensor (one k per row), 1 <= k < V."""
    B, V = logits.shape
    assert logits.stride(1) == 1
    k = torch.as_tensor(top_k, dtype=torch.int32, device=logits.device).expand(B).contiguous()
    assert bool(((k > 0) & (k < V)).all())
    key_shift = _key_shift(_TL_DTYPES[logits.dtype], False) if key_shift is None else key_shift
    block_v = triton.next_power_of_2(V)
    radix = _radix(block_v) if radix is None else radix
    out = torch.empty(B, dtype=torch.int32, device=logits.device)
    rows = _rows_per_program(B, block_v)
    _kth_key_kernel[(triton.cdiv(B, rows),)](
        logits, k, out, B, V, logits.stride(0),
        KEY_SHIFT=key_shift, RADIX=radix, ROWS=rows, BLOCK_V=block_v, num_warps=_num_warps(block_v),
    )  # fmt: skip
    return out
