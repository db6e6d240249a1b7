"""Telling a failed allocation apart from other errors: each device and library reports it its own way."""

from __future__ import annotations

import torch


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation that failed: Python's and numpy's ``MemoryError``, torch's ``OutOfMemoryError``
    (a GPU, and dsm's own size checks), or the plain ``RuntimeError`` of torch's CPU allocator."""
    return isinstance(e, MemoryError | torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e))


def first_line(e: BaseException) -> str:
    """What ``e`` says, in one line for an error message (torch's allocation errors run to several)."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__
