"""The STT and TTS runtimes end to end at N streams: what `dsm transcribe` / `serve-stt` and `dsm speak` /
`serve-tts` get per 80 ms frame, the host's work included, beside the device's part alone.

    python benchmarks/bench_runtime.py --preset stt-1b-en_fr --streams 1 64 [--frames-per-call 1 8]
    python benchmarks/bench_runtime.py --preset tts-1.6b-en_fr --streams 1 64

STT rows: ``runtime`` is ``STTRuntime.step(k)`` (Mimi encode of k frames, k LM steps, the words and VAD events of
every stream) per frame; ``overlap`` the same calls overlapped as `dsm transcribe` makes them (a call's events are
made while the device runs the next; ``rtf``/``rtfx`` are of these); ``stepper`` is the same Mimi encode and LM
steps through the runtime's stepper, the tokens read and dropped; ``events`` is ``runtime`` - ``stepper``, the
streams' host work on the tokens.

TTS rows: ``TTSRuntime.step()`` per frame with audio (text state machine, LM step with the depth transformer, Mimi
decode, PCM handed to every stream), p50 and p99, and the streams' time to first audio (from their first text, all
streams starting together, on warm graphs).

Wall-clock times (``time.perf_counter``): each call ends with the host reading the device's results, so its wall
time is the time a caller waits. `dsm bench` times the engine step and Mimi alone, with CUDA events. Random weights
of the preset (a cached random checkpoint, written once: no download); on a CPU use the ``tiny-*`` presets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dsm.bench import append_jsonl, check_output, environment
from dsm.checkpoint import ensure_random_checkpoint, resolve_checkpoint
from dsm.cli_args import device_or_default, parse_device, positive_int
from dsm.presets import PRESETS

FRAME = 1920  # samples at 24 kHz: 80 ms


def _wall(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def stt_rows(files, streams: int, k: int, calls: int, device: torch.device, slots: int | None = None) -> dict:
    from dsm.stt import STTRuntime

    slots = slots or streams
    rt = STTRuntime.from_checkpoint(files, device=device, max_streams=slots)
    rt.warm_up()
    warm = 3  # Mimi's eager call and capture for k frames, the engine's eager call and capture
    noise = np.random.default_rng(0).standard_normal(FRAME * k * (2 * calls + warm + 1)).astype(np.float32) * 0.1
    live = [rt.open_stream(f"s{i}", history=False) for i in range(streams)]
    for s in live:
        s.push(noise, process=False)
    for _ in range(warm):
        rt.step(k)
    runtime = []
    for _ in range(calls):
        runtime.append(_wall(lambda: rt.step(k), device) / k)
        for s in live:
            s.events()
    # overlapped calls (`dsm transcribe`): a call's events are made while the device runs the next call
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(calls):
        rt.step(k, overlap=True)
        for s in live:
            s.events()
    rt.settle()
    overlapped = (time.perf_counter() - t) / (calls * k)
    # the stepper alone: the same calls, the tokens read and dropped
    stepper = rt.stepper
    pcm = torch.from_numpy(noise[: FRAME * k]).expand(slots, -1).contiguous()
    active = torch.arange(slots) < streams

    def device_call():
        stepper.lm_steps(stepper.encode(pcm, active), active, lambda i, tokens, probs: None)

    device_call()
    alone = [_wall(device_call, device) / k for _ in range(calls)]
    r, d = 1e3 * statistics.median(runtime), 1e3 * statistics.median(alone)
    o = 1e3 * overlapped
    return {"runtime": "stt", "streams": streams, "slots": slots, "frames_per_call": k, "runtime_ms": r,
            "overlap_ms": o, "stepper_ms": d, "events_ms": r - d, "rtf": o / (80.0 * streams),
            "rtfx": 80.0 * streams / o}


def tts_rows(files, streams: int, frames: int, device: torch.device, slots: int | None = None) -> dict:
    from dsm.tts import TTSConfig, TTSRuntime

    slots = slots or streams
    rt = TTSRuntime.from_checkpoint(files, device=device, config=TTSConfig(max_batch=slots))
    rt.warm_up()
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)

    def open_all():
        out = [rt.open_stream(seed=i) for i in range(streams)]
        for s in out:
            s.push(text)
            s.end()
        return out

    for s in open_all():  # a first set of streams to the first audio: the graphs of every phase are captured
        while not s.read().numel():
            rt.step()
        s.cancel()
    live = open_all()
    while any(s.time_to_first_audio is None for s in live):
        rt.step()
    ttfa = [1e3 * s.time_to_first_audio for s in live]
    times = []
    for _ in range(frames):
        times.append(1e3 * _wall(rt.step, device))
        for s in live:
            s.read()
    times.sort()
    p50, p99 = statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))]
    return {"runtime": "tts", "streams": streams, "slots": slots, "frame_p50_ms": p50, "frame_p99_ms": p99,
            "ttfa_p50_ms": statistics.median(ttfa), "ttfa_max_ms": max(ttfa), "rtf": p50 / (80.0 * streams)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny-stt", choices=PRESETS, help="a preset (random weights)")
    ap.add_argument("--streams", type=positive_int, nargs="+", default=[1, 4])
    ap.add_argument("--frames-per-call", type=positive_int, nargs="+", default=[1, 8],
                    help="STT: frames a runtime call takes")
    ap.add_argument("--calls", type=positive_int, default=20, help="STT: timed calls per row")
    ap.add_argument("--frames", type=positive_int, default=40, help="TTS: timed frames per row")
    ap.add_argument("--slots", type=positive_int, help="the runtime's stream slots (default: as many as the "
                    "streams): a server sized for more streams than it serves")
    ap.add_argument("--device", type=parse_device, default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--output", type=Path, help="append the rows to this JSON-lines file")
    args = ap.parse_args(argv)
    if args.slots is not None and args.slots < max(args.streams):  # it was raised to the streams without a word
        ap.error(f"argument --slots: {args.slots} slots cannot hold --streams {max(args.streams)}")
    if args.output and (why := check_output(args.output)) is not None:  # before the run, not a traceback after it
        ap.error(why)
    device = device_or_default(args.device)
    files = resolve_checkpoint(ensure_random_checkpoint(args.preset))
    tts = files.config.tts_config is not None and bool(files.config.tts_config)
    rows, env = [], environment(device)
    with torch.no_grad():
        for n in args.streams:
            new = ([tts_rows(files, n, args.frames, device, args.slots)] if tts else
                   [stt_rows(files, n, k, args.calls, device, args.slots) for k in args.frames_per_call])
            for r in new:
                r = {"preset": args.preset, **r, **env}
                print(json.dumps(r), flush=True)
                rows.append(r)
    if args.output:
        append_jsonl(args.output, rows)
    print()
    if tts:
        print(f"{'preset':16} {'streams':>7} {'slots':>5} {'frame p50 ms':>12} {'p99':>8} {'ttfa p50':>9} "
              f"{'ttfa max':>9} {'rtf':>7}")
        for r in rows:
            print(f"{r['preset']:16} {r['streams']:7d} {r['slots']:5d} {r['frame_p50_ms']:12.3f} "
                  f"{r['frame_p99_ms']:8.3f} {r['ttfa_p50_ms']:9.1f} {r['ttfa_max_ms']:9.1f} {r['rtf']:7.4f}")
    else:
        print(f"{'preset':16} {'streams':>7} {'slots':>5} {'k':>3} {'ms/frame':>9} {'overlap':>8} {'stepper':>8} "
              f"{'events':>7} {'rtf':>7} {'rtfx':>8}")
        for r in rows:
            print(f"{r['preset']:16} {r['streams']:7d} {r['slots']:5d} {r['frames_per_call']:3d} "
                  f"{r['runtime_ms']:9.3f} {r['overlap_ms']:8.3f} {r['stepper_ms']:8.3f} {r['events_ms']:7.3f} "
                  f"{r['rtf']:7.4f} {r['rtfx']:8.1f}")

if __name__ == "__main__":
    main()
