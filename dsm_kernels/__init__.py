"""dsm kernels: fused multistream embedding, paged KV-cache decode attention and sampling, the fused depth
transformer frame, the temporal transformer's decode step at a few rows, the fused glue of a temporal decode step
(residual + RMSNorm, RoPE, SiLU gate), the small-batch GEMV with that glue in its prologue and epilogue, and the
delayed-stream bookkeeping of a step (input column, commit, KV slots).

Every op has a pure-torch reference (``dsm_kernels.reference``) and a Triton kernel; the three core kernels
(embedding, paged attention with its append, sampling), the depth-transformer frame and the decode step (persistent
kernels, one launch a frame or step at batch <= 4) also have a CUDA C++ kernel. The functions below are the single
dispatch point: each checks its inputs' shapes once for every backend (:mod:`dsm_kernels.checks`), then
``backend=None`` picks the fastest backend available for the tensors' device (cuda > triton > reference on a GPU;
reference on the CPU), or an explicit backend name.
Triton kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from functools import cache

import torch

from . import checks, reference

BACKENDS = ("reference", "triton", "cuda")

# The most rows the Triton GEMV kernel takes (its row loop is unrolled); callers use F.linear above it.
GEMV_MAX_B = 4


# The most output columns (batch rows x steps) conv1d_gemv takes: its weight tile stays in registers while the
# columns go by, so a conv's weights are read once however many; the work per weight grows with them.
CONV_GEMV_MAX_COLUMNS = 64


def counter_words(rows: int, heads: int) -> int:
    """Size of a ``counters`` tensor (int32 at 0) for the ops on up to ``rows`` rows of ``heads`` heads: a split-merge
    counter per (row, head) for the decode attention, and the CUDA persistent kernels' words (two of the grid
    barrier's, one of the depth transformer's, which also counts its own heads: enough when they are no more than
    ``rows * heads``). A caller that keeps such a tensor lets every launch skip zeroing words of its own."""
    return rows * heads + 3


def gemv_max_rows() -> int:
    """Up to how many rows the model and the depth transformer take their GEMV kernels: ``GEMV_MAX_B``, or 0 with
    ``DSM_GEMV=0`` (the tensor-core paths at every batch: to compare the two on a device)."""
    return 0 if os.environ.get("DSM_GEMV") == "0" else GEMV_MAX_B


def conv_gemv_max_columns() -> int:
    """Up to how many output columns Mimi takes ``conv1d_gemv`` for a convolution: ``CONV_GEMV_MAX_COLUMNS``, or 0
    with ``DSM_GEMV=0``."""
    return 0 if os.environ.get("DSM_GEMV") == "0" else CONV_GEMV_MAX_COLUMNS

# op name -> {backend -> "module:function"}; modules are imported on first use.
_OPS = {
    "multistream_embed": {
        "reference": "dsm_kernels.reference:multistream_embed_ref",
        "triton": "dsm_kernels.embed:multistream_embed_triton",
        "cuda": "dsm_kernels.cuda_ops:multistream_embed_cuda",
    },
    "append_kv": {
        "reference": "dsm_kernels.reference:append_kv_ref",
        "triton": "dsm_kernels.paged_attention:append_kv_triton",
        "cuda": "dsm_kernels.cuda_ops:append_kv_cuda",
    },
    "paged_decode_attention": {
        "reference": "dsm_kernels.reference:paged_decode_attention_ref",
        "triton": "dsm_kernels.paged_attention:paged_decode_attention_triton",
        "cuda": "dsm_kernels.cuda_ops:paged_decode_attention_cuda",
    },
    "sample_tokens": {
        "reference": "dsm_kernels.reference:sample_tokens_ref",
        "triton": "dsm_kernels.sampling:sample_tokens_triton",
        "cuda": "dsm_kernels.cuda_ops:sample_tokens_cuda",
    },
    # No CUDA C++ twin: a request for "cuda" (or the cuda default) falls back to the best registered backend.
    "add_rms_norm": {
        "reference": "dsm_kernels.reference:add_rms_norm_ref",
        "triton": "dsm_kernels.fused:add_rms_norm_triton",
    },
    "rope_append_kv": {
        "reference": "dsm_kernels.reference:rope_append_kv_ref",
        "triton": "dsm_kernels.fused:rope_append_kv_triton",
    },
    "gemv": {
        "reference": "dsm_kernels.reference:gemv_ref",
        "triton": "dsm_kernels.gemv_kernels:gemv_triton",
    },
    "qkv_rope_gemv": {
        "reference": "dsm_kernels.reference:qkv_rope_gemv_ref",
        "triton": "dsm_kernels.gemv_kernels:qkv_rope_gemv_triton",
    },
    "conv1d_igemm": {
        "reference": "dsm_kernels.reference:conv1d_igemm_ref",
        "triton": "dsm_kernels.conv_kernels:conv1d_igemm_triton",
    },
    "conv_transpose1d_igemm": {
        "reference": "dsm_kernels.reference:conv_transpose1d_igemm_ref",
        "triton": "dsm_kernels.conv_kernels:conv_transpose1d_igemm_triton",
    },
    "conv1d_gemv": {
        "reference": "dsm_kernels.reference:conv1d_gemv_ref",
        "triton": "dsm_kernels.gemv_kernels:conv1d_gemv_triton",
    },
    "silu_mul": {
        "reference": "dsm_kernels.reference:silu_mul_ref",
        "triton": "dsm_kernels.fused:silu_mul_triton",
    },
    "head_probs": {
        "reference": "dsm_kernels.reference:head_probs_ref",
        "triton": "dsm_kernels.fused:head_probs_triton",
    },
    "frame_inputs": {
        "reference": "dsm_kernels.reference:frame_inputs_ref",
        "triton": "dsm_kernels.frame:frame_inputs_triton",
    },
    "frame_commit": {
        "reference": "dsm_kernels.reference:frame_commit_ref",
        "triton": "dsm_kernels.frame:frame_commit_triton",
    },
    "kv_slots": {
        "reference": "dsm_kernels.reference:kv_slots_ref",
        "triton": "dsm_kernels.frame:kv_slots_triton",
    },
    "frame_embed": {
        "reference": "dsm_kernels.reference:frame_embed_ref",
        "triton": "dsm_kernels.frame:frame_embed_triton",
    },
    "depformer_frame": {
        "reference": "dsm_kernels.reference:depformer_frame_ref",
        "triton": "dsm_kernels.depformer:depformer_frame_triton",
        "cuda": "dsm_kernels.cuda_ops:depformer_frame_cuda",
    },
    "decoder_step": {
        "reference": "dsm_kernels.decoder:decoder_step_ref",
        "triton": "dsm_kernels.decoder:decoder_step_triton",
        "cuda": "dsm_kernels.cuda_ops:decoder_step_cuda",
    },
    "mimi_transformer": {
        "reference": "dsm_kernels.decoder:mimi_transformer_ref",
        "triton": "dsm_kernels.decoder:mimi_transformer_triton",
        "cuda": "dsm_kernels.cuda_ops:mimi_transformer_cuda",
    },
    "rvq_encode": {
        "reference": "dsm_kernels.reference:rvq_encode_ref",
        "triton": "dsm_kernels.mimi_kernels:rvq_encode_triton",
        "cuda": "dsm_kernels.cuda_ops:rvq_encode_cuda",
    },
    "rvq_decode_upsample": {
        "reference": "dsm_kernels.reference:rvq_decode_upsample_ref",
        "triton": "dsm_kernels.mimi_kernels:rvq_decode_upsample_triton",
    },
    "mimi_rope_kv": {
        "reference": "dsm_kernels.reference:mimi_rope_kv_ref",
        "triton": "dsm_kernels.mimi_kernels:mimi_rope_kv_triton",
    },
    "mimi_conv_pad": {
        "reference": "dsm_kernels.reference:mimi_conv_pad_ref",
        "triton": "dsm_kernels.mimi_kernels:mimi_conv_pad_triton",
    },
    "mimi_ring_attention": {
        "reference": "dsm_kernels.reference:mimi_ring_attention_ref",
        "triton": "dsm_kernels.mimi_kernels:mimi_ring_attention_triton",
    },
    "mimi_rows": {
        "reference": "dsm_kernels.reference:mimi_rows_ref",
        "triton": "dsm_kernels.mimi_kernels:mimi_rows_triton",
    },
    "mimi_residual_out": {
        "reference": "dsm_kernels.reference:mimi_residual_out_ref",
        "triton": "dsm_kernels.mimi_kernels:mimi_residual_out_triton",
    },
    "mimi_convtr_gemv": {
        "reference": "dsm_kernels.reference:mimi_convtr_gemv_ref",
        "triton": "dsm_kernels.mimi_kernels:mimi_convtr_gemv_triton",
    },
    "mimi_convtr_overlap": {
        "reference": "dsm_kernels.reference:mimi_convtr_overlap_ref",
        "triton": "dsm_kernels.mimi_kernels:mimi_convtr_overlap_triton",
    },
}


@cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


@cache
def has_cuda_ext() -> bool:
    """True when the compiled extension ``dsm_kernels._C`` imports."""
    try:
        importlib.import_module("dsm_kernels._C")
    except ImportError:
        return False
    return True


@cache
def cuda_ext_arch() -> str | None:
    """The GPU architecture ``dsm_kernels._C`` was compiled for (``DSM_CUDA_ARCH`` at build time, e.g. ``"90a"``), or
    None without the extension (or one built before it recorded its architecture)."""
    return getattr(importlib.import_module("dsm_kernels._C"), "cuda_arch", None) if has_cuda_ext() else None


@cache
def arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether machine code for ``sm_<arch>`` runs on a GPU of compute ``capability``. The extension carries machine
    code only (no PTX for the driver to compile), which runs on the same major version at an equal or higher minor
    one; an ``a`` (architecture-specific, e.g. 90a) build runs on exactly its own capability."""
    m = re.fullmatch(r"(\d+)(\d)([af]?)", arch)
    if m is None:
        return False
    major, minor = int(m[1]), int(m[2])
    if m[3] == "a":
        return capability == (major, minor)
    return capability[0] == major and capability[1] >= minor


@cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def cuda_ext_unavailable(device: torch.device | str) -> str | None:
    """Why the CUDA C++ backend cannot run on ``device`` (a sentence naming the fix), or None when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the CUDA kernels run on a GPU, not on {device.type} (move the tensors to a CUDA device)"
    if not has_cuda_ext():
        return ("dsm_kernels._C is not built (install with a CUDA build of torch and nvcc present, without "
                "DSM_SKIP_CUDA_BUILD=1)")
    arch = cuda_ext_arch()
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = _capability(index)
    if arch is not None and not arch_runs_on(arch, (major, minor)):
        return (f"dsm_kernels._C was built for sm_{arch}, and {device} is sm_{major}{minor}: reinstall with "
                f"DSM_CUDA_ARCH={major}{minor}{'a' if major >= 9 else ''} (or use the Triton kernels)")
    return None


@cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device | str) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (no index: the current device)."""
    device = torch.device(device)
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` in this process."""
    device = torch.device(device)
    out = ["reference"]
    if has_triton() and (device.type == "cuda" or triton_interpret()):
        out.append("triton")
    if device.type == "cuda" and cuda_ext_unavailable(device) is None:
        out.append("cuda")
    return out


def backend_unavailable(backend: str, device: torch.device | str) -> str | None:
    """Why kernel ``backend`` cannot run on ``device`` in this process (a sentence naming the fix where there is
    one: on a CPU, the Triton interpreter), or None when it can."""
    device = torch.device(device)
    avail = available_backends(device)
    if backend in avail:
        return None
    why = None
    if backend == "cuda":
        why = cuda_ext_unavailable(device)
    elif backend == "triton":
        why = ("Triton is not installed: pip install 'dsm[triton]'" if not has_triton() else
               "set TRITON_INTERPRET=1 to run the Triton kernels on a CPU")
    return (f"kernel backend {backend!r} is not available on {device} (available: {', '.join(avail)})"
            + (f": {why}" if why else ""))


def default_backend(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return "reference"
    avail = available_backends(device)
    return "cuda" if "cuda" in avail else ("triton" if "triton" in avail else "reference")


def op_names() -> tuple[str, ...]:
    return tuple(_OPS)


def op_backends(op: str) -> tuple[str, ...]:
    """The backends with an implementation of their own for ``op`` (others fall back, see :func:`resolve`)."""
    return tuple(_OPS[op])


def resolve(op: str, backend: str | None, device: torch.device | str):
    """The implementation of ``op`` for ``backend`` (None = default for ``device``), without the input checks of the
    dispatch functions below: its caller guarantees the shapes."""
    if op not in _OPS:
        raise KeyError(f"unknown kernel op {op!r}; known: {sorted(_OPS)}")
    backend = backend or default_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if (why := backend_unavailable(backend, device)) is not None:
        raise RuntimeError(why)
    if backend not in _OPS[op]:  # op without this backend: next best one registered for it
        avail = [b for b in available_backends(device) if b in _OPS[op]]
        backend = "triton" if "triton" in avail else "reference"
    return _load(_OPS[op][backend])


@cache
def _load(path: str):
    module, fn = path.split(":")
    return getattr(importlib.import_module(module), fn)


def multistream_embed(tokens, text_table, audio_tables, *, text_table2=None, cond=None, out_dtype=None, backend=None):
    """See :func:`dsm_kernels.reference.multistream_embed_ref`."""
    checks.multistream_embed(tokens, text_table, audio_tables, text_table2, cond)
    fn = resolve("multistream_embed", backend, tokens.device)
    return fn(tokens, text_table, audio_tables, text_table2=text_table2, cond=cond, out_dtype=out_dtype)


def append_kv(k_cache, v_cache, k, v, slot_mapping, *, backend=None):
    """See :func:`dsm_kernels.reference.append_kv_ref`."""
    checks.append_kv(k_cache, v_cache, k, v, slot_mapping)
    return resolve("append_kv", backend, k.device)(k_cache, v_cache, k, v, slot_mapping)


def paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, *, context, scale=None, counters=None,
                           backend=None):  # fmt: skip
    """See :func:`dsm_kernels.reference.paged_decode_attention_ref`; ``counters`` (int32, >= B*H, at 0, one launch
    at a time, e.g. :attr:`dsm.kv_cache.PagedKVCache.counters`) lets the split-K kernels merge in the same launch."""
    checks.paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, context)
    fn = resolve("paged_decode_attention", backend, q.device)
    return fn(q, k_cache, v_cache, block_table, seq_lens, context=context, scale=scale, counters=counters)


def _top_k(top_k: int, vocab: int) -> int:
    """The reference's rule for every backend: ``0 < top_k < vocab`` keeps that many, anything else keeps all (0).
    The CUDA binding reads top_k as a 32-bit int: 2**32 + 3 kept 3 tokens where the reference keeps them all."""
    top_k = int(top_k)
    return top_k if 0 < top_k < vocab else 0


def sample_tokens(logits, temperature, top_k, seeds, steps, *, step_scale=1, step_offset=0, null_logits=None,
                  cfg_coef=1.0, backend=None):  # fmt: skip
    """See :func:`dsm_kernels.reference.sample_tokens_ref` (row b's noise counter: ``steps[b] * step_scale +
    step_offset``)."""
    checks.sample_tokens(logits, temperature, seeds, steps, null_logits, top_k, step_scale, step_offset)
    fn = resolve("sample_tokens", backend, logits.device)
    return fn(logits, temperature, _top_k(top_k, logits.shape[1]), seeds, steps, step_scale=int(step_scale),
              step_offset=int(step_offset), null_logits=null_logits, cfg_coef=cfg_coef)


def add_rms_norm(x, alpha, eps, *, delta=None, scale=None, backend=None):
    """See :func:`dsm_kernels.reference.add_rms_norm_ref` (``x`` is updated in place)."""
    checks.add_rms_norm(x, alpha, delta, scale)
    return resolve("add_rms_norm", backend, x.device)(x, alpha, eps, delta=delta, scale=scale)


def rope_append_kv(qkv, positions, inv_freq, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, *,
                   backend=None):
    """See :func:`dsm_kernels.reference.rope_append_kv_ref` (the caches are written in place)."""
    checks.rope_append_kv(qkv, positions, inv_freq, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads)
    fn = resolve("rope_append_kv", backend, qkv.device)
    return fn(qkv, positions, inv_freq, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads)


def gemv(x, weight, *, alpha=None, beta=None, eps=0.0, residual=None, scale=None, gate=False, gelu=False, out=None,
         backend=None):  # fmt: skip
    """See :func:`dsm_kernels.reference.gemv_ref`: a small-batch linear with an RMSNorm (or LayerNorm) prologue and
    a residual, SiLU-gate or GELU epilogue (the Triton kernel takes B <= ``GEMV_MAX_B`` rows)."""
    checks.gemv(x, weight, alpha, beta, residual, scale, gate, gelu, out)
    fn = resolve("gemv", backend, x.device)
    return fn(x, weight, alpha=alpha, beta=beta, eps=eps, residual=residual, scale=scale, gate=gate, gelu=gelu,
              out=out)  # fmt: skip


def qkv_rope_gemv(x, weight, alpha, eps, positions, inv_freq, k_cache, v_cache, slot_mapping, num_heads,
                  num_kv_heads, *, beta=None, out=None, backend=None):  # fmt: skip
    """See :func:`dsm_kernels.reference.qkv_rope_gemv_ref` (the caches are written in place; the Triton kernel takes
    B <= ``GEMV_MAX_B`` rows; ``beta``: LayerNorm instead of RMSNorm)."""
    checks.qkv_rope_gemv(x, weight, alpha, positions, inv_freq, k_cache, v_cache, slot_mapping, num_heads,
                         num_kv_heads, beta, out)  # fmt: skip
    fn = resolve("qkv_rope_gemv", backend, x.device)
    return fn(x, weight, alpha, eps, positions, inv_freq, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads,
              out=out, beta=beta)


def conv1d_gemv(x, weight, bias=None, stride=1, dilation=1, *, elu=False, ctx=None, phase=None, exec_mask=None,
                first=None, out=None, backend=None):  # fmt: skip
    """See :func:`dsm_kernels.reference.conv1d_gemv_ref`: a conv1d with few output columns (the Triton kernel takes
    at most ``CONV_GEMV_MAX_COLUMNS`` of them, batch rows included); with ``ctx``, a streaming causal conv reading
    and updating its stored context (:func:`dsm_kernels.reference.conv_context_input`)."""
    checks.conv1d_gemv(x, weight, bias, stride, dilation, out, ctx, phase, exec_mask, first)
    return resolve("conv1d_gemv", backend, x.device)(x, weight, bias, stride, dilation, out=out, elu=elu, ctx=ctx,
                                                     phase=phase, exec_mask=exec_mask, first=first)  # fmt: skip


def conv_igemm_enabled() -> bool:
    """Whether Mimi's convolutions at many columns take the implicit-GEMM kernels (``conv1d_igemm``,
    ``conv_transpose1d_igemm``) off the reference backend; ``DSM_CONV_IGEMM=0`` leaves them to cuDNN."""
    return os.environ.get("DSM_CONV_IGEMM") != "0"


def conv1d_igemm(x, weight, bias=None, stride=1, *, residual=None, elu=False, ctx=None, phase=None, exec_mask=None,
                 first=None, out=None, backend=None):  # fmt: skip
    """See :func:`dsm_kernels.reference.conv1d_igemm_ref`: a conv1d (of ``elu(x)`` with ``elu``; + residual) as an
    implicit GEMM on tensor cores in fp32-accurate TF32 passes, for many output columns; with ``ctx``, a streaming
    causal conv reading and updating its stored context (:func:`dsm_kernels.reference.conv_context_input`)."""
    checks.conv1d_igemm(x, weight, bias, stride, residual, out, ctx, phase, exec_mask, first)
    fn = resolve("conv1d_igemm", backend, x.device)
    return fn(x, weight, bias, stride, residual=residual, elu=elu, out=out, ctx=ctx, phase=phase, exec_mask=exec_mask,
              first=first)


def conv_transpose1d_igemm(x, weight, bias=None, stride=1, *, phase_weight=None, elu=False, out=None, backend=None):
    """See :func:`dsm_kernels.reference.conv_transpose1d_igemm_ref`: a transposed conv1d as S phase GEMMs
    of ``x`` (of ``elu(x)`` with ``elu``; ``phase_weight``: ``dsm_kernels.reference.convtr_phase_weight(weight,
    stride)``, made once by the caller)."""
    checks.conv_transpose1d_igemm(x, weight, bias, stride, out)
    return resolve("conv_transpose1d_igemm", backend, x.device)(x, weight, bias, stride, phase_weight=phase_weight,
                                                                elu=elu, out=out)  # fmt: skip


def head_probs(x, weight, heads, *, backend=None):
    """See :func:`dsm_kernels.reference.head_probs_ref` (class-0 probabilities of stacked classifier heads)."""
    checks.head_probs(x, weight, heads)
    return resolve("head_probs", backend, x.device)(x, weight, heads)


def silu_mul(h, *, backend=None):
    """See :func:`dsm_kernels.reference.silu_mul_ref`."""
    checks.silu_mul(h)
    return resolve("silu_mul", backend, h.device)(h)


def frame_inputs(cache, offsets, exec_mask, delays, initial, input_tokens, n_gen, *, backend=None):
    """See :func:`dsm_kernels.reference.frame_inputs_ref` (``cache`` is updated in place)."""
    checks.frame_inputs(cache, offsets, exec_mask, delays, initial, input_tokens, n_gen)
    fn = resolve("frame_inputs", backend, cache.device)
    return fn(cache, offsets, exec_mask, delays, initial, input_tokens, n_gen)


def frame_commit(cache, offsets, exec_mask, delays, text_token, audio, max_delay, *, backend=None):
    """See :func:`dsm_kernels.reference.frame_commit_ref` (``cache`` and ``offsets`` are updated in place)."""
    checks.frame_commit(cache, offsets, exec_mask, delays, text_token, audio)
    fn = resolve("frame_commit", backend, cache.device)
    return fn(cache, offsets, exec_mask, delays, text_token, audio, max_delay)


def frame_embed(cache, offsets, exec_mask, delays, initial, input_tokens, n_gen, text_table, audio_tables,
                block_table, positions, page_size, *, text_table2=None, cond=None, out_dtype=None, out=None,
                backend=None):
    """See :func:`dsm_kernels.reference.frame_embed_ref`: :func:`frame_inputs`, :func:`multistream_embed` and
    :func:`kv_slots` (``write = exec_mask``, advanced) of a decode step in one launch on Triton (and on the CUDA
    backend, which has no kernel of its own for it); ``cache`` and ``positions`` are updated in place."""
    checks.frame_embed(cache, offsets, exec_mask, delays, initial, input_tokens, n_gen, text_table, audio_tables,
                       block_table, positions, page_size, text_table2, cond)
    fn = resolve("frame_embed", backend, cache.device)
    return fn(cache, offsets, exec_mask, delays, initial, input_tokens, n_gen, text_table, audio_tables, block_table,
              positions, page_size, text_table2=text_table2, cond=cond, out_dtype=out_dtype, out=out)


def kv_slots(block_table, positions, write, page_size, *, advance=False, backend=None):
    """See :func:`dsm_kernels.reference.kv_slots_ref` (``advance``: the written rows' ``positions`` then move on, in
    place, and the positions the step had come third)."""
    checks.kv_slots(block_table, positions, write, page_size)
    return resolve("kv_slots", backend, positions.device)(block_table, positions, write, page_size, advance)


def depformer_frame(weights, z, text_token, temperature, top_k, seeds, steps, *, step_scale=1, step_offset=0,
                    return_logits=False, counters=None, backend=None):  # fmt: skip
    """See :func:`dsm_kernels.reference.depformer_frame_ref` (codebook k's noise counters: ``steps * step_scale +
    step_offset + k``). ``counters``: as :func:`decoder_step`'s."""
    checks.depformer_frame(weights, z, text_token, temperature, seeds, steps, counters, top_k, step_scale, step_offset)
    fn = resolve("depformer_frame", backend, z.device)
    return fn(weights, z, text_token, temperature, _top_k(top_k, weights.heads[0].shape[0]), seeds, steps,
              step_scale=int(step_scale), step_offset=int(step_offset), return_logits=return_logits, counters=counters)


def decoder_step(weights, x, positions, slot, seq_lens, k_cache, v_cache, block_table, *, context, counters=None,
                 cross=None, backend=None):  # fmt: skip
    """See :func:`dsm_kernels.decoder.decoder_step_composed`: the temporal transformer's whole decode step for up to
    ``GEMV_MAX_B`` rows (``x`` is updated in place); returns ``(z, logits)``. ``counters`` (int32 at 0, used by one
    launch at a time, left at 0, e.g. :attr:`dsm.kv_cache.PagedKVCache.counters`): the split-K attention's merge
    counters and, on the CUDA backend, the persistent kernel's barrier words where it holds enough of them (else the
    op zeroes words of its own, one more kernel a launch)."""
    checks.decoder_step(weights, x, positions, slot, seq_lens, k_cache, v_cache, block_table, context, counters)
    if x.shape[0] > GEMV_MAX_B:  # the GEMV kernels' limit; the model's fused step covers more rows
        raise ValueError(f"decoder_step: {x.shape[0]} rows; it takes at most {GEMV_MAX_B}")
    fn = resolve("decoder_step", backend, x.device)
    return fn(weights, x, positions, slot, seq_lens, k_cache, v_cache, block_table, context=context,
              counters=counters, cross=cross)


def mimi_transformer(weights, h, pos, exec_mask, cache, *, tokens, counters=None, backend=None) -> None:
    """See :func:`dsm_kernels.decoder.mimi_transformer_composed`: Mimi's streaming transformer over ``tokens`` new
    tokens of each stream, ``h`` [B tokens, d] updated in place and ``pos`` advanced, for up to ``GEMV_MAX_B``
    rows. ``counters``: as :func:`decoder_step`'s."""
    checks.mimi_transformer(weights, h, pos, exec_mask, cache, tokens, counters)
    if h.shape[0] > GEMV_MAX_B:  # the GEMV kernels' limit; more rows take dsm.mimi_modules' batched path
        raise ValueError(f"mimi_transformer: {h.shape[0]} rows; it takes at most {GEMV_MAX_B}")
    resolve("mimi_transformer", backend, h.device)(weights, h, pos, exec_mask, cache, tokens=tokens, counters=counters)


def rvq_encode(x, codebooks_aug, group_levels, level_ranges, *, out=None, counters=None, backend=None):
    """See :func:`dsm_kernels.reference.rvq_encode_ref` (Mimi's split residual VQ encode); ``level_ranges`` is the
    caller's :func:`dsm_kernels.reference.rvq_level_ranges` of ``group_levels``, built once on ``x``'s device.
    ``counters``: as :func:`decoder_step`'s."""
    checks.rvq_encode(x, codebooks_aug, tuple(group_levels), level_ranges, out, counters)
    fn = resolve("rvq_encode", backend, x.device)
    return fn(x, codebooks_aug, tuple(group_levels), level_ranges, out=out, counters=counters)


def rvq_decode_upsample(codes, tables, weight, partial, exec_mask, *, out=None, backend=None):
    """See :func:`dsm_kernels.reference.rvq_decode_upsample_ref` (the sum of Mimi's codebook lookups and its streaming
    12.5 -> 25 Hz upsampling; ``partial`` in place)."""
    checks.rvq_decode_upsample(codes, tables, weight, partial, exec_mask, out)
    return resolve("rvq_decode_upsample", backend, tables.device)(codes, tables, weight, partial, exec_mask, out=out)


def mimi_rope_kv(qkv, rot, cache, rows, slots, *, out=None, backend=None):
    """See :func:`dsm_kernels.reference.mimi_rope_kv_ref` (Mimi's RoPE + KV ring write; ``cache`` in place)."""
    checks.mimi_rope_kv(qkv, rot, cache, rows, slots, out)
    return resolve("mimi_rope_kv", backend, qkv.device)(qkv, rot, cache, rows, slots, out=out)


def mimi_conv_pad(x, ctx, phase, exec_mask, *, elu=False, first=None, out=None, backend=None):
    """See :func:`dsm_kernels.reference.mimi_conv_pad_ref` (a streaming conv's input with its stored context, ELU;
    the context's other half written)."""
    checks.mimi_conv_pad(x, ctx, phase, exec_mask, first, out)
    return resolve("mimi_conv_pad", backend, x.device)(x, ctx, phase, exec_mask, elu=elu, first=first, out=out)


def mimi_ring_attention(q, cache, pos, *, out=None, backend=None):
    """See :func:`dsm_kernels.reference.mimi_ring_attention_ref` (a Mimi layer's new queries over its KV ring)."""
    checks.mimi_ring_attention(q, cache, pos, out)
    return resolve("mimi_ring_attention", backend, q.device)(q, cache, pos, out=out)


def mimi_rows(pos, exec_mask, tokens, capacity, *, advance=False, backend=None):
    """See :func:`dsm_kernels.reference.mimi_rows_ref` (a Mimi transformer step's per-row indices; ``advance``: then
    ``pos`` moves on, in place)."""
    checks.mimi_rows(pos, exec_mask, tokens, capacity)
    return resolve("mimi_rows", backend, pos.device)(pos, exec_mask, tokens, capacity, advance)


def mimi_residual_out(y, weight, bias, x, *, backend=None):
    """See :func:`dsm_kernels.reference.mimi_residual_out_ref` (``x + conv1x1(elu(y))``, a SEANet unit's end)."""
    checks.mimi_residual_out(y, weight, bias, x)
    return resolve("mimi_residual_out", backend, y.device)(y, weight, bias, x)


def mimi_convtr_gemv(x, w_rows, bias, stride, partial, exec_mask, *, elu=False, backend=None):
    """See :func:`dsm_kernels.reference.mimi_convtr_gemv_ref` (a Mimi transposed conv with its overlap-add, for few
    input columns; ``partial`` in place; ``elu``: of ``elu(x)``)."""
    checks.mimi_convtr_gemv(x, w_rows, bias, stride, partial, exec_mask)
    return resolve("mimi_convtr_gemv", backend, x.device)(x, w_rows, bias, stride, partial, exec_mask, elu=elu)


def mimi_convtr_overlap(y, partial, bias, exec_mask, *, backend=None):
    """See :func:`dsm_kernels.reference.mimi_convtr_overlap_ref` (Mimi's transposed-conv overlap-add; ``y`` and
    ``partial`` in place)."""
    checks.mimi_convtr_overlap(y, partial, bias, exec_mask)
    return resolve("mimi_convtr_overlap", backend, y.device)(y, partial, bias, exec_mask)


__all__ = [
    "BACKENDS",
    "CONV_GEMV_MAX_COLUMNS",
    "GEMV_MAX_B",
    "conv1d_gemv",
    "conv1d_igemm",
    "conv_igemm_enabled",
    "conv_transpose1d_igemm",
    "conv_gemv_max_columns",
    "counter_words",
    "add_rms_norm",
    "append_kv",
    "available_backends",
    "decoder_step",
    "default_backend",
    "depformer_frame",
    "frame_commit",
    "frame_embed",
    "frame_inputs",
    "gemv",
    "gemv_max_rows",
    "arch_runs_on",
    "cuda_ext_arch",
    "cuda_ext_unavailable",
    "has_cuda_ext",
    "has_triton",
    "kv_slots",
    "mimi_conv_pad",
    "mimi_convtr_gemv",
    "mimi_convtr_overlap",
    "mimi_residual_out",
    "mimi_ring_attention",
    "mimi_rows",
    "mimi_transformer",
    "mimi_rope_kv",
    "multistream_embed",
    "op_backends",
    "op_names",
    "head_probs",
    "paged_decode_attention",
    "qkv_rope_gemv",
    "reference",
    "resolve",
    "rope_append_kv",
    "rvq_decode_upsample",
    "rvq_encode",
    "sample_tokens",
    "sm_count",
    "silu_mul",
]
