"""Thin Python wrappers over the compiled CUDA ops (``torch.ops.dsm.*`` registered by ``dsm_kernels._C``).

Each wrapper allocates the output unless one is given, normalises index dtypes (no-ops when the caller already
passes int64 ids / int32 tables) and calls the out-parameter op on the current stream. The extension is imported on
first use, so this module imports on machines without it.
"""

from __future__ import annotations

import importlib
import math
from functools import cache

import torch

from . import sm_count
from .reference import DepformerWeights


@cache
def _ops():
    importlib.import_module("dsm_kernels._C")  # registers the TORCH_LIBRARY(dsm) schemas and CUDA impls
    return torch.ops.dsm


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# What the single-op CUDA kernels take (csrc/bindings.cpp checks the same); other inputs run the Triton kernels.
EMBED_MAX_COLUMNS = 64  # token columns: the kernel's unrolled lookups
ATTENTION_HEAD_DIMS = (16, 32, 64, 128, 256)  # head_dim / 8 lanes a key must divide a warp
SAMPLE_MAX_VOCAB = 16384  # a row's logits in one block's registers


def _rows16(t: torch.Tensor) -> bool:
    """Unit stride in the last dim, every other stride a multiple of 8 elements, a 16-byte aligned start: what the
    kernels' vector loads of 8 elements need (the bindings check the same)."""
    return t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0


def embed_unsupported(tokens, text_table, audio_tables, text_table2) -> str | None:
    """Why the CUDA embedding kernel does not take these inputs (Triton's then runs them), or None."""
    if not 1 <= tokens.shape[1] <= EMBED_MAX_COLUMNS:
        return f"{tokens.shape[1]} token columns (it takes 1..{EMBED_MAX_COLUMNS})"
    tables = [t for t in (text_table, audio_tables, text_table2) if t is not None]
    if text_table.dtype not in _FLOATS or any(t.dtype != text_table.dtype or t.stride(-1) != 1 for t in tables):
        return "tables of different dtypes, or not contiguous in the model dim"
    return None


def _pool_rows(cache: torch.Tensor) -> bool:
    return cache.stride(2) == cache.shape[3] and _rows16(cache)


def attention_unsupported(q, k_cache, v_cache) -> str | None:
    """Why the CUDA decode-attention kernel does not take these inputs (Triton's then runs them), or None."""
    D = q.shape[2]
    if D not in ATTENTION_HEAD_DIMS:
        return f"head_dim {D} (it takes {ATTENTION_HEAD_DIMS})"
    if q.dtype not in _FLOATS or k_cache.dtype not in (q.dtype, torch.float8_e4m3fn) or v_cache.dtype != k_cache.dtype:
        return f"q {q.dtype}, caches {k_cache.dtype}/{v_cache.dtype}"
    if not (_pool_rows(k_cache) and _pool_rows(v_cache)):
        return "cache pages not contiguous, 16-byte aligned (heads, head_dim) rows"
    return None


def sample_unsupported(logits, null_logits=None) -> str | None:
    """Why the CUDA sampling kernel does not take these logits (Triton's then samples them), or None."""
    if not 1 <= logits.shape[1] <= SAMPLE_MAX_VOCAB:
        return f"vocabulary {logits.shape[1]} (it takes 1..{SAMPLE_MAX_VOCAB})"
    if logits.dtype not in _FLOATS:
        return f"logits {logits.dtype}"
    if null_logits is not None and null_logits.dtype != logits.dtype:  # the kernel reads both as one dtype
        return f"null_logits {null_logits.dtype} against logits {logits.dtype}"
    return None


