"""Count the kernels one streaming Mimi step launches: the CPU proxy for its CUDA-graph replay time.

A captured Mimi step is launch-bound (a few microseconds per kernel on an H100, whatever it computes), so the
number of kernels per step predicts its GPU time. This counts, on the CPU, every dispatched non-view torch op
(``TorchDispatchMode``) plus every Triton kernel launch of the ``dsm_kernels`` Mimi ops (the ops run on the
``triton`` backend under ``TRITON_INTERPRET=1``; the interpreter's own torch calls are not counted).

    python benchmarks/count_mimi_ops.py                    # reference backend (what CPU tests run)
    TRITON_INTERPRET=1 python benchmarks/count_mimi_ops.py --backend triton   # what a GPU runs

Prints the totals and the most frequent ops for ``encode_step`` and ``decode_step`` (batch 1, one frame).
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsm_kernels  # noqa: E402
from dsm.cli_args import positive_int  # noqa: E402
from dsm.mimi import FRAME_SIZE, MAX_CODEBOOKS, Mimi, random_mimi_state_dict  # noqa: E402
from dsm_kernels.testing import LaunchCounter  # noqa: E402


def count_step(fn) -> collections.Counter[str]:
    """Kernels of one call of ``fn``: torch ops by aten name, Triton launches as ``triton:<kernel>``."""
    with torch.no_grad(), LaunchCounter() as counter:
        fn()
    return counter.counts


def count_mimi(backend: str | None = None, batch: int = 1, warmup: int = 3, seed: int = 0):
    """(encode counts, decode counts) for one 1-frame streaming step after ``warmup`` steps."""
    mimi = Mimi(random_mimi_state_dict(seed), backend=backend)
    enc_state, dec_state = mimi.init_state(batch), mimi.init_state(batch)
    g = torch.Generator().manual_seed(seed)
    pcm = torch.randn(batch, 1, FRAME_SIZE, generator=g) * 0.1
    codes = torch.randint(0, 2048, (batch, MAX_CODEBOOKS, 1), generator=g)
    with torch.no_grad():
        for _ in range(warmup):
            mimi.encode_step(pcm, enc_state)
            mimi.decode_step(codes, dec_state)
    enc = count_step(lambda: mimi.encode_step(pcm, enc_state))
    dec = count_step(lambda: mimi.decode_step(codes, dec_state))
    return enc, dec


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default=None, choices=dsm_kernels.BACKENDS,
                   help="dsm_kernels backend for the Mimi ops (default: the CPU's, reference)")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--top", type=positive_int, default=20, help="how many of the most frequent ops to list")
    args = p.parse_args(argv)
    # the count runs on the CPU: the Triton kernels only under the interpreter (the error says how to run it)
    if args.backend and (why := dsm_kernels.backend_unavailable(args.backend, "cpu")) is not None:
        p.error(f"argument --backend: {why}; this count runs on the CPU, where what a GPU runs is counted with: "
                "TRITON_INTERPRET=1 python benchmarks/count_mimi_ops.py --backend triton")
    enc, dec = count_mimi(args.backend, args.batch)
    for name, c in (("encode_step", enc), ("decode_step", dec)):
        print(f"{name}: {sum(c.values())} kernels  {c.most_common(args.top)}")


if __name__ == "__main__":
    main()
