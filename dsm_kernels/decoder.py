"""The temporal transformer's decode step for a few rows (DSM-SPEC §2): every layer, then the output norm and the text
head, from the embedded input ``x`` [B, d] to ``(z, logits)``.

:class:`DecoderWeights` holds what a step reads (``dsm.model.LMModel.decoder_weights`` packs it once). Its
reference and Triton implementations are one composition of the single ops (:func:`decoder_step_composed`), run on
that backend: per layer the QKV GEMV with its RMSNorm, RoPE and paged K/V write (``qkv_rope_gemv``), the paged decode
attention, the out-projection GEMV with the residual, the optional cross-attention (LayerNorm + query GEMV, paged
attention over the condition pages, out GEMV + residual), the gated FFN as two GEMVs; 6 launches a layer (8 with the
cross-attention). The CUDA backend (``dsm_kernels.cuda_ops.decoder_step_cuda``) runs the whole step as one
persistent kernel where it can. The rounding points are the module path's (``dsm.model``).

Mimi's streaming transformer (DSM-SPEC §7.5) is the same kind of step with LayerNorms, a GELU FFN and no head, over a
K/V ring per stream: :func:`mimi_transformer_composed` is its composition of single ops, and the CUDA backend runs
it on the same persistent kernel (``dsm_kernels.cuda_ops.mimi_transformer_cuda``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DecoderCrossWeights:
    """A layer's cross-attention to the condition (TTS): LayerNorm, query and output projections."""

    norm_weight: torch.Tensor  # [d]
    norm_bias: torch.Tensor  # [d]
    norm_eps: float
    q_proj: torch.Tensor  # [H D, d]
    out_proj: torch.Tensor  # [d, H D]
    scale: torch.Tensor | None = None  # LayerScale [d]


@dataclass
class DecoderLayerWeights:
    norm1: torch.Tensor  # [d] RMSNorm alpha (LayerNorm weight with norm1_bias)
    in_proj: torch.Tensor  # [(H + 2 Hkv) D, d]: q rows, then k, then v
    out_proj: torch.Tensor  # [d, H D]
    norm2: torch.Tensor  # [d]
    linear_in: torch.Tensor  # [2 hidden, d]: gate rows, then value rows
    linear_out: torch.Tensor  # [d, hidden]
    scale1: torch.Tensor | None = None  # LayerScale [d] or None
    scale2: torch.Tensor | None = None
    cross: DecoderCrossWeights | None = None
    norm1_bias: torch.Tensor | None = None  # [d]: the norms are LayerNorms (Mimi), else RMSNorms
    norm2_bias: torch.Tensor | None = None


@dataclass
class DecoderWeights:
    """Every tensor of a decode step: the LM's (RMSNorms, SiLU-gated FFNs, a text head) or Mimi's transformer's
    (LayerNorms, GELU FFNs, ``linear_in`` [hidden, d], no head: ``out_norm`` and ``text_linear`` None)."""

    num_heads: int
    num_kv_heads: int
    inv_freq: torch.Tensor | None  # [D/2] fp32 RoPE frequencies, or None (no RoPE)
    norm_eps: float
    layers: tuple[DecoderLayerWeights, ...]
    out_norm: torch.Tensor | None  # [d] RMSNorm alpha before the text head
    out_norm_eps: float
    text_linear: torch.Tensor | None  # [V, d]
    gelu: bool = False  # the FFN: GELU of linear_in (Mimi), else SiLU-gated
    # what a backend derives once from these tensors (the CUDA kernel's device table of pointers), by key
    derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def dim(self) -> int:
        return self.layers[0].norm1.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].in_proj.dtype

    @property
    def head_dim(self) -> int:
        return self.layers[0].out_proj.shape[1] // self.num_heads


def rope_append(qkv, positions, inv_freq, k_cache, v_cache, slot, num_heads, num_kv_heads, *, backend=None):
    """Of a fused ``[q | k | v]`` projection ``qkv`` [B, (H + 2 Hkv) D]: rotate q and k (interleaved RoPE, when
    ``inv_freq``) and write k and v into one layer's pages at ``slot``; returns q [B, H, D]."""
    import dsm_kernels as K

    H, Hkv = num_heads, num_kv_heads
    if inv_freq is not None:  # one kernel
        return K.rope_append_kv(qkv, positions, inv_freq, k_cache, v_cache, slot, H, Hkv, backend=backend)
    B, D = qkv.shape[0], qkv.shape[1] // (H + 2 * Hkv)
    q, k = qkv[:, : H * D].view(B, H, D), qkv[:, H * D : (H + Hkv) * D].view(B, Hkv, D)
    K.append_kv(k_cache, v_cache, k, qkv[:, (H + Hkv) * D :].view(B, Hkv, D), slot, backend=backend)
    return q


