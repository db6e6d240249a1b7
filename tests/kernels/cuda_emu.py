"""The CUDA C++ kernels of ``csrc/`` run on the CPU, for tests (backend name ``cuda_emu``).

``csrc/*.cu`` are compiled by the host C++ compiler against ``cuda_emu_include/`` (an emulation of the CUDA subset
they use: threads as fibers, barriers, warp collectives, bf16/fp16/fp8 conversions) into a shared library whose C
launchers (``csrc/dsm_cuda.h``) are called through ctypes on CPU tensors. So CPU CI executes the kernels' own logic
against the reference ops, where it could otherwise only compile them; the GPU tests still run the real thing.

The wrappers below have the signatures of ``dsm_kernels.cuda_ops``' and pass the same arguments as
``csrc/bindings.cpp`` (without its input checks: the tests give valid inputs).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from dsm_kernels.cuda_ops import (
    _rows16,
    attention_unsupported,
    decode_num_splits,
    decoder_operands,
    decoder_unsupported,
    depformer_operands,
    depformer_unsupported,
    embed_unsupported,
    mimi_operands,
    mimi_unsupported,
    rvq_unsupported,
    sample_unsupported,
    sync_words,
)
from dsm_kernels.embed import multistream_embed_triton
from dsm_kernels.paged_attention import paged_decode_attention_triton
from dsm_kernels.sampling import sample_tokens_triton

ROOT = Path(__file__).resolve().parents[2]
INCLUDE = Path(__file__).resolve().parent / "cuda_emu_include"
SOURCES = sorted((ROOT / "csrc").glob("*.cu"))
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
# No FMA contraction (the kernels' *_rn intrinsics and the sampler's CFG mix round each operation, as on the GPU).
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-shared", "-ffp-contract=off", "-x", "c++", f"-I{INCLUDE}",
         f"-I{ROOT / 'csrc'}"]
# DSM_CUDA_EMU_SANITIZE=1: built with AddressSanitizer and UBSan's integer checks (signed overflow, shifts, array
# bounds: what index math can get wrong; the whole UBSan group would triple the build) and its alignment check (a
# 16-byte vector access through a misaligned pointer, which faults on a GPU and passes on a CPU), so a read or write
# outside every tensor, an overflowing index or a misaligned vector access stops the process with a report; the
# process must have libasan preloaded (test_cuda_emu_sanitized.py).
if os.environ.get("DSM_CUDA_EMU_SANITIZE") == "1":
    FLAGS += ["-fsanitize=address,signed-integer-overflow,shift,bounds,alignment", "-fno-sanitize-recover=all",
              "-fno-omit-frame-pointer", "-g"]
EMULATED_SMS = 132  # an H100's: the split planner sees the GPU's block counts

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float8_e4m3fn: 3}


def build_command(out: Path) -> list[str]:
    return [CXX or "g++", *FLAGS, *map(str, SOURCES), "-o", str(out)]


def library_path() -> Path:
    """Where the library for the current sources lives (keyed by their content, so an edit rebuilds)."""
    h = hashlib.sha256(" ".join(FLAGS).encode())
    for f in [*SOURCES, *sorted((ROOT / "csrc").glob("*.cuh")), ROOT / "csrc" / "dsm_cuda.h",
              *sorted(INCLUDE.glob("*.h"))]:
        h.update(f.read_bytes())
    return Path(tempfile.gettempdir()) / f"dsm-cuda-emu-{h.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile the library unless this content's is already there (written under a temporary name, then renamed,
    so concurrent test processes never load a half-written file)."""
    path = library_path()
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run(build_command(tmp), capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"building the CUDA emulation failed:\n{done.stderr[-4000:]}")
        tmp.replace(path)
    return path


