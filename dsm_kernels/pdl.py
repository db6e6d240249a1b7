"""Programmatic dependent launch (PDL, sm_90+): a kernel launched with it may start while the kernel before it in the
stream still runs, so its launch latency and whatever it loads before waiting (weights) overlap that kernel.

Contract of a PDL kernel: it calls :func:`launch_and_wait` before its first read of anything an earlier kernel may
have written and before any write. ``launch_dependents`` lets the next PDL kernel start; ``wait`` blocks until the
previous kernel has completed and its writes are visible. Every kernel of a chain waits before completing, so the
chain stays ordered end to end; a kernel launched without PDL simply starts after its predecessor ends.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import triton_interpret


def use_pdl(device) -> bool:
    """Launch with PDL: CUDA devices of compute capability 9.0+, unless ``DSM_NO_PDL=1`` (never in the interpreter)."""
    device = torch.device(device)
    return (device.type == "cuda" and not triton_interpret()
            and torch.cuda.get_device_capability(device)[0] >= 9 and os.environ.get("DSM_NO_PDL") != "1")  # fmt: skip


@triton.jit
def launch_and_wait(PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous kernel's outputs (a no-op unless ``PDL``)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
