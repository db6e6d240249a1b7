"""Building blocks of the DSM transformers, with parameter names equal to the released checkpoints' tensor names.

Numerics follow moshi's eager path (DSM-SPEC §2.4-2.7): RMSNorm in fp32 (``rms_norm_f32``), interleaved RoPE
computed in fp32 from absolute positions, residual adds in the model dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "sigmoid": torch.sigmoid,
    "relu": F.relu,
}


class Weight(nn.Module):
    """A bias-free linear layer holding only ``weight`` (so names match ``*.weight`` checkpoint keys)."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Norm(nn.Module):
    """``rms_norm_f32`` / ``rms_norm`` (param ``alpha [1,1,d]``) or ``layer_norm`` / ``layer_norm_f32``."""

    def __init__(self, kind: str, dim: int):
        super().__init__()
        self.kind = kind
        if kind.startswith("rms_norm"):
            self.alpha = nn.Parameter(torch.ones(1, 1, dim), requires_grad=False)
            self.eps = 1e-8 if kind == "rms_norm_f32" else 1e-5
        else:
            self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
            self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)
            self.eps = 1e-8 if kind == "layer_norm_f32" else 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.kind.startswith("rms_norm"):
            if self.kind == "rms_norm_f32":
                x = x.float()
            var = self.eps + torch.mean(x**2, dim=-1, keepdim=True)
            # Product order matters for bit-compatibility: alpha * rsqrt(var) first.
            return (x * (self.alpha.view(-1).to(var) * torch.rsqrt(var))).to(dtype)
        if self.kind == "layer_norm_f32":
            return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps).to(dtype)
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale.to(x) * x


