"""Triton paged KV cache: ``append_kv`` and split-K (flash-decoding) decode attention over a ring of pages.

Semantics: :func:`dsm_kernels.reference.append_kv_ref` and :func:`~dsm_kernels.reference.paged_decode_attention_ref`
(pool ``[num_pages, page_size, H, D]``; slot ``b`` keeps absolute position ``p`` in page
``block_table[b, (p // page_size) % pages_per_slot]``; the query at ``seq_lens[b] - 1`` sees the last ``context``
positions; ``seq_lens == 0`` gives zeros).

Decode is memory-bound (one query row per head), so the only goal is to keep enough bytes in flight. The window of
each slot is cut into ``num_splits`` chunks of whole ``BLOCK_N``-position blocks (aligned to absolute positions, so
a block covers whole pages when ``BLOCK_N`` is a multiple of the page size); program ``(b, head block, split)``
streams its chunk with an fp32 online softmax and writes ``(m, l, acc)``; with a counter buffer the last split of
each head block to finish merges them (one launch), else a second small kernel does.
The split count depends only on static shapes (batch, heads, context, SM count), never on ``seq_lens`` values, so
there is no host sync and a captured graph stays valid as slots grow. Batch 1 with context 750 gets ~12 splits ×
16 heads; batch 400 gets one split.

Page size: a page of 16 positions of 16 heads x 128 bf16 is already 64 KB per pool, far above what DRAM needs per
contiguous run, so small pages cost no bandwidth; a slot's ring needs ceil(context / page_size) pages (row p
overwrites row p - pages * page_size, which must lie outside the window), so smaller pages waste less memory:
750 -> 47 x 16 = 752 rows versus 12 x 64 = 768 or 6 x 128 = 768, and 375 -> 376 / 384 / 384. Default 16; the
kernels take any page size (16/32/64/128 tested) and gather rows through the block table per position.

fp8 KV cache (``torch.float8_e4m3fn`` pools): append stores ``clamp(x, -448, 448)`` rounded to nearest even, with no
scale: post-RoPE K/V of the bf16 models are O(1)-O(10), far inside e4m3's range, and a per-tensor scale would need a
calibration pass and a scale per layer for nothing; the clamp makes an outlier saturate instead of becoming NaN.
Decode reads the e4m3 pages and upcasts to fp32 (q and out keep their dtype); pages are half the bytes of bf16.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import sm_count, triton_interpret
from .triton_common import _arrive, unit_stride

_LOG2E = 1.4426950408889634
FP8_CACHE_DTYPES = (torch.float8_e4m3fn,)


# ------------------------------------------------------------------------------------------------- append_kv


@triton.jit
def _round_e4m3(x, SAT: tl.constexpr):
    """``clamp(x, -SAT, SAT)`` rounded to nearest even on the e4m3 grid, in fp32, so that the cast to fp8 that
    follows is exact. Done by hand because the interpreter's fp32->fp8 cast rounds ties away and drops the carry
    into the exponent (1.97 -> 1.0); on a GPU the native cast of these exact values changes nothing. Comparisons
    keep a NaN a NaN; the sign bit is kept (-0.0 and tiny negatives give fp8 -0, as torch)."""
    x = tl.where(x > SAT, SAT, tl.where(x < -SAT, -SAT, x))  # saturate: overflow never becomes NaN
    bits = x.to(tl.int32, bitcast=True)
    ax = tl.abs(x)
    e = tl.maximum((ax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 127 - 6)  # subnormals (< 2^-6) step 2^-9
    big = ((e + 20) << 23).to(tl.float32, bitcast=True)  # 2^(E+20): fp32 spacing 2^(E-3) = the e4m3 spacing
    r = (ax + big) - big  # fp32 addition rounds to nearest even on that spacing
    return (r.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _append_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    page_size, HD,
    stride_kb, stride_vb, stride_kcp, stride_kcs, stride_vcp, stride_vcs,
    BLOCK: tl.constexpr, SAT: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    row = tl.load(slot_ptr + b).to(tl.int64)
    if row >= 0:
        page = row // page_size
        off = row % page_size
        offs = tl.arange(0, BLOCK)
        mask = offs < HD
        k = tl.load(k_ptr + b.to(tl.int64) * stride_kb + offs, mask=mask)
        v = tl.load(v_ptr + b.to(tl.int64) * stride_vb + offs, mask=mask)
        kc_row = kc_ptr + page * stride_kcp + off * stride_kcs
        vc_row = vc_ptr + page * stride_vcp + off * stride_vcs
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        if SAT > 0:  # fp8 e4m3 cache
            k = _round_e4m3(k, SAT)
            v = _round_e4m3(v, SAT)
        tl.store(kc_row + offs, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_row + offs, v.to(vc_ptr.dtype.element_ty), mask=mask)


def cache_saturation(dtype: torch.dtype) -> float:
    """The bound K/V values are clamped to before they are stored in a cache of ``dtype`` (0: no clamp).

    fp8 e4m3 caches store ``clamp(x, -448, 448)`` rounded to nearest even, without a scale (see the module doc)."""
    return float(torch.finfo(dtype).max) if dtype in FP8_CACHE_DTYPES else 0.0


def _check_heads_contiguous(x: torch.Tensor, name: str):
    if x.stride(-1) != 1 or x.stride(-2) != x.shape[-1]:
        raise ValueError(f"{name} {tuple(x.shape)} with strides {x.stride()}: the last two dims (heads, head_dim) "
                         "must be contiguous")  # fmt: skip


def append_kv_triton(k_cache, v_cache, k, v, slot_mapping) -> None:
    """Triton twin of :func:`~dsm_kernels.reference.append_kv_ref` (in place; ``slot_mapping == -1`` skips)."""
    B, H, D = k.shape
    for x, name in ((k, "k"), (v, "v"), (k_cache, "k_cache"), (v_cache, "v_cache")):
        _check_heads_contiguous(x, name)
    if B == 0:
        return
    (slot_mapping,) = unit_stride(slot_mapping)
    _append_kv_kernel[(B,)](
        k, v, k_cache, v_cache, slot_mapping,
        k_cache.shape[1], H * D,
        k.stride(0), v.stride(0), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        BLOCK=triton.next_power_of_2(H * D), SAT=cache_saturation(k_cache.dtype), num_warps=4,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------- decode


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, m_ptr, l_ptr, acc_ptr, cnt_ptr, out_ptr,
    qk_scale, context, page_size, pages_per_slot, blocks_per_split,
    stride_qb, stride_qh, stride_kp, stride_ks, stride_vp, stride_vs, stride_bt, stride_ob, stride_oh,
    H,
    NUM_SPLITS: tl.constexpr, MERGE: tl.constexpr, HEAD_DIM: tl.constexpr, HB: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    heads = tl.program_id(1) * HB + tl.arange(0, HB)
    split = tl.program_id(2)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    n = tl.load(len_ptr + b).to(tl.int32)
    qpos = n - 1
    lo = tl.maximum(qpos - context + 1, 0)
    # Blocks are aligned to absolute positions; an inactive slot (n == 0) gets none.
    first_blk = lo // BLOCK_N
    nblk = tl.where(n > 0, tl.maximum(qpos, 0) // BLOCK_N - first_blk + 1, 0)
    blk_begin = split * blocks_per_split
    blk_end = tl.minimum(blk_begin + blocks_per_split, nblk)

    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=dmask[None, :])
    q = q.to(tl.float32) * qk_scale  # log2 domain: softmax via exp2
    # heads and head_dim are contiguous in the pool; HEAD_DIM constexpr lets the gathers use 16-byte loads
    head_off = heads[:, None, None] * HEAD_DIM + d[None, None, :]
    # Finite -1e30 start: a fully masked block then gives exp2(-inf - -1e30) = 0, never NaN.
    m = tl.full([HB], -1.0e30, dtype=tl.float32)
    l = tl.zeros([HB], dtype=tl.float32)
    acc = tl.zeros([HB, BLOCK_D], dtype=tl.float32)
    for i in range(blk_begin, blk_end):
        pos = (first_blk + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = (pos >= lo) & (pos <= qpos)
        page = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + (pos // page_size) % pages_per_slot).to(tl.int64)
        off = (pos % page_size).to(tl.int64)
        kv_mask = valid[None, :, None] & dmask[None, None, :]
        kt = tl.load(k_ptr + (page * stride_kp + off * stride_ks)[None, :, None] + head_off, mask=kv_mask, other=0.0)
        s = tl.sum(q[:, None, :] * kt.to(tl.float32), axis=2)  # [HB, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_ptr + (page * stride_vp + off * stride_vs)[None, :, None] + head_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt.to(tl.float32), axis=1)
        m = m_new
    ml_off = (b * H + heads) * NUM_SPLITS + split  # [HB]
    tl.store(m_ptr + ml_off, m)
    tl.store(l_ptr + ml_off, l)
    tl.store(acc_ptr + ml_off[:, None].to(tl.int64) * BLOCK_D + d[None, :], acc)
    if MERGE:  # the last split of this (slot, head block) to finish merges them all
        if _arrive(cnt_ptr, b * tl.num_programs(1) + tl.program_id(1), NUM_SPLITS):
            _merge_splits(m_ptr, l_ptr, acc_ptr, out_ptr, b, heads, stride_ob, stride_oh, H, HEAD_DIM, NUM_SPLITS,
                          BLOCK_D, BLOCK_S)  # fmt: skip


@triton.jit
def _merge_splits(m_ptr, l_ptr, acc_ptr, out_ptr, b, heads, stride_ob, stride_oh, H, HEAD_DIM, NUM_SPLITS,
                  BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """out[b, heads] from the NUM_SPLITS partials of each head; .cg loads read L2, where the other programs of a
    launch published theirs."""
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = sp[None, :] < NUM_SPLITS
    ml_off = (b * H + heads[:, None]) * NUM_SPLITS + sp[None, :]  # [HB, BLOCK_S]
    m = tl.load(m_ptr + ml_off, mask=smask, other=-1.0e30, cache_modifier=".cg")
    l = tl.load(l_ptr + ml_off, mask=smask, other=0.0, cache_modifier=".cg")
    acc = tl.load(acc_ptr + ml_off[:, :, None].to(tl.int64) * BLOCK_D + d[None, None, :], mask=smask[:, :, None],
                  other=0.0, cache_modifier=".cg")  # fmt: skip
    w = tl.exp2(m - tl.max(m, axis=1)[:, None])  # [HB, BLOCK_S]
    den = tl.sum(w * l, axis=1)
    num = tl.sum(w[:, :, None] * acc, axis=1)  # [HB, BLOCK_D]
    o = tl.where(den[:, None] > 0, num / tl.where(den > 0, den, 1.0)[:, None], 0.0)  # inactive slot -> 0
    optr = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :]
    tl.store(optr, o.to(out_ptr.dtype.element_ty), mask=d[None, :] < HEAD_DIM)


@triton.jit
def _decode_merge_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr,
    stride_ob, stride_oh, H, HEAD_DIM, NUM_SPLITS,
    HB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    heads = tl.program_id(1) * HB + tl.arange(0, HB)
    _merge_splits(m_ptr, l_ptr, acc_ptr, out_ptr, b, heads, stride_ob, stride_oh, H, HEAD_DIM, NUM_SPLITS, BLOCK_D,
                  BLOCK_S)  # fmt: skip


def decode_plan(batch: int, heads: int, head_dim: int, context: int, device: torch.device, *, block_n=None,
                heads_per_program=None, num_splits=None) -> tuple[int, int, int, int]:  # fmt: skip
    """Static launch plan ``(heads_per_program, block_n, num_splits, blocks_per_split)`` from shapes only."""
    interp = triton_interpret() or device.type != "cuda"
    if heads_per_program is None:  # the largest power of 2 dividing `heads`, capped (all heads in the interpreter)
        cap = heads if interp else max(1, 128 // head_dim)
        heads_per_program = 1
        while heads_per_program * 2 <= cap and heads % (heads_per_program * 2) == 0:
            heads_per_program *= 2
    hb = heads_per_program
    assert heads % hb == 0 and hb & (hb - 1) == 0, f"heads_per_program {hb} must be a power of 2 dividing {heads}"
    block_n = block_n or (64 if interp else 32)
    max_blocks = triton.cdiv(context, block_n) + 1  # an unaligned window straddles one extra aligned block
    if num_splits is None:
        if interp:
            num_splits = 2
        else:  # ~4 resident programs per SM so the loads of one hide the latency of another
            num_splits = math.ceil(4 * sm_count(device) / (batch * (heads // hb)))
    num_splits = max(1, min(num_splits, max_blocks))
    blocks_per_split = triton.cdiv(max_blocks, num_splits)
    return hb, block_n, triton.cdiv(max_blocks, blocks_per_split), blocks_per_split


def paged_decode_attention_triton(
    q, k_cache, v_cache, block_table, seq_lens, *, context, scale=None, out=None, block_n=None,
    heads_per_program=None, num_splits=None, counters=None,
):  # fmt: skip
    """Triton twin of :func:`~dsm_kernels.reference.paged_decode_attention_ref`; ``out`` ([B, H, D], q.dtype) may
    be preallocated; ``block_n``/``heads_per_program``/``num_splits`` override the plan (tests, tuning).

    ``counters`` (int32, >= B*H, all 0, used by one launch at a time): the last split of each head block merges the
    splits and re-arms its counter, so the step needs one launch; without it a second kernel merges."""
    B, H, D = q.shape
    # the kernel reads rows of head_dim, of the block table and seq_lens at unit stride; the reference takes any layout
    q, block_table, seq_lens = unit_stride(q, block_table, seq_lens)
    _check_heads_contiguous(k_cache, "k_cache")
    _check_heads_contiguous(v_cache, "v_cache")
    scale = D**-0.5 if scale is None else scale
    if out is None:
        out = torch.empty_like(q)
    if B == 0:
        return out
    hb, block_n, splits, bps = decode_plan(
        B, H, D, context, q.device, block_n=block_n, heads_per_program=heads_per_program, num_splits=num_splits
    )
    merge = counters is not None and splits > 1
    if merge:
        if counters.dtype != torch.int32 or counters.numel() < B * H or not counters.is_contiguous():
            raise ValueError(f"paged_decode_attention: counters {tuple(counters.shape)} {counters.dtype} must hold "
                             f">= B*H = {B * H} contiguous int32 (at 0)")
    block_d, block_s = triton.next_power_of_2(D), triton.next_power_of_2(splits)
    m = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B, H, splits, block_d, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(B, H // hb, splits)](
        q, k_cache, v_cache, block_table, seq_lens, m, l, acc, counters if merge else m, out,
        scale * _LOG2E, context, k_cache.shape[1], block_table.shape[1], bps,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        block_table.stride(0), out.stride(0), out.stride(1), H,
        NUM_SPLITS=splits, MERGE=merge, HEAD_DIM=D, HB=hb, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_S=block_s,
        num_warps=4,
    )  # fmt: skip
    if not merge:
        _decode_merge_kernel[(B, H // hb)](
            m, l, acc, out, out.stride(0), out.stride(1), H, D, splits,
            HB=hb, BLOCK_D=block_d, BLOCK_S=block_s, num_warps=4,
        )  # fmt: skip
    return out
