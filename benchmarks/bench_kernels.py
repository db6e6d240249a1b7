"""Kernel benchmarks at the shapes of the three DSM models: providers reference (loop spec), torch (vectorised
eager baseline), compile (torch.compile of that baseline), triton, cuda.

Reports the median CUDA-event time after warm-up, achieved GB/s (bytes that must move / time) and its ratio to the
device-to-device copy bandwidth measured in the same process, and appends one JSON row per measurement to
benchmarks/results/kernels.jsonl (device, torch/triton versions, git commit).

    python benchmarks/bench_kernels.py                       # all kernels, batch 1 64 400, on cuda
    python benchmarks/bench_kernels.py --kernels attention --batch 1 --no-compile
    python benchmarks/bench_kernels.py --kernels voice --batch 1 64 256 --no-compile   # shared pages vs dense SDPA
    python benchmarks/bench_kernels.py --kernels gemv --batch 1 4 --graph --providers torch triton
    python benchmarks/bench_kernels.py --kernels conv convtr --batch 1 64 400 --graph --no-compile \
        --providers torch triton     # Mimi's convs: tf32x3 implicit GEMMs against cuDNN in fp32 (TF32 off)
    python benchmarks/bench_kernels.py --device cpu --batch 1 --no-compile   # smoke run of the script itself
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import torch

from dsm.bench import append_jsonl, check_output, git_commit
from dsm.cli_args import device_or_default, nonnegative_int, parse_device, positive_int
from dsm_kernels import available_backends, backend_unavailable, resolve
from dsm_kernels.testing import (
    cuda_graph_time_ms,
    cuda_time_ms,
    multistream_embed_torch,
    paged_decode_attention_torch,
    sample_tokens_torch,
)

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name: (heads, head_dim, context, text vocab)
    "stt-1b": (16, 128, 750, 8000),
    "stt-2.6b": (32, 64, 375, 4000),
    "tts-1.6b": (16, 128, 500, 8000),
}
DIM, N_AUDIO, AUDIO_CARD = 2048, 32, 2048


def timer(device: torch.device, iters: int, graph: bool = False):
    if device.type == "cuda":
        if graph:
            return lambda fn: cuda_graph_time_ms(fn, iters=iters)
        return lambda fn: cuda_time_ms(fn, iters=iters)

    def cpu_ms(fn):
        fn()
        ts = []
        for _ in range(max(3, iters // 20)):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    return cpu_ms


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy (read + write) of 1 GiB: the practical bandwidth ceiling."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), iters=20)
    return 2 * 2**30 / ms / 1e6


def embed_case(model, B, device):
    _, _, _, vt = MODELS[model]
    tts = model.startswith("tts")
    g = torch.Generator(device=device).manual_seed(0)
    text = torch.randn(vt + 1, DIM, device=device, generator=g).bfloat16()
    audio = torch.randn(N_AUDIO, AUDIO_CARD + 1, DIM, device=device, generator=g).bfloat16()
    tokens = torch.randint(0, AUDIO_CARD, (B, N_AUDIO + 1), device=device, generator=g)
    tokens[:, 0] = torch.randint(0, vt, (B,), device=device, generator=g)
    kw = {}
    if tts:  # demuxed second text stream + condition vector
        kw = {"text_table2": torch.randn_like(text), "cond": torch.randn(B, DIM, device=device).bfloat16()}
        tokens[:, 0] += (vt + 1) * torch.randint(0, 2, (B,), device=device, generator=g)
    args = (tokens, text, audio)
    rows_read = N_AUDIO + 1 + (1 if tts else 0) + (1 if tts else 0)
    nbytes = B * DIM * 2 * (rows_read + 1)  # table rows (+cond) read, output written
    return args, kw, nbytes


ATTENTION_KV = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def _attention_label(model, page_size, kv):
    """``stt-1b`` at the engine's defaults (16-position pages, bf16), else e.g. ``stt-1b/p64/fp8``."""
    return model + (f"/p{page_size}" if page_size != 16 else "") + (f"/{kv}" if kv != "bf16" else "")