@cache
def _lib():
    lib = ctypes.CDLL(str(build()))
    p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.dsm_launch_multistream_embed.argtypes = [p, i64, i64, i32, i32, p, p, p, p, p, i32, i32, i64, i64, i64, i64,
                                                 i64, i64, i64, i64, p]
    lib.dsm_launch_append_kv.argtypes = [p, p, p, p, p, i32, i32, i32, i32, i32, i64, i64, i64, i64, i64, i64, p]
    lib.dsm_launch_paged_decode_attention.argtypes = [p, p, p, p, p, p, i32, i32, i32, i32, i32, i32, i32, i32, f32,
                                                      i32, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, i32, p]
    lib.dsm_paged_decode_blocks_per_sm.argtypes = [i32, i32, i32, ctypes.POINTER(i32)]
    lib.dsm_launch_sample_tokens.argtypes = [p, p, p, i32, i32, i32, i64, i64, f32, p, i32, p, p, i64, i64, p]
    lib.dsm_launch_depformer_frame.argtypes = [ctypes.POINTER(DepformerArgs), p]
    lib.dsm_launch_decoder_step.argtypes = [ctypes.POINTER(DecoderArgs), p]
    lib.dsm_launch_rvq_encode.argtypes = [ctypes.POINTER(RvqArgs), p]
    lib.dsm_rvq_work_bytes.argtypes = []
    lib.dsm_rvq_work_bytes.restype = ctypes.c_size_t
    lib.dsm_decoder_work_bytes.argtypes = [i32] * 5
    lib.dsm_decoder_work_bytes.restype = ctypes.c_size_t
    lib.dsm_depformer_work_bytes.argtypes = [i32] * 7
    lib.dsm_depformer_work_bytes.restype = ctypes.c_size_t
    for fn in (lib.dsm_launch_multistream_embed, lib.dsm_launch_append_kv, lib.dsm_launch_paged_decode_attention,
               lib.dsm_paged_decode_blocks_per_sm, lib.dsm_launch_sample_tokens, lib.dsm_launch_depformer_frame,
               lib.dsm_launch_decoder_step, lib.dsm_launch_rvq_encode):
        fn.restype = ctypes.c_int
    return lib


class DepformerArgs(ctypes.Structure):
    """``DsmDepformerArgs`` of csrc/dsm_cuda.h."""

    _fields_ = [*((n, ctypes.c_int) for n in ("B", "dim", "heads", "hidden", "card", "dep_q", "layers", "d_model",
                                              "n_in", "text_vocab", "top_k", "dtype", "blocks", "step_scale",
                                              "step_offset")),
                ("eps", ctypes.c_float),
                *((n, ctypes.c_void_p) for n in ("table", "in_proj", "text_emb2", "z", "text_token", "temperature",
                                                 "seeds", "steps", "tokens", "logits", "work", "sync"))]


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _ok(err: int, what: str) -> None:
    if err != 0:
        raise RuntimeError(f"{what}: emulated launch failed with cudaError {err}")


def multistream_embed_emu(tokens, text_table, audio_tables, *, text_table2=None, cond=None, out_dtype=None, out=None):
    if embed_unsupported(tokens, text_table, audio_tables, text_table2) is not None:  # as on a GPU
        return multistream_embed_triton(tokens, text_table, audio_tables, text_table2=text_table2, cond=cond,
                                        out_dtype=out_dtype, out=out)  # fmt: skip
    B, K = tokens.shape
    D = text_table.shape[1]
    tokens = tokens.long()
    cond = None if cond is None else cond.float().contiguous()
    if out is None:
        out = torch.empty(B, D, dtype=out_dtype or text_table.dtype)
    _ok(_lib().dsm_launch_multistream_embed(
        _ptr(tokens), tokens.stride(0), tokens.stride(1), B, K, _ptr(text_table), _ptr(text_table2),
        _ptr(audio_tables), _ptr(cond), _ptr(out), _DTYPES[text_table.dtype], _DTYPES[out.dtype], D,
        text_table.shape[0], text_table.stride(0), 0 if text_table2 is None else text_table2.stride(0),
        audio_tables.stride(0), audio_tables.stride(1), 0 if cond is None else cond.stride(0), out.stride(0), None,
    ), "multistream_embed")
    return out


def append_kv_emu(k_cache, v_cache, k, v, slot_mapping) -> None:
    B, H, D = k.shape
    slot_mapping = slot_mapping.long().contiguous()
    _ok(_lib().dsm_launch_append_kv(
        _ptr(k), _ptr(v), _ptr(k_cache), _ptr(v_cache), _ptr(slot_mapping), B, H * D, k_cache.shape[1],
        _DTYPES[k.dtype], _DTYPES[k_cache.dtype], k.stride(0), v.stride(0), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), None,
    ), "append_kv")