def multistream_embed_cuda(
    tokens, text_table, audio_tables, *, text_table2=None, cond=None, out_dtype=None, out=None
) -> torch.Tensor:
    """CUDA twin of :func:`~dsm_kernels.reference.multistream_embed_ref` (ids in ``[-1, V)``, unchecked on device);
    the Triton kernel where :func:`embed_unsupported` says the CUDA one does not take the inputs."""
    if embed_unsupported(tokens, text_table, audio_tables, text_table2) is not None:
        from .embed import multistream_embed_triton

        return multistream_embed_triton(tokens, text_table, audio_tables, text_table2=text_table2, cond=cond,
                                        out_dtype=out_dtype, out=out)  # fmt: skip
    B, D = tokens.shape[0], text_table.shape[1]
    if out is None:
        out = torch.empty(B, D, dtype=out_dtype or text_table.dtype, device=tokens.device)
    # cond [B, D] is small: made the fp32, D-contiguous rows the kernel reads (the other backends take any layout)
    _ops().multistream_embed(
        out, tokens.long(), text_table, audio_tables, text_table2, None if cond is None else cond.float().contiguous()
    )
    return out


def append_kv_cuda(k_cache, v_cache, k, v, slot_mapping) -> None:
    """CUDA twin of :func:`~dsm_kernels.reference.append_kv_ref` (in place)."""
    _ops().append_kv(k_cache, v_cache, k, v, slot_mapping.long().contiguous())