def attention_case(model, B, device, page_size=16, kv_dtype=torch.bfloat16):
    H, D, context, _ = MODELS[model]
    pps = -(-context // page_size)
    g = torch.Generator(device=device).manual_seed(0)
    k_cache = torch.randn(B * pps, page_size, H, D, device=device, generator=g).to(kv_dtype)
    v_cache = torch.randn(B * pps, page_size, H, D, device=device, generator=g).to(kv_dtype)
    block_table = torch.randperm(B * pps, device=device, generator=g).view(B, pps).int()
    seq_lens = torch.full((B,), 10 * context + 3, dtype=torch.int32, device=device)  # full window, ring wrapped
    q = torch.randn(B, H, D, device=device, generator=g).bfloat16()
    nbytes = 2 * B * context * H * D * k_cache.element_size() + 2 * B * H * D * 2
    counters = torch.zeros(B * H, dtype=torch.int32, device=device)  # as the engine runs it: splits merged in-launch
    return (q, k_cache, v_cache, block_table, seq_lens), {"context": context, "counters": counters}, nbytes


def voice_case(B, device):
    """The TTS voice cross-attention (tts-1.6b: 16 x 128 heads, 625 condition positions) of ``B`` streams, each with a
    voice of its own (one page of 125) and the 4 padding pages shared (dsm.kv_cache.CrossKVCache). Its torch provider
    is what the engine ran before the pages: SDPA over every stream's dense K/V. Bytes: the distinct pages once."""
    H, D, S, n = 16, 128, 125, 5
    g = torch.Generator(device=device).manual_seed(0)
    k_cache = torch.randn(B + n, S, H, D, device=device, generator=g).bfloat16()  # page 0 null, 1-4 shared
    v_cache = torch.randn_like(k_cache)
    table = torch.cat([torch.arange(n, n + B, device=device)[:, None],
                       torch.arange(1, n, device=device).expand(B, n - 1)], dim=1).int()  # fmt: skip
    seq_lens = torch.full((B,), S * n, dtype=torch.int32, device=device)
    q = torch.randn(B, H, D, device=device, generator=g).bfloat16()
    dense_k, dense_v = (c[table.long()].flatten(1, 2).transpose(1, 2).contiguous() for c in (k_cache, v_cache))

    def sdpa_dense(*args, **kw):  # [B, H, 1, D] over [B, H, 625, D]
        return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], dense_k, dense_v)[:, :, 0]

    nbytes = 2 * (B + n - 1) * S * H * D * 2 + 2 * B * H * D * 2
    counters = torch.zeros(B * H, dtype=torch.int32, device=device)
    return (q, k_cache, v_cache, table, seq_lens), {"context": S * n, "counters": counters}, nbytes, sdpa_dense


def sampling_case(V, B, device):
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(B, V, device=device, generator=g) * 3
    null = torch.randn(B, V, device=device, generator=g) * 3
    temp = torch.full((B,), 0.8, device=device)
    seeds = torch.arange(B, device=device)
    steps = torch.zeros(B, dtype=torch.int64, device=device)
    nbytes = 2 * B * V * 4 + B * 8
    return (logits, temp, 250, seeds, steps), {"null_logits": null, "cfg_coef": 3.0}, nbytes


GEMV_SHAPES = {  # name: (N, K, epilogue) of the linears the GEMV path runs at batch <= 4
    "lm.qkv": (6144, 2048, "norm"), "lm.in": (5632, 2048, "gate"), "lm.out2": (2048, 5632, "residual"),
    "lm.text": (8001, 2048, "none"), "dep.qkv": (3072, 1024, "norm"), "dep.in": (2048, 1024, "gate"),
    "dep.out2": (1024, 2048, "residual"), "dep.head": (2048, 1024, "none"),
}  # fmt: skip


