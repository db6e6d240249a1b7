"""Triton sampler: CFG mix, per-slot temperature, top-k and an exp-race draw with counter-based noise, one pass.

Semantics: :func:`dsm_kernels.reference.sample_tokens_ref`. A program owns ``ROWS`` whole rows held in registers
(one row on a GPU; many rows in the interpreter, where cost scales with the number of programs). No sort:

* top-k keeps the tokens whose logit is ``>=`` the k-th largest logit. That threshold is found by bisection over
  the order-preserving int32 image of the fp32 logits: 33 count passes over the registers, exact for any k, with
  no data-dependent trip count. (Exact ties at the threshold keep every tied token; ``torch.topk`` would keep an
  arbitrary subset of them. Random logits never tie.)
* the draw is ``argmax(p / -log(u))`` over kept tokens with ``u`` the reference's hash of (seed, step, row, token),
  so every backend and every CUDA-graph replay draws the same token. ``temperature <= 0`` gives the argmax.

Floating-point operations follow the reference's order (a true division by ``t``; no FMA contraction), so tokens
agree with the reference except on near-exact ties of two scores (last-bit differences of exp/log).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


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
def _sample_kernel(
    logits_ptr, null_ptr, temp_ptr, seed_ptr, step_ptr, out_ptr,
    B, V, top_k, cfg_coef, stride_l, stride_n,
    HAS_NULL: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_V)
    rmask = rows < B
    mask = rmask[:, None] & (cols[None, :] < V)
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_l + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_NULL:
        n = tl.load(null_ptr + rows[:, None].to(tl.int64) * stride_n + cols[None, :], mask=mask, other=0.0)
        n = n.to(tl.float32)
        x = n + (x - n) * cfg_coef
    x = tl.where(mask, x, float("-inf"))
    greedy = tl.argmax(x, axis=1)  # lowest index on ties, like torch

    keep = mask
    if (top_k > 0) & (top_k < V):
        # Order-preserving int32 image of fp32 (flip the magnitude bits of negatives); padding sorts below all.
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        key = tl.where(mask, key, -0x80000000)
        lo = tl.min(tl.where(mask, key, 0x7FFFFFFF), axis=1).to(tl.int64)  # count(key >= lo) >= k
        hi = tl.max(key, axis=1).to(tl.int64) + 1  # count(key >= hi) = 0 < k
        for _ in range(33):  # hi - lo < 2**33 halves to 1: lo is then exactly the k-th largest key
            mid = lo + (hi - lo) // 2
            cnt = tl.sum((key >= mid[:, None]).to(tl.int32), axis=1)
            ge = cnt >= top_k
            lo = tl.where(ge, mid, lo)
            hi = tl.where(ge, hi, mid)
        keep = mask & (key >= lo[:, None])

    t = tl.load(temp_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    xs = x / tl.where(t > 0, t, 1.0)[:, None]  # a true division, as the reference's CPU `x / t`
    e = tl.exp(xs - tl.max(xs, axis=1)[:, None])
    den = tl.sum(e, axis=1)
    p = e / tl.where(den > 0, den, 1.0)[:, None]  # den == 0 only on padding rows

    seed = tl.load(seed_ptr + rows, mask=rmask, other=0).to(tl.uint32)  # low 32 bits, as the reference masks
    step = tl.load(step_ptr + rows, mask=rmask, other=0).to(tl.uint32)
    h = _hash32(_hash32(seed) ^ step)
    r = _hash32(h[:, None] ^ cols[None, :].to(tl.uint32)) >> 8
    u = (r.to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    score = tl.where(keep, p / -tl.log(u), -1.0)
    sampled = tl.argmax(score, axis=1)
    tok = tl.where(t > 0, sampled, greedy)
    tl.store(out_ptr + rows, tok.to(tl.int64), mask=rmask)


def _rows_per_program(B: int, block_v: int) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return min(triton.next_power_of_2(max(B, 1)), max(1, 2**19 // block_v))
    return 1


def sample_tokens_triton(
    logits, temperature, top_k, seeds, steps, *, null_logits=None, cfg_coef=1.0, out=None
) -> torch.Tensor:
    """Triton twin of :func:`~dsm_kernels.reference.sample_tokens_ref`; ``out`` ([B] int64) may be preallocated.

    ``temperature``: [B] fp32 tensor; ``top_k``: Python int (0 = all); ``seeds``/``steps``: [B] int64 tensors.
    """
    B, V = logits.shape
    assert logits.stride(1) == 1 and (null_logits is None or (null_logits.shape == logits.shape))
    assert temperature.shape == (B,) and seeds.shape == (B,) and steps.shape == (B,)
    if out is None:
        out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    nl = null_logits if null_logits is not None else logits
    assert nl.stride(1) == 1
    block_v = triton.next_power_of_2(V)
    rows = _rows_per_program(B, block_v)
    _sample_kernel[(triton.cdiv(B, rows),)](
        logits, nl, temperature, seeds, steps, out,
        B, V, int(top_k), float(cfg_coef), logits.stride(0), nl.stride(0),
        HAS_NULL=null_logits is not None, ROWS=rows, BLOCK_V=block_v,
        num_warps=16 if block_v >= 8192 else (8 if block_v >= 4096 else 4),
        enable_fp_fusion=False,  # keep the reference's rounding: no FMA in the CFG mix
    )  # fmt: skip
    return out
