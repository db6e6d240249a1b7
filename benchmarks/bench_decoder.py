"""Decode-step benchmark: the temporal transformer's whole step at batch 1..4 (``dsm_kernels.decoder_step``: every
layer, the output norm and the text head) at the released layouts, random bf16 weights, caches holding a full
context.

Providers, each captured in one CUDA graph: ``triton`` (the single ops: GEMV kernels with their fused glue, the
attention on Triton), ``cuda_single`` (the same with the CUDA decode attention: what the CUDA backend ran before the
persistent kernel), ``cuda_persistent`` (``csrc/decoder.cu``: one cooperative launch a step; ``--grids`` adds it at
other grid sizes). Reports ms per step, the
achieved GB/s against the bytes a step must read (weights + the K/V of its window + the voice K/V for TTS) and the
ratio to the device-to-device copy bandwidth; appends JSON rows to benchmarks/results/decoder.jsonl.

    python benchmarks/bench_decoder.py                          # stt-1b, stt-2.6b, tts layouts at batch 1 and 4
    TRITON_INTERPRET=1 python benchmarks/bench_decoder.py --device cpu --small   # smoke run of the script itself
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
from bench_depformer import bandwidth, copy_bandwidth_gbps, device_error, graphed, measure

from dsm.bench import append_jsonl, check_output, git_commit
from dsm.cli_args import device_or_default, parse_device, positive_int
from dsm_kernels.testing import decoder_inputs, random_decoder_weights

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {  # the temporal transformers of the released models
    "stt-1b": dict(dim=2048, heads=16, layers=16, hidden=5632, vocab=8001, context=750),
    "stt-2.6b": dict(dim=2048, heads=32, layers=48, hidden=5632, vocab=4001, context=375),
    "tts-1.6b": dict(dim=2048, heads=16, layers=16, hidden=5632, vocab=8001, context=500, cross=True),
}
SMALL = {"small": dict(dim=64, heads=4, layers=2, hidden=96, vocab=40, context=24)}


def step_bytes(w, ins, B: int) -> int:
    """Bytes a step must read: every weight once, each row's K/V window, and the rows' voice K/V (TTS)."""
    weights = sum(t.numel() * t.element_size() for lw in w.layers
                  for t in (lw.in_proj, lw.out_proj, lw.linear_in, lw.linear_out) + (
                      (lw.cross.q_proj, lw.cross.out_proj) if lw.cross else ()))  # fmt: skip
    weights += w.text_linear.numel() * w.text_linear.element_size()
    per_pos = 2 * w.num_kv_heads * w.head_dim * ins["k_cache"].element_size() * len(w.layers)
    window = sum(min(int(n), ins["context"]) for n in ins["seq_lens"].tolist())
    cross = ins["cross"].length * B if ins["cross"] is not None else 0
    return weights + per_pos * (window + cross)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph, not its first line
    ap.add_argument("--batch", type=positive_int, nargs="+", default=[1, 4])
    ap.add_argument("--layout", nargs="+", default=None, choices=list(LAYOUTS), help="default: all")
    ap.add_argument("--device", type=parse_device, default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--iters", type=positive_int, default=30)
    ap.add_argument("--providers", nargs="+", default=None, metavar="PREFIX",
                    help="time only the providers whose names start with one of these (default: all)")
    ap.add_argument("--grids", nargs="+", type=positive_int, default=[],
                    help="also time the persistent kernel at these grid sizes (providers cuda_persistent:g66, ...; its "
                         "default is one block per SM)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/decoder.jsonl"))
    args = ap.parse_args(argv)
    import dsm_kernels

    dev = device_or_default(args.device)
    if args.small and args.layout:
        ap.error("argument --layout: not with --small, which times its own tiny shapes")
    if (why := device_error("bench_decoder", "the decode step", dev, args.small)) is not None:
        ap.error(why)
    if (why := check_output(args.out, "--out")) is not None:  # before the run, not a traceback after it
        ap.error(why)
    from dsm_kernels.decoder import decoder_step_composed

    layouts = SMALL if args.small else {k: LAYOUTS[k] for k in (args.layout or LAYOUTS)}
    copy_bw = copy_bandwidth_gbps(dev)
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "commit": git_commit(), "copy_gbps": copy_bw if copy_bw == copy_bw else None}  # fmt: skip
    print(f"copy bandwidth {copy_bw:.0f} GB/s")
    print(f"{'layout':9} {'provider':20} {'B':>2} {'ms/step':>8} {'GB/s':>6} {'of copy':>8}")
    rows = []
    for name, shape in layouts.items():
        shape = dict(shape)
        context = shape.pop("context")
        w = random_decoder_weights(**shape, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
                                   device=dev, seed=1)  # fmt: skip
        for B in args.batch:
            ins = decoder_inputs(w, B, context=context, page_size=16 if dev.type == "cuda" else 4,
                                 positions=torch.full((B,), 3 * context), cross_length=625 if not args.small else 20,
                                 cross_page_size=125 if not args.small else 4, device=dev)  # fmt: skip
            ins["seq_lens"].fill_(3 * context + 1)  # every row active, a full window
            nbytes = step_bytes(w, ins, B)
            providers = {}
            if dev.type == "cuda":
                providers["triton"] = functools.partial(decoder_step_composed, w, **ins, backend="triton")
                if dsm_kernels.has_cuda_ext():
                    from dsm_kernels.cuda_ops import decoder_step_cuda

                    providers["cuda_single"] = functools.partial(decoder_step_composed, w, **ins, backend="cuda")
                    for n in [0, *args.grids]:  # 0: the kernel's own grid
                        name_n = "cuda_persistent" + (f":g{n}" if n else "")
                        providers[name_n] = functools.partial(decoder_step_cuda, w, **ins, blocks=n)
            else:
                providers["triton_interp"] = functools.partial(decoder_step_composed, w, **ins, backend="triton")
            for prov, fn in providers.items():
                if args.providers and not prov.startswith(tuple(args.providers)):
                    continue
                ms, err = measure((lambda fn=fn: graphed(fn)[0].replay) if dev.type == "cuda" else (lambda fn=fn: fn),
                                  dev, args.iters)
                gbps, frac, cell = bandwidth(ms, nbytes, copy_bw)
                rows.append({**meta, "layout": name, "provider": prov, "batch": B, "ms_per_step": ms, "gbps": gbps,
                             "bytes": nbytes, "frac_of_copy": frac, **({"error": err} if err else {})})
                print(f"{name:9} {prov:20} {B:2d} {ms:8.3f} {gbps:6.0f} {cell}" + (f"  {err}" if err else ""))
        del w
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    append_jsonl(args.out, rows)


if __name__ == "__main__":
    main()