def gemv_case(name, B, device):
    """The ``gemv`` op at one model linear: bytes = the weights (2N rows for the gate) + input and output rows."""
    N, K, epi = GEMV_SHAPES[name]
    g = torch.Generator(device=device).manual_seed(0)
    rows = 2 * N if epi == "gate" else N
    x = torch.randn(B, K, device=device, generator=g).bfloat16()
    w = (torch.randn(rows, K, device=device, generator=g) * K**-0.5).bfloat16()
    kw = {"norm": {"alpha": torch.ones(K, device=device).bfloat16(), "eps": 1e-8}, "gate": {"gate": True},
          "residual": {"residual": torch.zeros(B, N, device=device).bfloat16()}, "none": {}}[epi]  # fmt: skip
    nbytes = rows * K * 2 + B * (K + N) * 2 * (2 if epi == "residual" else 1)
    return (x, w), kw, nbytes


# Mimi's SEANet convolutions with more than 64 output columns a frame (C_in, C_out, kernel, stride, input columns of one
# stream's frame, its stored context included)
CONV_SHAPES = {
    "enc.in": (1, 64, 7, 1, 1926), "enc.k3": (64, 32, 3, 1, 1922), "enc.down1": (64, 128, 8, 4, 1924),
    "enc.down2": (128, 256, 10, 5, 485), "dec.last": (64, 1, 3, 1, 1922),
}  # fmt: skip
CONVTR_SHAPES = {"dec.up3": (256, 128, 10, 5, 96), "dec.up4": (128, 64, 8, 4, 480)}  # from 96 / 480 columns


def _fp32(conv):
    """torch's convolution in fp32 as Mimi's reference runs it (cuDNN's TF32 off: it would move the codes)."""

    def run(x, w, b, stride, **kw):
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            return conv(x, w, b, stride)

    return run


def conv_case(name, B, device, transposed=False):
    """A Mimi conv at ``B`` streams: bytes = input + weights + output once (the kernels are compute-bound at many
    streams; read the ms and the speedup)."""
    C_in, C_out, K, S, T = (CONVTR_SHAPES if transposed else CONV_SHAPES)[name]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, C_in, T, device=device, generator=g)
    shape = (C_in, C_out, K) if transposed else (C_out, C_in, K)
    w = torch.randn(*shape, device=device, generator=g) / (C_in * K) ** 0.5
    b = torch.randn(C_out, device=device, generator=g)
    T_out = (T - 1) * S + K if transposed else (T - K) // S + 1
    nbytes = 4 * (x.numel() + w.numel() + B * C_out * T_out)
    conv = torch.nn.functional.conv_transpose1d if transposed else torch.nn.functional.conv1d
    return (x, w, b, S), {}, nbytes, _fp32(conv)


def rvq_case(B, device):
    """Mimi's split residual-VQ encode of one frame at ``B`` streams (1 + 31 levels of 2048 codes in 256 dims, the
    latent random): bytes = the 32 augmented codebooks read once (the CUDA kernel runs 1..4 rows, more run Triton's)."""
    from dsm_kernels.reference import augment_codebook, rvq_encode_ref, rvq_level_ranges

    g = torch.Generator(device=device).manual_seed(0)
    books = torch.stack([augment_codebook(torch.randn(2048, 256, device=device, generator=g)) for _ in range(32)])
    x = torch.randn(B, 2 * 256, 1, device=device, generator=g) * 4
    levels = (1, 31)
    args = (x, books.contiguous(), levels, rvq_level_ranges(levels, device))
    counters = torch.zeros(2, dtype=torch.int32, device=device)  # the persistent kernel's barrier, as Mimi's state
    # keeps it (no zeroing a launch); the reference runs every row of a level as one GEMM
    return args, {"counters": counters}, books.numel() * 4, rvq_encode_ref


