"""Test and benchmark helpers: verbose comparisons, the reference-relative tolerance rule, a CUDA-event timer and
vectorised torch baselines of the reference ops (the references are loops written for clarity, not speed)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable

import torch

from . import reference


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (float) or a sentinel (int) so an unwritten output can never pass a comparison."""
    return t.fill_(float("nan") if t.is_floating_point() else -(2**31) + 7)


def strided(t: torch.Tensor, fill) -> torch.Tensor:
    """``t`` [N] as a stride-2 view on its device whose gaps hold ``fill``: what a kernel that reads a vector at unit
    stride would see instead of the values (pick an in-bounds ``fill``, so such a kernel errs rather than crashes)."""
    big = torch.full((2 * t.shape[0],), fill, dtype=t.dtype, device=t.device)
    big[::2] = t
    return big[::2]


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |actual - expected| in fp32; inf when either side holds a NaN (NaN never passes)."""
    a, e = actual.float(), expected.float()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != {tuple(e.shape)}")
    if bool(torch.isnan(a).any()) or bool(torch.isnan(e).any()):
        return float("inf")
    return float((a - e).abs().max()) if a.numel() else 0.0


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0, name: str = ""):
    """``|actual - expected| <= atol + rtol * |expected|`` everywhere, NaN never passing; on failure report the
    count, the worst elements and where they are."""
    a, e = actual.float(), expected.float()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    bad = ~((a - e).abs() <= atol + rtol * e.abs())  # NaN compares False, so it is bad
    if bool(bad.any()):
        idx = bad.nonzero()[:8].tolist()
        pairs = ", ".join(f"{tuple(i)}: {a[tuple(i)].item():.6g} vs {e[tuple(i)].item():.6g}" for i in idx)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off (atol={atol:.3g}, rtol={rtol:.3g}, "
            f"nan={int(torch.isnan(a).sum())}, max_err={max_abs_err(a, e):.4g}); first: {pairs}"
        )


def ref_relative_atol(ref_lowp: torch.Tensor, ref_fp32: torch.Tensor, factor: float = 2.0, floor: float = 1e-5):
    """flash-attn's rule: a kernel may err from the fp32 reference by ``factor`` × the error the reference itself
    makes when it runs in the low precision, plus ``floor`` (which covers exact-in-fp32 cases)."""
    return factor * max_abs_err(ref_lowp, ref_fp32) + floor


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Elementwise spacing of bf16 numbers at ``|x|`` (8 mantissa bits)."""
    e = torch.frexp(x.float().abs().clamp_min(2.0**-126))[1]
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), e - 8)


