"""TTS conditioning (DSM-SPEC §2.10): LUT and tensor conditioners, the sum and cross-attention fusers.

Conditioners stay in fp32 whatever the LM dtype, as in the reference.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from .config import ConditionerConfig, FuserConfig
from .layers import sin_embedding


@dataclass
class TensorInput:
    """A tensor condition: ``tensor`` [B, T, dim_in] with ``mask`` [B, T] (False = padded, replaced by padding)."""

    tensor: torch.Tensor
    mask: torch.Tensor


class Conditioner(nn.Module):
    def __init__(self, cfg: ConditionerConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.type == "lut":
            self.embed = nn.Embedding(cfg.n_bins + 1, cfg.dim)
            self.embed.weight.requires_grad_(False)
        self.output_proj = nn.Linear(cfg.dim, cfg.output_dim, bias=cfg.output_bias)
        self.output_proj.requires_grad_(False)
        if cfg.learn_padding:
            self.learnt_padding = nn.Parameter(torch.zeros(1, 1, cfg.output_dim), requires_grad=False)
        else:
            self.learnt_padding = None

    def lut_index(self, value: str | None) -> int:
        """Index of a LUT value; ``None`` is the padding row (masked)."""
        if value is None:
            return self.cfg.n_bins
        values = self.cfg.possible_values
        if values is None:
            raise ValueError(f"conditioner {self.cfg.name!r}: only fixed possible_values are supported")
        if value not in values:
            raise ValueError(f"conditioner {self.cfg.name!r}: unknown value {value!r}; expected one of {values}")
        return values.index(value)

    def forward(self, value) -> torch.Tensor:
        """``value``: list of str|None (lut) or a :class:`TensorInput` -> [B, T, output_dim] fp32."""
        device = self.output_proj.weight.device
        if self.cfg.type == "lut":
            idx = torch.tensor([self.lut_index(v) for v in value], device=device)[:, None]
            mask = torch.tensor([v is not None for v in value], device=device)[:, None]
            cond = self.embed(idx)
        else:
            cond, mask = value.tensor.to(device=device, dtype=torch.float32), value.mask.to(device)
            if cond.shape[1] == 0:
                cond = torch.zeros_like(cond)
        cond = self.output_proj(cond)
        maskf = mask.float()[..., None]
        if self.learnt_padding is not None:
            return cond * maskf + self.learnt_padding * (1 - maskf)
        return cond * maskf


class ConditionProvider(nn.Module):
    def __init__(self, conditioners: tuple[ConditionerConfig, ...]):
        super().__init__()
        self.conditioners = nn.ModuleDict({c.name: Conditioner(c) for c in conditioners})


def fuse_conditions(fuser: FuserConfig, conditions: dict[str, torch.Tensor]):
    """(sum [B, 1, d] or None, cross source [B, S, d] or None), fp32, from conditioned tensors by name."""
    total = None
    for name in fuser.sum:
        c = conditions[name]
        if c.shape[1] != 1:
            raise ValueError(f"sum condition {name!r} must have length 1, got shape {tuple(c.shape)}")
        total = c if total is None else total + c
    cross = None
    if fuser.cross:
        cross = torch.cat([conditions[name] for name in fuser.cross], dim=1)
        if fuser.cross_attention_pos_emb:
            pos = torch.arange(cross.shape[1], device=cross.device)[None]
            emb = sin_embedding(pos, cross.shape[-1], 10000.0, torch.float32).to(cross.dtype)
            cross = cross + fuser.cross_attention_pos_emb_scale * emb
    return total, cross


def null_condition_values(provider: ConditionProvider, values: dict) -> dict:
    """The CFG "null" conditions: LUT values become None, tensors zeros with mask False (DSM-SPEC §4.6)."""
    out = {}
    for name, v in values.items():
        if provider.conditioners[name].cfg.type == "lut":
            out[name] = [None] * len(v)
        else:
            out[name] = TensorInput(torch.zeros_like(v.tensor), torch.zeros_like(v.mask))
    return out


def condition_tensors(provider: ConditionProvider, fuser: FuserConfig, values: dict):
    """Run every conditioner on its value and fuse: returns (sum, cross) fp32 tensors (or None)."""
    missing = set(provider.conditioners) - set(values)
    if missing:
        raise ValueError(f"missing condition value(s) {sorted(missing)}")
    unknown = set(values) - set(provider.conditioners)
    if unknown:
        raise ValueError(f"unknown condition(s) {sorted(unknown)}; the model has {sorted(provider.conditioners)}")
    conds = {name: provider.conditioners[name](v) for name, v in values.items()}
    return fuse_conditions(fuser, conds)


def cross_length(provider: ConditionProvider, fuser: FuserConfig, values: dict) -> int:
    """Positions of the cross-attention source that ``values`` give (a lookup-table condition is one)."""
    return sum(values[n].tensor.shape[1] if provider.conditioners[n].cfg.type == "tensor" else 1 for n in fuser.cross)


def cross_page_keys(provider: ConditionProvider, fuser: FuserConfig, values: dict,
                    page_size: int) -> list[bytes] | None:
    """Content keys of one stream's cross source, page by page: equal keys mean equal source rows, hence equal K/V.

    Row ``p`` of the source depends only on position ``p`` and that position's input (a conditioner maps each row on
    its own: masked rows become the learnt padding), so a page's key digests its index and its rows' inputs and
    masks. Computed on the host from the values, with no device work. None when a value is a device tensor (reading
    it would wait for the device): the stream's pages are then not shared."""
    rows = []  # per cross condition: (name, length, per-row digest input)
    for name in fuser.cross:
        value = values[name]
        if provider.conditioners[name].cfg.type == "lut":
            rows.append((name, 1, lambda a, b, v=value: repr(v[0]).encode()))
            continue
        if value.tensor.device.type != "cpu" or value.mask.device.type != "cpu":
            return None
        t, m = value.tensor[0].to(torch.float32), value.mask[0].to(torch.bool)
        rows.append((name, t.shape[0], lambda a, b, t=t, m=m: _tensor_rows(t[a:b], m[a:b])))
    length = sum(n for _, n, _ in rows)
    keys = []
    for start in range(0, length, page_size):
        h = hashlib.blake2b(f"{start}:{page_size}".encode(), digest_size=32)
        offset = 0
        for name, n, data in rows:
            a, b = max(start, offset) - offset, min(start + page_size, offset + n) - offset
            if a < b:
                h.update(f"|{name}:{a}:{b}|".encode())
                h.update(data(a, b))
            offset += n
        keys.append(h.digest())
    return keys


def _tensor_rows(t: torch.Tensor, mask: torch.Tensor) -> bytes:
    """What rows of a tensor condition depend on: the mask and the rows it keeps. Masked rows become the padding,
    but only if finite (``cond * 0``), so their values count too unless all zero (the usual case: digesting only
    the kept rows is ~4x faster for one voice in five slots)."""
    out = mask.numpy().tobytes() + t[mask].numpy().tobytes()
    dropped = t[~mask]
    return out + dropped.numpy().tobytes() if dropped.any() else out


__all__ = ["ConditionProvider", "TensorInput", "condition_tensors", "cross_page_keys", "fuse_conditions",
           "null_condition_values"]