def vad_case(B, device):
    """stt-1b's semantic-VAD heads (4 heads of 6 classes over d = 2048, bf16) on ``B`` rows: bytes = the heads'
    weights and the rows read once; the torch baseline is the reference (a GEMM and an fp32 softmax)."""
    from dsm_kernels.reference import head_probs_ref

    g = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(B, 2048, device=device, generator=g).bfloat16()
    w = (torch.randn(24, 2048, device=device, generator=g) * 2048**-0.5).bfloat16()
    return (z, w, 4), {}, (w.numel() + z.numel()) * 2, head_probs_ref


def frame_case(model, B, device):
    """A decode step's input kernel (``frame_embed``: the delay ring, the embedding of its column, the K/V slots) at
    ``model``'s layout: STT with 32 input streams (delay 6), TTS with every stream generated (delay 2, demultiplexed
    text, a condition). Bytes: as ``embed``. The torch baseline is the three ops it replaces, on the fastest backend
    (on CUDA: Triton's ring and slot kernels around the CUDA embedding kernel)."""
    import dsm_kernels

    (tokens, text, audio), kw, nbytes = embed_case(model, B, device)
    tts = model.startswith("tts")
    K, delay = tokens.shape[1], 2 if tts else 6
    cache = tokens[:, :, None].repeat(1, 1, delay + 2).contiguous()
    offsets = torch.arange(B, device=device) + 10
    ex = torch.ones(B, dtype=torch.bool, device=device)
    delays = torch.tensor([0] + [delay] * (K - 1), device=device)
    initial = torch.full((K,), AUDIO_CARD, device=device)
    n_gen = K if tts else 1
    inputs = None if tts else tokens[:, 1:].contiguous()
    bt = torch.arange(B * 47, device=device, dtype=torch.int32).view(B, 47)
    positions = torch.zeros(B, dtype=torch.int64, device=device)
    fast = "cuda" if "cuda" in dsm_kernels.available_backends(device) else "triton"

    def three_ops(cache, offsets, ex, delays, initial, inputs, n_gen, text, audio, bt, positions, page_size, **kw):
        col = dsm_kernels.frame_inputs(cache, offsets, ex, delays, initial, inputs, n_gen, backend=fast)
        x = dsm_kernels.multistream_embed(col, text, audio, backend=fast, **kw)
        return x, *dsm_kernels.kv_slots(bt, positions, ex, page_size, advance=True, backend=fast)

    return (cache, offsets, ex, delays, initial, inputs, n_gen, text, audio, bt, positions, 16), kw, nbytes, three_ops


def grid_providers(fn, grids: list[int], name: str = "cuda") -> dict:
    """A persistent kernel at other grid sizes than its default (one block per SM): providers ``cuda:g66``, ... (the
    grid a planner should pick, by measurement)."""
    return {f"{name}:g{n}": functools.partial(fn, blocks=n) for n in grids}


def _gemv_torch(x, w, **kw):
    from dsm_kernels.reference import gemv_ref

    return gemv_ref(x, w, **kw)