def _tie_tol(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 rounding scale of a squared distance between ``r`` [D] and rows ``c`` [..., D] (fp64 inputs)."""
    return 64 * 2.0**-24 * (r.pow(2).sum() + c.pow(2).sum(-1) + 1.0)


def check_rvq_codes(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, aug: torch.Tensor, levels) -> int:
    """Assert Mimi RVQ codes ``got`` are the reference's ``want`` up to honest fp32 ties; returns the number of
    (row, group) paths that took a tie, for the caller to bound.

    The kernel ranks ``|c|^2 - 2 x.c``, the reference ``sqrt(clamp(|x|^2 - 2 x.c + |c|^2))``, so near ties may
    round apart. A differing code passes only if, on the residual both sides share at that level (fp64), its
    distance is within rounding of the reference's choice; every later code must be fp64-near-optimal on the
    kernel's own residual path."""
    B, _, T = x.shape
    D = aug.shape[-1] - 2
    books = aug[..., :D].double()
    ties = 0
    level0 = 0
    for g, n in enumerate(levels):
        for b in range(B):
            for t in range(T):
                r = x[b, g * D : (g + 1) * D, t].double()
                diverged = False
                for j in range(level0, level0 + n):
                    kg, kw = int(got[b, j, t]), int(want[b, j, t])
                    assert 0 <= kg < aug.shape[1], f"code {kg} out of range at {(b, j, t)}"
                    dist = (books[j] - r).pow(2).sum(-1)
                    tol = _tie_tol(r, books[j])
                    # the kernel's code is (near-)optimal for the residual it actually had
                    assert dist[kg] - dist.min() <= tol[kg], f"kernel code not nearest at {(b, j, t)}"
                    if not diverged and kg != kw:
                        assert abs(float(dist[kg] - dist[kw])) <= float(tol[kg]), f"no tie at {(b, j, t)}: {kg} vs {kw}"
                        diverged = True
                        ties += 1
                    r = r - books[j, kg]
        level0 += n
    return ties


def cuda_time_ms(fn: Callable[[], object], *, warmup_ms: float = 25.0, iters: int = 100) -> float:
    """Median CUDA-event time of ``fn`` in ms after a time-based warm-up (each call timed on its own)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    one = max(start.elapsed_time(end), 1e-3)
    for _ in range(int(min(1000, warmup_ms / one))):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def cuda_graph_time_ms(fn: Callable[[], object], *, iters: int = 50, calls_per_graph: int = 20) -> float:
    """Median time of one call of ``fn`` replayed from a CUDA graph holding ``calls_per_graph`` calls: the kernel's
    own time without host launch overhead (what a captured decode step pays). ``fn`` must be capturable."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    return cuda_time_ms(graph.replay, iters=iters) / calls_per_graph


# --------------------------------------------------------------------------------------------------------------
# Vectorised torch baselines ("torch eager" in benchmarks): same semantics as the references, no Python loops.


def multistream_embed_torch(tokens, text_table, audio_tables, *, text_table2=None, cond=None, out_dtype=None):
    B, K = tokens.shape
    ids = tokens[:, 1:].long()
    rows = audio_tables[torch.arange(K - 1, device=tokens.device)[None, :], ids.clamp(min=0)].float()  # [B, K-1, D]
    acc = (rows * (ids >= 0)[..., None]).sum(1)
    text = tokens[:, 0].long()
    if text_table2 is None:
        acc = acc + text_table[text.clamp(min=0)].float() * (text >= 0)[:, None]
    else:
        vt = text_table.shape[0]
        first, second = text % vt, text // vt - 1
        acc = acc + text_table[first.clamp(min=0)].float() * (text >= 0)[:, None]
        acc = acc + text_table2[second.clamp(min=0)].float() * ((text >= 0) & (second >= 0))[:, None]
    if cond is not None:
        acc = acc + cond.float()
    return acc.to(out_dtype or text_table.dtype)


def paged_decode_attention_torch(q, k_cache, v_cache, block_table, seq_lens, *, context, scale=None, counters=None):
    """Gather each slot's window (padded to ``context``) from the pages, then one masked SDPA call (``counters``, the
    split-K kernels' workspace, is unused)."""
    del counters
    B, H, D = q.shape
    S = k_cache.shape[1]
    qpos = seq_lens.long() - 1
    kpos = qpos[:, None] - context + 1 + torch.arange(context, device=q.device)[None, :]  # [B, context]
    valid = (kpos >= 0) & (kpos <= qpos[:, None])
    kp = kpos.clamp(min=0)
    page = block_table.long().gather(1, (kp // S) % block_table.shape[1])
    rows = page * S + kp % S
    keys = k_cache.flatten(0, 1)[rows].to(q.dtype).transpose(1, 2)  # [B, H, context, D]
    vals = v_cache.flatten(0, 1)[rows].to(q.dtype).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], keys, vals, attn_mask=valid[:, None, None], scale=scale
    )[:, :, 0]
    return torch.where((seq_lens > 0)[:, None, None], out, torch.zeros_like(out))


def sample_tokens_torch(logits, temperature, top_k, seeds, steps, *, step_scale=1, step_offset=0, null_logits=None,
                        cfg_coef=1.0):  # fmt: skip
    """Row-vectorised :func:`~dsm_kernels.reference.sample_tokens_ref` (topk threshold, exp race)."""
    x = logits.float()
    if null_logits is not None:
        n = null_logits.float()
        x = n + (x - n) * cfg_coef
    B, V = x.shape
    greedy = x.argmax(dim=-1)
    t = temperature.float()
    p = torch.softmax(x / torch.where(t > 0, t, 1.0)[:, None], dim=-1)
    if 0 < top_k < V:
        keep = x >= x.topk(top_k, dim=-1).values[:, -1:]
    else:
        keep = torch.ones_like(x, dtype=torch.bool)
    u = reference.sampling_uniform_ref(seeds, steps.long() * step_scale + step_offset, V)
    score = torch.where(keep, p / -torch.log(u), -1.0)
    return torch.where(t > 0, score.argmax(-1), greedy)


def sample_score_gap(x: torch.Tensor, temperature: float, seed: torch.Tensor, step: torch.Tensor, got: int,
                     expected: int) -> float:
    """The relative gap between the exp-race scores of two tokens of one row (mixed logits ``x`` [V], its seed and
    noise counter as ``[1]`` tensors): a kernel may differ from the reference only on a near tie (< 1e-5), decided by
    last-bit differences in exp/log."""
    p = torch.softmax(x.float().cpu() / temperature, -1)
    score = p / -torch.log(reference.sampling_uniform_ref(seed.cpu(), step.cpu(), x.shape[-1])[0])
    return float((score[expected] - score[got]).abs() / score[expected])


def random_depformer_weights(*, dim=32, heads=2, layers=1, hidden=48, card=40, d_model=24, text_vocab=17,
                             schedule=(0, 1, 2, 2), n_in=None, demux=True, scales=True, head_norm=False,
                             dtype=torch.float32, device="cpu", seed=0) -> reference.DepformerWeights:  # fmt: skip
    """Random depth-transformer weights in the packed layout, scaled by 1/sqrt(fan_in) so activations stay O(1)
    through the layers. ``schedule``: the weight set of each codebook; ``n_in``: distinct input projections."""
    g = torch.Generator(device=device).manual_seed(seed)

    def r(*shape, scale=None):
        t = torch.randn(*shape, generator=g, device=device)
        return (t * (scale if scale is not None else shape[-1] ** -0.5)).to(dtype)

    dq, S = len(schedule), max(schedule) + 1
    n_in = S if n_in is None else n_in
    lws = tuple(
        reference.DepformerLayerWeights(
            norm1=1 + r(dim, scale=0.1), norm2=1 + r(dim, scale=0.1),
            in_proj=r(S, 3 * dim, dim), out_proj=r(S, dim, dim),
            linear_in=tuple(r(2 * hidden, dim) for _ in range(S)), linear_out=tuple(r(dim, hidden) for _ in range(S)),
            scale1=r(dim, scale=0.3) if scales else None, scale2=r(dim, scale=0.3) if scales else None,
        )  # fmt: skip
        for _ in range(layers)
    )
    return reference.DepformerWeights(
        num_heads=heads, schedule=tuple(schedule), in_index=tuple(min(s, n_in - 1) for s in schedule),
        in_proj=r(n_in, dim, d_model), text_emb=r(text_vocab, dim, scale=0.5),
        text_emb2=r(text_vocab, dim, scale=0.5) if demux else None, emb=r(max(dq - 1, 1), card + 1, dim, scale=0.5),
        heads=tuple(r(card, dim, scale=2 * dim**-0.5) for _ in range(dq)),
        head_norms=tuple((1 + r(dim, scale=0.1)) if head_norm else None for _ in range(dq)), layers=lws,
    )  # fmt: skip


def cast_depformer_weights(w: reference.DepformerWeights, dtype: torch.dtype) -> reference.DepformerWeights:
    """``w`` with every tensor converted to ``dtype``."""

    def c(t):
        return t.to(dtype) if t is not None else None

    layers = tuple(reference.DepformerLayerWeights(
        c(lw.norm1), c(lw.norm2), c(lw.in_proj), c(lw.out_proj), tuple(map(c, lw.linear_in)),
        tuple(map(c, lw.linear_out)), c(lw.scale1), c(lw.scale2)) for lw in w.layers)  # fmt: skip
    return reference.DepformerWeights(
        w.num_heads, w.schedule, w.in_index, c(w.in_proj), c(w.text_emb), c(w.text_emb2), c(w.emb),
        tuple(map(c, w.heads)), tuple(map(c, w.head_norms)), layers, w.norm_eps, w.norm_f32, w.activation,
    )  # fmt: skip


def depformer_inputs(w: reference.DepformerWeights, B: int, *, temp: float, seed=1, device="cpu") -> dict:
    """Random frame inputs for ``w``: temporal output ``z``, text tokens (demuxed pairs when ``w`` has a second
    text table; the last row -1 when B > 1, a zero embedding), seeds and steps; top-k 5 when sampling."""
    g = torch.Generator().manual_seed(seed)
    vt = w.text_emb.shape[0]
    hi = vt * (vt + 1) if w.text_emb2 is not None else vt
    text = torch.randint(0, hi, (B,), generator=g)
    text[-1] = -1 if B > 1 else text[-1]
    z = torch.randn(B, w.in_proj.shape[2], generator=g)
    return dict(z=z.to(device, w.in_proj.dtype), text_token=text.to(device),
                temperature=torch.full((B,), temp, device=device), top_k=5 if temp > 0 else 0,
                seeds=torch.arange(B, device=device) + 11, steps=torch.arange(B, device=device) * 100 + 3,
                counters=_counters(B, w.num_heads, device))  # fmt: skip


def random_decoder_weights(*, dim=64, heads=4, kv_heads=None, layers=2, hidden=96, vocab=40, rope=True,
                           scales=False, cross=False, dtype=torch.float32, device="cpu", seed=0):  # fmt: skip
    """Random temporal-transformer step weights (``dsm_kernels.decoder.DecoderWeights``), scaled by 1/sqrt(fan_in);
    ``cross``: every layer with a cross-attention (LayerNorm, query and out projections, LayerScale with ``scales``)."""
    from .decoder import DecoderCrossWeights, DecoderLayerWeights, DecoderWeights

    g = torch.Generator(device=device).manual_seed(seed)

    def r(*shape, scale=None):
        t = torch.randn(*shape, generator=g, device=device)
        return (t * (scale if scale is not None else shape[-1] ** -0.5)).to(dtype)

    hkv = heads if kv_heads is None else kv_heads
    D = dim // heads
    lws = tuple(DecoderLayerWeights(
        norm1=1 + r(dim, scale=0.1), in_proj=r((heads + 2 * hkv) * D, dim), out_proj=r(dim, heads * D),
        norm2=1 + r(dim, scale=0.1), linear_in=r(2 * hidden, dim), linear_out=r(dim, hidden),
        scale1=r(dim, scale=0.3) if scales else None, scale2=r(dim, scale=0.3) if scales else None,
        cross=DecoderCrossWeights(norm_weight=1 + r(dim, scale=0.1), norm_bias=r(dim, scale=0.3), norm_eps=1e-5,
                                  q_proj=r(heads * D, dim), out_proj=r(dim, heads * D),
                                  scale=r(dim, scale=0.3) if scales else None) if cross else None,
    ) for _ in range(layers))  # fmt: skip
    inv_freq = torch.exp(torch.arange(D // 2, device=device) * (-9.21 * 2 / D)) if rope else None
    return DecoderWeights(num_heads=heads, num_kv_heads=hkv, inv_freq=inv_freq, norm_eps=1e-5, layers=lws,
                          out_norm=1 + r(dim, scale=0.1), out_norm_eps=1e-5, text_linear=r(vocab, dim))


def cast_decoder_weights(w, dtype: torch.dtype):
    """``w`` (``dsm_kernels.decoder.DecoderWeights``) with every weight in ``dtype`` (the RoPE frequencies stay
    fp32)."""
    from dataclasses import replace

    def c(t):
        return None if t is None else t.to(dtype)

    def cross(x):
        return None if x is None else replace(x, norm_weight=c(x.norm_weight), norm_bias=c(x.norm_bias),
                                              q_proj=c(x.q_proj), out_proj=c(x.out_proj), scale=c(x.scale))

    layers = tuple(replace(lw, norm1=c(lw.norm1), in_proj=c(lw.in_proj), out_proj=c(lw.out_proj), norm2=c(lw.norm2),
                           linear_in=c(lw.linear_in), linear_out=c(lw.linear_out), scale1=c(lw.scale1),
                           scale2=c(lw.scale2), cross=cross(lw.cross), norm1_bias=c(lw.norm1_bias),
                           norm2_bias=c(lw.norm2_bias)) for lw in w.layers)  # fmt: skip
    return replace(w, layers=layers, out_norm=c(w.out_norm), text_linear=c(w.text_linear))


def random_mimi_transformer_weights(*, dim=64, heads=4, layers=2, hidden=96, device="cpu", seed=0):
    """Random weights of Mimi's transformer as ``dsm_kernels.decoder.DecoderWeights`` (fp32 LayerNorms with biases,
    GELU FFNs, LayerScales, RoPE, no head), scaled by 1/sqrt(fan_in)."""
    from dataclasses import replace

    w = random_decoder_weights(dim=dim, heads=heads, layers=layers, hidden=hidden, scales=True, device=device,
                               seed=seed)  # fmt: skip
    g = torch.Generator(device=device).manual_seed(seed + 1)

    def r(*shape, scale):
        return torch.randn(*shape, generator=g, device=device) * scale

    lws = tuple(replace(lw, linear_in=lw.linear_in[:hidden].contiguous(), norm1_bias=r(dim, scale=0.3),
                        norm2_bias=r(dim, scale=0.3)) for lw in w.layers)  # fmt: skip
    return replace(w, layers=lws, out_norm=None, text_linear=None, gelu=True)


def _counters(rows: int, heads: int, device) -> torch.Tensor:
    """The ``counters`` an op's inputs carry, as the engine's and Mimi's state hold them (so that the persistent
    kernels run without zeroing words of their own, as in a real step)."""
    from . import counter_words

    return torch.zeros(counter_words(rows, heads), dtype=torch.int32, device=device)


def mimi_transformer_inputs(w, B: int, *, tokens=2, capacity=12, pos=None, active=None, seed=1, device="cpu"):
    """Inputs of one Mimi transformer step for ``w``: ``h`` [B tokens, d], ``pos`` (default: streams at different
    points of their ring: the first wrapped, the second fresh), ``exec_mask`` (default: all active), and a ring
    ``cache`` of ``capacity`` slots full of random history. Keyword arguments of ``mimi_transformer``; fresh tensors
    at every call (the step writes ``h`` and the cache in place)."""
    g = torch.Generator().manual_seed(seed)
    if pos is None:
        pos = torch.tensor([(5 * capacity + 3, 0, capacity - 1, 2 * capacity - 2)[b % 4] + 7 * (b // 4)
                            for b in range(B)])  # fmt: skip
    cache = torch.randn(len(w.layers), B + 1, 2, w.num_heads, capacity, w.head_dim, generator=g)
    h = torch.randn(B * tokens, w.dim, generator=g)
    mask = torch.ones(B, dtype=torch.bool) if active is None else torch.as_tensor(active, dtype=torch.bool)
    return dict(h=h.to(device), pos=torch.as_tensor(pos, dtype=torch.long).to(device), exec_mask=mask.to(device),
                cache=cache.to(device), tokens=tokens, counters=_counters(B * tokens, w.num_heads, device))


def decoder_inputs(w, B: int, *, context=24, page_size=4, kv_dtype=None, positions=None, cross_length=20,
                   cross_page_size=4, dtype=None, seed=1, device="cpu"):  # fmt: skip
    """Inputs of one decode step for ``w``: ``x``, caches full of random history (pages in a shuffled order), each
    row at its own position (some past the context, so the ring wraps; the last row of several not written this step:
    ``slot`` -1, ``seq_lens`` 0), as ``dsm_kernels.kv_slots`` gives them; with cross-attention weights, condition
    pages of ``cross_length`` positions (one page shared by all rows, as the voice pool shares the padding) as
    ``cross``. ``dtype``: that of x and the caches (default the weights'); the values do not depend on it. Keyword
    arguments of ``decoder_step``; fresh tensors at every call (the step writes x and the caches in place)."""
    g = torch.Generator().manual_seed(seed)
    dt = dtype or w.text_linear.dtype
    n = -(-context // page_size)
    pages = B * n + 3
    shape = (len(w.layers), pages, page_size, w.num_kv_heads, w.head_dim)
    k = torch.randn(*shape, generator=g).to(kv_dtype or dt)
    v = torch.randn(*shape, generator=g).to(kv_dtype or dt)
    table = torch.randperm(pages, generator=g)[: B * n].view(B, n).int()
    if positions is None:
        positions = torch.tensor([(7 * b * b + 3 * b) % (3 * context) for b in range(B)])
    write = torch.ones(B, dtype=torch.bool)
    if B > 1:
        write[-1] = False
    slot, seq_lens = reference.kv_slots_ref(table, positions, write, page_size)
    x = torch.randn(B, w.dim, generator=g).to(dt)
    cross = None
    if w.layers[0].cross is not None:
        import types

        cps, n_cross = cross_page_size, cross_length // cross_page_size
        cshape = (len(w.layers), B * n_cross + 2, cps, w.num_heads, w.head_dim)
        ck, cv = torch.randn(*cshape, generator=g).to(dt), torch.randn(*cshape, generator=g).to(dt)
        ctable = torch.randperm(cshape[1], generator=g)[: B * n_cross].view(B, n_cross).int()
        ctable[:, 0] = ctable[0, 0]  # a page every row reads, as the voices' shared padding
        cross = types.SimpleNamespace(k=ck.to(device), v=cv.to(device), block_table=ctable.to(device),
                                      seq_lens=torch.full((B,), cross_length, dtype=torch.int32, device=device),
                                      length=cross_length, page_size=cps)  # fmt: skip
    return dict(x=x.to(device), positions=positions.to(device), slot=slot.to(device), seq_lens=seq_lens.to(device),
                k_cache=k.to(device), v_cache=v.to(device), block_table=table.to(device), context=context,
                cross=cross, counters=_counters(B, w.num_heads, device))


def frame_embed_inputs(B: int, D: int, *, tts: bool, dtype: torch.dtype = torch.bfloat16, vt: int = 49,
                       seed: int = 0) -> dict:
    """Keyword inputs of ``dsm_kernels.frame_embed`` at a model's layout, on the CPU: 33 streams over their delay
    ring, STT (32 input streams of audio codes, delay 6) or TTS (every stream generated, delay 2, demultiplexed text
    ids and a condition row each); about a fifth of the rows do not execute; ``vt`` text ids, 2049 audio ids, each
    row's ring of 4 pages of 16 positions in a shuffled pool."""
    g = torch.Generator().manual_seed(seed)
    K, va, delay = 33, 2049, 2 if tts else 6
    n_gen, CT = K if tts else 1, delay + 2
    cache = torch.randint(-1, min(vt, va), (B, K, CT), generator=g)
    if tts:
        cache[:, 0] = torch.randint(-1, vt * (vt + 1), (B, CT), generator=g)
    return dict(
        cache=cache, offsets=torch.randint(0, 50, (B,), generator=g), exec_mask=torch.rand(B, generator=g) < 0.8,
        delays=torch.tensor([0] + [delay] * (K - 1)), initial=torch.randint(0, min(vt, va), (K,), generator=g),
        input_tokens=None if tts else torch.randint(0, va, (B, K - n_gen), generator=g), n_gen=n_gen,
        text_table=torch.randn(vt, D, generator=g).to(dtype),
        audio_tables=torch.randn(K - 1, va, D, generator=g).to(dtype),
        block_table=torch.randperm(B * 4, generator=g).view(B, 4).int(),
        positions=torch.randint(0, 500, (B,), generator=g), page_size=16,
        text_table2=torch.randn(vt, D, generator=g).to(dtype) if tts else None,
        cond=torch.randn(B, D, generator=g).to(dtype) if tts else None,
    )


def frame_embed_fp32(inputs: dict, tokens: torch.Tensor) -> torch.Tensor:
    """The fp32 sum that ``frame_embed``'s output rounds: the embedding of the column ``tokens`` over ``inputs``'
    tables taken in fp32."""
    def f32(t):
        return None if t is None else t.float()

    return reference.multistream_embed_ref(tokens.cpu(), f32(inputs["text_table"]), f32(inputs["audio_tables"]),
                                           text_table2=f32(inputs["text_table2"]), cond=f32(inputs["cond"]))


def kernel_device(backend: str) -> torch.device:
    """The device a kernel test of ``backend`` runs on: the GPU when present, else the CPU (Triton interpreter)."""
    from . import available_backends

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if backend not in available_backends(device):
        raise RuntimeError(
            f"backend {backend!r} unavailable on {device}: build dsm_kernels._C, or set TRITON_INTERPRET=1 on CPU"
        )
    return device


# --------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile checks: the interpreter accepts code that the GPU compiler rejects (and never allocates
# shared memory), so CPU tests also compile each kernel for an H100.


def aot_compile(kernel, arg_types: dict[str, str], constexprs: dict, *, num_warps: int = 4, num_stages: int = 3,
                divisible: Iterable[str] | None = None, arch: int = 90):
    """Compile a ``@triton.jit`` kernel for ``sm_<arch>`` without a GPU; returns Triton's compiled kernel (``.asm``
    with ``ptx``/``cubin``, ``.metadata.shared``). Arguments missing from ``arg_types`` are ``i32``. ``divisible``:
    the arguments given the 16-divisibility hint that run-time specialisation gives aligned pointers and sizes (it
    lets Triton pipeline loads through shared memory); default: every pointer."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget

    # constexpr parameters not given take their defaults, as at a launch (not run-time i32 arguments)
    defaults = {p.name: p.default for p in kernel.params if p.is_constexpr and p.default is not inspect.Parameter.empty}
    constexprs = {**defaults, **constexprs}
    sig = {n: "constexpr" if n in constexprs else arg_types.get(n, "i32") for n in kernel.arg_names}
    names = set(divisible) if divisible is not None else {n for n, t in sig.items() if t.startswith("*")}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if n in names}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def local_memory_ops(cubin: bytes) -> int:
    """Local-memory loads and stores (``LDL``/``STL``: register spills, arrays indexed at run time) in a compiled
    kernel's SASS, read with the ``nvdisasm`` that Triton's wheel ships."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(nvdisasm), "-c", f.name], check=True, capture_output=True, text=True).stdout
    return len(re.findall(r"\b(?:LDL|STL)\b", sass))


def prewait_loads(ptx: str) -> set[str]:
    """The names that a PDL kernel's global loads issued before its ``griddepcontrol.wait`` assign (``w`` for
    ``w = tl.load(...)``), read off the PTX line info: a kernel may request before the wait only what no kernel
    before it can be writing (weights, norm and scale parameters)."""
    import re
    from pathlib import Path

    files = dict(re.findall(r'\.file\s+(\d+)\s+"([^"]+)"', ptx))
    names, loc = set(), None
    for line in ptx.splitlines():
        m = re.search(r"\.loc\s+(\d+)\s+(\d+)", line)
        if m:
            loc = (files[m.group(1)], int(m.group(2)))
        elif "griddepcontrol.wait" in line:
            return names
        elif re.search(r"\bld\.global", line):
            src = Path(loc[0]).read_text().splitlines()[loc[1] - 1]
            names.add(re.match(r"\s*(\w+)", src).group(1))
    raise AssertionError("no griddepcontrol.wait in the PTX")


def check_arrival_protocol(ptx: str) -> None:
    """The split-K arrival counter (``triton_common._arrive``) as compiled: every partial store, then a CTA barrier,
    then ONE thread's gpu-scope acq_rel add (release of the CTA's stores, acquire for the last arriver), and the last
    arriver reads the other programs' partials from L2 (``.cg``) only after it."""
    import re

    lines = ptx.splitlines()
    atom = [i for i, line in enumerate(lines) if re.search(r"\batom\.global\S*\.add", line)]
    assert len(atom) == 1, f"one arrival add expected, got {len(atom)}"
    a = atom[0]
    assert re.search(r"atom\.global\.(gpu\.acq_rel|acq_rel\.gpu)\.add", lines[a]), lines[a].strip()
    assert lines[a].lstrip().startswith("@"), "the add must be predicated to one thread"
    stores = [i for i in range(a) if re.search(r"\b(st|red)\.global|cp\.async\.bulk", lines[i])]
    assert not stores or any("bar.sync" in lines[i] for i in range(stores[-1], a)), "no barrier after the stores"
    cg = [i for i, line in enumerate(lines) if "ld.global.cg" in line]
    assert cg and min(cg) > a, "the partials must be read from L2 after the count"


def aot_script_main(aot: Callable[[], object], path: str) -> None:
    """The ``__main__`` of a kernel test file with sm_90 AOT cases: ``--aot`` (what :func:`run_aot_script` passes)
    runs ``aot`` and exits; anything else runs the file's tests."""
    import sys

    import pytest

    if "--aot" in sys.argv:
        aot()
        sys.exit(0)
    sys.exit(pytest.main([path, "-q"]))


def run_aot_script(path: str) -> str:
    """Run ``python <path> --aot`` without ``TRITON_INTERPRET`` (the AOT path needs the real compiler); returns its
    stdout, raising with the output's tail if it failed."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, path, "--aot"], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise AssertionError((res.stdout + res.stderr)[-4000:])
    return res.stdout


# --------------------------------------------------------------------------------------------------------------
# Launch counting: at small batch a captured step costs a few microseconds per kernel whatever it computes, so the
# number of kernels a step launches, counted on the CPU, is the proxy for its GPU time.

_NO_KERNEL_OPS = frozenset({
    "view", "unsqueeze", "squeeze", "select", "slice", "t", "expand", "permute", "transpose", "_unsafe_view", "alias",
    "split", "split_with_sizes", "unbind", "as_strided", "detach", "chunk", "reshape", "narrow", "lift_fresh",
    "_reshape_alias", "view_as_complex", "view_as_real", "numpy_T", "mT",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
})  # fmt: skip


class LaunchCounter:
    """``with LaunchCounter() as c: step()`` then ``c.counts``: every dispatched torch op that launches a kernel
    (views and bare allocations excluded), by aten name, plus every Triton launch as ``triton:<kernel>`` (compiled or
    interpreted; the interpreter's own torch calls are not counted)."""

    def __init__(self):
        import collections

        self.counts: collections.Counter[str] = collections.Counter()
        self._patched: list[tuple[type, Callable]] = []
        self._mode = None

    def __enter__(self) -> LaunchCounter:
        from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        counts = self.counts

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name not in _NO_KERNEL_OPS:
                    counts[name] += 1
                return func(*args, **(kwargs or {}))

        def counted(run):
            def wrapper(fn, *args, **kwargs):
                if not kwargs.get("warmup", False):
                    counts["triton:" + getattr(getattr(fn, "fn", fn), "__name__", "kernel")] += 1
                with _disable_current_modes():
                    return run(fn, *args, **kwargs)

            return wrapper

        for cls in (JITFunction, InterpretedFunction):
            self._patched.append((cls, cls.run))
            cls.run = counted(cls.run)
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for cls, run in self._patched:
            cls.run = run
        self._patched.clear()

    @property
    def total(self) -> int:
        return sum(self.counts.values())
