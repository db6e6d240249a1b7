"""Mimi building blocks as plain functions over explicit weights and explicit state (DSM-SPEC §7).

Every op is written so that one streaming step has static shapes and no host synchronisation: states are updated
with ``torch.where`` on a per-row ``exec_mask`` instead of Python branches, so a step can later be captured in a
CUDA graph. The op sequence (layouts included) mirrors the moshi reference so that fp32 CPU results are bitwise
equal; comments say where a layout choice is load-bearing for that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor,
    prev: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    exec_mask: torch.Tensor,
    dilation: int = 1,
    groups: int = 1,
) -> torch.Tensor:
    """Streaming causal conv: left context is the ``Ke - S`` previous input samples (not ``Ke - 1``, §7.2).

    ``prev`` is ``[B, C_in, Ke - S]`` (``None`` when ``Ke == S``). Returns the output; rows
    whose ``exec_mask`` is false keep their old ``prev``. ``prev`` is updated in place (static addresses for
    graph capture).
    """
    if prev is None:
        return F.conv1d(x, weight, bias, stride, 0, dilation, groups)
    tp = prev.shape[-1]
    x = torch.cat([prev, x], dim=-1)
    y = F.conv1d(x, weight, bias, stride, 0, dilation, groups)
    prev.copy_(torch.where(exec_mask.view(-1, 1, 1), x[..., -tp:], prev))
    return y


def conv_transpose1d(
    x: torch.Tensor,
    partial: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    exec_mask: torch.Tensor,
    groups: int = 1,
) -> torch.Tensor:
    """Streaming transposed conv: overlap-add the stored ``K - S`` tail, emit ``T * S`` samples (§7.2).

    The stored tail excludes the bias, since the bias is added again when the next call's output overlaps it.
    Offline use is the same call from a zero ``partial``. ``partial`` is updated in place.
    """
    pt = partial.shape[-1]
    y = F.conv_transpose1d(x, weight, bias, stride, 0, 0, groups)
    head = y[..., :pt] + partial
    tail = y[..., -pt:]
    if bias is not None:
        tail = tail - bias[:, None]
    out = torch.cat([head, y[..., pt:-pt]], dim=-1)
    partial.copy_(torch.where(exec_mask.view(-1, 1, 1), tail, partial))
    return out


@dataclass
class LayerWeights:
    """One Mimi transformer layer (§7.5): pre-LayerNorm attention and GELU MLP, both behind a LayerScale."""

    norm1_w: torch.Tensor
    norm1_b: torch.Tensor
    in_proj: torch.Tensor  # [3*dim, dim]; rows = [q | k | v], head-major inside each block
    out_proj: torch.Tensor
    ls1: torch.Tensor
    norm2_w: torch.Tensor
    norm2_b: torch.Tensor
    linear1: torch.Tensor
    linear2: torch.Tensor
    ls2: torch.Tensor


def rope(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, max_period: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved RoPE on ``[B, H, T, D]`` at absolute positions ``pos[b] + t`` (§2.5).

    The frequency is ``exp(i * c)`` with ``c`` a host double rounded to fp32, in this exact order, for bit parity.
    """
    b, _, t, d = q.shape
    ds = torch.arange(d // 2, device=q.device, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / d))
    ts = (pos.float().view(-1, 1) + torch.arange(t, device=q.device, dtype=torch.float32)).view(b, 1, -1, 1)
    cos, sin = torch.cos(freqs * ts), torch.sin(freqs * ts)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.view(*x.shape[:-1], d // 2, 2)
        xr, xi = x[..., 0].float(), x[..., 1].float()
        return torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1).view(*x.shape[:-2], d)

    return rotate(q), rotate(k)


@dataclass
class KVState:
    """Ring KV cache of one transformer: per layer ``[B, H, capacity, D]``, plus the tokens-written counter."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    pos: torch.Tensor  # [B] int64: tokens written since reset = RoPE offset of the next token


def init_kv_state(
    batch_size: int, num_layers: int, num_heads: int, head_dim: int, capacity: int, device, dtype=torch.float32
) -> KVState:
    shape = (batch_size, num_heads, capacity, head_dim)
    return KVState(
        keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)],
        values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)],
        pos=torch.zeros(batch_size, device=device, dtype=torch.long),
    )


def transformer_forward(
    x: torch.Tensor,
    layers: list[LayerWeights],
    num_heads: int,
    context: int,
    max_period: float,
    kv: KVState | None,
    exec_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Run the transformer on conv-layout ``x`` ``[B, C, T]``; returns conv layout again.

    With ``kv`` (streaming) keys go to a ring of exactly ``context`` slots and all ``T`` new tokens are written
    before attending, so after wrap-around the first of the two tokens of a Mimi call sees one key fewer (§2.6),
    exactly like the reference. Without ``kv`` (whole file) every query sees the last ``context`` positions.
    ``kv`` is updated in place; rows with a false ``exec_mask`` keep it bitwise unchanged.
    """
    b, c, t = x.shape
    h = x.transpose(1, 2)  # kept as a strided view, like the reference
    device = x.device
    if kv is None:
        pos = torch.zeros(b, device=device, dtype=torch.long)
        pos_k = torch.arange(t, device=device, dtype=torch.long).expand(b, -1)
        new_pos = pos
        write_idx = None
    else:
        assert exec_mask is not None
        capacity = kv.keys[0].shape[2]
        pos = kv.pos
        write_idx = (pos.view(-1, 1) + torch.arange(t, device=device, dtype=torch.long)) % capacity  # [B, T]
        slots = torch.arange(capacity, device=device, dtype=torch.long)
        last = pos.view(-1, 1) + t - 1
        delta_slot = slots - last % capacity
        pos_k = torch.where(delta_slot <= 0, last + delta_slot, last + delta_slot - capacity)
        new_pos = torch.where(exec_mask, pos + t, pos)
        pos_k = torch.where(slots >= new_pos.view(-1, 1), torch.full_like(pos_k, -1), pos_k)
    pos_q = pos.view(-1, 1, 1) + torch.arange(t, device=device, dtype=torch.long).view(-1, 1)
    delta = pos_q - pos_k[:, None]
    mask = ((pos_k[:, None] >= 0) & (delta >= 0) & (delta < context))[:, None]  # [B, 1, T, S]

    for i, lw in enumerate(layers):
        y = F.layer_norm(h, (c,), lw.norm1_w, lw.norm1_b, 1e-5)
        q, k, v = F.linear(y, lw.in_proj).view(b, t, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
        q, k = rope(q, k, pos, max_period)
        if kv is not None:
            idx = write_idx.view(b, 1, t, 1).expand(-1, num_heads, t, c // num_heads)
            keep = exec_mask.view(-1, 1, 1, 1)
            kc, vc = kv.keys[i], kv.values[i]
            # Inactive rows write back what was there, so their cache stays bitwise frozen.
            kc.scatter_(2, idx, torch.where(keep, k, kc.gather(2, idx)))
            vc.scatter_(2, idx, torch.where(keep, v, vc.gather(2, idx)))
            k, v = kc, vc
        a = F.scaled_dot_product_attention(q, k, v, mask, dropout_p=0.0)
        a = F.linear(a.transpose(1, 2).reshape(b, t, c), lw.out_proj)
        h = h + lw.ls1 * a
        y = F.layer_norm(h, (c,), lw.norm2_w, lw.norm2_b, 1e-5)
        h = h + lw.ls2 * F.linear(F.gelu(F.linear(y, lw.linear1)), lw.linear2)
    if kv is not None:
        kv.pos.copy_(new_pos)
    return h.transpose(1, 2)


def euclidean_codes(r: torch.Tensor, codebook_aug: torch.Tensor) -> torch.Tensor:
    """Nearest codebook row for each row of ``r`` ``[N, D]`` -> ``[N]`` int64, first index on ties.

    Same arithmetic as ``torch.cdist(p=2)`` on its matrix-multiply path (taken for > 25 candidates): one GEMM of
    ``[-2r, |r|^2, 1]`` against the precomputed ``[c, 1, |c|^2]``, clamp at 1e-30, sqrt. Near-ties flip with any
    other formula, so codes only match the reference bit for bit this way. ``codebook_aug`` is ``[1, K, D + 2]``.
    """
    x = r[None]
    norm = x.pow(2).sum(-1, keepdim=True)
    x_aug = torch.cat([x.mul(-2), norm, torch.ones_like(norm)], dim=-1)
    dist = x_aug.matmul(codebook_aug.mT).clamp_min(1e-30).sqrt()
    return dist[0].argmin(dim=-1)


def augment_codebook(codebook: torch.Tensor) -> torch.Tensor:
    """``[K, D]`` -> ``[1, K, D + 2]`` rows ``[c, 1, |c|^2]`` (the constant half of :func:`euclidean_codes`)."""
    c = codebook[None]
    norm = c.pow(2).sum(-1, keepdim=True)
    return torch.cat([c, torch.ones_like(norm), norm], dim=-1).contiguous()


@dataclass
class RVQGroup:
    """One residual VQ group: ``input_proj`` to the 256-d code space, codebooks, ``output_proj`` back."""

    input_proj: torch.Tensor  # [256, 512, 1]
    output_proj: torch.Tensor  # [512, 256, 1]
    codebooks: list[torch.Tensor]  # [2048, 256] each
    codebooks_aug: list[torch.Tensor]

    def encode(self, latent: torch.Tensor, n_q: int) -> torch.Tensor:
        """``[B, 512, T]`` -> codes ``[B, n_q, T]``; residuals live in the projected space (pitfall 18)."""
        b, _, t = latent.shape
        r = F.conv1d(latent, self.input_proj)
        codes = []
        for level in range(n_q):
            flat = r.transpose(1, 2).reshape(-1, r.shape[1])
            c = euclidean_codes(flat, self.codebooks_aug[level]).view(b, t)
            r = r - F.embedding(c, self.codebooks[level]).transpose(1, 2)
            codes.append(c)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[B, n, T]`` -> ``[B, 512, T]``; levels summed in order starting from an exact zero."""
        q = torch.zeros((), device=codes.device, dtype=self.input_proj.dtype)
        for level in range(codes.shape[1]):
            q = q + F.embedding(codes[:, level], self.codebooks[level]).transpose(1, 2)
        return F.conv1d(q, self.output_proj)