KERNELS = {
    "embed": (
        "multistream_embed",
        multistream_embed_torch,
        lambda B, dev, args: [(m, *embed_case(m, B, dev)) for m in MODELS],
    ),
    "attention": (
        "paged_decode_attention",
        paged_decode_attention_torch,
        lambda B, dev, args: [(_attention_label(m, ps, kv), *attention_case(m, B, dev, ps, ATTENTION_KV[kv]))
                              for m in MODELS for ps in args.page_sizes for kv in args.kv_dtypes],
    ),
    "voice": ("paged_decode_attention", None, lambda B, dev, args: [("tts-1.6b", *voice_case(B, dev))]),
    "sampling": (
        "sample_tokens",
        sample_tokens_torch,
        lambda B, dev, args: [(f"V{V}", *sampling_case(V, B, dev)) for V in (8000, 4000, 2048)],
    ),
    # the small-batch GEMV against cuBLAS (F.linear + the torch glue): only batch <= 4 exists
    "gemv": ("gemv", _gemv_torch,
             lambda B, dev, args: [(n, *gemv_case(n, B, dev)) for n in GEMV_SHAPES] if B <= 4 else []),
    # Mimi's wide convolutions: the tf32x3 implicit GEMMs against cuDNN's fp32 convolutions
    "conv": ("conv1d_igemm", None, lambda B, dev, args: [(n, *conv_case(n, B, dev)) for n in CONV_SHAPES]),
    "convtr": ("conv_transpose1d_igemm", None,
               lambda B, dev, args: [(n, *conv_case(n, B, dev, transposed=True)) for n in CONVTR_SHAPES]),
    # Mimi's residual-VQ encode: 32 dependent levels (one cooperative launch on CUDA at 1..4 rows, else one a level)
    "rvq": ("rvq_encode", None, lambda B, dev, args: [("mimi", *rvq_case(B, dev))]),
    # stt-1b's semantic VAD: one kernel against a GEMM and a softmax
    "vad": ("head_probs", None, lambda B, dev, args: [("stt-1b", *vad_case(B, dev))]),
    # a step's input kernel against the three it replaces
    "frame": ("frame_embed", None, lambda B, dev, args: [(m, *frame_case(m, B, dev)) for m in ("stt-1b", "tts-1.6b")]),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", type=parse_device, default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    ap.add_argument("--batch", nargs="+", type=positive_int, default=[1, 64, 400])
    ap.add_argument("--iters", type=positive_int, default=100)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    ap.add_argument("--graph", action="store_true",
                    help="time CUDA-graph replays (kernel time without host launch overhead; the loop reference "
                         "cannot be captured)")
    ap.add_argument("--providers", nargs="+", default=None, choices=["reference", "torch", "compile", "triton", "cuda"],
                    help="time only these providers (default: all available)")
    ap.add_argument("--reference-max-batch", type=nonnegative_int, default=64,
                    help="the loop references are slow beyond this (0: none)")
    ap.add_argument("--attention-splits", nargs="+", type=positive_int, default=[],
                    help="also time the triton/cuda attention at these split-K factors (providers 'cuda:s3', ...)")
    ap.add_argument("--page-sizes", nargs="+", type=positive_int, default=[16],
                    help="attention: KV page sizes to time (positions a page; the engine's default is 16)")
    ap.add_argument("--kv-dtypes", nargs="+", default=["bf16"], choices=list(ATTENTION_KV),
                    help="attention: KV page dtypes to time (fp8 = e4m3, half the bytes)")
    ap.add_argument("--grids", nargs="+", type=positive_int, default=[],
                    help="rvq: also time the persistent CUDA kernel at these grid sizes (providers 'cuda:g66', ...)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/kernels.jsonl"))
    args = ap.parse_args(argv)
    if (why := check_output(args.out, "--out")) is not None:  # before the run, not a traceback after its first row
        ap.error(why)

    device = device_or_default(args.device)
    backends = [b for b in available_backends(device) if b != "reference"]
    if (why := unavailable_providers(args, device, backends)) is not None:
        ap.error(why)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "timing": ("cuda_graph_replay" if args.graph else "cuda_events_eager") if device.type == "cuda"
        else "perf_counter",
    }
    copy_gbps = copy_bandwidth_gbps(device)
    print(f"# {meta['device']}  torch {meta['torch']}  triton {triton_version}  copy {copy_gbps:.0f} GB/s")
    time_ms = timer(device, args.iters, args.graph)
    results = []
    for kname in args.kernels:
        op, torch_fn, cases = KERNELS[kname]
        want_compile = not args.no_compile and (args.providers is None or "compile" in args.providers)
        compiled = torch.compile(torch_fn, dynamic=True) if want_compile and torch_fn is not None else None
        for B in args.batch:
            for shape, fargs, kw, nbytes, *own_torch in cases(B, device, args):  # a case may bring its torch baseline
                providers = {"torch": own_torch[0] if own_torch else torch_fn}
                if B <= args.reference_max_batch:
                    providers["reference"] = resolve(op, "reference", device)
                if compiled is not None:
                    providers["compile"] = compiled
                providers |= {b: resolve(op, b, device) for b in backends}
                if kname == "attention":  # the split-K sweep behind the planner's choice
                    providers |= {f"{b}:s{n}": functools.partial(resolve(op, b, device), num_splits=n)
                                  for b in backends for n in args.attention_splits}  # fmt: skip
                if kname == "rvq" and "cuda" in backends:
                    from dsm_kernels.cuda_ops import rvq_encode_cuda

                    providers |= grid_providers(rvq_encode_cuda, args.grids)
                if args.providers:
                    providers = {n: f for n, f in providers.items() if n.split(":")[0] in args.providers}
                for name, fn in providers.items():
                    try:
                        ms = time_ms(lambda fn=fn, a=fargs, k=kw: fn(*a, **k))
                        err = None
                    except Exception as e:  # a provider failing must not hide the others' numbers
                        ms, err = float("nan"), repr(e)[:200]
                    gbps = nbytes / ms / 1e6
                    row = {"kernel": kname, "shape": shape, "batch": B, "provider": name, "ms": ms, "gbps": gbps,
                           "frac_copy": gbps / copy_gbps, "bytes": nbytes, "copy_gbps": copy_gbps, **meta}  # fmt: skip
                    if err:
                        row["error"] = err
                    results.append(row)
                    append_jsonl(args.out, [row])  # row by row, each whole; a failed row's NaN: null
                    print(f"{kname:<10}{shape:<18} B={B:<5}{name:<10}{ms:>9.4f} ms {gbps:>8.1f} GB/s "
                          f"{100 * gbps / copy_gbps:>6.1f}% copy" + (f"  {err}" if err else ""))  # fmt: skip
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_summary(results)
    return results


