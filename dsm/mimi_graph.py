"""CUDA-graph replay of Mimi streaming steps for the runtimes (STT encode, TTS decode).

An eager Mimi step is ~800 small kernels, so on a GPU it is bound by launch overhead (measured on an H100 at batch 1:
encode 18.9 ms eager, 2.95 ms replayed from a graph). :class:`GraphedMimiStep` captures one step per input shape over
the runtime's own :class:`~dsm.mimi.MimiState`: inputs are copied into a static buffer, the state is updated in place,
and resets or exec masks set between steps are seen by the replay (they write the same tensors in place).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .cuda_graphs import capture_cuda_graph, check_current_device
from .mimi import MimiState


class GraphedMimiStep:
    """``step(x, state) -> y`` (``Mimi.encode_step`` or ``Mimi.decode_step``) replayed from one CUDA graph per input
    shape, always on the same ``state``. Runs eagerly on a CPU or with ``DSM_NO_CUDA_GRAPH=1``."""

    def __init__(self, step: Callable[[torch.Tensor, MimiState], torch.Tensor], state: MimiState):
        self.step, self.state = step, state
        dev = state.exec_mask.device
        check_current_device(dev, "Mimi's state")
        self.enabled = dev.type == "cuda" and os.environ.get("DSM_NO_CUDA_GRAPH", "0") != "1"
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.step(x, self.state)
        key = (tuple(x.shape), x.dtype)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(x)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()  # the next replay overwrites the static output

    def _capture(self, x: torch.Tensor):
        # Warm-up calls run the step for real, so keep the streams' state and put it back before the first replay.
        saved = [t.clone() for t in self.state.tensors()]
        static_in = x.clone()
        graph, static_out = capture_cuda_graph(lambda: self.step(static_in, self.state), warmup=2)
        for t, s in zip(self.state.tensors(), saved, strict=True):
            t.copy_(s)
        return graph, static_in, static_out
