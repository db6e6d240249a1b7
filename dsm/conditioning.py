"""TTS conditioning (DSM-SPEC §2.10): LUT and tensor conditioners, the sum and cross-attention fusers.

Conditioners stay in fp32 whatever the LM dtype, as in the reference.
"""

from __future__ import annotations

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


__all__ = ["ConditionProvider", "TensorInput", "condition_tensors", "fuse_conditions", "null_condition_values"]
