"""CUDA-graph replay of Mimi streaming steps for the runtimes (STT encode, TTS decode).

An eager Mimi step is ~800 small kernels, so on a GPU it is bound by launch overhead (measured on an H100 at batch 1:
encode 18.9 ms eager, 2.95 ms replayed from a graph). :class:`GraphedMimiStep` captures one step per input shape over
the runtime's own :class:`~dsm.mimi.MimiState`: inputs are copied into a static buffer, the state is updated in place,
and resets or exec masks set between steps are seen by the replay (they write the same tensors in place).

An input of ``n`` rows steps the state's rows ``[0, n)`` (:meth:`~dsm.mimi.MimiState.rows`): a runtime passes the
smallest of :func:`mimi_buckets` that holds its open streams, so a few streams on a runtime sized for hundreds pay for
128 rows, not for every slot (measured on an H100, run 2: encode 4.4 ms a frame at batch 64 against 23 ms at 400).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch

import dsm_kernels

from .cuda_graphs import capture_cuda_graph, check_current_device
from .mimi import MimiState

# Mimi's buckets start past every small-batch kernel path: its 12.5 Hz convs see one column a row a frame, and the
# conv GEMV path takes up to CONV_GEMV_MAX_COLUMNS columns (the transformer's GEMV and the persistent RVQ kernels
# take fewer rows still).
MIMI_MIN_ROWS = 2 * dsm_kernels.CONV_GEMV_MAX_COLUMNS
MIMI_BUCKET_STEP = 64


def mimi_buckets(max_rows: int, smallest: int = MIMI_MIN_ROWS, step: int = MIMI_BUCKET_STEP) -> tuple[int, ...]:
    """The row counts a runtime of ``max_rows`` slots steps Mimi on (the smallest one holding every open slot):
    ``smallest``, then every ``step`` rows, then ``max_rows`` (only ``max_rows`` when it is not above ``smallest``).

    Why these: a stream's codes must not depend on the other streams (isolation). Every bucket past the small-batch
    paths runs the same kernels, whose sums do not depend on the row count (on this CPU every count from 16 rows up
    gives the same bits, measured at 16 to 256; 2 to 12 rows differ from them by up to 2.9e-9 in decoded PCM, 1 row by
    2.4e-8, so a runtime of at most 128 slots, which steps them all, rounds with its slot count; our GPU kernels
    reduce in a fixed order: not measured). Fewer rows would take other kernels, and a near-tie at a deep RVQ level
    then flips a code, which can flip a text token (seen in 3 of 19 churn runs over a server). Where a library picks
    its kernels by size (cuBLAS and SDPA in the transformer's torch path on a GPU), rounding can still differ between
    buckets, as with the LM's buckets (see :mod:`dsm.engine`; ``batch_invariant`` in the runtimes steps every slot
    instead). Past ~64 rows a Mimi step is linear in its rows (run 2, H100, graphs: encode 4.4 / 23 ms at 64 / 400
    rows), so steps of 64 keep a bucket's padding rows under ~4 ms a frame, where powers of two would step up to twice
    the rows."""
    if max_rows < 1 or smallest < 1 or step < 1:
        raise ValueError(f"max_rows, smallest and step must be >= 1, got {max_rows}, {smallest}, {step}")
    return (*range(smallest, max_rows, step), max_rows)


class GraphedMimiStep:
    """``step(x, state) -> y`` (``Mimi.encode_step`` or ``Mimi.decode_step``) replayed from one CUDA graph per input
    shape, always on the same ``state`` (on its rows ``[0, n)`` for an input of ``n`` rows). Runs eagerly on a CPU or
    with ``DSM_NO_CUDA_GRAPH=1``. The graphs share one memory pool: they replay one at a time, and each call's output
    is copied out before the next replay."""

    def __init__(self, step: Callable[[torch.Tensor, MimiState], torch.Tensor], state: MimiState):
        self.step, self.state = step, state
        dev = state.exec_mask.device
        check_current_device(dev, "Mimi's state")
        self.enabled = dev.type == "cuda" and os.environ.get("DSM_NO_CUDA_GRAPH", "0") != "1"
        self._pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self._rows: dict[int, MimiState] = {}  # n -> the state's rows [0, n) (the views a graph captured)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def rows(self, n: int) -> MimiState:
        """The state's rows ``[0, n)``, the views made once per ``n``."""
        if n not in self._rows:
            self._rows[n] = self.state.rows(n)
        return self._rows[n]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] if x.dim() else 0
        state = self.rows(n) if 1 <= n < self.state.batch_size else self.state  # (else the step's checks refuse x)
        if not self.enabled:
            return self.step(x, state)
        key = (tuple(x.shape), x.dtype)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(x, state)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()  # the next replay overwrites the static output

    def warm_up(self, x: torch.Tensor, batches: Iterable[int]) -> None:
        """Capture the graphs of inputs like ``x`` (its shape past the batch, dtype and device) for each batch size,
        before the first stream (a no-op when graphs are off)."""
        if self.enabled:
            for n in batches:
                key = ((n, *x.shape[1:]), x.dtype)
                if key not in self._graphs:
                    self._graphs[key] = self._capture(x.new_zeros(key[0]), self.rows(n))

    def _capture(self, x: torch.Tensor, state: MimiState):
        # Warm-up calls run the step for real, so keep the streams' state and put it back before the first replay:
        # the rows this view steps and the phases (rows past them hold no stream, and its scratch row no state).
        saved = [t.clone() for t in state.tensors()]
        static_in = x.clone()
        graph, static_out = capture_cuda_graph(lambda: self.step(static_in, state), warmup=2, pool=self._pool)
        for t, s in zip(state.tensors(), saved, strict=True):
            t.copy_(s)
        return graph, static_in, static_out
