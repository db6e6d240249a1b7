"""Pure-torch reference ops: the specification every fast kernel is tested against.

They are written to be obviously right, not fast. Never edit one to agree with a kernel.

Conventions shared by all backends (see DSM-SPEC §2):

* token id ``-1`` embeds to an exact zero row; ids ``< -1`` are invalid and must never reach an embedding.
* paged KV cache: one pool ``[num_pages, page_size, heads, head_dim]`` for K and one for V per layer. Stream slot
  ``b`` owns the ring of pages ``block_table[b, :]``; absolute position ``p`` lives in page
  ``block_table[b, (p // page_size) % pages_per_slot]`` at row ``p % page_size``. The query of a slot sits at
  position ``seq_lens[b] - 1`` and sees key ``k`` iff ``0 <= q - k < context`` (moshi's rule). ``seq_lens[b] == 0``
  marks an inactive slot, whose output is zero.
* sampling noise is a counter-based hash of ``(seed, step, token)``, the seed being the row's own, so that every
  backend, and every replay of a captured CUDA graph, draws the same tokens for the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def multistream_embed_ref(
    tokens: torch.Tensor,
    text_table: torch.Tensor,
    audio_tables: torch.Tensor,
    *,
    text_table2: torch.Tensor | None = None,
    cond: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sum of the K table lookups of each slot, accumulated in fp32.

    Parameters
    ----------
    tokens : [B, K] integer ids; column 0 is text, columns 1..K-1 use ``audio_tables[0..K-2]``. ``-1`` gives zeros.
    text_table : [Vt, D] text embedding table.
    audio_tables : [Q, Va, D] audio embedding tables, ``Q >= K - 1``.
    text_table2 : optional [Vt, D] table of the demultiplexed second text stream. When given, a text id ``v`` packs
        two ids (DSM-SPEC §2.2): ``first = v % Vt`` looked up in ``text_table``, ``second = v // Vt - 1`` looked up
        in ``text_table2`` (skipped when ``second == -1``).
    cond : optional [B, D] per-slot vector added last.
    out_dtype : output dtype, default ``text_table.dtype``.

    Returns
    -------
    [B, D] tensor: audio 0..K-2, then text, then second text, then cond, summed in fp32 and cast once.
    """
    B, K = tokens.shape
    D = text_table.shape[1]
    acc = torch.zeros(B, D, dtype=torch.float32, device=tokens.device)
    for k in range(1, K):
        acc = acc + _lookup(audio_tables[k - 1], tokens[:, k])
    text = tokens[:, 0]
    if text_table2 is None:
        acc = acc + _lookup(text_table, text)
    else:
        vt = text_table.shape[0]
        valid = text >= 0
        first = torch.where(valid, text % vt, -1)
        second = torch.where(valid, text // vt - 1, -1)
        acc = acc + _lookup(text_table, first) + _lookup(text_table2, second)
    if cond is not None:
        acc = acc + cond.float()
    return acc.to(out_dtype or text_table.dtype)


def _lookup(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    if bool((ids < -1).any()) or bool((ids >= table.shape[0]).any()):
        raise ValueError(f"embedding ids out of range [-1, {table.shape[0]}): {ids.tolist()}")
    rows = table[ids.clamp(min=0)].float()
    return torch.where((ids >= 0)[:, None], rows, torch.zeros_like(rows))


def kv_position_to_slot(block_table: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Flat row index (``page * page_size + offset``) in the pool of absolute ``positions`` [B] of each slot."""
    pages_per_slot = block_table.shape[1]
    logical = (positions // page_size) % pages_per_slot
    page = block_table.gather(1, logical[:, None].long())[:, 0].long()
    return page * page_size + positions % page_size


def append_kv_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write the new key/value of each slot into the page pool, in place.

    ``k_cache``/``v_cache``: [num_pages, page_size, H, D]; ``k``/``v``: [B, H, D] (keys already rotated);
    ``slot_mapping``: [B] flat row index into the pool (``page * page_size + offset``), ``-1`` = do not write.
    An fp8 (e4m3) cache stores ``clamp(x, -448, 448)`` rounded to nearest, with no scale: overflow saturates instead
    of becoming NaN (a NaN input stays NaN).
    """
    for b in range(k.shape[0]):
        row = int(slot_mapping[b])
        if row < 0:
            continue
        page, off = divmod(row, k_cache.shape[1])
        k_cache[page, off] = _to_cache(k[b], k_cache.dtype)
        v_cache[page, off] = _to_cache(v[b], v_cache.dtype)


def _to_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float8_e4m3fn:
        bound = torch.finfo(dtype).max  # 448
        x = x.float().clamp(-bound, bound)
    return x.to(dtype)


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    context: int,
    scale: float | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per slot attending over its last ``context`` positions in the paged cache.

    ``q``: [B, H, D]; ``k_cache``/``v_cache``: [num_pages, page_size, H, D]; ``block_table``: [B, pages_per_slot]
    int32 page ids (ring, see module doc); ``seq_lens``: [B] tokens written so far including the current one.
    Softmax in fp32; output [B, H, D] in ``q.dtype``; zeros for slots with ``seq_lens == 0``. ``counters``: the
    split-K kernels' merge counters (int32, >= B*H, at 0), unused here.
    """
    del counters
    B, H, D = q.shape
    page_size = k_cache.shape[1]
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros(B, H, D, dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        qpos = n - 1
        kpos = torch.arange(max(0, qpos - context + 1), qpos + 1, device=q.device)
        rows = kv_position_to_slot(block_table[b : b + 1].expand(len(kpos), -1), kpos, page_size)
        keys = k_cache.flatten(0, 1)[rows].float()  # [T, H, D]
        vals = v_cache.flatten(0, 1)[rows].float()
        scores = torch.einsum("hd,thd->ht", q[b].float(), keys) * scale
        probs = scores.softmax(dim=-1)
        out[b] = torch.einsum("ht,thd->hd", probs, vals)
    return out.to(q.dtype)


_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on uint32 values held in int64 (identical in every backend)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    return x


def sampling_uniform_ref(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Counter-based uniform noise in (0, 1], [B, vocab] fp32, from per-slot ``seeds`` and ``steps`` ([B] int64).

    ``u = (hash(hash(hash(seed) ^ step) ^ token) >> 8 + 0.5) / 2**24``: 24 random bits, never 0; the top value rounds
    to exactly 1.0 in fp32 (then ``-log(u)`` is 0 and that token's score is ``-inf``, never drawn).
    """
    h = _hash32(_hash32(seeds.long()) ^ (steps.long() & _MASK32))
    tok = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _hash32(h[:, None] ^ tok[None, :]) >> 8
    return (bits.float() + 0.5) * (1.0 / 16777216.0)


def sample_tokens_ref(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: int,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    *,
    step_scale: int = 1,
    step_offset: int = 0,
    null_logits: torch.Tensor | None = None,
    cfg_coef: float = 1.0,
) -> torch.Tensor:
    """Sample one token per row (moshi's ``sample_token`` with a deterministic noise source).

    ``logits``: [B, V]; ``temperature``: [B] fp32 (``<= 0`` means greedy argmax, lowest index on ties);
    ``top_k``: keep the ``top_k`` largest logits (0 = all); ``seeds``/``steps``: [B] int64, row ``b``'s noise
    counter being ``steps[b] * step_scale + step_offset`` (a generator's frame offsets, and its stream's place among
    the ``step_scale`` streams of a frame, with no kernel of its own to combine them).
    With ``null_logits`` the logits are first mixed as ``null + (cond - null) * cfg_coef`` (in fp32).
    Sampling draws ``argmax(p / e)`` over the kept tokens with ``e = -log(u)`` ~ Exp(1), which is a draw from the
    (renormalised) softmax of ``logits / temperature`` restricted to the top-k set.
    Returns [B] int64.
    """
    x = logits.float()
    if null_logits is not None:
        n = null_logits.float()
        x = n + (x - n) * cfg_coef
    B, V = x.shape
    greedy = x.argmax(dim=-1)
    u = sampling_uniform_ref(seeds, steps.long() * step_scale + step_offset, V)
    out = torch.empty(B, dtype=torch.int64, device=x.device)
    for b in range(B):
        t = float(temperature[b])
        if t <= 0 or not torch.isfinite(x[b].max() / t):  # max(x) / t overflows: the limit t -> 0, greedy (softmax
            out[b] = greedy[b]  # of inf - inf was NaN, and each backend drew another token)
            continue
        p = torch.softmax(x[b] / t, dim=-1)
        keep = torch.ones(V, dtype=torch.bool, device=x.device)
        if 0 < top_k < V:
            keep = torch.zeros(V, dtype=torch.bool, device=x.device)
            keep[torch.topk(x[b], top_k).indices] = True
        score = torch.where(keep, p / -torch.log(u[b]), torch.full_like(p, -1.0))
        out[b] = score.argmax()
    return out


# ---- depth transformer (DSM-SPEC §3) --------------------------------------------------------------------------


@dataclass
class DepformerLayerWeights:
    """One depformer layer. ``in_proj``/``out_proj`` are views of the stacked checkpoint tensors (set ``j`` is
    ``[j]``); the FFN sets are separate checkpoint tensors, so they stay a tuple (no copy of ~0.6 GB)."""

    norm1: torch.Tensor  # [dd] RMSNorm alpha
    norm2: torch.Tensor  # [dd]
    in_proj: torch.Tensor  # [S, 3*dd, dd]: q rows, then k, then v
    out_proj: torch.Tensor  # [S, dd, dd]
    linear_in: tuple[torch.Tensor, ...]  # per set [2*hidden, dd]: gate rows, then value rows
    linear_out: tuple[torch.Tensor, ...]  # per set [dd, hidden]
    scale1: torch.Tensor | None = None  # LayerScale [dd] or None
    scale2: torch.Tensor | None = None


@dataclass
class DepformerWeights:
    """Every tensor one depformer frame reads (packed once by ``LMModel.depformer_weights``).

    The low-rank audio embeddings are folded into full-width tables once (a gather commutes with the row-wise
    low-rank projection): per step that reads one 2 KB row per slot instead of the 256 KB projection, at the cost
    of 2049×1024 bf16 = 4 MB of memory per codebook (126 MB for 31 tables). The demuxed text embedding keeps its
    two tables ``out1(weight)``/``out2(weight)``.
    """

    num_heads: int
    schedule: tuple[int, ...]  # weight set of step k (len dep_q)
    in_index: tuple[int, ...]  # depformer_in projection of step k
    in_proj: torch.Tensor  # [n_in, dd, d]
    text_emb: torch.Tensor  # [Vt, dd] (demux: the first id's table)
    text_emb2: torch.Tensor | None  # [Vt, dd] demux second id's table, or None
    emb: torch.Tensor  # [max(dep_q - 1, 1), card + 1, dd] audio tables of steps 1..dep_q-1
    heads: tuple[torch.Tensor, ...]  # per step [card, dd]
    head_norms: tuple[torch.Tensor | None, ...]  # per step RMSNorm alpha before the head, or None (identity)
    layers: tuple[DepformerLayerWeights, ...]
    norm_eps: float = 1e-8
    norm_f32: bool = True  # rms_norm_f32 (compute in fp32) vs rms_norm (compute in the model dtype)
    activation: str = "silu"
    # what a backend derives once from these tensors (the CUDA kernel's device table of weight pointers), by key
    derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def dep_q(self) -> int:
        return len(self.schedule)

    @property
    def dim(self) -> int:
        return self.in_proj.shape[1]

    @property
    def card(self) -> int:
        return self.heads[0].shape[0]


def _dep_rms(x: torch.Tensor, alpha: torch.Tensor, eps: float, f32: bool) -> torch.Tensor:
    """``dsm.layers.Norm`` (rms kinds), same operation order."""
    dtype = x.dtype
    if f32:
        x = x.float()
    var = eps + torch.mean(x**2, dim=-1, keepdim=True)
    return (x * (alpha.view(-1).to(var) * torch.rsqrt(var))).to(dtype)


def _dep_embed(w: DepformerWeights, k: int, ids: torch.Tensor) -> torch.Tensor:
    """``ScaledEmbedding`` on the folded tables: id -1 gives zeros; step 0 demuxes the text id (DSM-SPEC §2.2)."""
    is_zero = (ids == -1)[:, None]
    ids = ids.clamp(min=0)
    if k == 0 and w.text_emb2 is not None:
        vt = w.text_emb.shape[0]
        first = w.text_emb[ids % vt]
        second = ids // vt - 1
        y = first + torch.where((second < 0)[:, None], first.new_zeros(()),
                                w.text_emb2[second.clamp(min=0)])
    else:
        y = (w.text_emb if k == 0 else w.emb[k - 1])[ids]
    return torch.where(is_zero, y.new_zeros(()), y)


_DEP_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "sigmoid": torch.sigmoid, "relu": F.relu}


def depformer_frame_ref(
    w: DepformerWeights,
    z: torch.Tensor,
    text_token: torch.Tensor,
    temperature: torch.Tensor,
    top_k: int,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    *,
    return_logits: bool = False,
    step_scale: int = 1,
    step_offset: int = 0,
    counters: torch.Tensor | None = None,
):
    """All ``dep_q`` audio tokens of one frame (DSM-SPEC §3): the plain per-codebook loop.

    ``z``: [B, d] temporal output; ``text_token``: [B] (fed at step 0); sampling as :func:`sample_tokens_ref` with
    ``temperature`` [B], ``top_k``, ``seeds`` [B] and noise counter ``steps * step_scale + step_offset + k`` at
    codebook ``k`` (``steps`` [B]).
    No positional embedding (``depformer_pos_emb: none``), attention over the steps 0..k of this frame.
    Returns tokens [B, dep_q] int64 (and logits [B, dep_q, card] in the model dtype with ``return_logits``).
    ``counters``: the persistent kernel's barrier words (int32 at 0), unused here.
    """
    del counters
    act = _DEP_ACTIVATIONS[w.activation]
    B, H = z.shape[0], w.num_heads
    caches: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in w.layers]
    prev, out, all_logits = text_token, [], []
    for k in range(w.dep_q):
        j = w.schedule[k]
        x = F.linear(z, w.in_proj[w.in_index[k]]) + _dep_embed(w, k, prev)
        for i, lw in enumerate(w.layers):
            qkv = F.linear(_dep_rms(x, lw.norm1, w.norm_eps, w.norm_f32), lw.in_proj[j])
            q, kk, v = qkv.view(B, 3, H, w.dim // H).unbind(1)
            caches[i].append((kk, v))
            keys = torch.stack([c[0] for c in caches[i]], dim=2)  # [B, H, k+1, D]
            vals = torch.stack([c[1] for c in caches[i]], dim=2)
            a = F.scaled_dot_product_attention(q[:, :, None], keys, vals)[:, :, 0]
            y = F.linear(a.flatten(1), lw.out_proj[j])
            x = x + (lw.scale1.to(y) * y if lw.scale1 is not None else y)
            h = F.linear(_dep_rms(x, lw.norm2, w.norm_eps, w.norm_f32), lw.linear_in[j])
            h = h.view(B, 2, h.shape[1] // 2)
            y = F.linear(act(h[:, 0]) * h[:, 1], lw.linear_out[j])
            x = x + (lw.scale2.to(y) * y if lw.scale2 is not None else y)
        hn = w.head_norms[k]
        logits = F.linear(_dep_rms(x, hn, w.norm_eps, w.norm_f32) if hn is not None else x, w.heads[k])
        prev = sample_tokens_ref(logits, temperature, top_k, seeds, steps, step_scale=step_scale,
                                 step_offset=step_offset + k)
        out.append(prev)
        all_logits.append(logits)
    tokens = torch.stack(out, dim=1)
    return (tokens, torch.stack(all_logits, dim=1)) if return_logits else tokens


# ------------------------------------------------------------------------------------------------------------------
# Temporal-step fusions: the elementwise glue between the GEMMs of one decode step (each is one launch on the GPU
# instead of 5-30). Written as the module path computes them (dsm.layers), so the reference backend is bit-identical
# to the unfused model.


def add_rms_norm_ref(
    x: torch.Tensor,
    alpha: torch.Tensor,
    eps: float,
    delta: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add, then fp32 RMSNorm (moshi's ``rms_norm_f32``).

    ``x`` [B, d] is the residual stream, updated in place to ``x + scale * delta`` (``scale`` [d] or None = 1;
    ``delta`` None: no add). Returns ``(x, y)`` with ``y = (x * (alpha * rsqrt(eps + mean(x^2)))).to(x.dtype)``
    computed in fp32 from the updated ``x`` as stored (``alpha`` [d] or [1, 1, d])."""
    if delta is not None:
        x.copy_(x + (scale.to(delta) * delta if scale is not None else delta))
    xf = x.float()
    var = eps + torch.mean(xf**2, dim=-1, keepdim=True)
    y = (xf * (alpha.view(-1).to(var) * torch.rsqrt(var))).to(x.dtype)
    return x, (y if out is None else out.copy_(y))


def rope_qk_ref(
    qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, num_heads: int, num_kv_heads: int,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved RoPE of the query and key parts of a fused projection.

    ``qkv`` [B, (H + 2 Hkv) D] as ``[q | k | v]``; ``positions`` [B] int (absolute position of each row);
    ``inv_freq`` [D/2] fp32. Returns contiguous ``q`` [B, H, D] and ``k`` [B, Hkv, D] in ``qkv``'s dtype: pairs
    ``(x0, x1)`` become ``(x0 cos - x1 sin, x0 sin + x1 cos)`` of the angle ``position * inv_freq`` (fp32)."""
    B = qkv.shape[0]
    D = 2 * inv_freq.shape[0]
    qk = qkv[:, : (num_heads + num_kv_heads) * D].reshape(B, num_heads + num_kv_heads, D // 2, 2)
    angle = inv_freq * positions.float()[:, None, None]  # [B, 1, D/2]
    cos, sin = torch.cos(angle), torch.sin(angle)
    xr, xi = qk[..., 0].float(), qk[..., 1].float()
    rot = torch.stack([(xr * cos - xi * sin).to(qkv.dtype), (xr * sin + xi * cos).to(qkv.dtype)], dim=-1)
    rot = rot.view(B, num_heads + num_kv_heads, D)
    q, k = rot[:, :num_heads].contiguous(), rot[:, num_heads:].contiguous()
    return (q, k) if out is None else (out[0].copy_(q), out[1].copy_(k))


def rope_append_kv_ref(
    qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`rope_qk_ref`, then :func:`append_kv_ref` of the rotated k and of v (the last ``Hkv * D`` columns of
    ``qkv``) into the pages; returns the rotated q [B, H, D]."""
    q, k = rope_qk_ref(qkv, positions, inv_freq, num_heads, num_kv_heads)
    D = 2 * inv_freq.shape[0]
    v = qkv[:, (num_heads + num_kv_heads) * D : (num_heads + 2 * num_kv_heads) * D].reshape(-1, num_kv_heads, D)
    append_kv_ref(k_cache, v_cache, k, v, slot_mapping)
    return q if out is None else out.copy_(q)


def gemv_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    alpha: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    gate: bool = False,
    out: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    """A linear layer with its neighbours fused, as the module path computes them (each op rounded to the dtype):
    ``y = F.linear(h, weight)`` with ``h = RMSNorm_f32(x) * alpha`` if ``alpha`` is given (``LayerNorm(x) * alpha +
    beta`` if ``beta`` is given too), else ``h = x``; then

    * ``residual`` [B, N]: updated in place to ``residual + scale * y`` (``scale`` [N] or None = 1) and returned;
    * ``gate``: ``weight`` holds 2N rows (gate, value): returns ``silu(y[:, :N]) * y[:, N:]``;
    * ``gelu``: returns ``F.gelu(y)`` (Mimi's FFN);
    * otherwise returns ``y``.

    ``out`` (not with ``residual``): where to write the result.
    """
    if beta is not None:
        h = F.layer_norm(x, x.shape[-1:], alpha.view(-1), beta.view(-1), eps)
    else:
        h = add_rms_norm_ref(x, alpha, eps)[1] if alpha is not None else x
    y = F.linear(h, weight)
    if residual is not None:
        return residual.copy_(residual + (scale.to(y) * y if scale is not None else y))
    y = silu_mul_ref(y) if gate else (F.gelu(y) if gelu else y)
    return y if out is None else out.copy_(y)


def conv1d_gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                    dilation: int = 1, out: torch.Tensor | None = None, elu: bool = False,
                    ctx: torch.Tensor | None = None, phase: torch.Tensor | None = None,
                    exec_mask: torch.Tensor | None = None, first: torch.Tensor | None = None) -> torch.Tensor:
    """A valid (unpadded) conv1d ``[B, C_in, T] -> [B, C_out, T_out]`` of ``x`` (of ``elu(x)`` with ``elu``; fp32,
    no groups), the op Mimi's SEANet runs where only a few output columns remain (its deep, wide layers); the
    kernels take at most ``CONV_GEMV_MAX_COLUMNS`` output columns in all. With ``ctx`` (and ``phase``,
    ``exec_mask``, optionally ``first``) a streaming causal conv: the input is :func:`conv_context_input`'s (the
    stored context prepended, and updated)."""
    if ctx is not None:
        x = conv_context_input(x, ctx, phase, exec_mask, first)
    y = F.conv1d(F.elu(x) if elu else x, weight, bias, stride, 0, dilation)
    return y if out is None else out.copy_(y)


def conv1d_igemm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                     residual: torch.Tensor | None = None, elu: bool = False,
                     out: torch.Tensor | None = None, ctx: torch.Tensor | None = None,
                     phase: torch.Tensor | None = None, exec_mask: torch.Tensor | None = None,
                     first: torch.Tensor | None = None) -> torch.Tensor:
    """A valid conv1d ``[B, C_in, T] -> [B, C_out, T_out]`` of ``x`` (of ``elu(x)`` with ``elu``; fp32, no groups,
    no dilation) plus ``residual`` ``[B, C_out, T_out]`` if given: the op Mimi's SEANet runs at many output columns
    (a residual unit's end is ``x + conv1x1(elu(y))``). The kernels compute the products on tensor cores in three
    TF32 passes (a few fp32 ulps). With ``ctx`` (and ``phase``, ``exec_mask``, optionally ``first``) a streaming
    causal conv: the input is :func:`conv_context_input`'s (the stored context prepended, and updated)."""
    if ctx is not None:
        x = conv_context_input(x, ctx, phase, exec_mask, first)
    y = F.conv1d(F.elu(x) if elu else x, weight, bias, stride)
    if residual is not None:
        y = residual + y
    return y if out is None else out.copy_(y)


def convtr_phase_weight(weight: torch.Tensor, stride: int) -> torch.Tensor:
    """A transposed conv's weight [C_in, C_out, J S] as the phase GEMMs read it: [S, C_out, J C_in], element
    ``[p, co, j C_in + ci] = weight[ci, co, p + j S]``."""
    C_in, C_out, K = weight.shape
    J = K // stride
    return weight.view(C_in, C_out, J, stride).permute(3, 1, 2, 0).reshape(stride, C_out, J * C_in).contiguous()


def conv_transpose1d_igemm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                               stride: int = 1, phase_weight: torch.Tensor | None = None, elu: bool = False,
                               out: torch.Tensor | None = None) -> torch.Tensor:
    """A transposed conv1d ``[B, C_in, T] -> [B, C_out, (T - 1) stride + K]`` (fp32, no groups, weight
    ``[C_in, C_out, K]`` with K a multiple of the stride: Mimi's are twice it), the whole output with the bias (the
    streaming overlap-add is :func:`mimi_convtr_overlap_ref`'s). ``phase_weight``: the kernels' layout of the same
    weight (:func:`convtr_phase_weight`), unused here. ``elu``: of ``elu(x)``."""
    y = F.conv_transpose1d(F.elu(x) if elu else x, weight, bias, stride)
    return y if out is None else out.copy_(y)


def qkv_rope_gemv_ref(
    x: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, eps: float, positions: torch.Tensor,
    inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    num_heads: int, num_kv_heads: int, out: torch.Tensor | None = None, beta: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The attention's input side in one op: the fused q|k|v projection of ``RMSNorm_f32(x) * alpha`` (with
    ``beta``: ``LayerNorm(x) * alpha + beta``; :func:`gemv_ref`), then :func:`rope_append_kv_ref` (q and k rotated,
    k and v written into the pages). Returns the rotated q [B, H, D]. The caches may be any [pages, page_size, Hkv,
    D] views with a contiguous last dim (Mimi passes its ring [rows, heads, slots, D] permuted)."""
    qkv = gemv_ref(x, weight, alpha=alpha, beta=beta, eps=eps)
    return rope_append_kv_ref(qkv, positions, inv_freq, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads,
                              out=out)  # fmt: skip


def silu_mul_ref(h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The gated FFN's activation: ``h`` [B, 2F] -> ``silu(h[:, :F]) * h[:, F:]`` [B, F] (each op rounded to the
    dtype of ``h``, as the module computes it)."""
    a, b = h.view(h.shape[0], 2, h.shape[1] // 2).unbind(1)
    y = F.silu(a) * b
    return y if out is None else out.copy_(y)


def head_probs_ref(x: torch.Tensor, weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The probability of class 0 of ``heads`` classifier heads stacked in ``weight`` [heads * C, d] (head h: rows
    ``h * C .. h * C + C - 1``), for rows ``x`` [B, d]: the heads as one linear layer in ``x``'s dtype (logits rounded
    to it, as ``F.linear``), each head's softmax in fp32 (as moshi-server computes stt-1b's semantic VAD).
    Returns [B, heads] fp32."""
    # the class count given, not inferred (-1): view() cannot infer it for B = 0 rows, which the kernels take
    return torch.softmax(F.linear(x, weight).view(x.shape[0], heads, weight.shape[0] // heads), -1,
                         dtype=torch.float32)[..., 0]


# ------------------------------------------------------------------------------------------------------------------
# Mimi residual vector quantizer (DSM-SPEC §7.6), fp32. Kernels: dsm_kernels.mimi_kernels.


def augment_codebook(codebook: torch.Tensor) -> torch.Tensor:
    """``[K, D]`` -> ``[K, D + 2]`` rows ``[c, 1, |c|^2]``: the constant half of the distance GEMM of
    :func:`rvq_encode_ref` (and the norms the Triton kernel reads)."""
    norm = codebook.pow(2).sum(-1, keepdim=True)
    return torch.cat([codebook, torch.ones_like(norm), norm], dim=-1).contiguous()


def rvq_level_ranges(group_levels: tuple[int, ...], device: torch.device | str | None = None) -> torch.Tensor:
    """The device copy of ``group_levels`` that :func:`rvq_encode_ref`'s kernels read: [G, 2] int32 rows
    ``(first level, level count)`` per group. The caller builds it once (with its codebooks), never in a step."""
    firsts = [sum(group_levels[:g]) for g in range(len(group_levels))]
    rows = [[f, n] for f, n in zip(firsts, group_levels, strict=True)]
    return torch.tensor(rows, dtype=torch.int32, device=device).view(len(group_levels), 2)


def rvq_encode_ref(
    x: torch.Tensor, codebooks_aug: torch.Tensor, group_levels: tuple[int, ...], level_ranges: torch.Tensor,
    out: torch.Tensor | None = None, counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """Split residual VQ encode: nearest codebook entry level by level, each level quantizing the residual left by
    the previous ones.

    ``x`` [B, G*D, T] holds each group's projected latent (channels ``g*D .. g*D+D-1`` for group ``g``);
    ``codebooks_aug`` [L, K, D+2] rows ``[c, 1, |c|^2]``; group ``g`` uses the ``group_levels[g]`` codebooks that
    follow those of the groups before it. Returns codes [B, sum(group_levels), T] int64 (group by group).
    ``level_ranges`` is ``rvq_level_ranges(group_levels)`` on the kernels' device (they read it; this reference
    only checks its shape and reads ``group_levels``).

    Distances are ``torch.cdist``'s matrix-multiply path (one GEMM of ``[-2r, |r|^2, 1]`` against the augmented
    rows, clamp at 1e-30, square root), the first index on ties: this is moshi's arithmetic, so codes equal its own
    bit for bit. A kernel may differ only where two distances tie within fp32 rounding. ``counters``: the persistent
    kernel's barrier words, unused here."""
    del counters
    B, _, T = x.shape
    D = codebooks_aug.shape[-1] - 2
    assert level_ranges.shape == (len(group_levels), 2), (level_ranges.shape, group_levels)
    codes = []
    level0 = 0
    for g, n in enumerate(group_levels):
        r = x[:, g * D : (g + 1) * D]
        for level in range(level0, level0 + n):
            flat = r.transpose(1, 2).reshape(-1, D)[None]
            norm = flat.pow(2).sum(-1, keepdim=True)
            flat_aug = torch.cat([flat.mul(-2), norm, torch.ones_like(norm)], dim=-1)
            dist = flat_aug.matmul(codebooks_aug[level : level + 1].mT).clamp_min(1e-30).sqrt()
            c = dist[0].argmin(dim=-1).view(B, T)
            r = r - F.embedding(c, codebooks_aug[level, :, :D]).transpose(1, 2)
            codes.append(c)
        level0 += n
    res = torch.stack(codes, dim=1)
    return res if out is None else out.copy_(res)


def rvq_decode_ref(codes: torch.Tensor, tables: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of codebook lookups: ``codes`` [B, L, T] (values in [0, K)), ``tables`` [Lt >= L, K, C] (Mimi folds the
    output projection into them) -> [B, C, T] fp32, levels added in order starting from an exact zero."""
    B, L, T = codes.shape
    acc = torch.zeros(B, T, tables.shape[-1], dtype=torch.float32, device=tables.device)
    for level in range(L):
        acc = acc + F.embedding(codes[:, level], tables[level]).float()
    res = acc.transpose(1, 2)
    return res if out is None else out.copy_(res)


def rvq_decode_upsample_ref(
    codes: torch.Tensor, tables: torch.Tensor, weight: torch.Tensor, partial: torch.Tensor, exec_mask: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mimi's decode up to its transformer: the sum of codebook lookups (:func:`rvq_decode_ref`), then the streaming
    depthwise transposed conv from 12.5 to 25 Hz (``weight`` [C, 1, 2 S], stride S, no bias) with its overlap-add
    (:func:`mimi_convtr_overlap_ref`: ``partial`` [B, C, S] in place; rows whose ``exec_mask`` is false keep
    theirs). Returns [B, C, T S] fp32, a transposed view of a time-major [B, T S, C] tensor (``out``, if given):
    the layout the transformer reads."""
    B, _, T = codes.shape
    C, S = weight.shape[0], weight.shape[-1] // 2
    y = F.conv_transpose1d(rvq_decode_ref(codes, tables), weight, None, S, 0, 0, C)
    y = mimi_convtr_overlap_ref(y, partial, None, exec_mask)
    if out is None:
        out = torch.empty(B, T * S, C, dtype=torch.float32, device=tables.device)
    out.copy_(y.transpose(1, 2))
    return out.transpose(1, 2)


def mimi_rope_kv_ref(
    qkv: torch.Tensor, rot: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """RoPE of a Mimi layer's fused projection and the write of its keys and values into the streaming KV ring.

    ``qkv`` [B, T, 3, H, D] fp32 (``[q | k | v]``, pairs ``(x0, x1)`` interleaved along D); ``rot`` [B, T, 3, 1, D/2]
    complex64 factors ``cos + i sin`` (the v factor is exactly 1: v passes through); ``cache`` [R, 2, H, S, D]
    (keys, values); ``rows`` [B, 1] int64 cache row of each batch row (Mimi sends inactive rows to a scratch row
    ``R - 1``); ``slots`` [B, T] int64 ring slot of each token (distinct within a row). Pairs become
    ``(x0 cos - x1 sin, x0 sin + x1 cos)``; then ``cache[rows[b], :, :, slots[b, t]] = (k, v)`` in place. Returns
    the rotated q [B, H, T, D] (a view here; a kernel may return a contiguous tensor)."""
    b, t, _, h, d = qkv.shape
    x = torch.view_as_real(torch.view_as_complex(qkv.reshape(b, t, 3, h, d // 2, 2)) * rot).view(b, t, 3, h, d)
    cache[rows, :, :, slots] = x[:, :, 1:]  # [B, T, 2, H, D] -> slots
    q = x[:, :, 0].transpose(1, 2)
    return q if out is None else out.copy_(q)


def mimi_ring_attention_ref(q: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of a Mimi layer's ``T`` new queries ``q`` [B, T, H, D] fp32 over its KV ring ``cache`` [R >= B, 2,
    H, S, D] once their keys are in it: ``pos`` [B] int64 is the number of tokens the row had written before them,
    so query t sits at ``pos + t`` and ring slot s holds position ``last - (last - s) mod S`` (``last = pos + T -
    1``; negative: never written). Query t sees the slots whose position is in ``[0, pos + t]`` (the ring holds
    exactly the context), with scale ``D ** -0.5``; SDPA with that additive mask, as ``transformer_forward``.
    Returns [B, T, H, D]."""
    B, T, H, D = q.shape
    S = cache.shape[3]
    pos_q = pos.view(-1, 1) + torch.arange(T, device=q.device)  # [B, T]
    last = pos_q[:, -1:]
    pos_k = last - torch.remainder(last - torch.arange(S, device=q.device), S)  # [B, S]
    ok = (pos_q[:, :, None] >= pos_k[:, None]) & (pos_k[:, None] >= 0)  # [B, T, S]
    mask = torch.where(ok, 0.0, float("-inf"))[:, None]
    a = F.scaled_dot_product_attention(q.transpose(1, 2), cache[:B, 0], cache[:B, 1], mask).transpose(1, 2)
    return a if out is None else out.copy_(a)


def conv_context_input(
    x: torch.Tensor, ctx: torch.Tensor, phase: torch.Tensor, exec_mask: torch.Tensor, first: torch.Tensor | None = None
) -> torch.Tensor:
    """The raw input ``[B, C, P + T]`` of a streaming causal conv of Mimi's SEANet: its stored left context, then
    ``x`` [B, C, T]. The context is double-buffered: ``ctx`` [2, B, C, P] holds it in half ``phase`` ([1] int32 on
    the device, 0 or 1; the caller flips it once a step has run all its convs). Rows whose ``first`` [B] bool is
    true (a stream's first call of the 12.5 Hz downsampling, replicate-padded) take x's first column for every
    context column instead. Half ``1 - phase`` takes the input's last ``P`` columns for rows whose ``exec_mask`` is
    true, half ``phase``'s for the others (kept bitwise). Nothing reads half ``1 - phase`` in a step, so a kernel
    may read one half while it writes the other: no launch of its own for the context."""
    cur_i, nxt_i = phase.long(), (1 - phase).long()
    cur = ctx.index_select(0, cur_i)[0]  # [B, C, P]
    head = cur if first is None else torch.where(first.view(-1, 1, 1), x[..., :1].expand_as(cur), cur)
    xp = torch.cat([head, x], dim=-1)
    ctx.index_copy_(0, nxt_i, torch.where(exec_mask.view(-1, 1, 1), xp[..., -ctx.shape[-1] :], cur)[None])
    return xp


def mimi_conv_pad_ref(
    x: torch.Tensor, ctx: torch.Tensor, phase: torch.Tensor, exec_mask: torch.Tensor, elu: bool = False,
    first: torch.Tensor | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """A streaming causal conv's input for a convolution that cannot read the context itself (torch's):
    ``elu(conv_context_input(...))`` (without ``elu``: as is) [B, C, P + T], the context updated as
    :func:`conv_context_input` says. ``x`` [B, C, T] fp32; ELU with alpha 1 (``expm1`` below zero)."""
    xp = conv_context_input(x, ctx, phase, exec_mask, first)
    if elu:
        xp = F.elu(xp)
    return xp if out is None else out.copy_(xp)


def mimi_convtr_overlap_ref(
    y: torch.Tensor, partial: torch.Tensor, bias: torch.Tensor | None, exec_mask: torch.Tensor
) -> torch.Tensor:
    """Overlap-add of a streaming transposed conv of Mimi's SEANet (§7.2), in place: ``y`` [B, C, N] is the conv's
    output (bias included); its first ``P`` columns get the stored tail ``partial`` [B, C, P] added, and ``partial``
    takes ``y``'s last ``P`` columns without the bias (added again when the next call overlaps them) for rows whose
    ``exec_mask`` [B] is true. Needs ``N >= 2 P``. Returns the finished columns ``y[..., :N - P]`` (a view)."""
    pt = partial.shape[-1]
    assert y.shape[-1] >= 2 * pt, (y.shape, partial.shape)
    y[..., :pt].add_(partial)
    tail = y[..., -pt:]
    if bias is not None:
        tail = tail - bias[:, None]
    torch.where(exec_mask.view(-1, 1, 1), tail, partial, out=partial)
    return y[..., :-pt]


def mimi_residual_out_ref(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          x: torch.Tensor) -> torch.Tensor:
    """The end of a SEANet residual unit (§7.3): ``x + conv1x1(elu(y))``; ``y`` [B, C_in, T], ``weight`` [C_out,
    C_in, 1], ``x`` [B, C_out, T], fp32. Returns a new tensor."""
    return x + F.conv1d(F.elu(y), weight, bias)


def mimi_convtr_gemv_ref(
    x: torch.Tensor, w_rows: torch.Tensor, bias: torch.Tensor | None, stride: int, partial: torch.Tensor,
    exec_mask: torch.Tensor, elu: bool = False,
) -> torch.Tensor:
    """A streaming transposed conv of Mimi's SEANet with its overlap-add (§7.2): ``conv_transpose1d(elu(x) if elu
    else x, w, bias, stride)`` then :func:`mimi_convtr_overlap_ref`. ``x`` [B, C_in, T] fp32; the weight is given as
    ``w_rows`` [C_out, K, C_in] (the checkpoint's [C_in, C_out, K] permuted, so that each (output channel, tap) is a
    contiguous row); ``partial`` [B, C_out, K - S]. Returns the finished ``[B, C_out, T * S]``."""
    y = F.conv_transpose1d(F.elu(x) if elu else x, w_rows.permute(2, 0, 1), bias, stride)
    return mimi_convtr_overlap_ref(y, partial, bias, exec_mask)


# ------------------------------------------------------------------------------------------------------------------
# Delayed-stream bookkeeping of one step (DSM-SPEC §4): the token cache in, the un-delayed frame out. Integer-only,
# so every backend must be exact.


def frame_inputs_ref(
    cache: torch.Tensor,
    offsets: torch.Tensor,
    exec_mask: torch.Tensor,
    delays: torch.Tensor,
    initial: torch.Tensor,
    input_tokens: torch.Tensor | None,
    n_gen: int,
) -> torch.Tensor:
    """Write the input-only streams' tokens and read this step's input column.

    ``cache`` [B, K, CT] int64 ring of delayed tokens (updated in place); ``offsets`` [B] frames done since reset;
    ``exec_mask`` [B] bool; ``delays``/``initial`` [K]; ``input_tokens`` [B, K - n_gen] (streams ``n_gen..K-1``, the
    audio codes for STT) or None. Executing rows write stream k's token at column ``(offset + delay_k) % CT``.
    Returns [B, K]: column ``offset % CT``, or the stream's initial token where ``offset <= delay_k`` or the row
    does not execute."""
    B, K, CT = cache.shape
    ex = exec_mask
    if input_tokens is not None:
        cols = (offsets[:, None] + delays[n_gen:][None]) % CT
        user = cache[:, n_gen:]
        cur = user.gather(2, cols[..., None])[..., 0]
        user.scatter_(2, cols[..., None], torch.where(ex[:, None], input_tokens.long(), cur)[..., None])
    is_init = (offsets[:, None] <= delays[None]) | ~ex[:, None]
    inp = cache.gather(2, (offsets % CT)[:, None, None].expand(B, K, 1))[..., 0]
    return torch.where(is_init, initial[None], inp)


def frame_commit_ref(
    cache: torch.Tensor,
    offsets: torch.Tensor,
    exec_mask: torch.Tensor,
    delays: torch.Tensor,
    text_token: torch.Tensor,
    audio: torch.Tensor | None,
    max_delay: int,
) -> torch.Tensor:
    """Advance executing rows and cache their generated tokens; return the un-delayed frame.

    ``offsets += exec_mask``; executing rows write ``[text_token, audio...]`` (streams ``0..n_gen-1``,
    ``n_gen = 1 + audio.shape[1]``) at column ``offset % CT``. Returns [B, n_gen]: stream k read at column
    ``(offset - max_delay + delay_k) % CT``, or ``-2`` where ``offset <= max_delay`` or the row does not execute."""
    B, _, CT = cache.shape
    n_gen = 1 + (audio.shape[1] if audio is not None else 0)
    ex = exec_mask
    offsets.add_(ex.long())
    col = (offsets % CT)[:, None, None].expand(B, n_gen, 1)
    new = text_token[:, None] if audio is None else torch.cat([text_token[:, None], audio], dim=1)
    gen = cache[:, :n_gen]
    cur = gen.gather(2, col)[..., 0]
    gen.scatter_(2, col, torch.where(ex[:, None], new, cur)[..., None])
    idx = (offsets[:, None] - max_delay + delays[None, :n_gen]) % CT
    tokens = gen.gather(2, idx[..., None])[..., 0]
    invalid = (offsets <= max_delay) | ~ex
    return torch.where(invalid[:, None], -2, tokens)


def frame_embed_ref(
    cache: torch.Tensor,
    offsets: torch.Tensor,
    exec_mask: torch.Tensor,
    delays: torch.Tensor,
    initial: torch.Tensor,
    input_tokens: torch.Tensor | None,
    n_gen: int,
    text_table: torch.Tensor,
    audio_tables: torch.Tensor,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    page_size: int,
    *,
    text_table2: torch.Tensor | None = None,
    cond: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """A decode step's bookkeeping and input as one op: :func:`frame_inputs_ref` (``cache`` updated in place), the
    :func:`multistream_embed_ref` of its column, and :func:`kv_slots_ref` of the executing rows with ``advance``
    (``positions`` moved on in place). Returns ``(x [B, D], tokens [B, K], slot [B], seq_lens [B], before [B])``:
    the embedded input (written into ``out`` when given), the input column, and the K/V slots, sequence lengths and
    RoPE positions of this step."""
    tokens = frame_inputs_ref(cache, offsets, exec_mask, delays, initial, input_tokens, n_gen)
    x = multistream_embed_ref(tokens, text_table, audio_tables, text_table2=text_table2, cond=cond,
                              out_dtype=out.dtype if out is not None else out_dtype)
    if out is not None:
        x = out.copy_(x)
    return (x, tokens, *kv_slots_ref(block_table, positions, exec_mask, page_size, advance=True))


def kv_slots_ref(
    block_table: torch.Tensor, positions: torch.Tensor, write: torch.Tensor, page_size: int, advance: bool = False
) -> tuple[torch.Tensor, ...]:
    """Where this step's K/V go and how long each row's sequence is: ``slot`` [B] int64 (the pool row of
    ``positions``, -1 where ``write`` is False) and ``seq_lens`` [B] int32 (``positions + 1``, 0 where not). With
    ``advance`` the written rows' ``positions`` then move on by one, in place, and a third tensor holds the positions
    this step had (its RoPE positions)."""
    slot = torch.where(write, kv_position_to_slot(block_table, positions, page_size), -1)
    seq_lens = torch.where(write, positions + 1, 0).to(torch.int32)
    if not advance:
        return slot, seq_lens
    before = positions.clone()
    positions.add_(write)
    return slot, seq_lens, before


def mimi_rows_ref(
    pos: torch.Tensor, exec_mask: torch.Tensor, tokens: int, capacity: int, advance: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row indices of a Mimi transformer step of ``tokens`` new tokens per stream, rows ``b * tokens + j`` over a
    ring of ``capacity`` slots per stream (stream b's ring seen as page b), of token position ``p = pos[b] + j``:
    ``positions`` [B T] int64 (the RoPE position as moshi rounds it, ``fp32(pos[b]) + j`` in fp32, an integer; ``p``
    below 2**24), ``slots`` [B T] int64 (``b * capacity + p % capacity``; -1 where ``exec_mask[b]`` is False: no
    write), ``seq_lens`` [B T] int32 (``p + 1``) and ``starts`` [B T] int32 (the first position the row sees,
    ``p + tokens - capacity - j``: what the ring still holds once every new key is written). With ``advance``,
    ``pos`` of the active streams then moves on by ``tokens``, in place."""
    B = pos.shape[0]
    j = torch.arange(tokens, device=pos.device)
    positions = pos.long().view(-1, 1) + j  # [B, T]
    base = torch.arange(B, device=pos.device).view(-1, 1) * capacity
    slots = torch.where(exec_mask.view(-1, 1), base + positions % capacity, -1)
    starts = positions + (tokens - capacity) - j
    rope = (pos.float().view(-1, 1) + j.float()).long()  # exact: every fp32 from 2**23 on is an integer
    if advance:
        pos.add_(exec_mask, alpha=tokens)
    return rope.view(-1), slots.view(-1), (positions + 1).int().view(-1), starts.int().view(-1)
