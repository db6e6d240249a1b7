"""Input checks of the public ops, run by the dispatch point (:mod:`dsm_kernels`) before any backend.

The Triton and CUDA kernels trust their shapes (a short ``positions`` or a one-row ``cond`` is read out of bounds),
while the reference may broadcast or index its way to an answer. Checking here, once, gives every backend the same
``ValueError`` naming the tensor. Host-side metadata only (shapes, dtypes): no ``.item()`` and no device sync, since
the ops run inside captured CUDA graphs. Data-dependent conditions are the caller's to guarantee and are not checked
on this path: token ids within their table, codes within their codebook, slots and block-table entries within the
page pool, positions >= 0.
"""

from __future__ import annotations

import operator

import torch


def _dims(shape) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def shape(op: str, name: str, t: torch.Tensor, want: tuple) -> None:
    """``t`` has ``len(want)`` dims of the sizes in ``want`` (None: any size)."""
    if t.dim() != len(want) or any(w is not None and s != w for s, w in zip(t.shape, want, strict=True)):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {_dims(want)}")


def numel(op: str, name: str, t: torch.Tensor, n: int, what: str) -> None:
    if t.numel() != n:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} ({t.numel()} values), expected {n} ({what})")


def like(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` has ``ref``'s shape and dtype."""
    if t.shape != ref.shape or t.dtype != ref.dtype:
        raise ValueError(f"{op}: {name} {tuple(t.shape)} {t.dtype} must match {ref_name} {tuple(ref.shape)} "
                         f"{ref.dtype}")  # fmt: skip


def _pool(op: str, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, head_dim: int) -> None:
    shape(op, "k_cache", k_cache, (None, None, heads, head_dim))
    like(op, "v_cache", v_cache, "k_cache", k_cache)


def fp32(op: str, **tensors) -> None:
    """Mimi's ops run in fp32 (its codes are chaotic in low precision)."""
    for name, t in tensors.items():
        if t is not None and t.dtype != torch.float32:
            raise ValueError(f"{op}: {name} must be torch.float32, got {t.dtype}")


def counter_tensor(op: str, c: torch.Tensor | None) -> None:
    """Counter words the kernels keep at 0 between launches: flat, contiguous int32 (their size is the op's to judge:
    one too small for a launch is not used)."""
    if c is not None and (c.dim() != 1 or c.dtype != torch.int32 or not c.is_contiguous()):
        raise ValueError(f"{op}: counters must be a contiguous 1-D torch.int32 tensor, got {tuple(c.shape)} {c.dtype}")


def ids(op: str, **tensors) -> None:
    """Integer tensors (token ids, slots, page ids, positions, lengths, seeds): the kernels cast what they read to
    int64, which truncates a float id (and rounds one past 2**24) without a word, where the reference refuses it."""
    for name, t in tensors.items():
        if t is not None and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
            raise ValueError(f"{op}: {name} must be an integer tensor, got {t.dtype}")


def integers(op: str, **values) -> None:
    """Python integer arguments (top_k, the noise counter's scale and offset): the dispatch's ``int()`` truncated a
    float (top_k 2.5 kept 2 tokens on the kernels) where the reference refused it."""
    for name, v in values.items():
        try:
            operator.index(v)
        except TypeError:
            raise TypeError(f"{op}: {name} must be an integer, got {v!r}") from None


def _mask(op: str, mask: torch.Tensor, B: int, name: str = "exec_mask") -> None:
    """A [B] bool mask (per-row flags the kernels read as bytes)."""
    shape(op, name, mask, (B,))
    if mask.dtype != torch.bool:
        raise ValueError(f"{op}: {name} must be torch.bool, got {mask.dtype}")


def multistream_embed(tokens, text_table, audio_tables, text_table2, cond) -> None:
    op = "multistream_embed"
    shape(op, "tokens", tokens, (None, None))
    ids(op, tokens=tokens)
    _embed_tables(op, *tokens.shape, "tokens", tokens, text_table, audio_tables, text_table2, cond)


def _embed_tables(op, B, K, what, columns, text_table, audio_tables, text_table2, cond) -> None:
    """The tables (and condition rows) of an embedding of ``B`` rows of ``K`` token columns, held by ``what``."""
    if K < 1:  # the text column is read by every row
        raise ValueError(f"{op}: {what} {tuple(columns.shape)} has no token column (at least the text one)")
    shape(op, "text_table", text_table, (None, None))
    D = text_table.shape[1]
    shape(op, "audio_tables", audio_tables, (None, None, D))
    if audio_tables.shape[0] < K - 1:
        raise ValueError(f"{op}: audio_tables {tuple(audio_tables.shape)} holds {audio_tables.shape[0]} tables for "
                         f"the {K - 1} audio columns of {what} {tuple(columns.shape)}")  # fmt: skip
    if text_table2 is not None:
        like(op, "text_table2", text_table2, "text_table", text_table)
    if cond is not None:
        shape(op, "cond", cond, (B, D))


def append_kv(k_cache, v_cache, k, v, slot_mapping) -> None:
    op = "append_kv"
    shape(op, "k", k, (None, None, None))
    like(op, "v", v, "k", k)
    B, H, D = k.shape
    _pool(op, k_cache, v_cache, H, D)
    shape(op, "slot_mapping", slot_mapping, (B,))
    ids(op, slot_mapping=slot_mapping)


def _context_in_ring(op: str, context: int, block_table, k_cache, page_size: int) -> None:
    """A window longer than a slot's ring of pages would read ring positions twice (overwritten ones)."""
    ring = block_table.shape[1] * page_size
    if not 1 <= context <= ring:
        raise ValueError(f"{op}: context {context} must be in [1, pages_per_slot * page_size = {ring}] "
                         f"(block_table {tuple(block_table.shape)}, k_cache {tuple(k_cache.shape)})")  # fmt: skip


def paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, context) -> None:
    op = "paged_decode_attention"
    shape(op, "q", q, (None, None, None))
    B, H, D = q.shape
    _pool(op, k_cache, v_cache, H, D)
    shape(op, "block_table", block_table, (B, None))
    shape(op, "seq_lens", seq_lens, (B,))
    ids(op, block_table=block_table, seq_lens=seq_lens)
    _context_in_ring(op, context, block_table, k_cache, page_size=k_cache.shape[1])


def sample_tokens(logits, temperature, seeds, steps, null_logits, top_k=0, step_scale=1, step_offset=0) -> None:
    op = "sample_tokens"
    shape(op, "logits", logits, (None, None))
    B = logits.shape[0]
    if logits.shape[1] < 1:
        raise ValueError(f"{op}: logits has shape {tuple(logits.shape)}: an empty vocabulary has no token to draw")
    integers(op, top_k=top_k, step_scale=step_scale, step_offset=step_offset)
    for name, t in (("temperature", temperature), ("seeds", seeds), ("steps", steps)):
        shape(op, name, t, (B,))
    ids(op, seeds=seeds, steps=steps)
    if null_logits is not None:
        shape(op, "null_logits", null_logits, tuple(logits.shape))


def add_rms_norm(x, alpha, delta, scale) -> None:
    op = "add_rms_norm"
    shape(op, "x", x, (None, None))
    D = x.shape[1]
    numel(op, "alpha", alpha, D, "x's width")
    if delta is not None:
        shape(op, "delta", delta, tuple(x.shape))
    if scale is not None:
        numel(op, "scale", scale, D, "x's width")


def _rope(op, B, positions, inv_freq, k_cache, v_cache, slot_mapping, num_kv_heads) -> int:
    shape(op, "inv_freq", inv_freq, (None,))
    D = 2 * inv_freq.shape[0]
    shape(op, "positions", positions, (B,))
    _pool(op, k_cache, v_cache, num_kv_heads, D)
    shape(op, "slot_mapping", slot_mapping, (B,))
    ids(op, positions=positions, slot_mapping=slot_mapping)
    return D


def rope_append_kv(qkv, positions, inv_freq, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads) -> None:
    op = "rope_append_kv"
    shape(op, "qkv", qkv, (None, None))
    D = _rope(op, qkv.shape[0], positions, inv_freq, k_cache, v_cache, slot_mapping, num_kv_heads)
    if qkv.shape[1] < (num_heads + 2 * num_kv_heads) * D:
        raise ValueError(f"{op}: qkv has shape {tuple(qkv.shape)}, expected at least (H + 2 Hkv) * D = "
                         f"{(num_heads + 2 * num_kv_heads) * D} columns")  # fmt: skip


def _norm_params(op, alpha, beta, K) -> None:
    if alpha is not None:
        numel(op, "alpha", alpha, K, "x's width")
    if beta is not None:
        if alpha is None:
            raise ValueError(f"{op}: a LayerNorm bias (beta) needs its weight (alpha)")
        numel(op, "beta", beta, K, "x's width")


def gemv(x, weight, alpha, beta, residual, scale, gate, gelu, out) -> None:
    op = "gemv"
    shape(op, "x", x, (None, None))
    B, K = x.shape
    shape(op, "weight", weight, (None, K))
    if gate and weight.shape[0] % 2:
        raise ValueError(f"{op}: weight has shape {tuple(weight.shape)}; gate=True needs an even number of rows "
                         "(gate rows, then value rows)")  # fmt: skip
    N = weight.shape[0] // 2 if gate else weight.shape[0]
    _norm_params(op, alpha, beta, K)
    if residual is not None:
        if gate or gelu or out is not None:
            raise ValueError(f"{op}: the residual epilogue goes without gate, gelu and out (the residual is the "
                             "output)")  # fmt: skip
        shape(op, "residual", residual, (B, N))
    if scale is not None:
        numel(op, "scale", scale, N, "output features")
    if out is not None:
        shape(op, "out", out, (B, N))


def qkv_rope_gemv(x, weight, alpha, positions, inv_freq, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads,
                  beta, out) -> None:  # fmt: skip
    op = "qkv_rope_gemv"
    shape(op, "x", x, (None, None))
    B, K = x.shape
    D = _rope(op, B, positions, inv_freq, k_cache, v_cache, slot_mapping, num_kv_heads)
    shape(op, "weight", weight, ((num_heads + 2 * num_kv_heads) * D, K))
    _norm_params(op, alpha, beta, K)
    if out is not None:
        shape(op, "out", out, (B, num_heads, D))


def _conv1d(op, x, weight, bias, stride, dilation, outputs, ctx=None, phase=None, exec_mask=None, first=None) -> None:
    """A valid conv1d's operands: x [B, C, T] and weight [N, C, KS] with T (plus the context's P columns) at least
    the kernel's span, a stride of at least 1, bias [N], each named output [B, N, T_out], and a streaming conv's
    context (:func:`context`)."""
    shape(op, "x", x, (None, None, None))
    B, C, T = x.shape
    shape(op, "weight", weight, (None, C, None))
    N, _, KS = weight.shape
    span = dilation * (KS - 1) + 1
    if ctx is not None:
        context(op, x, ctx, phase, exec_mask, first)
        T += ctx.shape[-1]
    elif phase is not None or exec_mask is not None or first is not None:
        raise ValueError(f"{op}: phase, exec_mask and first go with a context (ctx)")
    if T < span or stride < 1:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}: {T} steps (context included), fewer than the "
                         f"kernel's span {span} (stride {stride})")  # fmt: skip
    if bias is not None:
        shape(op, "bias", bias, (N,))
    for name, t in outputs:
        if t is not None:
            shape(op, name, t, (B, N, (T - span) // stride + 1))


def context(op, x, ctx, phase, exec_mask, first) -> None:
    """A streaming conv's double-buffered context: ctx [2, B, C, P >= 1] fp32 like x [B, C, T], phase a [1] int32
    tensor (0 or 1: the half read now), exec_mask and the optional first flags [B] bool."""
    B, C, _ = x.shape
    shape(op, "ctx", ctx, (2, B, C, None))
    if ctx.shape[3] < 1:
        raise ValueError(f"{op}: ctx has shape {tuple(ctx.shape)}: a conv without left context has no state")
    fp32(op, x=x, ctx=ctx)
    if phase is None or phase.dtype != torch.int32 or tuple(phase.shape) != (1,):
        got = "None" if phase is None else f"{phase.dtype} {tuple(phase.shape)}"
        raise ValueError(f"{op}: phase must be an int32 tensor of shape (1,), got {got}")
    if exec_mask is None:
        raise ValueError(f"{op}: a context needs the exec_mask of its rows")
    _mask(op, exec_mask, B)
    if first is not None:
        _mask(op, first, B, "first")
    for name, t in (("ctx", ctx), ("phase", phase), ("exec_mask", exec_mask), ("first", first)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, x on {x.device}")


def conv1d_gemv(x, weight, bias, stride, dilation, out, ctx=None, phase=None, exec_mask=None, first=None) -> None:
    _conv1d("conv1d_gemv", x, weight, bias, stride, dilation, (("out", out),), ctx, phase, exec_mask, first)


def conv1d_igemm(x, weight, bias, stride, residual, out, ctx=None, phase=None, exec_mask=None, first=None) -> None:
    _conv1d("conv1d_igemm", x, weight, bias, stride, 1, (("residual", residual), ("out", out)), ctx, phase, exec_mask,
            first)  # fmt: skip


def conv_transpose1d_igemm(x, weight, bias, stride, out) -> None:
    op = "conv_transpose1d_igemm"
    shape(op, "x", x, (None, None, None))
    B, C, T = x.shape
    shape(op, "weight", weight, (C, None, None))
    N, K = weight.shape[1:]
    if stride < 1 or K % stride:
        raise ValueError(f"{op}: weight has shape {tuple(weight.shape)}: kernel {K} is not a multiple of the stride "
                         f"{stride}")  # fmt: skip
    if bias is not None:
        shape(op, "bias", bias, (N,))
    if out is not None:
        shape(op, "out", out, (B, N, (T - 1) * stride + K))


def depformer_frame(w, z, text_token, temperature, seeds, steps, counters=None, top_k=0, step_scale=1,
                    step_offset=0) -> None:  # fmt: skip
    op = "depformer_frame"
    counter_tensor(op, counters)
    integers(op, top_k=top_k, step_scale=step_scale, step_offset=step_offset)
    shape(op, "z", z, (None, w.in_proj.shape[2]))
    B = z.shape[0]
    for name, t in (("text_token", text_token), ("temperature", temperature), ("seeds", seeds), ("steps", steps)):
        shape(op, name, t, (B,))
    ids(op, text_token=text_token, seeds=seeds, steps=steps)


def decoder_step(w, x, positions, slot, seq_lens, k_cache, v_cache, block_table, context, counters=None) -> None:
    op = "decoder_step"
    counter_tensor(op, counters)
    shape(op, "x", x, (None, w.dim))
    B = x.shape[0]
    for name, t in (("positions", positions), ("slot", slot), ("seq_lens", seq_lens)):
        shape(op, name, t, (B,))
    shape(op, "k_cache", k_cache, (len(w.layers), None, None, w.num_kv_heads, w.head_dim))
    like(op, "v_cache", v_cache, "k_cache", k_cache)
    shape(op, "block_table", block_table, (B, None))
    ids(op, positions=positions, slot=slot, seq_lens=seq_lens, block_table=block_table)
    _context_in_ring(op, context, block_table, k_cache, page_size=k_cache.shape[2])  # per layer: [L, P, page, ...]


def mimi_rows(pos, exec_mask, tokens: int, capacity: int) -> None:
    op = "mimi_rows"
    shape(op, "pos", pos, (None,))
    _mask(op, exec_mask, pos.shape[0])
    if pos.dtype != torch.int64:
        raise ValueError(f"{op}: pos must be torch.int64, got {pos.dtype}")
    if not 1 <= tokens <= capacity:
        raise ValueError(f"{op}: tokens must be in [1, capacity = {capacity}], got {tokens}")


def mimi_transformer(w, h, pos, exec_mask, cache, tokens: int, counters=None) -> None:
    op = "mimi_transformer"
    counter_tensor(op, counters)
    shape(op, "pos", pos, (None,))
    ids(op, pos=pos)
    B = pos.shape[0]
    if tokens < 1:
        raise ValueError(f"{op}: tokens must be >= 1, got {tokens}")
    shape(op, "h", h, (B * tokens, w.dim))
    shape(op, "exec_mask", exec_mask, (B,))
    shape(op, "cache", cache, (len(w.layers), B + 1, 2, w.num_heads, None, w.head_dim))
    if cache.shape[4] < tokens:
        raise ValueError(f"{op}: a ring of {cache.shape[4]} slots cannot take {tokens} new tokens a step")


def rvq_encode(x, codebooks_aug, group_levels, level_ranges, out, counters=None) -> None:
    op = "rvq_encode"
    counter_tensor(op, counters)
    shape(op, "x", x, (None, None, None))
    shape(op, "codebooks_aug", codebooks_aug, (None, None, None))
    B, GD, T = x.shape
    L, D = codebooks_aug.shape[0], codebooks_aug.shape[2] - 2
    G, n_q = len(group_levels), sum(group_levels)
    if GD != G * D or n_q > L:
        raise ValueError(f"{op}: x {tuple(x.shape)} against codebooks_aug {tuple(codebooks_aug.shape)}: expected "
                         f"{G} groups x {D} channels and at most {L} levels, got group_levels {group_levels}")
    shape(op, "level_ranges", level_ranges, (G, 2))
    ids(op, level_ranges=level_ranges)
    if out is not None:
        shape(op, "out", out, (B, n_q, T))


def rvq_decode_upsample(codes, tables, weight, partial, exec_mask, out) -> None:
    op = "rvq_decode_upsample"
    shape(op, "codes", codes, (None, None, None))
    ids(op, codes=codes)
    shape(op, "tables", tables, (None, None, None))
    (B, L, T), C = codes.shape, tables.shape[2]
    if L > tables.shape[0]:
        raise ValueError(f"{op}: codes {tuple(codes.shape)} has {L} levels, tables {tuple(tables.shape)} only "
                         f"{tables.shape[0]}")  # fmt: skip
    shape(op, "weight", weight, (C, 1, None))
    if weight.shape[2] == 0 or weight.shape[2] % 2:
        raise ValueError(f"{op}: weight has shape {tuple(weight.shape)}: the kernel must be twice the stride")
    S = weight.shape[2] // 2
    shape(op, "partial", partial, (B, C, S))
    _mask(op, exec_mask, B)
    fp32(op, tables=tables, weight=weight, partial=partial, out=out)
    if out is not None:
        shape(op, "out", out, (B, T * S, C))


def mimi_conv_pad(x, ctx, phase, exec_mask, first, out) -> None:
    op = "mimi_conv_pad"
    shape(op, "x", x, (None, None, None))
    context(op, x, ctx, phase, exec_mask, first)
    fp32(op, out=out)
    if out is not None:
        B, C, T = x.shape
        shape(op, "out", out, (B, C, ctx.shape[3] + T))


def mimi_convtr_overlap(y, partial, bias, exec_mask) -> None:
    op = "mimi_convtr_overlap"
    shape(op, "y", y, (None, None, None))
    B, C, N = y.shape
    shape(op, "partial", partial, (B, C, None))
    if partial.shape[2] == 0:
        raise ValueError(f"{op}: partial has shape {tuple(partial.shape)}: an empty tail (stride == kernel size) has "
                         "nothing to overlap")
    if N < 2 * partial.shape[2]:
        raise ValueError(f"{op}: y has shape {tuple(y.shape)}: {N} columns, fewer than twice the tail of partial "
                         f"{tuple(partial.shape)} (head and tail would overlap)")  # fmt: skip
    if bias is not None:
        shape(op, "bias", bias, (C,))
    _mask(op, exec_mask, B)
    fp32(op, y=y, partial=partial, bias=bias)


def mimi_convtr_gemv(x, w_rows, bias, stride, partial, exec_mask) -> None:
    op = "mimi_convtr_gemv"
    shape(op, "x", x, (None, None, None))
    B, C_in, T = x.shape
    shape(op, "w_rows", w_rows, (None, None, C_in))
    C, K, _ = w_rows.shape
    if not 1 <= stride < K or T * stride < K - stride:  # stride == K: no overlap, an empty partial
        raise ValueError(f"{op}: stride {stride} with {K} taps (w_rows {tuple(w_rows.shape)}) and {T} input steps: "
                         "needs 1 <= stride < K and T * stride >= K - stride")  # fmt: skip
    shape(op, "partial", partial, (B, C, K - stride))
    if bias is not None:
        shape(op, "bias", bias, (C,))
    _mask(op, exec_mask, B)
    fp32(op, x=x, w_rows=w_rows, bias=bias, partial=partial)


def mimi_rope_kv(qkv, rot, cache, rows, slots, out) -> None:
    op = "mimi_rope_kv"
    shape(op, "qkv", qkv, (None, None, 3, None, None))
    B, T, _, H, D = qkv.shape
    if D % 2:
        raise ValueError(f"{op}: qkv has shape {tuple(qkv.shape)}: head_dim {D} must be even (RoPE pairs)")
    shape(op, "rot", rot, (B, T, 3, 1, D // 2))
    if rot.dtype != torch.complex64:
        raise ValueError(f"{op}: rot must be torch.complex64 (cos + i sin), got {rot.dtype}")
    shape(op, "cache", cache, (None, 2, H, None, D))
    numel(op, "rows", rows, B, "one cache row per batch row")
    shape(op, "slots", slots, (B, T))
    ids(op, rows=rows, slots=slots)
    fp32(op, qkv=qkv, cache=cache, out=out)
    if out is not None:
        shape(op, "out", out, (B, H, T, D))


def mimi_ring_attention(q, cache, pos, out) -> None:
    op = "mimi_ring_attention"
    shape(op, "q", q, (None, None, None, None))
    B, T, H, D = q.shape
    shape(op, "cache", cache, (None, 2, H, None, D))
    if cache.shape[0] < B:
        raise ValueError(f"{op}: cache {tuple(cache.shape)} has {cache.shape[0]} rows for the {B} rows of q")
    shape(op, "pos", pos, (B,))
    ids(op, pos=pos)
    fp32(op, q=q, cache=cache, out=out)
    if out is not None:
        shape(op, "out", out, (B, T, H, D))


def mimi_residual_out(y, weight, bias, x) -> None:
    op = "mimi_residual_out"
    shape(op, "y", y, (None, None, None))
    B, C_in, T = y.shape
    shape(op, "weight", weight, (None, C_in, 1))
    C_out = weight.shape[0]
    shape(op, "x", x, (B, C_out, T))
    if bias is not None:
        shape(op, "bias", bias, (C_out,))
    fp32(op, y=y, weight=weight, bias=bias, x=x)


def head_probs(x, weight, heads: int) -> None:
    op = "head_probs"
    shape(op, "x", x, (None, None))
    shape(op, "weight", weight, (None, x.shape[1]))
    if heads < 1 or weight.shape[0] % heads:
        raise ValueError(f"{op}: weight has shape {tuple(weight.shape)}: {weight.shape[0]} rows do not split into "
                         f"{heads} heads")
    if weight.dtype != x.dtype:
        raise ValueError(f"{op}: weight {weight.dtype} must match x {x.dtype}")


def silu_mul(h) -> None:
    shape("silu_mul", "h", h, (None, None))
    if h.shape[1] % 2:
        raise ValueError(f"silu_mul: h has shape {tuple(h.shape)}: an odd width cannot split into gate and value")


def _ring(op, cache, offsets, exec_mask, delays) -> tuple[int, int]:
    shape(op, "cache", cache, (None, None, None))
    B, K, _ = cache.shape
    shape(op, "offsets", offsets, (B,))
    _mask(op, exec_mask, B)
    shape(op, "delays", delays, (K,))
    ids(op, cache=cache, offsets=offsets, delays=delays)
    return B, K


def frame_embed(cache, offsets, exec_mask, delays, initial, input_tokens, n_gen, text_table, audio_tables,
                block_table, positions, page_size, text_table2, cond) -> None:
    op = "frame_embed"
    frame_inputs(cache, offsets, exec_mask, delays, initial, input_tokens, n_gen, op)
    _embed_tables(op, *cache.shape[:2], "cache", cache, text_table, audio_tables, text_table2, cond)
    kv_slots(block_table, positions, exec_mask, page_size, op)


def frame_inputs(cache, offsets, exec_mask, delays, initial, input_tokens, n_gen, op="frame_inputs") -> None:
    B, K = _ring(op, cache, offsets, exec_mask, delays)
    shape(op, "initial", initial, (K,))
    ids(op, initial=initial, input_tokens=input_tokens)
    if not 1 <= n_gen <= K:
        raise ValueError(f"{op}: n_gen {n_gen} must be in [1, {K}] (cache {tuple(cache.shape)})")
    if input_tokens is not None:
        shape(op, "input_tokens", input_tokens, (B, K - n_gen))


def frame_commit(cache, offsets, exec_mask, delays, text_token, audio) -> None:
    op = "frame_commit"
    B, K = _ring(op, cache, offsets, exec_mask, delays)
    shape(op, "text_token", text_token, (B,))
    ids(op, text_token=text_token, audio=audio)
    if audio is not None:
        shape(op, "audio", audio, (B, None))
        if audio.shape[1] >= K:
            raise ValueError(f"{op}: audio {tuple(audio.shape)} has more streams than cache {tuple(cache.shape)}")


def kv_slots(block_table, positions, write, page_size, op="kv_slots") -> None:
    shape(op, "block_table", block_table, (None, None))
    B = block_table.shape[0]
    shape(op, "positions", positions, (B,))
    ids(op, block_table=block_table, positions=positions)
    _mask(op, write, B, "write")
    if page_size < 1:
        raise ValueError(f"{op}: page_size must be >= 1, got {page_size}")
