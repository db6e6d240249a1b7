"""Thin Python wrappers over the compiled CUDA ops (``torch.ops.dsm.*`` registered by ``dsm_kernels._C``).

Each wrapper allocates the output unless one is given, normalises index dtypes (no-ops when the caller already
passes int64 ids / int32 tables) and calls the out-parameter op on the current stream. The extension is imported on
first use, so this module imports on machines without it.
"""

from __future__ import annotations

import importlib
import math
from functools import cache

import torch

from . import sm_count


@cache
def _ops():
    importlib.import_module("dsm_kernels._C")  # registers the TORCH_LIBRARY(dsm) schemas and CUDA impls
    return torch.ops.dsm


def multistream_embed_cuda(
    tokens, text_table, audio_tables, *, text_table2=None, cond=None, out_dtype=None, out=None
) -> torch.Tensor:
    """CUDA twin of :func:`~dsm_kernels.reference.multistream_embed_ref` (ids in ``[-1, V)``, unchecked on device)."""
    B, D = tokens.shape[0], text_table.shape[1]
    if out is None:
        out = torch.empty(B, D, dtype=out_dtype or text_table.dtype, device=tokens.device)
    _ops().multistream_embed(
        out, tokens.long(), text_table, audio_tables, text_table2, None if cond is None else cond.float()
    )
    return out


def append_kv_cuda(k_cache, v_cache, k, v, slot_mapping) -> None:
    """CUDA twin of :func:`~dsm_kernels.reference.append_kv_ref` (in place)."""
    _ops().append_kv(k_cache, v_cache, k, v, slot_mapping.long())


def decode_num_splits(batch: int, heads: int, context: int, resident: int) -> int:
    """Split-K factor from static shapes only (a captured graph stays valid as slots grow).

    The launch is ``batch * heads * splits`` blocks, ``resident`` of which run at once (SMs x blocks per SM). A last
    wave that is only partly filled leaves bandwidth unused (1024 blocks over 660 resident ones run as 1.55 waves), so
    take the fewest splits whose last wave is >= 90% full, else the fullest; each split spans >= 32 positions."""
    base, best, best_fill = batch * heads, 1, 0.0
    for splits in range(1, max(1, context // 32) + 1):
        blocks = base * splits
        fill = blocks / (math.ceil(blocks / resident) * resident)
        if fill >= 0.9:
            return splits
        if fill > best_fill:
            best, best_fill = splits, fill
    return best


@cache
def _decode_resident_blocks(index: int, dtype: torch.dtype, cache_dtype: torch.dtype, head_dim: int) -> int:
    """Decode blocks resident on the whole device at once, from the CUDA occupancy calculator."""
    q = torch.empty(1, 1, head_dim, dtype=dtype, device=torch.device("cuda", index))
    per_sm = _ops().paged_decode_blocks_per_sm(q, torch.empty(1, dtype=cache_dtype, device=q.device))
    return max(1, per_sm) * sm_count(q.device)


def paged_decode_attention_cuda(
    q, k_cache, v_cache, block_table, seq_lens, *, context, scale=None, out=None, num_splits=None, counters=None
) -> torch.Tensor:
    """CUDA twin of :func:`~dsm_kernels.reference.paged_decode_attention_ref`; head_dim 16/32/64/128/256.

    ``counters`` (int32, >= B*H, all 0, used by one launch at a time): the last split of each head merges the
    splits, re-arming its counter; without it a second kernel merges."""
    B, H, D = q.shape
    if q.stride(2) != 1:  # the kernel reads rows of head_dim; the reference takes any layout
        q = q.contiguous()
    block_table = block_table.int()
    if block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_splits is None:
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        num_splits = decode_num_splits(B, H, context, _decode_resident_blocks(index, q.dtype, k_cache.dtype, D))
    scale = D**-0.5 if scale is None else scale
    _ops().paged_decode_attention(
        out, q, k_cache, v_cache, block_table, seq_lens.int(), int(context), float(scale), int(num_splits),
        counters,
    )
    return out


def sample_tokens_cuda(
    logits, temperature, top_k, seeds, steps, *, null_logits=None, cfg_coef=1.0, out=None
) -> torch.Tensor:
    """CUDA twin of :func:`~dsm_kernels.reference.sample_tokens_ref`; vocab <= 16384."""
    if out is None:
        out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    if logits.stride(1) != 1:  # the kernel reads rows; the reference takes any layout
        logits = logits.contiguous()
    if null_logits is not None and null_logits.stride(1) != 1:
        null_logits = null_logits.contiguous()
    _ops().sample_tokens(
        out, logits, null_logits, float(cfg_coef), temperature.float(), int(top_k), seeds.long(), steps.long()
    )
    return out
