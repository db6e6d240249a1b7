"""Mimi streaming step latency per 80 ms frame: ours (eager and CUDA-graph replay) vs moshi, same input.

    python benchmarks/bench_mimi.py                          # CUDA, batch 1, 64, 400
    python benchmarks/bench_mimi.py --device cpu --batch 1   # quick CPU smoke

Timings are medians over ``--steps`` calls after ``--warmup`` calls (CUDA events on GPU, perf_counter on CPU).
A stream is real time while its per-frame step stays under 80 ms; ``streams@RTF1`` = batch * 80 ms / step.
On CUDA, convolutions and matmuls run in true fp32 (TF32 off, like the bit-exact CPU reference), and more graph
variants are timed beside ours: ``triton`` (the Triton backend: at batch <= 2 the transformers as 5 GEMV-kernel
launches a layer where ours, with the CUDA extension, runs each as one persistent kernel), ``nogemv`` (``DSM_GEMV=0``:
the transformers on cuBLAS, batch <= 2), ``cudnn`` (``DSM_CONV_IGEMM=0``: the wide convolutions on cuDNN in fp32
where ours runs tf32x3 implicit GEMMs) and ``tf32`` (that, with cuDNN's TF32 convolutions, PyTorch's default outside
this benchmark).
``--agree-frames`` encodes that many frames of one speech-like stream with each path and prints how many codes
equal the CPU fp32 reference's (the moshi-parity path), overall and at the semantic level 0.
Appends one JSON row per run to benchmarks/results/mimi.jsonl (device, torch version, git commit, figures).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsm_kernels  # noqa: E402
from dsm.bench import append_jsonl, check_output, git_commit  # noqa: E402
from dsm.cli_args import device_or_default, int_in_range, nonnegative_int, parse_device, positive_int  # noqa: E402
from dsm.mimi import FRAME_SIZE, MAX_CODEBOOKS, Mimi, cuda_graphed, load_mimi_state_dict, save_random_mimi  # noqa: E402

FRAME_MS = 80.0


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


@contextlib.contextmanager
def variant(name: str):
    """Run ours as variant ``name``: "" (as shipped), "triton" (the Triton backend; yields that backend name for the
    Mimi to build), "nogemv" (DSM_GEMV=0), "cudnn" (DSM_CONV_IGEMM=0) or "tf32" (that, with cuDNN's TF32
    convolutions)."""
    env = {"nogemv": {"DSM_GEMV": "0"}, "cudnn": {"DSM_CONV_IGEMM": "0"}, "tf32": {"DSM_CONV_IGEMM": "0"}}.get(name, {})
    old_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = name == "tf32"
    try:
        with mock.patch.dict(os.environ, env):
            yield "triton" if name == "triton" else None
    finally:
        torch.backends.cudnn.allow_tf32 = old_tf32


def speech_like(frames: int, seed: int = 0) -> torch.Tensor:
    """``[1, 1, frames * 1920]``: a gliding harmonic tone with syllable-rate bursts, noise and pauses."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(frames * FRAME_SIZE) / 24000.0
    f0 = 140 + 40 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / 24000.0
    voiced = sum(torch.sin(k * phase) / k for k in range(1, 8))
    env = (torch.sin(2 * math.pi * 3.1 * t).clamp(min=0) ** 0.5) * (torch.rand(frames, generator=g) > 0.15).float(
        ).repeat_interleave(FRAME_SIZE)  # fmt: skip
    return (0.2 * voiced * env + 0.01 * torch.randn(t.shape, generator=g)).view(1, 1, -1)


def code_agreement(sd: dict, frames: int, device: torch.device, variants: list[str]) -> dict[str, dict]:
    """Per path, the fraction of codes equal to the CPU fp32 reference's on :func:`speech_like` (batch 1)."""
    pcm = speech_like(frames)

    def encode(mimi: Mimi, x: torch.Tensor) -> torch.Tensor:
        state = mimi.init_state(1)
        with torch.no_grad():
            return torch.cat([mimi.encode_step(x[..., i * FRAME_SIZE : (i + 1) * FRAME_SIZE], state)
                              for i in range(frames)], -1).cpu()  # fmt: skip

    want = encode(Mimi(sd, backend="reference"), pcm)
    out = {}
    paths = [("ours" + (f"_{v}" if v else ""), v, None) for v in variants] + [("reference_backend", "", "reference")]
    for name, v, backend in paths:
        with variant(v) as variant_backend:
            got = encode(Mimi(sd, device=device, backend=backend or variant_backend), pcm.to(device))
        same = got == want
        out[name] = {"codes": round(float(same.float().mean()), 5),
                     "level0": round(float(same[:, 0].float().mean()), 5)}  # fmt: skip
    return out


def bench_ours(mimi: Mimi, batch: int, args, device: torch.device, use_graph: bool) -> dict[str, float]:
    pcm = (0.1 * torch.randn(batch, 1, FRAME_SIZE, device=device)).clamp(-1, 1)
    codes = torch.randint(0, 2048, (batch, mimi.n_q, 1), device=device)
    enc_state, dec_state = mimi.init_state(batch), mimi.init_state(batch)

    def enc():
        mimi.encode_step(pcm, enc_state)

    def dec():
        mimi.decode_step(codes, dec_state)

    with torch.no_grad():
        if use_graph:
            enc, dec = cuda_graphed(enc), cuda_graphed(dec)
        return {"encode_ms": timed(enc, args.steps, args.warmup, device),
                "decode_ms": timed(dec, args.steps, args.warmup, device)}


