"""Triton multistream embedding: per slot, the fp32 sum of K table lookups (text + audio codebooks), cast once.

Semantics: :func:`dsm_kernels.reference.multistream_embed_ref`. One program owns one slot and a ``BLOCK_D`` slice of
the model dimension and walks the K token columns (unrolled: K is a compile-time constant), so every table row is
read exactly once and the fp32 accumulator stays in registers. Id ``-1`` moves no bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_interpret
from .triton_common import unit_stride


@triton.jit
def _embed_kernel(
    tok_ptr, text_ptr, text2_ptr, audio_ptr, cond_ptr, out_ptr,
    D, Vt,
    stride_tb, stride_tk,
    stride_text, stride_text2, stride_aq, stride_av,
    stride_cond, stride_out,
    K: tl.constexpr, HAS_TEXT2: tl.constexpr, HAS_COND: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    zero = tl.zeros([BLOCK_D], dtype=tl.int64)  # turns a scalar condition into a block-constant vector mask
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    tok_row = tok_ptr + b.to(tl.int64) * stride_tb
    # K is a compile-time constant: the unrolled, branch-free body lets every row load be issued before the first
    # add (one latency instead of K at batch 1). A -1 row is masked (no bytes moved) and adds exact zeros, in the
    # reference's order (audio 0..K-2, text, text2, cond), so fp32 results match the reference bit for bit.
    for k in tl.static_range(1, K):
        t = tl.load(tok_row + k * stride_tk).to(tl.int64)
        row = audio_ptr + (k - 1) * stride_aq + tl.maximum(t, 0) * stride_av
        acc += tl.load(row + offs, mask=dmask & (zero + t >= 0), other=0.0).to(tl.float32)
    v = tl.load(tok_row).to(tl.int64)
    vv = tl.maximum(v, 0)
    if HAS_TEXT2:
        first = vv % Vt
        second = vv // Vt - 1
        acc += tl.load(text_ptr + first * stride_text + offs, mask=dmask & (zero + v >= 0), other=0.0).to(tl.float32)
        ok2 = (zero + v >= 0) & (zero + second >= 0)
        second = tl.maximum(second, 0)
        acc += tl.load(text2_ptr + second * stride_text2 + offs, mask=dmask & ok2, other=0.0).to(tl.float32)
    else:
        acc += tl.load(text_ptr + vv * stride_text + offs, mask=dmask & (zero + v >= 0), other=0.0).to(tl.float32)
    if HAS_COND:
        acc += tl.load(cond_ptr + b.to(tl.int64) * stride_cond + offs, mask=dmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + b.to(tl.int64) * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=dmask)


def _block_d(D: int) -> int:
    # Interpreter cost scales with the number of programs: one program per slot. On a GPU, 256 columns per program
    # (2 warps x 4 bf16 per thread per row, all K rows in flight) spreads batch 1 over D/256 = 8 programs.
    if triton_interpret():
        return triton.next_power_of_2(D)
    return min(256, triton.next_power_of_2(D))


def multistream_embed_triton(
    tokens: torch.Tensor,
    text_table: torch.Tensor,
    audio_tables: torch.Tensor,
    *,
    text_table2: torch.Tensor | None = None,
    cond: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`~dsm_kernels.reference.multistream_embed_ref`; ``out`` ([B, D]) may be preallocated.

    Ids must lie in ``[-1, V)`` (not checked on device: a check would need a host sync).
    """
    B, K = tokens.shape
    Vt, D = text_table.shape
    if out is None:
        out = torch.empty(B, D, dtype=out_dtype or text_table.dtype, device=tokens.device)
    if out.shape != (B, D):
        raise ValueError(f"multistream_embed: out has shape {tuple(out.shape)}, expected {(B, D)}")
    (cond,) = unit_stride(cond)  # small: copied; the tables are not
    t2 = text_table2 if text_table2 is not None else text_table
    c = cond if cond is not None else out
    for name, t in (("text_table", text_table), ("text_table2", t2), ("audio_tables", audio_tables), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"multistream_embed: {name} {tuple(t.shape)} with strides {t.stride()} must be "
                             "contiguous along D")  # fmt: skip
    if B == 0:
        return out
    block_d = _block_d(D)
    grid = (B, triton.cdiv(D, block_d))
    _embed_kernel[grid](
        tokens, text_table, t2, audio_tables, c, out,
        D, Vt,
        tokens.stride(0), tokens.stride(1),
        text_table.stride(0), t2.stride(0), audio_tables.stride(0), audio_tables.stride(1),
        c.stride(0), out.stride(0),
        K=K, HAS_TEXT2=text_table2 is not None, HAS_COND=cond is not None, BLOCK_D=block_d,
        num_warps=2,
    )  # fmt: skip
    return out
