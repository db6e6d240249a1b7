"""Kernel launches of one engine step, counted on the CPU: the GPU step is launch-bound at small batch (each kernel
costs ~3 us even inside a CUDA graph), so this count is the CPU-side proxy for the step's overhead.

Counts every dispatched non-view torch op plus one per ``dsm_kernels`` op (a Triton/CUDA kernel on the GPU; its
reference implementation's own ops are not counted), grouped by step phase.

    python benchmarks/count_step_launches.py --preset stt-1b-en_fr --layers 2
"""

from __future__ import annotations

import argparse
import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dsm_kernels
from dsm.bench import _random_conditions, random_model
from dsm.engine import Engine
from dsm.presets import preset_config

VIEWS = {"view", "unsqueeze", "squeeze", "select", "slice", "t", "expand", "permute", "transpose", "_unsafe_view",
         "alias", "split", "split_with_sizes", "unbind", "as_strided", "detach", "reshape", "narrow", "lift_fresh",
         "_reshape_alias", "empty", "empty_like", "new_empty", "empty_strided"}  # fmt: skip


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.depth = 0  # inside a dsm_kernels op: counted once, by its wrapper

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.depth == 0 and name not in VIEWS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_kernel_ops(counter: LaunchCounter):
    """Make every op resolved through ``dsm_kernels.resolve`` count as one launch."""
    orig = dsm_kernels.resolve

    def resolve(op, backend, device):
        fn = orig(op, backend, device)

        def wrapped(*a, **k):
            counter.counts["dsm:" + op] += 1
            counter.depth += 1
            try:
                return fn(*a, **k)
            finally:
                counter.depth -= 1

        return wrapped

    dsm_kernels.resolve = resolve
    try:
        yield
    finally:
        dsm_kernels.resolve = orig


def count_step(preset: str, layers: int | None, dep_layers: int | None = None, batch: int = 2) -> collections.Counter:
    cfg = preset_config(preset)
    if layers is not None:
        cfg = dict(cfg, num_layers=layers)
    if dep_layers is not None:
        cfg = dict(cfg, depformer_num_layers=dep_layers)
    model, _ = random_model(cfg, "cpu", torch.float32)
    eng = Engine(model, max_slots=batch, buckets=(batch,))
    conds = _random_conditions(model, 1, eng.device)
    for _ in range(batch):
        eng.open(conditions=conds)
    n_in = model.cfg.num_codebooks - model.cfg.dep_q - 1
    inp = torch.randint(0, model.cfg.card, (batch, n_in)) if n_in else None
    for _ in range(3):
        eng.step(inp)
    counter = LaunchCounter()
    with count_kernel_ops(counter), counter:
        eng.step(inp)
    return counter.counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="stt-1b-en_fr")
    ap.add_argument("--layers", type=int, default=2, help="temporal layers to build (per-layer counts scale)")
    ap.add_argument("--depformer-layers", type=int, default=None, help="depth-transformer layers to build")
    args = ap.parse_args(argv)
    counts = count_step(args.preset, args.layers, args.depformer_layers)
    print(f"{args.preset} ({args.layers} layers): {sum(counts.values())} launches per step")
    for name, n in counts.most_common():
        print(f"  {n:5d}  {name}")


if __name__ == "__main__":
    main()
