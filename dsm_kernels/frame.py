"""Triton kernels for the delayed-stream bookkeeping of one step (twins of ``frame_inputs_ref``,
``frame_commit_ref`` and ``kv_slots_ref`` in ``dsm_kernels.reference``).

In torch each is 10-15 small integer ops (gather, scatter, where, modulo), ~40 launches per step together; here each
is one launch. One program per row; a row's streams are one vector. Where a row writes and then reads the same
cache cell in one step (a stream whose delay is a multiple of the ring length), the value is taken from registers
rather than re-read, so no ordering between the store and the load is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .embed import _block_d
from .triton_common import unit_stride


@triton.jit
def _frame_inputs_kernel(
    cache_ptr, off_ptr, ex_ptr, delay_ptr, init_ptr, tok_ptr, out_ptr,
    K, CT, n_gen, stride_cb, stride_ck, stride_tb,
    HAS_INPUT: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    km = k < K
    off = tl.load(off_ptr + b)
    ex = tl.load(ex_ptr + b).to(tl.int32) != 0
    delay = tl.load(delay_ptr + k, mask=km, other=0)
    r = off % CT
    row = cache_ptr + b * stride_cb + k * stride_ck
    cur = tl.load(row + r, mask=km, other=0)
    if HAS_INPUT:
        is_input = km & (k >= n_gen)
        w = (off + delay) % CT
        val = tl.load(tok_ptr + b * stride_tb + (k - n_gen), mask=is_input, other=0).to(tl.int64)
        do_write = is_input & ex
        tl.store(row + w, val, mask=do_write)
        cur = tl.where(do_write & (w == r), val, cur)
    init = (off <= delay) | (ex == 0)
    out = tl.where(init, tl.load(init_ptr + k, mask=km, other=0), cur)
    tl.store(out_ptr + b * K + k, out, mask=km)


def frame_inputs_triton(cache, offsets, exec_mask, delays, initial, input_tokens, n_gen):
    """Triton twin of :func:`~dsm_kernels.reference.frame_inputs_ref`."""
    B, K, CT = cache.shape
    if cache.stride(2) != 1:
        raise ValueError(f"frame_inputs: cache {tuple(cache.shape)} must be contiguous along the ring")
    out = torch.empty(B, K, dtype=torch.int64, device=cache.device)
    if B == 0:
        return out
    tok = input_tokens if input_tokens is not None else offsets
    if input_tokens is not None and (input_tokens.shape != (B, K - n_gen) or input_tokens.stride(1) != 1):
        raise ValueError(f"frame_inputs: input_tokens {tuple(input_tokens.shape)} must be [B={B}, {K - n_gen}]")
    offsets, exec_mask, delays, initial = unit_stride(offsets, exec_mask, delays, initial)
    _frame_inputs_kernel[(B,)](
        cache, offsets, exec_mask, delays, initial, tok, out,
        K, CT, n_gen, cache.stride(0), cache.stride(1), tok.stride(0),
        HAS_INPUT=input_tokens is not None, BLOCK_K=triton.next_power_of_2(K), num_warps=1,
    )  # fmt: skip
    return out


@triton.jit
def _frame_commit_kernel(
    cache_ptr, off_ptr, ex_ptr, delay_ptr, text_ptr, audio_ptr, out_ptr,
    CT, n_gen, max_delay, stride_cb, stride_ck, stride_ab,
    HAS_AUDIO: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    km = k < n_gen
    ex = tl.load(ex_ptr + b).to(tl.int32) != 0
    off = tl.load(off_ptr + b) + ex.to(tl.int64)
    tl.store(off_ptr + b, off)
    new = tl.zeros([BLOCK_K], dtype=tl.int64) + tl.load(text_ptr + b).to(tl.int64)
    if HAS_AUDIO:
        audio = tl.load(audio_ptr + b * stride_ab + (k - 1), mask=km & (k >= 1), other=0).to(tl.int64)
        new = tl.where(k >= 1, audio, new)
    col = off % CT
    row = cache_ptr + b * stride_cb + k * stride_ck
    tl.store(row + col, new, mask=km & ex)
    delay = tl.load(delay_ptr + k, mask=km, other=0)
    idx = (off - max_delay + delay) % CT
    idx = tl.where(idx < 0, idx + CT, idx)  # floor modulo, as torch's %
    tok = tl.load(row + idx, mask=km, other=0)
    tok = tl.where(ex & (idx == col), new, tok)
    invalid = (off <= max_delay) | (ex == 0)
    tl.store(out_ptr + b * n_gen + k, tl.where(invalid, -2, tok), mask=km)


def frame_commit_triton(cache, offsets, exec_mask, delays, text_token, audio, max_delay):
    """Triton twin of :func:`~dsm_kernels.reference.frame_commit_ref`."""
    B, _, CT = cache.shape
    n_gen = 1 + (audio.shape[1] if audio is not None else 0)
    if cache.stride(2) != 1:
        raise ValueError(f"frame_commit: cache {tuple(cache.shape)} must be contiguous along the ring")
    if audio is not None and (audio.shape[0] != B or audio.stride(1) != 1):
        raise ValueError(f"frame_commit: audio {tuple(audio.shape)} must be [B={B}, dep_q], row-contiguous")
    out = torch.empty(B, n_gen, dtype=torch.int64, device=cache.device)
    if B == 0:
        return out
    aud = audio if audio is not None else text_token
    off, exec_mask, delays, text_token = unit_stride(offsets, exec_mask, delays, text_token)
    _frame_commit_kernel[(B,)](
        cache, off, exec_mask, delays, text_token, aud, out,
        CT, n_gen, max_delay, cache.stride(0), cache.stride(1), aud.stride(0),
        HAS_AUDIO=audio is not None, BLOCK_K=triton.next_power_of_2(n_gen), num_warps=1,
    )  # fmt: skip
    if off is not offsets:  # updated in place: back into the caller's strided view
        offsets.copy_(off)
    return out


@triton.jit
def _kv_slots_kernel(bt_ptr, pos_ptr, write_ptr, slot_ptr, len_ptr, before_ptr, B, page_size, pps, stride_bt,
                     stride_bp, ADVANCE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = b < B
    pos = tl.load(pos_ptr + b, mask=m, other=0).to(tl.int64)
    w = tl.load(write_ptr + b, mask=m, other=0).to(tl.int32) != 0
    logical = (pos // page_size) % pps
    page = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + logical * stride_bp, mask=m & w, other=0).to(tl.int64)
    tl.store(slot_ptr + b, tl.where(w, page * page_size + pos % page_size, -1), mask=m)
    tl.store(len_ptr + b, tl.where(w, pos + 1, 0).to(tl.int32), mask=m)
    if ADVANCE:  # each lane moves on the position it read
        tl.store(before_ptr + b, pos, mask=m)
        tl.store(pos_ptr + b, pos + w.to(tl.int64), mask=m)


def kv_slots_triton(block_table, positions, write, page_size, advance=False):
    """Triton twin of :func:`~dsm_kernels.reference.kv_slots_ref`: one launch, the advance of ``positions``
    included."""
    B = positions.shape[0]
    slot = torch.empty(B, dtype=torch.int64, device=positions.device)
    seq_lens = torch.empty(B, dtype=torch.int32, device=positions.device)
    before = torch.empty(B, dtype=positions.dtype, device=positions.device) if advance else None
    if B:
        if advance and positions.stride(0) != 1:  # unit_stride would advance a copy
            raise ValueError(f"kv_slots: positions with stride {positions.stride(0)} cannot be advanced in place")
        block = min(1024, triton.next_power_of_2(B))
        positions, write = unit_stride(positions, write)
        _kv_slots_kernel[(triton.cdiv(B, block),)](
            block_table, positions, write, slot, seq_lens, before if advance else slot, B, page_size,
            block_table.shape[1], block_table.stride(0), block_table.stride(1), ADVANCE=advance, BLOCK=block,
            num_warps=4,
        )  # fmt: skip
    return (slot, seq_lens, before) if advance else (slot, seq_lens)


@triton.jit
def _column_token(cache_row, stride_ck, tok_row, delay_ptr, init_ptr, off, r, CT, exi, first,
                  k: tl.constexpr, N_GEN: tl.constexpr, HAS_INPUT: tl.constexpr):  # fmt: skip
    """Stream k's token of this step's input column (frame_inputs' rule for one stream, as a scalar); the
    input-only streams' new token is written into the ring by the row's first program only."""
    delay = tl.load(delay_ptr + k)
    cell = cache_row + k * stride_ck
    cur = tl.load(cell + r)
    if HAS_INPUT:
        if k >= N_GEN:
            w = (off + delay) % CT
            val = tl.load(tok_row + (k - N_GEN)).to(tl.int64)
            tl.store(cell + w, val, mask=(exi != 0) & first)
            cur = tl.where((exi != 0) & (w == r), val, cur)  # a cell written and read this step: the new value
    init = (off <= delay) | (exi == 0)
    return tl.where(init, tl.load(init_ptr + k), cur)


@triton.jit
def _frame_embed_kernel(
    cache_ptr, off_ptr, ex_ptr, delay_ptr, init_ptr, in_ptr, text_ptr, text2_ptr, audio_ptr, cond_ptr,
    bt_ptr, pos_ptr, out_ptr, tok_ptr, slot_ptr, len_ptr, before_ptr,
    D, Vt, CT, page_size, pps,
    stride_cb, stride_ck, stride_in, stride_text, stride_text2, stride_aq, stride_av, stride_cond, stride_out,
    stride_bt, stride_bp,
    K: tl.constexpr, N_GEN: tl.constexpr, HAS_INPUT: tl.constexpr, HAS_TEXT2: tl.constexpr, HAS_COND: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) == 0  # the row's one program that writes its bookkeeping
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    zero = tl.zeros([BLOCK_D], dtype=tl.int64)  # turns a scalar condition into a block-constant vector mask
    off = tl.load(off_ptr + b)
    exi = tl.load(ex_ptr + b).to(tl.int32)
    r = off % CT
    cache_row = cache_ptr + b * stride_cb
    in_row = in_ptr + b * stride_in
    # every program of the row derives the column itself (K scalars): no ordering between programs is needed, as
    # only the first writes, and a ring cell it writes is read by no program this step but through `val`
    text = _column_token(cache_row, stride_ck, in_row, delay_ptr, init_ptr, off, r, CT, exi, first, 0, N_GEN,
                         HAS_INPUT)  # fmt: skip
    tl.store(tok_ptr + b * K, text, mask=first)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    # the reference's order (audio 0..K-2, text, text2, cond): fp32 sums equal multistream_embed's bit for bit
    for k in tl.static_range(1, K):
        t = _column_token(cache_row, stride_ck, in_row, delay_ptr, init_ptr, off, r, CT, exi, first, k, N_GEN,
                          HAS_INPUT)  # fmt: skip
        tl.store(tok_ptr + b * K + k, t, mask=first)
        row = audio_ptr + (k - 1) * stride_aq + tl.maximum(t, 0) * stride_av
        acc += tl.load(row + offs, mask=dmask & (zero + t >= 0), other=0.0).to(tl.float32)
    vv = tl.maximum(text, 0)
    if HAS_TEXT2:
        second = vv // Vt - 1
        acc += tl.load(text_ptr + (vv % Vt) * stride_text + offs, mask=dmask & (zero + text >= 0),
                       other=0.0).to(tl.float32)  # fmt: skip
        ok2 = (zero + text >= 0) & (zero + second >= 0)
        acc += tl.load(text2_ptr + tl.maximum(second, 0) * stride_text2 + offs, mask=dmask & ok2,
                       other=0.0).to(tl.float32)  # fmt: skip
    else:
        acc += tl.load(text_ptr + vv * stride_text + offs, mask=dmask & (zero + text >= 0), other=0.0).to(tl.float32)
    if HAS_COND:
        acc += tl.load(cond_ptr + b * stride_cond + offs, mask=dmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=dmask)
    # kv_slots of the executing rows, positions advanced (first program only)
    pos = tl.load(pos_ptr + b).to(tl.int64)
    w = exi != 0
    page = tl.load(bt_ptr + b * stride_bt + ((pos // page_size) % pps) * stride_bp, mask=w, other=0).to(tl.int64)
    tl.store(slot_ptr + b, tl.where(w, page * page_size + pos % page_size, -1), mask=first)
    tl.store(len_ptr + b, tl.where(w, pos + 1, 0).to(tl.int32), mask=first)
    tl.store(before_ptr + b, pos, mask=first)
    tl.store(pos_ptr + b, pos + w.to(tl.int64), mask=first)


def frame_embed_triton(cache, offsets, exec_mask, delays, initial, input_tokens, n_gen, text_table, audio_tables,
                       block_table, positions, page_size, *, text_table2=None, cond=None, out_dtype=None,
                       out=None, block_d=None):  # fmt: skip
    """Triton twin of :func:`~dsm_kernels.reference.frame_embed_ref`: one launch for ``frame_inputs``,
    ``multistream_embed`` and ``kv_slots`` (three before), a program per row and ``block_d`` columns (default: the
    embedding kernel's)."""
    B, K, CT = cache.shape
    D = text_table.shape[1]
    if cache.stride(2) != 1:
        raise ValueError(f"frame_embed: cache {tuple(cache.shape)} must be contiguous along the ring")
    if input_tokens is not None and input_tokens.stride(1) != 1:
        raise ValueError(f"frame_embed: input_tokens {tuple(input_tokens.shape)} must be row-contiguous")
    if B and positions.stride(0) != 1:  # unit_stride would advance a copy
        raise ValueError(f"frame_embed: positions with stride {positions.stride(0)} cannot be advanced in place")
    t2 = text_table2 if text_table2 is not None else text_table
    for name, t in (("text_table", text_table), ("text_table2", t2), ("audio_tables", audio_tables)):
        if t.stride(-1) != 1:
            raise ValueError(f"frame_embed: {name} {tuple(t.shape)} with strides {t.stride()} must be contiguous "
                             "along D")  # fmt: skip
    dev = cache.device
    x = out if out is not None else torch.empty(B, D, dtype=out_dtype or text_table.dtype, device=dev)
    if x.shape != (B, D) or x.stride(-1) != 1:
        raise ValueError(f"frame_embed: out {tuple(x.shape)} must be [{B}, {D}], contiguous along D")
    tokens = torch.empty(B, K, dtype=torch.int64, device=dev)
    slot = torch.empty(B, dtype=torch.int64, device=dev)
    seq_lens = torch.empty(B, dtype=torch.int32, device=dev)
    before = torch.empty(B, dtype=positions.dtype, device=dev)
    if B == 0:
        return x, tokens, slot, seq_lens, before
    offsets, exec_mask, delays, initial, cond = unit_stride(offsets, exec_mask, delays, initial, cond)
    inp = input_tokens if input_tokens is not None else offsets
    c = cond if cond is not None else x
    block_d = block_d or _block_d(D)
    _frame_embed_kernel[(B, triton.cdiv(D, block_d))](
        cache, offsets, exec_mask, delays, initial, inp, text_table, t2, audio_tables, c,
        block_table, positions, x, tokens, slot, seq_lens, before,
        D, text_table.shape[0], CT, page_size, block_table.shape[1],
        cache.stride(0), cache.stride(1), inp.stride(0), text_table.stride(0), t2.stride(0), audio_tables.stride(0),
        audio_tables.stride(1), c.stride(0), x.stride(0), block_table.stride(0), block_table.stride(1),
        K=K, N_GEN=n_gen, HAS_INPUT=input_tokens is not None, HAS_TEXT2=text_table2 is not None,
        HAS_COND=cond is not None, BLOCK_D=block_d, num_warps=2,
    )  # fmt: skip
    return x, tokens, slot, seq_lens, before
