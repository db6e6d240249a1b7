"""Where one engine step's GPU time goes: the kernels of a few eager steps (same kernels as the graph replays),
from torch.profiler, grouped by kernel name, with the launch count per step.

    python benchmarks/profile_step.py --preset stt-1b-en_fr --batch 1
    python benchmarks/profile_step.py --mimi --batch 1     # Mimi's encode and decode of one 80 ms frame
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from dsm.bench import _random_conditions, random_model
from dsm.engine import Engine
from dsm.presets import preset_config


def report(name: str, prof, steps: int, top: int) -> None:
    """Kernel time and launches per step, and the ``top`` kernels by time."""
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]  # the kernels
    total_us = sum(e.self_device_time_total for e in events) / steps
    launches = sum(e.count for e in events) / steps
    print(f"\n{name}: {launches:.0f} kernels per step, {total_us / 1e3:.3f} ms of kernel time "
          f"per step (eager; gaps not counted)")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"  {e.self_device_time_total / steps:9.1f} us  {e.count / steps:6.1f}x  {e.key[:90]}")


def profile_mimi(batch: int, steps: int, top: int) -> None:
    """Mimi (random weights, fp32) encoding one frame of noise and decoding one frame of codes per step."""
    from dsm.mimi import FRAME_SIZE, Mimi, random_mimi_state_dict

    mimi = Mimi(random_mimi_state_dict(0), device="cuda")
    pcm = 0.1 * torch.randn(batch, 1, FRAME_SIZE, device="cuda")
    codes = torch.randint(0, 2048, (batch, 32, 1), device="cuda")
    for label, fn, arg in (("encode", mimi.encode_step, pcm), ("decode", mimi.decode_step, codes)):
        state = mimi.init_state(batch)
        for _ in range(5):
            fn(arg, state)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                fn(arg, state)
            torch.cuda.synchronize()
        report(f"mimi {label} batch {batch}", prof, steps, top)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", default=None)
    ap.add_argument("--mimi", action="store_true", help="profile Mimi's encode and decode instead of the LM")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    if args.mimi:
        profile_mimi(args.batch, args.steps, args.top)
        return
    for name in args.preset or ["stt-1b-en_fr", "tts-1.6b-en_fr"]:
        model, _ = random_model(preset_config(name), "cuda", torch.bfloat16)
        eng = Engine(model, max_slots=args.batch, buckets=(args.batch,), cuda_graphs=False)
        for b in range(args.batch):
            eng.open(conditions=_random_conditions(model, b))
        n_in = model.cfg.num_codebooks - model.cfg.dep_q - 1
        inp = torch.randint(0, model.cfg.card, (args.batch, n_in), device="cuda") if n_in else None
        for _ in range(5):
            eng.step(inp)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                eng.step(inp)
            torch.cuda.synchronize()
        report(f"{name} batch {args.batch}", prof, args.steps, args.top)
        del eng, model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
