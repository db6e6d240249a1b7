"""Triton kernels of the Mimi codec's residual vector quantizer (fp32).

* :func:`rvq_encode_triton`: the split RVQ encode, one launch per level (plus one that writes the last codes). Each
  launch fuses the previous level's argmin resolution, the residual update and this level's distances and partial
  argmins over a slice of the codebook, so a 32-level encode is 32 launches instead of ~300 torch ops.
* :func:`rvq_decode_triton`: the sum of the codebook lookups of all levels (tables with the output projection folded
  in), one launch.

Specifications: :func:`dsm_kernels.reference.rvq_encode_ref` and :func:`dsm_kernels.reference.rvq_decode_ref`.
Distances here are ``|c|^2 - 2 x.c`` (the reference adds ``|x|^2``, clamps and takes a square root, like
``torch.cdist``): the argmin may differ from the reference only where two candidates tie within fp32 rounding.
"""

from __future__ import annotations

import os
from functools import cache

import torch
import triton
import triton.language as tl


@cache
def _levels_tensor(levels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[G, 2] int32 (first level, level count) per group; cached so a captured step never builds it."""
    offs = [sum(levels[:g]) for g in range(len(levels))]
    return torch.tensor([[o, n] for o, n in zip(offs, levels, strict=True)], dtype=torch.int32, device=device)


@triton.jit
def _rvq_level_kernel(
    x_ptr, sxb, sxc, sxt,  # projected latents [B, G*D, T]
    books_ptr,  # [L, K, D + 2] rows [c, 1, |c|^2]
    lev_ptr,  # [G, 2] int32: first level, number of levels
    out_ptr, sob, sol, sot,  # codes [B, L, T] int64
    res_ptr,  # [2, G, N, D] fp32 scratch (residual after the previous level, ping-pong)
    pmin_ptr, pidx_ptr,  # [2, G, N, P] partial minima / their indices (ping-pong)
    level, N, T, K,
    D: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pk = tl.program_id(0)
    pn = tl.program_id(1)
    g = tl.program_id(2)
    G = tl.num_programs(2)
    off = tl.load(lev_ptr + 2 * g)
    n_lv = tl.load(lev_ptr + 2 * g + 1)
    if level <= n_lv:
        rows = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        b = rows // T
        t = rows % T
        d = tl.arange(0, D)
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
            k = pk * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = k < K
            crow = ((off + level) * K + k).to(tl.int64) * (D + 2)
            cb = tl.load(books_ptr + crow[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)  # [BLOCK_K, D]
            cn = tl.load(books_ptr + crow + D + 1, mask=k_ok, other=float("inf"))
            dot = tl.dot(r, tl.trans(cb), input_precision="ieee")  # [BLOCK_N, BLOCK_K]
            dist = cn[None, :] - 2.0 * dot
            dist = tl.where(k_ok[None, :], dist, float("inf"))
            m = tl.min(dist, axis=1)
            i = tl.min(tl.where(dist == m[:, None], k[None, :], 2147483647), axis=1)
            pout = (cur * G + g) * N * P + rows * P + pk
            tl.store(pmin_ptr + pout, m, mask=row_ok)
            tl.store(pidx_ptr + pout, i, mask=row_ok)


def rvq_encode_triton(x: torch.Tensor, codebooks_aug: torch.Tensor, group_levels: tuple[int, ...],
                      out: torch.Tensor | None = None, block_k: int | None = None) -> torch.Tensor:
    """See :func:`dsm_kernels.reference.rvq_encode_ref`.

    Each launch spreads a level's codebook over ``K / block_k`` programs per 16 rows (default 32 codes each on a
    GPU; the whole codebook in one program under ``TRITON_INTERPRET=1``, where programs run one after another)."""
    B, GD, T = x.shape
    G = len(group_levels)
    L, K, D2 = codebooks_aug.shape
    D = D2 - 2
    assert GD == G * D and sum(group_levels) <= L, (x.shape, codebooks_aug.shape, group_levels)
    assert x.dtype == codebooks_aug.dtype == torch.float32 and codebooks_aug.is_contiguous()
    n_q = sum(group_levels)
    if out is None:
        out = torch.empty(B, n_q, T, dtype=torch.int64, device=x.device)
    N = B * T
    if block_k is None:
        block_k = K if os.environ.get("TRITON_INTERPRET") == "1" else 32
    BLOCK_K = max(16, min(triton.next_power_of_2(block_k), triton.next_power_of_2(K)))
    P = triton.cdiv(K, BLOCK_K)
    assert P == triton.next_power_of_2(P), "K / BLOCK_K must be a power of two"
    BLOCK_N = 16
    res = torch.empty(2, G, N, D, dtype=torch.float32, device=x.device)
    pmin = torch.empty(2, G, N, P, dtype=torch.float32, device=x.device)
    pidx = torch.empty(2, G, N, P, dtype=torch.int32, device=x.device)
    lev = _levels_tensor(tuple(group_levels), x.device)
    grid = (P, triton.cdiv(N, BLOCK_N), G)
    for level in range(max(group_levels) + 1):
        _rvq_level_kernel[grid](x, x.stride(0), x.stride(1), x.stride(2), codebooks_aug, lev,
                out, out.stride(0), out.stride(1), out.stride(2), res, pmin, pidx, level, N, T, K,
                D=D, P=P, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out


@triton.jit
def _rvq_decode_kernel(
    codes_ptr, scb, scl, sct,  # [B, L, T] int
    tab_ptr,  # [Lt, K, C]
    out_ptr, sob, soc, sot,  # [B, C, T]
    L, T, K, C,
    BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    pc = tl.program_id(1)
    b = n // T
    t = n % T
    c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for lvl in range(L):
        code = tl.load(codes_ptr + b * scb + lvl * scl + t * sct).to(tl.int64)
        acc += tl.load(tab_ptr + (lvl * K + code) * C + c, mask=c_ok, other=0.0)
    tl.store(out_ptr + b * sob + c * soc + t * sot, acc, mask=c_ok)


def rvq_decode_triton(codes: torch.Tensor, tables: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """See :func:`dsm_kernels.reference.rvq_decode_ref`."""
    B, L, T = codes.shape
    Lt, K, C = tables.shape
    assert L <= Lt and tables.is_contiguous() and tables.dtype == torch.float32
    if out is None:
        out = torch.empty(B, C, T, dtype=tables.dtype, device=tables.device)
    BLOCK_C = min(512, triton.next_power_of_2(C))
    grid = (B * T, triton.cdiv(C, BLOCK_C))
    _rvq_decode_kernel[grid](codes, codes.stride(0), codes.stride(1), codes.stride(2), tables,
            out, out.stride(0), out.stride(1), out.stride(2), L, T, K, C, BLOCK_C=BLOCK_C)
    return out