def bench_moshi(path: Path, n_q: int, batch: int, args, device: torch.device) -> dict[str, float] | None:
    try:
        from moshi.models.loaders import get_mimi
    except ImportError:
        return None
    ref = get_mimi(str(path), device=device, num_codebooks=n_q)
    pcm = (0.1 * torch.randn(batch, 1, FRAME_SIZE, device=device)).clamp(-1, 1)
    codes = torch.randint(0, 2048, (batch, n_q, 1), device=device)
    out = {}
    with torch.no_grad():
        with ref.streaming(batch):
            out["encode_ms"] = timed(lambda: ref.encode(pcm), args.steps, args.warmup, device)
        with ref.streaming(batch):
            out["decode_ms"] = timed(lambda: ref.decode(codes), args.steps, args.warmup, device)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=parse_device, default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1, 64, 400])
    p.add_argument("--n-q", type=int_in_range(1, MAX_CODEBOOKS, f"a codebook count in 1..{MAX_CODEBOOKS}"),
                   default=MAX_CODEBOOKS)
    p.add_argument("--steps", type=positive_int, default=None, help="timed calls (default 50 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=nonnegative_int, default=None, help="warm-up calls (default 10 on CUDA, 2 on CPU)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU intra-op threads (default: torch's choice)")
    p.add_argument("--ckpt", type=Path, default=None, help="Mimi safetensors (default: a random one)")
    p.add_argument("--no-moshi", action="store_true", help="skip the moshi baseline")
    p.add_argument("--no-graph", action="store_true", help="skip CUDA-graph replay timings")
    p.add_argument("--no-variants", action="store_true", help="skip the triton / nogemv / cudnn / tf32 graph variants")
    p.add_argument("--agree-frames", type=nonnegative_int, default=None,
                   help="frames of the code agreement check (default: 50 on CUDA, 0 on CPU)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "mimi.jsonl")
    args = p.parse_args(argv)
    if (why := check_output(args.out, "--out")) is not None:  # before the run, not a traceback after it
        p.error(why)
    device = device_or_default(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    args.steps = (50 if cuda else 5) if args.steps is None else args.steps  # an asked 0 warm-up stays 0
    args.warmup = (10 if cuda else 2) if args.warmup is None else args.warmup
    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    if cuda:
        # fp32 convs like the bit-exact reference; TF32 would change codes (DSM-SPEC §0).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    with tempfile.TemporaryDirectory() as tmp:
        path = args.ckpt or save_random_mimi(Path(tmp) / "mimi.safetensors", seed=0)
        mimi = Mimi.from_file(path, n_q=args.n_q, device=device)
        rows = []
        variants = [""] + ([] if args.no_variants or not cuda else ["triton", "nogemv", "cudnn", "tf32"])
        if "cuda" not in dsm_kernels.available_backends(device):  # ours is the Triton backend already
            variants = [v for v in variants if v != "triton"]
        for batch in args.batch:
            row: dict = {"batch": batch, "ours": bench_ours(mimi, batch, args, device, use_graph=False)}
            if cuda and not args.no_graph:
                for v in variants:
                    if v in ("nogemv", "triton") and batch * 2 > dsm_kernels.GEMV_MAX_B:
                        continue  # the same path as ours there
                    with variant(v) as backend:
                        m = Mimi.from_file(path, n_q=args.n_q, device=device, backend=backend) if backend else mimi
                        row["ours_graph" + (f"_{v}" if v else "")] = bench_ours(m, batch, args, device, True)
            if not args.no_moshi:
                row["moshi"] = bench_moshi(path, args.n_q, batch, args, device)
            rows.append(row)
            if cuda:
                torch.cuda.empty_cache()
        frames = args.agree_frames if args.agree_frames is not None else (50 if cuda else 0)
        agreement = code_agreement(load_mimi_state_dict(path), frames, device, variants) if frames else {}

    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"Mimi step per 80 ms frame on {name}, torch {torch.__version__}, n_q={args.n_q}, fp32")
    print(f"{'batch':>6} {'impl':>18} {'encode ms':>10} {'decode ms':>10} {'streams@RTF1':>13}")
    for row in rows:
        for impl in [k for k in row if k != "batch"]:
            r = row.get(impl)
            if r:
                total = r["encode_ms"] + r["decode_ms"]
                streams = row["batch"] * FRAME_MS / total
                print(f"{row['batch']:>6} {impl:>18} {r['encode_ms']:>10.3f} {r['decode_ms']:>10.3f} {streams:>13.1f}")
    record = {"bench": "mimi", "device": name, "torch": torch.__version__, "commit": git_commit(),
              "n_q": args.n_q, "steps": args.steps, "warmup": args.warmup, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "rows": rows, "agreement_frames": frames, "agreement": agreement}
    for name, a in agreement.items():
        print(f"codes equal to the CPU fp32 reference over {frames} frames, {name}: {100 * a['codes']:.2f}% "
              f"(level 0: {100 * a['level0']:.2f}%)")
    append_jsonl(args.out, [record])
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