def paged_decode_attention_emu(
    q, k_cache, v_cache, block_table, seq_lens, *, context, scale=None, out=None, num_splits=None, counters=None
):
    if attention_unsupported(q, k_cache, v_cache) is not None:  # as on a GPU
        return paged_decode_attention_triton(q, k_cache, v_cache, block_table, seq_lens, context=context, scale=scale,
                                             out=out, num_splits=num_splits, counters=counters)  # fmt: skip
    B, H, D = q.shape
    if not _rows16(q):
        q = q.contiguous()
    block_table = block_table.int()
    if block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    seq_lens = seq_lens.int().contiguous()
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_splits is None:
        per_sm = ctypes.c_int(0)
        _ok(_lib().dsm_paged_decode_blocks_per_sm(D, _DTYPES[q.dtype], _DTYPES[k_cache.dtype], ctypes.byref(per_sm)),
            "paged_decode_blocks_per_sm")
        num_splits = decode_num_splits(B, H, context, per_sm.value * EMULATED_SMS)
    scale = D**-0.5 if scale is None else scale
    parts = B * H * num_splits if num_splits > 1 else 1
    ml = torch.empty(2, parts)
    acc = torch.empty(parts, D if num_splits > 1 else 1)
    cnt = counters if counters is not None and num_splits > 1 else None
    _ok(_lib().dsm_launch_paged_decode_attention(
        _ptr(out), _ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(block_table), _ptr(seq_lens), B, H, D,
        _DTYPES[q.dtype], _DTYPES[k_cache.dtype], k_cache.shape[1], block_table.shape[1], int(context), float(scale),
        int(num_splits), _ptr(ml), _ptr(ml) + 4 * parts, _ptr(acc), _ptr(cnt), q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), block_table.stride(0), 0, None,
    ), "paged_decode_attention")
    return out


def sample_tokens_emu(logits, temperature, top_k, seeds, steps, *, step_scale=1, step_offset=0, null_logits=None,
                      cfg_coef=1.0, out=None):  # fmt: skip
    if sample_unsupported(logits, null_logits) is not None:  # as on a GPU
        return sample_tokens_triton(logits, temperature, top_k, seeds, steps, step_scale=step_scale,
                                    step_offset=step_offset, null_logits=null_logits, cfg_coef=cfg_coef, out=out)
    B, V = logits.shape
    if out is None:
        out = torch.empty(B, dtype=torch.int64)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if null_logits is not None and null_logits.stride(1) != 1:
        null_logits = null_logits.contiguous()
    temperature, seeds, steps = temperature.float().contiguous(), seeds.long().contiguous(), steps.long().contiguous()
    _ok(_lib().dsm_launch_sample_tokens(
        _ptr(out), _ptr(logits), _ptr(null_logits), _DTYPES[logits.dtype], B, V, logits.stride(0),
        0 if null_logits is None else null_logits.stride(0), float(cfg_coef), _ptr(temperature), int(top_k),
        _ptr(seeds), _ptr(steps), int(step_scale), int(step_offset), None,
    ), "sample_tokens")
    return out


def _poisoned_work(nbytes: int) -> torch.Tensor:
    """A persistent kernel's scratch, all 0xFF bytes: what it reads before writing is NaN."""
    return torch.full((nbytes,), 0xFF, dtype=torch.uint8)


def _sync(ops_counters, words: int) -> torch.Tensor:
    """A persistent kernel's barrier and counter words: the caller's (``cuda_ops.sync_words``), else zeroed here, as
    the binding does."""
    return ops_counters if ops_counters is not None else torch.zeros(words, dtype=torch.int32)


def _run_persistent(launcher, args, sync: torch.Tensor, what: str) -> None:
    """Launch an emulated persistent kernel (on ``args.blocks`` blocks); it must leave every barrier and counter word
    (``sync``) at 0, as the next launch on the same words needs them."""
    _ok(launcher(ctypes.byref(args), None), what)
    assert not sync.any(), f"barrier or counter words left at {sync.tolist()}"


class DecoderArgs(ctypes.Structure):
    """``DsmDecoderArgs`` of csrc/dsm_cuda.h."""

    _fields_ = [*((n, ctypes.c_int) for n in ("B", "dim", "heads", "kv_heads", "head_dim", "hidden", "vocab", "layers",
                                              "dtype", "page_size", "pages_per_slot", "context", "blocks", "gelu",
                                              "cache_dtype")),
                *((n, ctypes.c_float) for n in ("eps", "out_eps", "scale", "cross_eps")),
                *((n, ctypes.c_void_p) for n in ("table", "out_norm", "text_linear", "inv_freq", "positions", "slot",
                                                 "seq_lens", "starts", "block_table", "k_cache", "v_cache")),
                *((n, ctypes.c_int64) for n in ("cache_layer_stride", "page_stride", "slot_stride", "head_stride")),
                ("cross_k", ctypes.c_void_p), ("cross_v", ctypes.c_void_p), ("cross_layer_stride", ctypes.c_int64),
                *((n, ctypes.c_void_p) for n in ("cross_block_table", "cross_seq_lens")),
                ("cross_page_size", ctypes.c_int), ("cross_length", ctypes.c_int),
                *((n, ctypes.c_void_p) for n in ("x", "z", "logits", "work", "sync"))]