def unavailable_providers(args, device: torch.device, backends: list[str]) -> str | None:
    """Say which --providers cannot run (they were dropped without a word, and a run of only those printed nothing):
    a usage error when none of them can, one line each when others still run (a GPU run whose CUDA build failed keeps
    its Triton rows)."""
    if not args.providers:
        return None
    why = {p: backend_unavailable(p, device) for p in args.providers if p in ("triton", "cuda") and p not in backends}
    if "compile" in args.providers and args.no_compile:
        why["compile"] = "--no-compile was given"
    if "reference" in args.providers and min(args.batch) > args.reference_max_batch:
        why["reference"] = f"--reference-max-batch {args.reference_max_batch} is below every --batch"
    if set(args.providers) <= set(why):
        return "argument --providers: nothing to time: " + "; ".join(f"{p}: {w}" for p, w in why.items())
    for p, w in why.items():
        print(f"# provider {p} not timed: {w}")
    return None


def print_summary(results):
    """One line per (kernel, shape, batch): the ms of each provider, best custom kernel vs best torch baseline."""
    groups: dict[tuple, dict[str, float]] = {}
    for r in results:
        groups.setdefault((r["kernel"], r["shape"], r["batch"]), {})[r["provider"]] = r["ms"]
    names = ["reference", "torch", "compile", "triton", "cuda"]
    print("\n" + f"{'kernel':<10}{'shape':<18}{'B':>5}" + "".join(f"{n:>11}" for n in names) + f"{'speedup':>9}")
    for (k, s, b), p in groups.items():
        base = min((p[n] for n in ("torch", "compile") if n in p and p[n] == p[n]), default=float("nan"))
        best = min((p[n] for n in ("triton", "cuda") if n in p and p[n] == p[n]), default=float("nan"))
        cells = "".join(f"{p[n]:>11.4f}" if n in p else f"{'-':>11}" for n in names)
        print(f"{k:<10}{s:<18}{b:>5}{cells}{base / best:>8.2f}x")


if __name__ == "__main__":
    main()
