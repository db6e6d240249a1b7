"""Triton kernels for the elementwise glue of one temporal decode step (twins of the ``*_ref`` ops in
``dsm_kernels.reference``): residual add + fp32 RMSNorm, interleaved RoPE of q and k with k and v written straight into
the paged cache, the SiLU gate, and the classifier heads' probabilities (stt-1b's semantic VAD).

At batch 1 a decode step is launch-bound: the unfused glue costs ~50 small kernels per layer (the norm alone is 8,
RoPE ~30), each ~3 us even inside a CUDA graph, against ~0.7 ms for streaming the 1B model's weights once. These
kernels make it one launch per piece. Arithmetic is fp32; loads and stores use the tensors' dtypes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_attention import _check_heads_contiguous, _round_e4m3, cache_saturation
from .triton_common import unit_stride


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, d_ptr, s_ptr, a_ptr, y_ptr, D, eps,
    HAS_DELTA: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        delta = tl.load(d_ptr + row * D + offs, mask=mask, other=0.0)
        if HAS_SCALE:  # scale * delta in delta's dtype, rounded before the add (as the module and the reference)
            scale = tl.load(s_ptr + offs, mask=mask, other=0.0).to(delta.dtype)
            delta = (scale.to(tl.float32) * delta.to(tl.float32)).to(delta.dtype)
        delta = delta.to(tl.float32)
        stored = (x + delta).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + row * D + offs, stored, mask=mask)
        x = stored.to(tl.float32)  # the norm reads the residual as stored, as the unfused model does
    var = eps + tl.sum(x * x, axis=0) / D
    alpha = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * (alpha * (1.0 / tl.sqrt(var)))
    tl.store(y_ptr + row * D + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def add_rms_norm_triton(x, alpha, eps, delta=None, scale=None, out=None):
    """Triton twin of :func:`~dsm_kernels.reference.add_rms_norm_ref` (``x`` updated in place; ``out``: the
    normalised output's buffer, else a new tensor)."""
    B, D = x.shape
    if not x.is_contiguous() or (delta is not None and (not delta.is_contiguous() or delta.shape != x.shape)):
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} and delta must be contiguous [B, d]")
    y = torch.empty_like(x) if out is None else out
    if B == 0:
        return x, y
    alpha, scale = unit_stride(alpha.reshape(-1), scale)
    _add_rms_norm_kernel[(B,)](
        x, delta if delta is not None else x, scale if scale is not None else alpha, alpha, y, D,
        float(eps), HAS_DELTA=delta is not None, HAS_SCALE=scale is not None,
        BLOCK=triton.next_power_of_2(D), num_warps=4 if D <= 2048 else 8,
    )  # fmt: skip
    return x, y


@triton.jit
def _rope_append_kernel(
    qkv_ptr, pos_ptr, f_ptr, slot_ptr, q_ptr, kc_ptr, vc_ptr,
    stride_b, H, HKV, page_size, stride_kp, stride_ks, stride_vp, stride_vs,
    HALF: tl.constexpr, BLOCK: tl.constexpr, SAT: tl.constexpr,
):  # fmt: skip
    """Programs (row, head): heads [0, H) rotate q into ``q``; [H, H + HKV) rotate k, [H + HKV, H + 2 HKV) copy v,
    both into the row's cache slot (skipped where the slot is -1)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    src = qkv_ptr + b * stride_b + h * (2 * HALF)
    x0 = tl.load(src + 2 * i, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(src + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
    if h < H + HKV:  # q or k: rotate, rounded to the projection's dtype as the unfused path stores it
        angle = tl.load(f_ptr + i, mask=mask, other=0.0) * tl.load(pos_ptr + b).to(tl.float32)
        c, s = tl.cos(angle), tl.sin(angle)
        r0 = (x0 * c - x1 * s).to(qkv_ptr.dtype.element_ty).to(tl.float32)
        r1 = (x0 * s + x1 * c).to(qkv_ptr.dtype.element_ty).to(tl.float32)
    else:
        r0, r1 = x0, x1
    if h < H:
        dst = q_ptr + (b * H + h) * (2 * HALF)
        tl.store(dst + 2 * i, r0.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + 2 * i + 1, r1.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        row = tl.load(slot_ptr + b).to(tl.int64)
        if row >= 0:
            page, off = row // page_size, row % page_size
            if h < H + HKV:
                dst = kc_ptr + page * stride_kp + off * stride_ks + (h - H) * (2 * HALF)
            else:
                dst = vc_ptr + page * stride_vp + off * stride_vs + (h - H - HKV) * (2 * HALF)
            if SAT > 0:  # fp8 e4m3 cache
                r0 = _round_e4m3(r0, SAT)
                r1 = _round_e4m3(r1, SAT)
            tl.store(dst + 2 * i, r0.to(kc_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + 2 * i + 1, r1.to(kc_ptr.dtype.element_ty), mask=mask)


def rope_append_kv_triton(qkv, positions, inv_freq, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads,
                          out=None):
    """Triton twin of :func:`~dsm_kernels.reference.rope_append_kv_ref` (caches written in place; ``out``: the
    rotated q's buffer)."""
    B = qkv.shape[0]
    half = inv_freq.shape[0]
    D = 2 * half
    if qkv.stride(-1) != 1 or qkv.shape[1] < (num_heads + 2 * num_kv_heads) * D:
        raise ValueError(f"rope_append_kv: qkv {tuple(qkv.shape)} must be row-contiguous [B, (H + 2 Hkv) D]")
    if k_cache.shape[2:] != (num_kv_heads, D) or v_cache.shape != k_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"rope_append_kv: caches {tuple(k_cache.shape)} must be [pages, page, {num_kv_heads}, {D}]")
    _check_heads_contiguous(k_cache, "k_cache")
    _check_heads_contiguous(v_cache, "v_cache")
    q = torch.empty(B, num_heads, D, dtype=qkv.dtype, device=qkv.device) if out is None else out
    if B == 0:
        return q
    positions, inv_freq, slot_mapping = unit_stride(positions, inv_freq, slot_mapping)
    _rope_append_kernel[(B, num_heads + 2 * num_kv_heads)](
        qkv, positions, inv_freq, slot_mapping, q, k_cache, v_cache,
        qkv.stride(0), num_heads, num_kv_heads, k_cache.shape[1],
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        HALF=half, BLOCK=triton.next_power_of_2(half), SAT=cache_saturation(k_cache.dtype),
        num_warps=1 if half <= 64 else 2,
    )  # fmt: skip
    return q