class RvqArgs(ctypes.Structure):
    """``DsmRvqArgs`` of csrc/dsm_cuda.h."""

    _fields_ = [*((n, ctypes.c_int) for n in ("N", "T", "D", "K", "groups", "max_levels", "blocks")),
                ("x", ctypes.c_void_p), *((n, ctypes.c_int64) for n in ("sxb", "sxc", "sxt")),
                *((n, ctypes.c_void_p) for n in ("books", "level_ranges", "out")),
                *((n, ctypes.c_int64) for n in ("sob", "sol", "sot")),
                *((n, ctypes.c_void_p) for n in ("work", "sync"))]


def rvq_encode_emu(x, codebooks_aug, group_levels, level_ranges, out=None, counters=None, blocks=3):
    """``cuda_ops.rvq_encode_cuda`` on the emulated persistent kernel; encodes it does not take run Triton's."""
    if rvq_unsupported(x, codebooks_aug, group_levels) is not None:
        from dsm_kernels.mimi_kernels import rvq_encode_triton

        return rvq_encode_triton(x, codebooks_aug, tuple(group_levels), level_ranges, out=out)
    B, _, T = x.shape
    if out is None:
        out = torch.empty(B, sum(group_levels), T, dtype=torch.int64)
    out.fill_(-7)  # poisoned: a code the kernel never wrote
    work = _poisoned_work(_lib().dsm_rvq_work_bytes())
    sync = _sync(sync_words(counters, 2), 2)
    args = RvqArgs(B * T, T, codebooks_aug.shape[2] - 2, codebooks_aug.shape[1], len(group_levels),
                   max(group_levels), blocks, _ptr(x), *x.stride(), _ptr(codebooks_aug), _ptr(level_ranges),
                   _ptr(out), *out.stride(), _ptr(work), _ptr(sync))  # fmt: skip
    _run_persistent(_lib().dsm_launch_rvq_encode, args, sync, "rvq_encode")
    return out


def _decoder_launch_emu(x, k_cache, v_cache, ops, cross, blocks) -> None:
    """The persistent decode-step kernel, emulated, on ``decoder_operands``' ``ops`` (as bindings.cpp passes them)."""
    heads, kv_heads, hidden, layers, page_size, context, gelu = ops["dims"]
    B, D, dtype = x.shape[0], k_cache.shape[4], _DTYPES[x.dtype]
    # poisoned: scratch read before the kernel wrote it is NaN, an output it never wrote stays NaN
    work = _poisoned_work(_lib().dsm_decoder_work_bytes(B, heads, D, hidden, dtype))
    for out in (ops["z"], ops["logits"]):
        if out is not None:
            out.fill_(float("nan"))
    sync = _sync(ops["counters"], 2 + B * heads)  # the grid barrier, the attention counters
    vocab = 0 if ops["text_linear"] is None else ops["text_linear"].shape[0]
    args = DecoderArgs(B, x.shape[1], heads, kv_heads, D, hidden, vocab, layers, dtype, page_size,
                       ops["block_table"].shape[1], context, blocks, gelu, _DTYPES[k_cache.dtype], ops["eps"],
                       ops["out_eps"], ops["scale"],
                       ops["cross_eps"],
                       *map(_ptr, (ops["table"], ops["out_norm"], ops["text_linear"], ops["inv_freq"],
                                   ops["positions"], ops["slot"], ops["seq_lens"], ops["starts"], ops["block_table"],
                                   k_cache, v_cache)),
                       *k_cache.stride()[:4], _ptr(ops["cross_k"]), _ptr(ops["cross_v"]),
                       0 if cross is None else cross.k.stride(0), _ptr(ops["cross_block_table"]),
                       _ptr(ops["cross_seq_lens"]), 0 if cross is None else cross.page_size,
                       0 if cross is None else cross.length,
                       *map(_ptr, (x, ops["z"], ops["logits"], work, sync)))  # fmt: skip
    _run_persistent(_lib().dsm_launch_decoder_step, args, sync, "decoder_step")


def _single_ops_backend(device) -> str:
    """What the single ops run on where the persistent kernel does not: the emulated CUDA ones where the
    cuda_emulated fixture routes the cuda backend here, else Triton's."""
    import dsm_kernels

    return "cuda" if "cuda" in dsm_kernels.available_backends(device) else "triton"