def decode_num_splits(batch: int, heads: int, context: int, resident: int) -> int:
    """Split-K factor from static shapes only (a captured graph stays valid as slots grow).

    The launch is ``batch * heads * splits`` blocks, ``resident`` of which run at once (SMs x blocks per SM). A last
    wave that is only partly filled leaves bandwidth unused (1024 blocks over 660 resident ones run as 1.55 waves), so
    take the fewest splits whose last wave is >= 90% full, else the fullest; each split spans >= 32 positions."""
    base, best, best_fill = batch * heads, 1, 0.0
    if base == 0:  # an empty batch launches nothing (the launcher returns at once)
        return 1
    for splits in range(1, max(1, context // 32) + 1):
        blocks = base * splits
        fill = blocks / (math.ceil(blocks / resident) * resident)
        if fill >= 0.9:
            return splits
        if fill > best_fill:
            best, best_fill = splits, fill
    return best


@cache
def _decode_resident_blocks(index: int, dtype: torch.dtype, cache_dtype: torch.dtype, head_dim: int) -> int:
    """Decode blocks resident on the whole device at once, from the CUDA occupancy calculator."""
    q = torch.empty(1, 1, head_dim, dtype=dtype, device=torch.device("cuda", index))
    per_sm = _ops().paged_decode_blocks_per_sm(q, torch.empty(1, dtype=cache_dtype, device=q.device))
    return max(1, per_sm) * sm_count(q.device)


def paged_decode_attention_cuda(
    q, k_cache, v_cache, block_table, seq_lens, *, context, scale=None, out=None, num_splits=None, counters=None
) -> torch.Tensor:
    """CUDA twin of :func:`~dsm_kernels.reference.paged_decode_attention_ref`; head_dim 16/32/64/128/256.

    ``counters`` (int32, >= B*H, all 0, used by one launch at a time): the last split of each head merges the
    splits, re-arming its counter; without it a second kernel merges. The Triton kernel runs what
    :func:`attention_unsupported` names."""
    if attention_unsupported(q, k_cache, v_cache) is not None:
        from .paged_attention import paged_decode_attention_triton

        return paged_decode_attention_triton(q, k_cache, v_cache, block_table, seq_lens, context=context, scale=scale,
                                             out=out, num_splits=num_splits, counters=counters)  # fmt: skip
    B, H, D = q.shape
    if not _rows16(q):  # the kernel reads 16-byte aligned rows of head_dim; the reference takes any layout
        q = q.contiguous()
    block_table = block_table.int()
    if block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_splits is None:
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        num_splits = decode_num_splits(B, H, context, _decode_resident_blocks(index, q.dtype, k_cache.dtype, D))
    scale = D**-0.5 if scale is None else scale
    _ops().paged_decode_attention(
        out, q, k_cache, v_cache, block_table, seq_lens.int().contiguous(), int(context), float(scale), int(num_splits),
        counters,
    )
    return out


def sample_tokens_cuda(
    logits, temperature, top_k, seeds, steps, *, step_scale=1, step_offset=0, null_logits=None, cfg_coef=1.0, out=None
) -> torch.Tensor:
    """CUDA twin of :func:`~dsm_kernels.reference.sample_tokens_ref`; the Triton kernel for what
    :func:`sample_unsupported` names (a vocabulary above ``SAMPLE_MAX_VOCAB``)."""
    if sample_unsupported(logits, null_logits) is not None:
        from .sampling import sample_tokens_triton

        return sample_tokens_triton(logits, temperature, top_k, seeds, steps, step_scale=step_scale,
                                    step_offset=step_offset, null_logits=null_logits, cfg_coef=cfg_coef, out=out)
    if out is None:
        out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    if logits.stride(1) != 1:  # the kernel reads rows; the reference takes any layout
        logits = logits.contiguous()
    if null_logits is not None and null_logits.stride(1) != 1:
        null_logits = null_logits.contiguous()
    _ops().sample_tokens(
        # [B] views of any stride (an expanded temperature): the kernel reads them dense; the other backends take them
        out, logits, null_logits, float(cfg_coef), temperature.float().contiguous(), int(top_k),
        seeds.long().contiguous(), steps.long().contiguous(),
        int(step_scale), int(step_offset),
    )
    return out


# The persistent depth-transformer kernel (csrc/depformer.cu) keeps each row's accumulators in registers.
DEPFORMER_MAX_ROWS = 4


def _aligned(tensors, dtype) -> bool:
    """Every tensor (None skipped) contiguous, 16-byte aligned and of ``dtype``: what the kernels' 16-byte loads and
    cp.async copies need."""
    return all(t is None or (t.dtype == dtype and t.is_contiguous() and t.data_ptr() % 16 == 0) for t in tensors)


def _weights_verdict(w, check) -> str | None:
    """``check(w)`` once per weights object (its result kept in ``w.derived``): the weights do not change shape."""
    if "cuda_weights_verdict" not in w.derived:
        w.derived["cuda_weights_verdict"] = check(w)
    return w.derived["cuda_weights_verdict"]


def _depformer_weights_verdict(w: DepformerWeights) -> str | None:
    dd, H = w.dim, w.num_heads
    vec = 16 // w.in_proj.element_size()
    hidden = w.layers[0].linear_out[0].shape[1]
    if w.activation != "silu" or not w.norm_f32:
        return "silu gating and rms_norm_f32 only"
    if w.in_proj.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {w.in_proj.dtype}"
    if dd % H or dd // H > 256 or w.card > 8192:
        return f"head dim {dd // H}, card {w.card}"
    if dd % vec or hidden % vec or w.in_proj.shape[2] % vec:
        return f"dims ({dd}, {hidden}, {w.in_proj.shape[2]}) not multiples of {vec} (16-byte rows)"
    tensors = [w.in_proj, w.text_emb, w.text_emb2, w.emb, *w.heads, *w.head_norms]
    for lw in w.layers:
        tensors += [lw.in_proj, lw.out_proj, *lw.linear_in, *lw.linear_out, lw.norm1, lw.norm2, lw.scale1, lw.scale2]
    if not _aligned(tensors, w.in_proj.dtype):
        return "a weight tensor that is not contiguous, 16-byte aligned and of the model dtype"
    return None


def depformer_unsupported(w: DepformerWeights, z: torch.Tensor) -> str | None:
    """Why the persistent kernel does not take this frame (the caller then runs the Triton kernels), or None."""
    if not 1 <= z.shape[0] <= DEPFORMER_MAX_ROWS:
        return f"{z.shape[0]} rows (it takes 1..{DEPFORMER_MAX_ROWS})"
    return _weights_verdict(w, _depformer_weights_verdict)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _pointer_table(w, device: torch.device, op: str, entries) -> torch.Tensor:
    """A persistent kernel's device table of weight pointers (and indices), ``entries(w)`` as int64, built once per
    weights and device and kept in ``w.derived`` (not under graph capture: it is a host-to-device copy)."""
    key = ("cuda_table", str(device))
    if key not in w.derived:
        if torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{op} (cuda): call it once eagerly before capturing it in a CUDA graph (its "
                               "weight-pointer table is a host-to-device copy, which a capture cannot hold)")
        w.derived[key] = torch.tensor(entries(w), dtype=torch.int64, device=device)
    return w.derived[key]


def _depformer_entries(w: DepformerWeights) -> list[int]:
    """Layout: ``DSM_DEP_TABLE_STRIDE`` in csrc/dsm_cuda.h."""
    rows = []
    for k, j in enumerate(w.schedule):
        for lw in w.layers:
            rows += map(_ptr, (lw.in_proj[j], lw.out_proj[j], lw.linear_in[j], lw.linear_out[j], lw.norm1, lw.norm2,
                               lw.scale1, lw.scale2))
        rows += [*map(_ptr, (w.heads[k], w.head_norms[k], w.text_emb if k == 0 else w.emb[k - 1])), w.in_index[k]]
    return rows


def sync_words(counters, words: int):
    """The caller's ``counters`` as a persistent kernel's barrier and counter words when it holds ``words`` int32
    (at 0; the kernels leave them at 0, so no memset runs before each launch), else None: the binding then zeroes
    words of its own, one more kernel a launch."""
    ok = counters is not None and counters.dtype == torch.int32 and counters.is_contiguous()
    return counters if ok and counters.numel() >= words else None


def depformer_operands(w: DepformerWeights, z, text_token, temperature, top_k, seeds, steps, counters=None,
                       step_scale=1, step_offset=0) -> dict:  # fmt: skip
    """Outputs and inputs of one persistent-kernel frame, as both launch routes (the torch op, the tests' CPU
    emulation) pass them: ``tokens`` [B, dep_q] and ``logits`` [dep_q, B, card] to fill, ``dims``, and the sync
    words (:func:`sync_words` of ``counters``)."""
    B, dev = z.shape[0], z.device
    hidden = w.layers[0].linear_out[0].shape[1]
    return dict(
        tokens=torch.empty(B, w.dep_q, dtype=torch.int64, device=dev),
        logits=torch.empty(w.dep_q, B, w.card, dtype=w.in_proj.dtype, device=dev),
        table=_pointer_table(w, dev, "depformer_frame", _depformer_entries), in_proj=w.in_proj,
        text_emb2=w.text_emb2, z=z.to(w.in_proj.dtype).contiguous(),
        text_token=text_token.long().contiguous(), temperature=temperature.float().contiguous(),
        seeds=seeds.long().contiguous(), steps=steps.long().contiguous(),
        dims=[w.num_heads, hidden, w.card, w.dep_q, len(w.layers), w.in_proj.shape[0], w.text_emb.shape[0],
              int(top_k), int(step_scale), int(step_offset)],
        eps=float(w.norm_eps), counters=sync_words(counters, 3 + w.num_heads),
    )


def depformer_frame_cuda(w, z, text_token, temperature, top_k, seeds, steps, *, return_logits=False, step_scale=1,
                         step_offset=0, counters=None, blocks=0):  # fmt: skip
    """CUDA twin of :func:`~dsm_kernels.reference.depformer_frame_ref`: the persistent kernel, one cooperative launch
    a frame, for up to ``DEPFORMER_MAX_ROWS`` rows; other frames (:func:`depformer_unsupported`) run
    :func:`~dsm_kernels.depformer.depformer_frame_triton`. ``blocks``: grid size (0 = one block per SM)."""
    if depformer_unsupported(w, z) is not None:
        from .depformer import depformer_frame_triton

        return depformer_frame_triton(w, z, text_token, temperature, top_k, seeds, steps, return_logits=return_logits,
                                      step_scale=step_scale, step_offset=step_offset)  # fmt: skip
    ops = depformer_operands(w, z, text_token, temperature, top_k, seeds, steps, counters, step_scale, step_offset)
    _ops().depformer_frame(ops["tokens"], ops["logits"], ops["table"], ops["in_proj"], ops["text_emb2"], ops["z"],
                           ops["text_token"], ops["temperature"], ops["seeds"], ops["steps"], [*ops["dims"], blocks],
                           ops["eps"], ops["counters"])  # fmt: skip
    return (ops["tokens"], ops["logits"].permute(1, 0, 2).contiguous()) if return_logits else ops["tokens"]


# The persistent decode-step kernel (csrc/decoder.cu): rows in registers, and head dims up to 128.
DECODER_MAX_ROWS, DECODER_MAX_HEAD_DIM = 4, 128


def _decoder_weights_verdict(w) -> str | None:
    D, dt = w.head_dim, w.dtype
    vec = 16 // dt.itemsize
    hidden = w.layers[0].linear_out.shape[1]
    if dt not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {dt}"
    if D % 2 or D > DECODER_MAX_HEAD_DIM or w.num_heads != w.num_kv_heads:  # as paged_decode_attention
        return f"head dim {D}, heads {w.num_heads}/{w.num_kv_heads}"
    if w.dim % vec or hidden % vec or (w.num_heads * D) % vec:
        return f"dims ({w.dim}, {hidden}) not multiples of {vec} (16-byte rows)"
    tensors = [w.out_norm, w.text_linear]
    for lw in w.layers:
        tensors += [lw.norm1, lw.in_proj, lw.out_proj, lw.norm2, lw.linear_in, lw.linear_out, lw.scale1, lw.scale2,
                    lw.norm1_bias, lw.norm2_bias]
        if (lw.cross is None) != (w.layers[0].cross is None) or lw.cross is not None and lw.cross.norm_bias is None:
            return "a cross-attention in some layers only, or without its LayerNorm bias"
        if lw.cross is not None:
            c = lw.cross
            tensors += [c.norm_weight, c.norm_bias, c.q_proj, c.out_proj, c.scale]
    if not _aligned(tensors, dt):
        return "a weight tensor that is not contiguous, 16-byte aligned and of the model dtype"
    return None


def decoder_unsupported(w, x, k_cache, cross, v_cache=None) -> str | None:
    """Why the persistent step kernel does not take this step (the single ops then run it), or None. ``cross``: the
    condition's pages (``dsm.kv_cache.CrossKVCache``) or None. ``k_cache`` may be a strided view (Mimi's ring);
    ``v_cache`` (None: laid out as ``k_cache``) must then have its strides, as the kernel reads both with one set."""
    from .decoder import DecoderWeights

    assert isinstance(w, DecoderWeights)
    if (why := _weights_verdict(w, _decoder_weights_verdict)) is not None:
        return why
    if not 1 <= x.shape[0] <= DECODER_MAX_ROWS:
        return f"{x.shape[0]} rows (it takes 1..{DECODER_MAX_ROWS})"
    if (w.layers[0].cross is None) != (cross is None):
        return "a cross-attention in some layers only (or condition pages without one)"
    vec = 16 // k_cache.element_size()
    if k_cache.dtype not in (w.dtype, torch.float8_e4m3fn) or k_cache.stride(-1) != 1 or any(
            st % vec for st in k_cache.stride()[:-1]):
        return (f"a {k_cache.dtype} cache with strides {k_cache.stride()} (it takes the model dtype or e4m3, "
                "16-byte rows)")
    tensors = [x] + ([cross.k, cross.v] if cross is not None else [])
    if v_cache is not None and (v_cache.stride() != k_cache.stride() or v_cache.data_ptr() % 16):
        return f"v_cache strides {v_cache.stride()} against k_cache {k_cache.stride()}, or not 16-byte aligned"
    if not _aligned(tensors, w.dtype) or k_cache.data_ptr() % 16:
        return f"x {x.dtype} or the caches not contiguous, 16-byte aligned and of the model dtype"
    if cross is not None and (cross.k.shape[2:] != (cross.page_size, w.num_heads, w.head_dim)
                              or cross.length % cross.page_size):  # fmt: skip
        return f"condition pages {tuple(cross.k.shape)}"
    return None


def _decoder_entries(w) -> list[int]:
    """Layout: ``DSM_DEC_TABLE_STRIDE`` (15) per layer in csrc/dsm_cuda.h."""
    rows = []
    for lw in w.layers:
        c = lw.cross
        cross = (c.norm_weight, c.norm_bias, c.q_proj, c.out_proj, c.scale) if c is not None else (None,) * 5
        rows += map(_ptr, (lw.in_proj, lw.out_proj, lw.linear_in, lw.linear_out, lw.norm1, lw.norm2, lw.scale1,
                           lw.scale2, *cross, lw.norm1_bias, lw.norm2_bias))
    return rows


def decoder_operands(w, x, positions, slot, seq_lens, k_cache, block_table, context, cross, starts=None,
                     counters=None) -> dict:  # fmt: skip
    """Outputs and inputs of one persistent step, as both launch routes (the torch op, the tests' CPU emulation) pass
    them: ``z`` [B, d] and ``logits`` [B, V] to fill (None without a head), ``dims``, and the sync words
    (:func:`sync_words` of ``counters``)."""
    B, head = x.shape[0], w.text_linear is not None
    return dict(
        z=torch.empty_like(x) if head else None,
        logits=torch.empty(B, w.text_linear.shape[0], dtype=x.dtype, device=x.device) if head else None,
        table=_pointer_table(w, x.device, "decoder_step", _decoder_entries), out_norm=w.out_norm,
        text_linear=w.text_linear,
        inv_freq=None if w.inv_freq is None else w.inv_freq.float().contiguous(),
        positions=positions.long().contiguous(),
        slot=slot.long().contiguous(), seq_lens=seq_lens.int().contiguous(),
        starts=None if starts is None else starts.int().contiguous(),
        block_table=block_table.int().contiguous(),
        dims=[w.num_heads, w.num_kv_heads, w.layers[0].linear_out.shape[1], len(w.layers), k_cache.shape[2],
              int(context), int(w.gelu)],
        eps=float(w.norm_eps), out_eps=float(w.out_norm_eps), scale=float(w.head_dim**-0.5),
        cross_k=None if cross is None else cross.k, cross_v=None if cross is None else cross.v,
        cross_block_table=None if cross is None else cross.block_table.int().contiguous(),
        cross_seq_lens=None if cross is None else cross.seq_lens.int().contiguous(),
        cross_eps=float(w.layers[0].cross.norm_eps) if cross is not None else 0.0,
        counters=sync_words(counters, 2 + B * w.num_heads),
    )


def _decoder_launch(x, k_cache, v_cache, ops, blocks) -> None:
    _ops().decoder_step(x, ops["z"], ops["logits"], k_cache, v_cache, ops["table"], ops["out_norm"],
                        ops["text_linear"], ops["inv_freq"], ops["positions"], ops["slot"], ops["seq_lens"],
                        ops["starts"], ops["block_table"], ops["cross_k"], ops["cross_v"], ops["cross_block_table"],
                        ops["cross_seq_lens"], [*ops["dims"], blocks], ops["eps"], ops["out_eps"], ops["scale"],
                        ops["cross_eps"], ops["counters"])


def decoder_step_cuda(w, x, positions, slot, seq_lens, k_cache, v_cache, block_table, *, context, counters=None,
                      cross=None, blocks=0):  # fmt: skip
    """CUDA backend of :func:`~dsm_kernels.decoder.decoder_step_composed`: the persistent kernel (one cooperative
    launch a step) where :func:`decoder_unsupported` allows, else the single ops with the CUDA kernels where they
    exist (paged attention) and Triton's elsewhere. ``blocks``: the persistent kernel's grid (0 = one per SM)."""
    if w.text_linear is None or decoder_unsupported(w, x, k_cache, cross, v_cache) is not None:
        from .decoder import decoder_step_composed

        return decoder_step_composed(w, x, positions, slot, seq_lens, k_cache, v_cache, block_table, context=context,
                                     counters=counters, cross=cross, backend="cuda")
    ops = decoder_operands(w, x, positions, slot, seq_lens, k_cache, block_table, context, cross, counters=counters)
    _decoder_launch(x, k_cache, v_cache, ops, blocks)
    return ops["z"], ops["logits"]


def mimi_unsupported(w, h, cache) -> str | None:
    """Why the persistent kernel does not take this Mimi transformer step (the single ops then run it), or None."""
    from .decoder import mimi_pages

    k_pages, v_pages = mimi_pages(cache)
    return decoder_unsupported(w, h, k_pages, None, v_pages)


def mimi_operands(w, h, pos, exec_mask, cache, tokens: int, counters=None):
    """Mimi's transformer step as the persistent kernel's operands: ``(k_pages, v_pages, operands)``; ``pos``
    advanced by ``tokens`` for the active streams (the step's, done by the index kernel). Stream b's ring
    is page b of ``context`` slots ([L, B + 1, S, H, D] views of ``cache``), row ``b * tokens + j`` sees positions
    from ``pos[b] + tokens - S`` (what the ring still holds once every new key is written) to its own."""
    from . import available_backends, mimi_rows
    from .decoder import mimi_pages

    B, S = pos.shape[0], cache.shape[4]
    index_backend = "triton" if "triton" in available_backends(h.device) else "reference"  # Triton: one launch
    # pos advanced here: the persistent kernel reads the rows' positions, never pos
    positions, slots, seq_lens, starts = mimi_rows(pos, exec_mask, tokens, S, advance=True, backend=index_backend)
    key = ("mimi_pages", B, tokens, str(h.device))
    if key not in w.derived:  # row b * tokens + j: page b
        w.derived[key] = (torch.arange(B * tokens, device=h.device) // tokens).int().view(-1, 1)
    k_pages, v_pages = mimi_pages(cache)
    ops = decoder_operands(w, h, positions, slots, seq_lens, k_pages, w.derived[key], S, None, starts=starts,
                           counters=counters)  # fmt: skip
    return k_pages, v_pages, ops


def mimi_transformer_cuda(w, h, pos, exec_mask, cache, *, tokens, counters=None, blocks=0) -> None:
    """CUDA backend of :func:`~dsm_kernels.decoder.mimi_transformer_composed`: the persistent decode-step kernel
    (one cooperative launch for all layers) where :func:`mimi_unsupported` allows, else the single ops."""
    if mimi_unsupported(w, h, cache) is not None:
        from .decoder import mimi_transformer_composed

        return mimi_transformer_composed(w, h, pos, exec_mask, cache, tokens=tokens, backend="cuda")
    k_pages, v_pages, ops = mimi_operands(w, h, pos, exec_mask, cache, tokens, counters)
    _decoder_launch(h, k_pages, v_pages, ops, blocks)


# The persistent residual-VQ encode (csrc/rvq.cu): every level in one cooperative launch, for a few rows.
RVQ_MAX_ROWS, RVQ_MAX_GROUPS, RVQ_MAX_DIM = 4, 2, 256


def rvq_unsupported(x, codebooks_aug, group_levels) -> str | None:
    """Why the persistent RVQ kernel does not take this encode (the Triton kernels then run it), or None."""
    B, _, T = x.shape
    D = codebooks_aug.shape[-1] - 2
    if not 1 <= B * T <= RVQ_MAX_ROWS:
        return f"{B * T} rows (it takes 1..{RVQ_MAX_ROWS})"
    if len(group_levels) > RVQ_MAX_GROUPS or D % 2 or D > RVQ_MAX_DIM:
        return f"{len(group_levels)} groups of dim {D}"
    if x.dtype != torch.float32 or codebooks_aug.dtype != torch.float32 or not codebooks_aug.is_contiguous():
        return f"x {x.dtype}, codebooks_aug {codebooks_aug.dtype} (fp32, contiguous)"
    return None


def rvq_encode_cuda(x, codebooks_aug, group_levels, level_ranges, out=None, counters=None, blocks=0):
    """CUDA backend of :func:`~dsm_kernels.reference.rvq_encode_ref`: the persistent kernel where
    :func:`rvq_unsupported` allows (one launch for all levels), else the Triton kernels (one launch a level)."""
    if rvq_unsupported(x, codebooks_aug, group_levels) is not None:
        from .mimi_kernels import rvq_encode_triton

        return rvq_encode_triton(x, codebooks_aug, tuple(group_levels), level_ranges, out=out)
    if out is None:
        out = torch.empty(x.shape[0], sum(group_levels), x.shape[2], dtype=torch.int64, device=x.device)
    _ops().rvq_encode(out, x, codebooks_aug, level_ranges, [max(group_levels), blocks], sync_words(counters, 2))
    return out
