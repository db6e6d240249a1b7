"""Where one engine step's GPU time goes: the kernels of a few eager steps (same kernels as the graph replays),
from torch.profiler, grouped by kernel name, with the launch count per step.

    python benchmarks/profile_step.py --preset stt-1b-en_fr --batch 1
    python benchmarks/profile_step.py --mimi --batch 1     # Mimi's encode and decode of one 80 ms frame
    python benchmarks/profile_step.py --device cpu --preset tiny-stt    # smoke run (CPU time of the torch ops)
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from dsm.bench import _random_conditions, random_model
from dsm.cli_args import device_or_default, parse_device, positive_int
from dsm.engine import Engine
from dsm.model import default_dtype
from dsm.presets import PRESETS, preset_config


def profiled(device: torch.device, fn, steps: int):
    """torch.profiler over ``steps`` calls of ``fn`` (after the caller's warm-up): the device's kernels on a GPU, the
    torch ops on a CPU."""
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        if gpu:
            torch.cuda.synchronize()
    return prof


def report(name: str, prof, steps: int, top: int, device: torch.device) -> None:
    """Kernel time and launches per step, and the ``top`` kernels by time (on a CPU: the torch ops' own CPU time)."""
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0]  # the kernels
    total_us = sum(getattr(e, attr) for e in events) / steps
    launches = sum(e.count for e in events) / steps
    what = "kernel" if device.type == "cuda" else "torch op (CPU, nested ops included)"
    print(f"\n{name}: {launches:.0f} {what} calls per step, {total_us / 1e3:.3f} ms of {what} time "
          f"per step (eager; gaps not counted)")
    for e in sorted(events, key=lambda e: -getattr(e, attr))[:top]:
        print(f"  {getattr(e, attr) / steps:9.1f} us  {e.count / steps:6.1f}x  {e.key[:90]}")


def profile_mimi(batch: int, steps: int, top: int, device: torch.device) -> None:
    """Mimi (random weights, fp32) encoding one frame of noise and decoding one frame of codes per step."""
    from dsm.mimi import FRAME_SIZE, Mimi, random_mimi_state_dict

    mimi = Mimi(random_mimi_state_dict(0), device=device)
    pcm = 0.1 * torch.randn(batch, 1, FRAME_SIZE, device=device)
    codes = torch.randint(0, 2048, (batch, 32, 1), device=device)
    for label, fn, arg in (("encode", mimi.encode_step, pcm), ("decode", mimi.decode_step, codes)):
        state = mimi.init_state(batch)
        for _ in range(5):
            fn(arg, state)
        prof = profiled(device, lambda fn=fn, arg=arg, state=state: fn(arg, state), steps)
        report(f"mimi {label} batch {batch}", prof, steps, top, device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", default=None, choices=PRESETS,
                    help="repeatable (default: stt-1b-en_fr and tts-1.6b-en_fr on a GPU, tiny-stt and tiny-tts on a "
                         "CPU)")
    ap.add_argument("--mimi", action="store_true", help="profile Mimi's encode and decode instead of the LM")
    ap.add_argument("--batch", type=positive_int, default=1)
    ap.add_argument("--steps", type=positive_int, default=5, help="profiled steps (default 5)")
    ap.add_argument("--top", type=positive_int, default=15, help="kernels listed (default 15)")
    ap.add_argument("--device", type=parse_device, default=None, help="cuda or cpu (default: cuda if available)")
    args = ap.parse_args(argv)
    if args.mimi and args.preset:
        ap.error("argument --preset: not with --mimi, which profiles Mimi alone")
    dev = device_or_default(args.device)
    if args.mimi:
        profile_mimi(args.batch, args.steps, args.top, dev)
        return
    dtype = default_dtype(dev)
    default = ["stt-1b-en_fr", "tts-1.6b-en_fr"] if dev.type == "cuda" else ["tiny-stt", "tiny-tts"]
    for name in args.preset or default:
        model, _ = random_model(preset_config(name), dev, dtype)
        eng = Engine(model, max_slots=args.batch, buckets=(args.batch,), cuda_graphs=False)
        for b in range(args.batch):
            eng.open(conditions=_random_conditions(model, b))
        n_in = model.cfg.num_codebooks - model.cfg.dep_q - 1
        inp = torch.randint(0, model.cfg.card, (args.batch, n_in), device=dev) if n_in else None
        for _ in range(5):
            eng.step(inp)
        report(f"{name} batch {args.batch}", profiled(dev, lambda eng=eng, inp=inp: eng.step(inp), args.steps),
               args.steps, args.top, dev)
        del eng, model
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