def rope_frequencies(head_dim: int, max_period: float, device) -> torch.Tensor:
    ds = torch.arange(head_dim // 2, device=device, dtype=torch.float32)
    return torch.exp(ds * (-math.log(max_period) * 2 / head_dim))


def apply_rope(x: torch.Tensor, positions: torch.Tensor, max_period: float) -> torch.Tensor:
    """Interleaved RoPE. ``x``: [..., T, H, D]; ``positions``: broadcastable to [..., T] (absolute, int)."""
    D = x.shape[-1]
    freqs = rope_frequencies(D, max_period, x.device)
    angle = freqs * positions.float()[..., None, None]  # [..., T, 1, D/2]
    cos, sin = torch.cos(angle), torch.sin(angle)
    pairs = x.view(*x.shape[:-1], D // 2, 2)
    xr, xi = pairs[..., 0].float(), pairs[..., 1].float()
    out = torch.stack([(xr * cos - xi * sin).to(x.dtype), (xr * sin + xi * cos).to(x.dtype)], dim=-1)
    return out.view(x.shape)


def sin_embedding(positions: torch.Tensor, dim: int, max_period: float, dtype: torch.dtype) -> torch.Tensor:
    """Additive sinusoidal embedding ``[cos | sin]`` (half split); ``positions``: [...] int -> [..., dim]."""
    half = dim // 2
    pos = positions.to(dtype)[..., None]
    adim = torch.arange(half, device=positions.device, dtype=dtype)
    period = torch.full([], max_period, device=positions.device, dtype=dtype)
    phase = pos / (period ** (adim / (half - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class ScaledEmbedding(nn.Module):
    """moshi's ``ScaledEmbedding``: id -1 gives zeros; optional low-rank projection or demuxed second stream."""

    def __init__(self, num: int, dim: int, *, low_rank: int | None = None, demux: bool = False, norm: bool = False):
        super().__init__()
        self.num = num
        self.weight = nn.Parameter(torch.empty(num, low_rank or dim), requires_grad=False)
        self.low_rank = Weight(dim, low_rank) if low_rank is not None else None
        self.norm = Norm("layer_norm", low_rank or dim) if norm else None
        self.demux = demux
        if demux:
            self.out1 = Weight(dim, low_rank or dim)
            self.out2 = Weight(dim, low_rank or dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_zero = (ids == -1)[..., None]
        ids = ids.clamp(min=0)
        if self.demux:
            first = F.embedding(ids % self.num, self.weight)
            second = ids // self.num - 1
            second_zero = (second < 0)[..., None]
            second = F.embedding(second.clamp(min=0), self.weight)
            y = self.out1(first) + torch.where(second_zero, first.new_zeros(()), self.out2(second))
            return torch.where(is_zero, y.new_zeros(()), y)
        y = F.embedding(ids, self.weight)
        if self.norm is not None:
            y = self.norm(y)
        y = torch.where(is_zero, y.new_zeros(()), y)
        if self.low_rank is not None:
            y = self.low_rank(y)
        return y

    def fused_tables(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Full-width lookup tables for the fused multistream embedding kernel.

        Plain tables are used as they are; a demux table is projected once through ``out1``/``out2`` (a gather
        commutes with a row-wise linear map), so the kernel only gathers and sums.
        """
        if self.demux:
            return self.out1(self.weight), self.out2(self.weight)
        if self.low_rank is not None or self.norm is not None:
            raise ValueError("fused tables need a plain or demux embedding")
        return self.weight, None


def _gated_block(dim: int, hidden: int) -> nn.Module:
    m = nn.Module()
    m.linear_in = Weight(2 * hidden, dim)
    m.linear_out = Weight(dim, hidden)
    return m


def gated_hidden(dim: int, dim_feedforward: int) -> int:
    """moshi's hidden width of a gated FFN (DSM-SPEC §2.7)."""
    return (21 * dim) // 8 if dim_feedforward == 4 * dim else (2 * dim_feedforward) // 3


class Attention(nn.Module):
    """Projections of a (self or cross) attention: stacked ``in_proj_weight [sets*3d, d]``, ``out_proj.weight``."""

    def __init__(self, dim: int, num_heads: int, sets: int = 1, kv_repeat: int = 1):
        super().__init__()
        self.dim, self.num_heads, self.sets = dim, num_heads, sets
        self.kv_heads = num_heads // kv_repeat
        kv_dim = (dim // num_heads) * self.kv_heads
        self.qkv_dim = dim + 2 * kv_dim
        self.in_proj_weight = nn.Parameter(torch.empty(sets * self.qkv_dim, dim), requires_grad=False)
        self.out_proj = Weight(sets * dim, dim)

    def qkv(self, x: torch.Tensor, weight_set: int = 0):
        """``x`` [..., d] -> q [..., H, D], k/v [..., Hkv, D]."""
        w = self.in_proj_weight[weight_set * self.qkv_dim : (weight_set + 1) * self.qkv_dim]
        y = F.linear(x, w)
        D = self.dim // self.num_heads
        q, k, v = y.split([self.dim, self.kv_heads * D, self.kv_heads * D], dim=-1)
        shape = x.shape[:-1]
        return q.view(*shape, self.num_heads, D), k.view(*shape, self.kv_heads, D), v.view(*shape, self.kv_heads, D)

    def cross_kv(self, src: torch.Tensor):
        """Cross-attention K/V of a source [B, S, d] -> [B, H, S, D] each (computed once per stream)."""
        kv = F.linear(src, self.in_proj_weight[self.dim :])
        D = self.dim // self.num_heads
        k, v = kv.view(*src.shape[:-1], 2, self.num_heads, D).unbind(-3)
        return k.transpose(1, 2), v.transpose(1, 2)

    def cross_q(self, x: torch.Tensor) -> torch.Tensor:
        D = self.dim // self.num_heads
        return F.linear(x, self.in_proj_weight[: self.dim]).view(*x.shape[:-1], self.num_heads, D)

    def out(self, x: torch.Tensor, weight_set: int = 0) -> torch.Tensor:
        w = self.out_proj.weight[weight_set * self.dim : (weight_set + 1) * self.dim]
        return F.linear(x, w)


class TransformerLayer(nn.Module):
    """Pre-norm layer: self-attention, optional cross-attention, FFN (gated: ``gating[.j]``; plain: ``linear1/2``)."""

    def __init__(self, dim: int, num_heads: int, dim_feedforward: int, *, norm: str, gating: str,
                 layer_scale: float | None, sets: int, cross_attention: bool, kv_repeat: int = 1):
        super().__init__()
        self.norm1 = Norm(norm, dim)
        self.self_attn = Attention(dim, num_heads, sets, kv_repeat)
        self.cross_attention = Attention(dim, num_heads) if cross_attention else None
        if cross_attention:
            self.norm_cross = Norm("layer_norm", dim)
        self.norm2 = Norm(norm, dim)
        self.activation = ACTIVATIONS.get(gating)
        if gating == "none":
            self.linear1 = Weight(dim_feedforward, dim)
            self.linear2 = Weight(dim, dim_feedforward)
        else:
            hidden = gated_hidden(dim, dim_feedforward)
            blocks = [_gated_block(dim, hidden) for _ in range(sets)]
            self.gating = nn.ModuleList(blocks) if sets > 1 else blocks[0]
        scaled = layer_scale is not None
        self.layer_scale_1 = LayerScale(dim) if scaled else nn.Identity()
        self.layer_scale_2 = LayerScale(dim) if scaled else nn.Identity()
        if cross_attention:
            self.layer_scale_cross = LayerScale(dim) if scaled else nn.Identity()

    def ffn(self, x: torch.Tensor, weight_set: int = 0) -> torch.Tensor:
        if self.activation is None:
            return self.linear2(F.gelu(self.linear1(x)))
        g = self.gating[weight_set] if isinstance(self.gating, nn.ModuleList) else self.gating
        h = g.linear_in(x)
        h = h.view(*h.shape[:-1], 2, -1)
        return g.linear_out(self.activation(h[..., 0, :]) * h[..., 1, :])