@triton.jit
def _silu_mul_kernel(h_ptr, o_ptr, F, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < F
    a = tl.load(h_ptr + b * 2 * F + j, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(h_ptr + b * 2 * F + F + j, mask=mask, other=0.0).to(tl.float32)
    act = (a / (1.0 + tl.exp(-a))).to(o_ptr.dtype.element_ty).to(tl.float32)  # rounded like F.silu's output
    tl.store(o_ptr + b * F + j, (act * g).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _head_probs_kernel(x_ptr, w_ptr, out_ptr, D, C, HEADS, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_D: tl.constexpr):  # fmt: skip
    """Grid (B,): row b's logits of every head ([BLOCK_H, BLOCK_C] tile, head h's class c at weight row h C + c),
    fp32 dots rounded to x's dtype, then each head's softmax in fp32 and its class-0 probability."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None, None]
    c = tl.arange(0, BLOCK_C)[None, :, None]
    rmask = (h < HEADS) & (c < C)
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + b * D + d, mask=d < D, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + (h * C + c) * D + d[None, None, :], mask=rmask & (d < D)[None, None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, None, :], axis=2)
    logits = acc.to(x_ptr.dtype.element_ty).to(tl.float32)  # F.linear's output dtype
    cls = tl.arange(0, BLOCK_C)[None, :]
    logits = tl.where(cls < C, logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p0 = tl.sum(tl.where(cls == 0, e, 0.0), axis=1) / tl.sum(e, axis=1)
    hh = tl.arange(0, BLOCK_H)
    tl.store(out_ptr + b * HEADS + hh, p0, mask=hh < HEADS)


def head_probs_triton(x, weight, heads, out=None):
    """Triton twin of :func:`~dsm_kernels.reference.head_probs_ref`: one launch (the linear layer and the softmax in
    one program per row), where the module path takes a GEMM and a softmax."""
    B, D = x.shape
    C = weight.shape[0] // heads
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(B, heads, dtype=torch.float32, device=x.device) if out is None else out
    if B == 0:
        return out
    block_h, block_c = triton.next_power_of_2(heads), triton.next_power_of_2(C)
    block_d = max(16, min(triton.next_power_of_2(D), 4096 // (block_h * block_c)))
    _head_probs_kernel[(B,)](x, weight, out, D, C, heads, BLOCK_H=block_h, BLOCK_C=block_c, BLOCK_D=block_d,
                             num_warps=4)  # fmt: skip
    return out


def silu_mul_triton(h, out=None):
    """Triton twin of :func:`~dsm_kernels.reference.silu_mul_ref`."""
    B, F2 = h.shape
    if not h.is_contiguous() or F2 % 2:
        raise ValueError(f"silu_mul: h {tuple(h.shape)} must be contiguous [B, 2F]")
    F = F2 // 2
    out = torch.empty(B, F, dtype=h.dtype, device=h.device) if out is None else out
    if B == 0:
        return out
    block = min(1024, triton.next_power_of_2(F))
    _silu_mul_kernel[(B, triton.cdiv(F, block))](h, out, F, BLOCK=block, num_warps=4)
    return out
