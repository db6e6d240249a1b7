"""Where one engine step's GPU time goes: the kernels of a few eager steps (same kernels as the graph replays),
from torch.profiler, grouped by kernel name, with the launch count per step.

    python benchmarks/profile_step.py --preset stt-1b-en_fr --batch 1
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from dsm.bench import _random_conditions, random_model
from dsm.engine import Engine
from dsm.presets import preset_config


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    for name in args.preset or ["stt-1b-en_fr", "tts-1.6b-en_fr"]:
        model, _ = random_model(preset_config(name), "cuda", torch.bfloat16)
        eng = Engine(model, max_slots=args.batch, buckets=(args.batch,), cuda_graphs=False)
        conds = _random_conditions(model, 1, eng.device)
        for _ in range(args.batch):
            eng.open(conditions=conds)
        n_in = model.cfg.num_codebooks - model.cfg.dep_q - 1
        inp = torch.randint(0, model.cfg.card, (args.batch, n_in), device="cuda") if n_in else None
        for _ in range(5):
            eng.step(inp)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                eng.step(inp)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.self_device_time_total > 0]  # the kernels
        total_us = sum(e.self_device_time_total for e in events) / args.steps
        launches = sum(e.count for e in events) / args.steps
        print(f"\n{name} batch {args.batch}: {launches:.0f} kernels per step, {total_us / 1e3:.3f} ms of kernel time "
              f"per step (eager; gaps not counted)")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[: args.top]:
            print(f"  {e.self_device_time_total / args.steps:9.1f} us  {e.count / args.steps:6.1f}x  {e.key[:90]}")
        del eng, model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
