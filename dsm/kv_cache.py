"""Paged KV cache of the temporal transformer: one page pool per layer, a ring of pages per stream slot.

Slot ``b`` owns ``pages_per_slot`` pages listed in ``block_table[b]``; absolute position ``p`` lives in
``block_table[b, (p // page_size) % pages_per_slot]`` (see ``dsm_kernels.reference``). Positions are thus stored
modulo ``pages_per_slot * page_size``, and a ring of ``ceil(context / page_size)`` pages always holds the last
``context`` positions distinctly, so a stream running for hours uses bounded memory and every tensor shape stays
static (CUDA-graph friendly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def pages_per_slot(context: int, page_size: int) -> int:
    return -(-context // page_size)


@dataclass
class PagedKVCache:
    k: torch.Tensor  # [L, num_pages, page_size, H, D]
    v: torch.Tensor  # [L, num_pages, page_size, H, D]
    block_table: torch.Tensor  # [B, pages_per_slot] int32
    context: int
    # [B * H] int32 at 0: the decode kernels' split-merge counters, shared by the layers (each launch leaves them at 0)
    counters: torch.Tensor | None = None

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @classmethod
    def allocate(cls, *, num_layers: int, batch_size: int, heads: int, head_dim: int, context: int,
                 page_size: int = 16, dtype=torch.float32, device="cpu") -> PagedKVCache:
        """A cache where slot ``b`` statically owns pages ``[b * n, (b + 1) * n)`` (the engine reassigns pages)."""
        if context is None or context <= 0:
            raise ValueError(f"a streaming KV cache needs a positive context, got {context!r}")
        n = pages_per_slot(context, page_size)
        shape = (num_layers, batch_size * n, page_size, heads, head_dim)
        # Zero-filled so that never-written rows cannot inject NaN/inf through a masked-out score.
        k = torch.zeros(shape, dtype=dtype, device=device)
        v = torch.zeros(shape, dtype=dtype, device=device)
        table = torch.arange(batch_size * n, dtype=torch.int32, device=device).view(batch_size, n)
        return cls(k, v, table, context, torch.zeros(batch_size * heads, dtype=torch.int32, device=device))
