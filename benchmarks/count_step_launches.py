"""Kernel launches of one engine step, counted on the CPU: at small batch a captured step costs a few microseconds
per kernel whatever it computes, so this count is the CPU-side proxy for the step's GPU time.

Runs the engine on the Triton backend under ``TRITON_INTERPRET=1`` (set here) and counts every dispatched torch op
that launches a kernel plus every Triton launch (``dsm_kernels.testing.LaunchCounter``). The model keeps a preset's
structure (layers, streams, heads of the depth transformer, conditioning) with narrow widths, so the count is the
preset's and the run is quick; ``--layers`` builds fewer temporal layers (the count per layer is the difference).

    python benchmarks/count_step_launches.py --preset stt-1b-en_fr --layers 2
    python benchmarks/count_step_launches.py --preset tts-1.6b-en_fr --layers 1
"""

from __future__ import annotations

import argparse
import collections
import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from dsm.bench import _random_conditions, random_model  # noqa: E402
from dsm.cli_args import positive_int  # noqa: E402
from dsm.engine import Engine  # noqa: E402
from dsm.presets import PRESETS, preset_config  # noqa: E402
from dsm_kernels.testing import LaunchCounter  # noqa: E402

NARROW = {"dim": 128, "num_heads": 4, "depformer_dim": 64, "depformer_num_heads": 4, "depformer_dim_feedforward": 192}


def count_step(preset: str, layers: int | None = None, batch: int = 2) -> collections.Counter:
    cfg = dict(preset_config(preset), **NARROW)
    if layers is not None:
        cfg["num_layers"] = layers
    model, _ = random_model(cfg, "cpu", torch.float32)
    eng = Engine(model, max_slots=batch, buckets=(batch,), backend="triton")
    for b in range(batch):
        eng.open(conditions=_random_conditions(model, b))
    n_in = model.cfg.num_codebooks - model.cfg.dep_q - 1
    inp = torch.randint(0, model.cfg.card, (batch, n_in)) if n_in else None
    for _ in range(model.cfg.max_delay + 2):  # past the delays: every phase runs
        eng.step(inp)
    with torch.no_grad(), LaunchCounter() as counter:
        eng.step(inp)
    return counter.counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="stt-1b-en_fr", choices=PRESETS)
    ap.add_argument("--layers", type=positive_int, default=None,
                    help="temporal layers to build (default: the preset's)")
    ap.add_argument("--batch", type=positive_int, default=2,
                    help="streams (default 2; above 4 the GEMMs are cuBLAS calls)")
    args = ap.parse_args(argv)
    counts = count_step(args.preset, args.layers, args.batch)
    total = sum(counts.values())
    print(f"{args.preset} ({args.layers or 'all'} layers, batch {args.batch}): {total} launches per step")
    for name, n in counts.most_common():
        print(f"  {n:5d}  {name}")


if __name__ == "__main__":
    main()
