"""CUDA-graph capture, the one mechanism the engine and Mimi share.

A captured function must read and write only tensors with fixed addresses: a replay reruns the recorded kernels on
the addresses they saw at capture (the inputs it reads, the outputs it returns). Before capture, the function runs
eagerly on a side stream (allocator and kernel warm-up, lazily built constants); those runs are real calls.

* :func:`capture_cuda_graph`: ``warmup`` eager calls, then capture; returns ``(graph, output)``.
* :func:`cuda_graphed`: the replay of such a capture (for timing).
* :class:`LazyGraph`: the engine's form: the first call is a real eager step (on a side stream), the second
  captures and replays, every later call replays; its graphs share a memory pool.

(``dsm_kernels.testing.cuda_graph_time_ms`` keeps its own copy: ``dsm_kernels`` does not import ``dsm``.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def check_current_device(device: torch.device | str, what: str) -> None:
    """Triton launches and CUDA-graph captures go to the current CUDA device: refuse ``what`` on another one (its
    graphs would capture nothing, and their replays silently do nothing)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        raise RuntimeError(f"{what} is on {device} but the current CUDA device is cuda:{torch.cuda.current_device()}: "
                           f"call torch.cuda.set_device({device.index}) first (Triton kernels and CUDA graphs run on "
                           "the current device)")


def run_on_side_stream(fn: Callable[[], object], calls: int = 1):
    """Call ``fn`` ``calls`` times on a fresh side stream ordered after the current stream's work (and before the
    current stream's later work); returns the last call's result (None for no call)."""
    out = None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(calls):
            out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


def capture(fn: Callable[[], object], pool=None):
    """Capture one call of ``fn`` (recorded, not executed) into a new graph, its memory from ``pool`` (a
    ``torch.cuda.graph_pool_handle()``, shared with other graphs; None: the graph's own); returns
    ``(graph, output)``: every replay rewrites the tensors of ``output``."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def capture_cuda_graph(fn: Callable[[], object], warmup: int = 3, pool=None):
    """Capture ``fn`` (e.g. a Mimi step on static input tensors, state updated in place) in a CUDA graph; returns
    ``(graph, output)``, where each replay rewrites ``output``. ``warmup`` eager calls run first on a side stream
    (allocator and kernel warm-up); they advance any state ``fn`` updates, so capture before the stream's first
    real frame or restore the state after."""
    run_on_side_stream(fn, warmup)
    return capture(fn, pool)


def cuda_graphed(fn: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """The replay of :func:`capture_cuda_graph` (for timing: the output is read from the tensors ``fn`` writes)."""
    return capture_cuda_graph(fn, warmup)[0].replay


class LazyGraph:
    """A CUDA graph of ``fn`` over static tensors, captured on demand into the memory pool ``pool``.

    The first call runs ``fn`` eagerly on a side stream (a real step that also warms up lazy initialisation) and
    returns its result; the second captures it (capture records without executing) and every call from then on
    replays it and returns the capture's output (the same tensors each time). ``fn`` must read and write only
    tensors with fixed addresses (state, buffers and other graphs' outputs): note that the output of the first
    call and the capture's output are different tensors.
    """

    def __init__(self, fn: Callable[[], object], pool=None):
        self.fn, self.pool = fn, pool
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out = None

    def replay(self):
        self.calls += 1
        if self.calls == 1:
            return run_on_side_stream(self.fn)
        if self.graph is None:
            self.graph, self.out = capture(self.fn, self.pool)
        self.graph.replay()
        return self.out