def condition_attention(q, cross, layer: int, *, counters=None, backend=None):
    """Attention of ``q`` [B, H, D] over every position of the rows' condition pages of layer ``layer`` (``cross``:
    ``dsm.kv_cache.CrossKVCache``; ``seq_lens == context == length``)."""
    import dsm_kernels as K

    return K.paged_decode_attention(q, cross.k[layer], cross.v[layer], cross.block_table, cross.seq_lens,
                                    context=cross.length, counters=counters, backend=backend)


def decoder_step_composed(w: DecoderWeights, x, positions, slot, seq_lens, k_cache, v_cache, block_table, *,
                          context, counters=None, cross=None, backend=None):  # fmt: skip
    """The step as single ops on ``backend``. ``x`` [B, d] (the embedded input; updated in place into the residual
    stream); ``positions``, ``slot`` and ``seq_lens`` [B] as ``dsm_kernels.kv_slots`` gives them; ``k_cache`` and
    ``v_cache`` [L, pages, page_size, Hkv, D] with ``block_table`` [B, pages_per_slot]; ``cross``: the condition's
    paged K/V (``dsm.kv_cache.CrossKVCache``: ``k``, ``v``, ``block_table``, ``seq_lens``, ``length``) or None.
    Returns ``(z, logits)``: the normed output [B, d] and the text logits [B, V]."""
    import dsm_kernels as K

    if w.text_linear is None:  # before any layer updates x in place
        raise ValueError("decoder_step: these weights have no text head (Mimi's: use mimi_transformer)")
    H = w.num_heads
    for i, lw in enumerate(w.layers):
        q = _attention_input(w, i, x, positions, k_cache[i], v_cache[i], slot, backend)
        a = K.paged_decode_attention(q, k_cache[i], v_cache[i], block_table, seq_lens, context=context,
                                     counters=counters, backend=backend)  # fmt: skip
        K.gemv(a.flatten(1), lw.out_proj, residual=x, scale=lw.scale1, backend=backend)
        if lw.cross is not None:  # query GEMV with its LayerNorm, attention over the condition, out GEMV + residual
            c = lw.cross
            q = K.gemv(x, c.q_proj, alpha=c.norm_weight, beta=c.norm_bias, eps=c.norm_eps, backend=backend)
            a = condition_attention(q.view(q.shape[0], H, -1), cross, i, counters=counters, backend=backend)
            K.gemv(a.flatten(1), c.out_proj, residual=x, scale=c.scale, backend=backend)
        _feed_forward(w, i, x, backend)
    x, z = K.add_rms_norm(x, w.out_norm, w.out_norm_eps, backend=backend)
    return z, K.gemv(z, w.text_linear, backend=backend)


def _attention_input(w: DecoderWeights, i: int, x, positions, k_cache, v_cache, slot, backend):
    """Layer ``i``'s norm + QKV projection of ``x``, RoPE, and the K/V write at ``slot``; returns q [B, H, D]."""
    import dsm_kernels as K

    lw, H, Hkv = w.layers[i], w.num_heads, w.num_kv_heads
    if w.inv_freq is not None:  # projection, RoPE and the K/V write: one kernel
        return K.qkv_rope_gemv(x, lw.in_proj, lw.norm1, w.norm_eps, positions, w.inv_freq, k_cache, v_cache, slot, H,
                               Hkv, beta=lw.norm1_bias, backend=backend)  # fmt: skip
    qkv = K.gemv(x, lw.in_proj, alpha=lw.norm1, beta=lw.norm1_bias, eps=w.norm_eps, backend=backend)
    return rope_append(qkv, positions, None, k_cache, v_cache, slot, H, Hkv, backend=backend)


