"""Paged KV caches of the temporal transformer: one page pool per layer, a ring of pages per stream slot
(:class:`PagedKVCache`, self-attention), and fixed page lists over a shared pool (:class:`CrossKVCache`,
cross-attention to the condition).

Slot ``b`` owns ``pages_per_slot`` pages listed in ``block_table[b]``; absolute position ``p`` lives in
``block_table[b, (p // page_size) % pages_per_slot]`` (see ``dsm_kernels.reference``). Positions are thus stored
modulo ``pages_per_slot * page_size``, and a ring of ``ceil(context / page_size)`` pages always holds the last
``context`` positions distinctly, so a stream running for hours uses bounded memory and every tensor shape stays
static (CUDA-graph friendly).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from dsm_kernels import counter_words


def pages_per_slot(context: int, page_size: int) -> int:
    return -(-context // page_size)


def memory_room(device: torch.device) -> tuple[int, str] | None:
    """(bytes, words) an allocation on ``device`` can have at most: a GPU's free memory plus what torch's allocator
    holds unused; a CPU's physical memory (Linux overcommits, so only a size that could never fit is caught, before
    the page fills of ``torch.zeros`` meet the OOM killer). None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device), "free"
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "of memory"
        except (AttributeError, OSError, ValueError):
            return None
    return None


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def zeros_kv(shape: tuple[int, ...], dtype: torch.dtype, device, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A zeroed K and V pool of ``shape``, refused first (torch.OutOfMemoryError naming ``what`` and the sizes) when
    the two cannot fit on ``device``: a batch or context too large then says which cache, instead of failing inside
    the allocator or, on a CPU, being killed. Zero-filled so that never-written rows cannot inject NaN/inf through a
    masked-out score."""
    device = torch.device(device)
    need = 2 * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    room = memory_room(device)
    if room is not None and need > room[0]:
        raise torch.OutOfMemoryError(
            f"{what} needs {_size(need)} for K and V ({' x '.join(map(str, shape))} {str(dtype)[6:]}), and {device} "
            f"has {_size(room[0])} {room[1]}")
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


@dataclass
class PagedKVCache:
    k: torch.Tensor  # [L, num_pages, page_size, H, D]
    v: torch.Tensor  # [L, num_pages, page_size, H, D]
    block_table: torch.Tensor  # [B, pages_per_slot] int32
    context: int
    # [dsm_kernels.counter_words(B, H)] int32 at 0: the decode kernels' split-merge counters, shared by the layers,
    # and the persistent kernels' barrier words (each launch leaves them at 0, one launch at a time)
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
        k, v = zeros_kv(shape, dtype, device, f"the KV cache of {batch_size} rows x context {context}")
        table = torch.arange(batch_size * n, dtype=torch.int32, device=device).view(batch_size, n)
        counters = torch.zeros(counter_words(batch_size, heads), dtype=torch.int32, device=device)
        return cls(k, v, table, context, counters)


def cross_page_size(length: int, limit: int = 128) -> int:
    """Page size of a cross-attention source of ``length`` positions: its largest divisor <= ``limit``, so the pages
    tile it exactly (the TTS's 625 positions, 5 voice slots of 125 frames, give one page per voice slot)."""
    return max(p for p in range(1, min(length, limit) + 1) if length % p == 0)


@dataclass
class CrossKVCache:
    """Cross-attention K/V in pages, which rows may share: row ``b`` attends over the ``length`` positions stored in
    pages ``block_table[b]`` (page ``j`` holds positions ``[j * page_size, (j + 1) * page_size)``).

    The condition's K/V is computed once per stream and never changes, so pages whose source rows are equal (the
    learnt padding of unused voice slots, or a voice many streams use) are stored and read once. It is read with
    ``dsm_kernels.paged_decode_attention`` (``seq_lens == context == length``: every position is visible)."""

    k: torch.Tensor  # [L, num_pages, page_size, H, D]
    v: torch.Tensor  # [L, num_pages, page_size, H, D]
    block_table: torch.Tensor  # [B, length // page_size] int32
    seq_lens: torch.Tensor  # [B] int32, all ``length``

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def length(self) -> int:
        return self.block_table.shape[1] * self.page_size

    def rows(self, n: int) -> CrossKVCache:
        return CrossKVCache(self.k, self.v, self.block_table[:n], self.seq_lens[:n])

    @classmethod
    def allocate(cls, *, num_layers: int, num_pages: int, batch_size: int, heads: int, head_dim: int, length: int,
                 page_size: int | None = None, dtype=torch.float32, device="cpu") -> CrossKVCache:
        """A zeroed pool of ``num_pages`` pages; every row's table points at page 0 until it is conditioned."""
        page_size = page_size or cross_page_size(length)
        if length <= 0 or length % page_size:
            raise ValueError(f"cross-attention length {length} must be a positive multiple of page_size {page_size}")
        k, v = zeros_kv((num_layers, num_pages, page_size, heads, head_dim), dtype, device,
                        f"the condition's cross-attention cache of {num_pages} pages")
        return cls(k, v,
                   torch.zeros(batch_size, length // page_size, dtype=torch.int32, device=device),
                   torch.full((batch_size,), length, dtype=torch.int32, device=device))

    def write(self, pages: list[int | None], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store one source's K/V (per layer ``(k, v)`` [H, length, D]) into pool pages: part ``j`` of the source goes
        to page ``pages[j]``, or nowhere if it is None (already stored)."""
        parts = [j for j, p in enumerate(pages) if p is not None]
        if not parts:
            return
        dst = torch.tensor([pages[j] for j in parts], dtype=torch.long).to(self.k.device, non_blocking=True)
        src_parts = torch.tensor(parts, dtype=torch.long).to(self.k.device, non_blocking=True)
        for i, layer in enumerate(kv):
            for pool, src in zip((self.k[i], self.v[i]), layer, strict=True):
                H, _, D = src.shape
                paged = src.transpose(0, 1).reshape(-1, self.page_size, H, D)  # [parts, page_size, H, D]
                pool[dst] = paged[src_parts].to(pool.dtype)