def decoder_step_emu(w, x, positions, slot, seq_lens, k_cache, v_cache, block_table, *, context, counters=None,
                     cross=None, blocks=3):  # fmt: skip
    """``cuda_ops.decoder_step_cuda`` on the emulated persistent kernel (``blocks``: its grid, as in
    :func:`depformer_frame_emu`); steps it does not take run the single ops (Triton, emulated CUDA attention)."""
    if decoder_unsupported(w, x, k_cache, cross, v_cache) is not None:
        from dsm_kernels.decoder import decoder_step_composed

        return decoder_step_composed(w, x, positions, slot, seq_lens, k_cache, v_cache, block_table, context=context,
                                     counters=counters, cross=cross, backend=_single_ops_backend(x.device))
    ops = decoder_operands(w, x, positions, slot, seq_lens, k_cache, block_table, context, cross, counters=counters)
    _decoder_launch_emu(x, k_cache, v_cache, ops, cross, blocks)
    return ops["z"], ops["logits"]


def mimi_transformer_emu(w, h, pos, exec_mask, cache, *, tokens, counters=None, blocks=3) -> None:
    """``cuda_ops.mimi_transformer_cuda`` on the emulated persistent kernel."""
    if mimi_unsupported(w, h, cache) is not None:
        from dsm_kernels.decoder import mimi_transformer_composed

        return mimi_transformer_composed(w, h, pos, exec_mask, cache, tokens=tokens,
                                         backend=_single_ops_backend(h.device))  # fmt: skip
    k_pages, v_pages, ops = mimi_operands(w, h, pos, exec_mask, cache, tokens, counters)
    _decoder_launch_emu(h, k_pages, v_pages, ops, None, blocks)


def depformer_frame_emu(w, z, text_token, temperature, top_k, seeds, steps, *, return_logits=False, step_scale=1,
                        step_offset=0, counters=None, blocks=3):  # fmt: skip
    """``cuda_ops.depformer_frame_cuda`` on the emulated persistent kernel; ``blocks``: its grid (the emulation runs
    every block's 512 threads at once, so a few; their count changes every block's share of the rows)."""
    if depformer_unsupported(w, z) is not None:
        from dsm_kernels.depformer import depformer_frame_triton

        return depformer_frame_triton(w, z, text_token, temperature, top_k, seeds, steps, return_logits=return_logits,
                                      step_scale=step_scale, step_offset=step_offset)  # fmt: skip
    ops = depformer_operands(w, z, text_token, temperature, top_k, seeds, steps, counters, step_scale, step_offset)
    heads, hidden, card, dep_q, layers, n_in, vocab, top_k, step_scale, step_offset = ops["dims"]
    B, dim, dtype = z.shape[0], w.dim, _DTYPES[ops["z"].dtype]
    # poisoned: scratch read before the kernel wrote it is NaN, an output it never wrote stays NaN or -7
    work = _poisoned_work(_lib().dsm_depformer_work_bytes(B, dim, hidden, n_in, layers, dep_q, dtype))
    ops["tokens"].fill_(-7)
    ops["logits"].fill_(float("nan"))
    sync = _sync(ops["counters"], 3 + heads)  # the grid barrier, the arrival counters
    args = DepformerArgs(B, dim, heads, hidden, card, dep_q, layers, z.shape[1], n_in, vocab, top_k, dtype, blocks,
                         step_scale, step_offset, ops["eps"],
                         *map(_ptr, (ops["table"], ops["in_proj"], ops["text_emb2"], ops["z"], ops["text_token"],
                                     ops["temperature"], ops["seeds"], ops["steps"], ops["tokens"], ops["logits"],
                                     work, sync)))  # fmt: skip
    _run_persistent(_lib().dsm_launch_depformer_frame, args, sync, "depformer_frame")
    tokens = ops["tokens"]
    return (tokens, ops["logits"].permute(1, 0, 2).contiguous()) if return_logits else tokens


OPS = {
    "multistream_embed": multistream_embed_emu,
    "append_kv": append_kv_emu,
    "paged_decode_attention": paged_decode_attention_emu,
    "sample_tokens": sample_tokens_emu,
    "depformer_frame": depformer_frame_emu,
    "decoder_step": decoder_step_emu,
    "mimi_transformer": mimi_transformer_emu,
    "rvq_encode": rvq_encode_emu,
}
