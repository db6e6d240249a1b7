"""Depth-transformer frame benchmark: all ``dep_q`` codebook steps of one frame at the TTS depformer shapes (dim
1024, 16 heads, 4 layers, FFN hidden 2048, 11 weight sets, schedule [0..7, 8x8, 9x8, 10x8], heads 1024 -> 2048,
temporal dim 2048), random bf16 weights, sampling at temperature 0.8 / top-k 250.

Providers: ``ref_eager`` (the reference loop, vectorised sampler), ``ref_graph`` (the same loop captured in one CUDA
graph), ``triton_gemv_graph`` / ``triton_splitk_graph`` (``dsm_kernels.depformer`` with its GEMV or split-K kernels,
captured in one CUDA graph; both up to 2 x ``GEMV_MAX_B`` rows, split-K only above), ``triton_gemv_nopdl_graph``
(the GEMV chain without programmatic dependent launch), ``cuda_persistent_graph`` (the CUDA backend: one cooperative
launch a frame, csrc/depformer.cu, up to 4 rows; ``--grids`` adds it at other grid sizes). Reports ms per frame, the
achieved GB/s against the weight bytes a frame must read (DSM-SPEC §10.3: 2.96 GB, every codebook re-reads its
set) and its ratio to the device-to-device copy bandwidth; appends JSON rows to benchmarks/results/depformer.jsonl.

    python benchmarks/bench_depformer.py                   # batch 1 2 4 8 64 on cuda
    TRITON_INTERPRET=1 python benchmarks/bench_depformer.py --device cpu --small --batch 1   # smoke run of the script
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import triton

import dsm_kernels
import dsm_kernels.reference as ref_mod
from dsm.bench import append_jsonl, check_output, git_commit  # noqa: E402
from dsm.cli_args import device_or_default, parse_device, positive_int
from dsm_kernels.reference import DepformerWeights, depformer_frame_ref
from dsm_kernels.testing import cuda_time_ms, random_depformer_weights, sample_tokens_torch

ROOT = Path(__file__).resolve().parents[1]
TTS = dict(dim=1024, heads=16, layers=4, hidden=2048, card=2048, d_model=2048, text_vocab=8001, low_rank=128,
           schedule=tuple(range(8)) + (8,) * 8 + (9,) * 8 + (10,) * 8)  # fmt: skip
SMALL = dict(dim=64, heads=4, layers=2, hidden=128, card=64, d_model=96, text_vocab=33, low_rank=16,
             schedule=(0, 1, 2, 2, 3, 3, 3, 3))  # fmt: skip


def make_weights(s: dict, device, dtype=torch.bfloat16) -> DepformerWeights:
    shapes = {k: v for k, v in s.items() if k != "low_rank"}  # the low-rank tables are folded (bytes only)
    return random_depformer_weights(**shapes, n_in=len(set(s["schedule"])), dtype=dtype, device=device)


def frame_weight_bytes(s: dict, elt: int = 2) -> int:
    """Weights one frame reads, DSM-SPEC §10.3 accounting: per codebook the 4 layers of its set, one
    ``depformer_in`` projection, its head and the low-rank embedding (table row + projection)."""
    dd, h = s["dim"], s["hidden"]
    per_layer = 3 * dd * dd + dd * dd + 2 * h * dd + dd * h
    per_step = s["layers"] * per_layer + dd * s["d_model"] + s["card"] * dd + dd * s["low_rank"]
    return len(s["schedule"]) * per_step * elt


@contextmanager
def capturable_reference():
    """The reference loop with the row-vectorised sampler (the reference sampler syncs with the host per row)."""
    orig = ref_mod.sample_tokens_ref
    ref_mod.sample_tokens_ref = sample_tokens_torch
    try:
        yield
    finally:
        ref_mod.sample_tokens_ref = orig


def graphed(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # warm-up: Triton compiles, lazy init
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def cpu_ms(fn, iters=3):
    fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def measure(make, device, iters: int) -> tuple[float, str | None]:
    """ms per call of the function ``make()`` returns (CUDA events on a GPU, wall clock on a CPU), or ``(nan, the
    error)``: a provider that fails (in its graph capture too) must not lose the other providers' rows, as GPU time
    is scarce."""
    try:
        fn = make()
        return (cuda_time_ms(fn, iters=iters) if device.type == "cuda" else cpu_ms(fn, min(iters, 3))), None
    except Exception as e:  # reported in the row and the table
        return float("nan"), repr(e)[:200]


def copy_bandwidth_gbps(device) -> float:
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * 2**30 / cuda_time_ms(lambda: dst.copy_(src), iters=20) / 1e6


def bandwidth(ms: float, nbytes: int, copy_bw: float) -> tuple[float, float | None, str]:
    """Achieved GB/s of reading ``nbytes`` in ``ms``, its fraction of the copy bandwidth (None without one: a CPU)
    and that fraction as a table cell."""
    gbps = nbytes / ms / 1e6
    frac = gbps / copy_bw if copy_bw == copy_bw else None
    return gbps, frac, f"{frac:8.2f}" if frac is not None else f"{'-':>8}"


def device_error(script: str, what: str, device: torch.device, small: bool) -> str | None:
    """Why ``benchmarks/<script>.py`` cannot time ``what`` on ``device`` as asked (with the command that can), or
    None: off a GPU it runs the Triton kernels interpreted, which takes TRITON_INTERPRET=1 and the --small shapes
    (the real ones' weights are GBs, interpreted)."""
    if device.type == "cuda":
        return None
    why = dsm_kernels.backend_unavailable("triton", device)
    if why is None and small:
        return None
    return (f"on {device} {what} runs in the Triton interpreter, at the --small shapes only{f' ({why})' if why else ''}"
            f": TRITON_INTERPRET=1 python benchmarks/{script}.py --device cpu --small")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph, not its first line
    ap.add_argument("--batch", type=positive_int, nargs="+", default=[1, 2, 4, 8, 64])
    ap.add_argument("--device", type=parse_device, default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--iters", type=positive_int, default=30)
    ap.add_argument("--providers", nargs="+", default=None, metavar="PREFIX",
                    help="time only the providers whose names start with one of these (default: all)")
    ap.add_argument("--grids", nargs="+", type=positive_int, default=[],
                    help="also time the persistent kernel at these grid sizes (providers cuda_persistent_graph:g66, "
                         "...; its default is one block per SM)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/depformer.jsonl"))
    args = ap.parse_args(argv)
    dev = device_or_default(args.device)
    if (why := device_error("bench_depformer", "the depth transformer", dev, args.small)) is not None:
        ap.error(why)
    if (why := check_output(args.out, "--out")) is not None:  # before the run, not a traceback after it
        ap.error(why)
    shapes = SMALL if args.small else TTS
    w = make_weights(shapes, dev)
    wbytes = frame_weight_bytes(shapes)
    copy_bw = copy_bandwidth_gbps(dev)
    from dsm_kernels import has_cuda_ext
    from dsm_kernels.cuda_ops import DEPFORMER_MAX_ROWS
    from dsm_kernels.depformer import depformer_frame_triton
    from dsm_kernels.gemv_kernels import GEMV_MAX_B

    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "triton": triton.__version__, "commit": git_commit(), "shapes": "small" if args.small else "tts-1.6b",
            "dep_q": len(shapes["schedule"]), "weight_bytes": wbytes,
            "copy_gbps": copy_bw if copy_bw == copy_bw else None}  # fmt: skip
    rows = []
    print(f"weights/frame {wbytes / 1e9:.3f} GB, copy bandwidth {copy_bw:.0f} GB/s")
    print(f"{'provider':27} {'B':>3} {'ms/frame':>9} {'GB/s':>7} {'of copy':>8}")
    for B in args.batch:
        g = torch.Generator(device=dev).manual_seed(B)
        inp = dict(z=torch.randn(B, shapes["d_model"], device=dev, generator=g).bfloat16(),
                   text_token=torch.randint(0, shapes["text_vocab"], (B,), device=dev, generator=g),
                   temperature=torch.full((B,), 0.8, device=dev), top_k=min(250, shapes["card"] // 2),
                   seeds=torch.arange(B, device=dev), steps=torch.full((B,), 33, device=dev))  # fmt: skip
        # name -> a function making what is timed (a graph's replay is made, i.e. captured, inside the measurement)
        providers = {"ref_eager": lambda inp=inp: lambda: depformer_frame_ref(w, **inp)}
        if dev.type == "cuda":
            providers["ref_graph"] = lambda inp=inp: graphed(lambda: depformer_frame_ref(w, **inp))[0].replay
        # both kernel families where the automatic choice is close (GEMV up to GEMV_MAX_B rows, split-K above)
        # and the GEMV chain without programmatic dependent launch, to measure what PDL buys
        variants = {"gemv": {"path": "gemv"}, "gemv_nopdl": {"path": "gemv", "pdl": False},
                    "splitk": {"path": "splitk"}}
        for name, kw in variants.items():
            if B > 2 * GEMV_MAX_B and name != "splitk" or dev.type != "cuda" and name == "gemv_nopdl":
                continue
            fn = functools.partial(depformer_frame_triton, w, **inp, **kw)
            if dev.type == "cuda":
                providers[f"triton_{name}_graph"] = lambda fn=fn: graphed(fn)[0].replay
            else:
                providers[f"triton_{name}_interp"] = lambda fn=fn: fn
        if dev.type == "cuda" and B <= DEPFORMER_MAX_ROWS and has_cuda_ext():
            from dsm_kernels.cuda_ops import depformer_frame_cuda

            for n in [0, *args.grids]:  # 0: the kernel's own grid
                fn = functools.partial(depformer_frame_cuda, w, **inp, blocks=n)
                providers["cuda_persistent_graph" + (f":g{n}" if n else "")] = lambda fn=fn: graphed(fn)[0].replay
        for name, make in providers.items():
            if args.providers and not name.startswith(tuple(args.providers)):
                continue
            with capturable_reference():
                ms, err = measure(make, dev, args.iters)
            gbps, frac, cell = bandwidth(ms, wbytes, copy_bw)
            rows.append({**meta, "provider": name, "batch": B, "ms_per_frame": ms, "gbps": gbps, "frac_of_copy": frac,
                         **({"error": err} if err else {})})
            print(f"{name:27} {B:3d} {ms:9.3f} {gbps:7.0f} {cell}" + (f"  {err}" if err else ""))
    append_jsonl(args.out, rows)


if __name__ == "__main__":
    main()