def _feed_forward(w: DecoderWeights, i: int, x, backend) -> None:
    """Layer ``i``'s norm + FFN (SiLU-gated, or GELU), added to the residual stream ``x`` in place."""
    import dsm_kernels as K

    lw = w.layers[i]
    h = K.gemv(x, lw.linear_in, alpha=lw.norm2, beta=lw.norm2_bias, eps=w.norm_eps, gate=not w.gelu, gelu=w.gelu,
               backend=backend)  # fmt: skip
    K.gemv(h, lw.linear_out, residual=x, scale=lw.scale2, backend=backend)


def mimi_pages(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mimi's K/V ring ``[L, B + 1, 2, H, S, D]`` as the decode step's pages: K and V ``[L, B + 1, S, H, D]`` views
    (stream b's ring is page b of S slots)."""
    pages = cache.transpose(3, 4)
    return pages[:, :, 0], pages[:, :, 1]


def mimi_transformer_composed(w: DecoderWeights, h, pos, exec_mask, cache, *, tokens: int, backend=None) -> None:
    """Mimi's streaming transformer over ``tokens`` new tokens of each of B streams, as single ops on ``backend``:
    ``h`` [B T, d] (rows ``b * tokens + j``; updated in place), ``pos`` [B] int64 (tokens each stream has written:
    the RoPE position of its first new token), ``exec_mask`` [B] bool (inactive streams write nothing; their rows'
    outputs are meaningless), ``cache`` [L, B + 1, 2, H, S, D] (the K/V ring of ``S == context`` slots per stream).
    Every new key is written before any query attends, so after the ring wraps a stream's first token sees one key
    fewer (the slot its second token overwrote), as in the reference. Per layer: the QKV GEMV with its LayerNorm,
    RoPE and the ring write; the ring attention; out + LayerScaled residual; the FFN's GEMV with its LayerNorm and
    GELU; its out GEMV + residual. Then ``pos`` of the active streams moves on by ``tokens``, in place."""
    import dsm_kernels as K

    B, S = pos.shape[0], cache.shape[4]
    positions, slots, _, _ = K.mimi_rows(pos, exec_mask, tokens, S, backend=backend)
    k_pages, v_pages = mimi_pages(cache)
    for i in range(len(w.layers)):
        q = _attention_input(w, i, h, positions, k_pages[i], v_pages[i], slots, backend)
        a = K.mimi_ring_attention(q.view(B, tokens, w.num_heads, w.head_dim), cache[i], pos, backend=backend)
        K.gemv(a.view(B * tokens, -1), w.layers[i].out_proj, residual=h, scale=w.layers[i].scale1, backend=backend)
        _feed_forward(w, i, h, backend)
    pos.add_(exec_mask, alpha=tokens)  # the ring attention read it


def mimi_transformer_ref(w, h, pos, exec_mask, cache, *, tokens, counters=None):
    """Mimi's transformer step on the reference ops (see :func:`mimi_transformer_composed`; ``counters``: the CUDA
    persistent kernel's, unused here)."""
    del counters
    mimi_transformer_composed(w, h, pos, exec_mask, cache, tokens=tokens, backend="reference")


def mimi_transformer_triton(w, h, pos, exec_mask, cache, *, tokens, counters=None):
    """Mimi's transformer step on the Triton kernels (see :func:`mimi_transformer_composed`; ``counters``: the CUDA
    persistent kernel's, unused here)."""
    del counters
    mimi_transformer_composed(w, h, pos, exec_mask, cache, tokens=tokens, backend="triton")


def decoder_step_ref(w, x, positions, slot, seq_lens, k_cache, v_cache, block_table, *, context, counters=None,
                     cross=None):  # fmt: skip
    """The step on the reference ops (see :func:`decoder_step_composed`)."""
    return decoder_step_composed(w, x, positions, slot, seq_lens, k_cache, v_cache, block_table, context=context,
                                 counters=counters, cross=cross, backend="reference")  # fmt: skip


def decoder_step_triton(w, x, positions, slot, seq_lens, k_cache, v_cache, block_table, *, context, counters=None,
                        cross=None):  # fmt: skip
    """The step on the Triton kernels (see :func:`decoder_step_composed`)."""
    return decoder_step_composed(w, x, positions, slot, seq_lens, k_cache, v_cache, block_table, context=context,
                                 counters=counters, cross=cross, backend="triton")  # fmt: skip
