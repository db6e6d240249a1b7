"""Mimi building blocks as plain functions over explicit weights and explicit state (DSM-SPEC §7).

Every op is written so that one streaming step has static shapes and no host synchronisation: states are updated
with ``torch.where`` on a per-row ``exec_mask`` instead of Python branches, so a step can later be captured in a
CUDA graph. The op sequence (layouts included) mirrors the moshi reference so that fp32 CPU results are bitwise
equal; comments say where a layout choice is load-bearing for that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import dsm_kernels
from dsm_kernels.decoder import DecoderLayerWeights, DecoderWeights


def causal_conv1d(
    x: torch.Tensor,
    ctx: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    exec_mask: torch.Tensor,
    phase: torch.Tensor | None = None,
    dilation: int = 1,
    elu: bool = False,
    backend: str | None = None,
    residual: torch.Tensor | None = None,
    first: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Streaming causal conv: left context is the ``Ke - S`` previous input samples (not ``Ke - 1``, §7.2).
    With ``elu`` the conv reads ``elu(x)`` (on a GPU the same bits as torch's ELU, under the Triton interpreter an
    ulp or two apart). ``residual``: returns ``residual + conv``. ``first`` [B] bool: rows that replicate x's first
    column as their context (the 12.5 Hz downsampling's first call). ``out``: where to write the result (any
    strides: the encoder's last conv writes the transformer's time-major layout).

    ``ctx`` is ``[2, B, C_in, Ke - S]`` (``None`` when ``Ke == S``), double-buffered: half ``phase`` is read and the
    other half written (:func:`dsm_kernels.reference.conv_context_input`; rows whose ``exec_mask`` is false keep
    theirs); the caller flips ``phase`` after its step's last conv. Off the reference backend the GEMV and
    implicit-GEMM kernels read the context in place (no input copy, no launch of its own); torch's convolution reads
    the input :func:`dsm_kernels.mimi_conv_pad` builds (ELU, context and its update: one kernel on Triton)."""
    context = {} if ctx is None else dict(ctx=ctx, phase=phase, exec_mask=exec_mask, first=first)
    return conv1d(x, weight, bias, stride, dilation, backend, residual, elu=elu, out=out, **context)


def conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, dilation: int = 1,
           backend: str | None = None, residual: torch.Tensor | None = None, elu: bool = False,
           out: torch.Tensor | None = None, **context) -> torch.Tensor:  # fmt: skip
    """A valid conv1d of ``x`` (of ``elu(x)`` with ``elu``, which the kernels apply as they load x), plus
    ``residual`` if given; with ``context`` (``ctx``, ``phase``, ``exec_mask``, ``first``: see
    :func:`causal_conv1d`) of the input ``[context | x]``. Off the reference backend, one with at most
    ``dsm_kernels.conv_gemv_max_columns()`` output columns (batch rows x steps: at a few streams the deep SEANet
    layers, up to 16 steps a frame, and the quantizer's projection) runs as a GEMV (:func:`dsm_kernels.conv1d_gemv`),
    which streams the weights at bandwidth; one with more as an implicit GEMM on tensor cores in fp32-accurate TF32
    passes (:func:`dsm_kernels.conv1d_igemm`, the residual added in its epilogue; ``DSM_CONV_IGEMM=0``: cuDNN's fp32
    convolution, on the CUDA cores). ``out``: where to write the result (returned)."""
    b, t = x.shape[0], x.shape[-1] + (context["ctx"].shape[-1] if context else 0)
    t_out = (t - dilation * (weight.shape[-1] - 1) - 1) // stride + 1
    if gemv_path(b * t_out, backend, x.device, dsm_kernels.conv_gemv_max_columns()):
        y = dsm_kernels.conv1d_gemv(x, weight, bias, stride, dilation, elu=elu, backend=backend,
                                    out=None if residual is not None else out, **context)  # fmt: skip
    elif dilation == 1 and igemm_path(backend, x.device):
        return dsm_kernels.conv1d_igemm(x, weight, bias, stride, residual=residual, elu=elu, backend=backend,
                                        out=out, **context)  # fmt: skip
    else:
        if context:  # torch's conv reads a copy of [context | x] (ELU applied)
            x = dsm_kernels.mimi_conv_pad(x, elu=elu, backend=backend, **context)
        elif elu:
            x = F.elu(x)
        y = F.conv1d(x, weight, bias, stride, 0, dilation)
    if residual is not None:
        y = residual + y
    return y if out is None or y is out else out.copy_(y)


def conv_transpose1d(
    x: torch.Tensor,
    partial: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    exec_mask: torch.Tensor,
    groups: int = 1,
    backend: str | None = None,
    w_rows: torch.Tensor | None = None,
    w_phases: torch.Tensor | None = None,
    elu: bool = False,
) -> torch.Tensor:
    """Streaming transposed conv: overlap-add the stored ``K - S`` tail, emit ``T * S`` samples (§7.2).
    With ``w_rows`` (the weight as [C_out, K, C_in]) few input columns take :func:`dsm_kernels.mimi_convtr_gemv`;
    more take :func:`dsm_kernels.conv_transpose1d_igemm` (``w_phases``: its weight layout, made once); both apply
    ``elu`` (the conv reads ``elu(x)``) as they load x.

    The stored tail excludes the bias, since the bias is added again when the next call's output overlaps it.
    Offline use is the same call from a zero ``partial``. ``partial`` is updated in place (one kernel on Triton:
    :func:`dsm_kernels.mimi_convtr_overlap`). Needs ``T * S >= K - S`` (Mimi has ``K = 2 S``), so that the head and
    the tail do not overlap; the output is a view of the conv's.
    """
    narrow = w_rows is not None and groups == 1 and gemv_path(x.shape[0] * x.shape[-1], backend, x.device,
                                                              dsm_kernels.conv_gemv_max_columns())  # fmt: skip
    if not narrow and groups == 1 and igemm_path(backend, x.device):  # S phase GEMMs on tensor cores (see conv1d)
        y = dsm_kernels.conv_transpose1d_igemm(x, weight, bias, stride, phase_weight=w_phases, elu=elu,
                                               backend=backend)  # fmt: skip
        return dsm_kernels.mimi_convtr_overlap(y, partial, bias, exec_mask, backend=backend)
    if narrow:
        return dsm_kernels.mimi_convtr_gemv(x, w_rows, bias, stride, partial, exec_mask, elu=elu, backend=backend)
    y = F.conv_transpose1d(F.elu(x) if elu else x, weight, bias, stride, 0, 0, groups)
    return dsm_kernels.mimi_convtr_overlap(y, partial, bias, exec_mask, backend=backend)


def gemv_path(columns: int, backend: str | None, device: torch.device, limit: int | None = None) -> bool:
    """Whether an op over ``columns`` input or output columns (batch rows x steps; streams for the decoder's fused
    residual units) takes the small-batch kernels: off the reference backend, up to ``limit`` (default
    ``dsm_kernels.gemv_max_rows()``; both limits are 0 with ``DSM_GEMV=0``, which turns these paths off)."""
    limit = dsm_kernels.gemv_max_rows() if limit is None else limit
    return columns <= limit and uses_kernels(backend, device)


def igemm_path(backend: str | None, device: torch.device) -> bool:
    """Whether a convolution with more columns than the GEMV kernels take runs as an implicit GEMM
    (``dsm_kernels.conv1d_igemm``): off the reference backend, unless ``DSM_CONV_IGEMM=0``."""
    return uses_kernels(backend, device) and dsm_kernels.conv_igemm_enabled()


def uses_kernels(backend: str | None, device: torch.device) -> bool:
    """Whether ``backend`` (None: the default for ``device``) runs kernels rather than the reference ops."""
    return (backend or dsm_kernels.default_backend(device)) != "reference"


@dataclass
class LayerWeights:
    """One Mimi transformer layer (§7.5): pre-LayerNorm attention and GELU MLP, both behind a LayerScale.

    With ``out_proj_scaled``/``linear2_scaled`` set (``[in, out]``, the LayerScale folded into the transposed
    weight at load), each residual branch ends in one ``addmm``; otherwise in ``addcmul`` with the scale, which is
    bitwise the reference's ``h + scale * branch``.
    """

    norm1_w: torch.Tensor
    norm1_b: torch.Tensor
    in_proj: torch.Tensor  # [3*dim, dim]; rows = [q | k | v], head-major inside each block
    out_proj: torch.Tensor
    ls1: torch.Tensor
    norm2_w: torch.Tensor
    norm2_b: torch.Tensor
    linear1: torch.Tensor
    linear2: torch.Tensor
    ls2: torch.Tensor
    out_proj_scaled: torch.Tensor | None = None
    linear2_scaled: torch.Tensor | None = None

    @staticmethod
    def step_weights(layers: list[LayerWeights], num_heads: int, freqs: torch.Tensor) -> DecoderWeights:
        """The layers as the streaming step's kernels take them (``dsm_kernels.mimi_transformer``): LayerNorms,
        GELU FFNs, the LayerScales unfolded, no head."""
        lws = tuple(DecoderLayerWeights(norm1=lw.norm1_w, norm1_bias=lw.norm1_b, in_proj=lw.in_proj,
                                        out_proj=lw.out_proj, scale1=lw.ls1, norm2=lw.norm2_w, norm2_bias=lw.norm2_b,
                                        linear_in=lw.linear1, linear_out=lw.linear2, scale2=lw.ls2)
                    for lw in layers)  # fmt: skip
        return DecoderWeights(num_heads=num_heads, num_kv_heads=num_heads, inv_freq=freqs[0, 0].contiguous(),
                              norm_eps=1e-5, layers=lws, out_norm=None, out_norm_eps=0.0, text_linear=None, gelu=True)

    def fold_layer_scales(self) -> LayerWeights:
        self.out_proj_scaled = (self.out_proj * self.ls1[:, None]).T.contiguous()
        self.linear2_scaled = (self.linear2 * self.ls2[:, None]).T.contiguous()
        return self


def rope_angles(freqs: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Complex RoPE factors ``[B, T, 3, 1, D/2]`` for a ``[B, T, 3, H, D/2]`` complex view of a fused q|k|v
    projection at positions ``ts`` ``[B, T]`` (fp32); the v factor is exactly 1, so v passes through unchanged.

    ``freqs`` is ``[3, 1, D/2]``: the RoPE frequencies for q and k, zeros for v. Angles are ``ts * freq`` in fp32
    and the complex product ``(x0 + i x1)(cos + i sin)`` is bitwise the reference's
    ``(x0 cos - x1 sin, x0 sin + x1 cos)``, computed once per step for all layers (§2.5).
    """
    ang = ts.view(*ts.shape, 1, 1, 1) * freqs
    return torch.complex(torch.cos(ang), torch.sin(ang))


def rope_freqs(head_dim: int, max_period: float, device) -> torch.Tensor:
    """``[3, 1, D/2]`` (q, k, v) frequencies for :func:`rope_angles`: ``exp(i * c)`` with ``c`` a host double
    rounded to fp32, in this exact order, for bit parity with the reference; v's are zero."""
    ds = torch.arange(head_dim // 2, device=device, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / head_dim))
    return torch.stack([freqs, freqs, torch.zeros_like(freqs)]).view(3, 1, -1)


@dataclass
class KVState:
    """Ring KV cache of one transformer: ``[L, B + 1, 2, H, capacity, D]`` (per layer keys and values, one tensor so
    that one kernel can reach every layer's; the extra last row takes the writes of inactive rows, so that one
    ``index_put_`` per layer leaves them frozen), plus the tokens-written counter."""

    cache: torch.Tensor
    pos: torch.Tensor  # [B] int64: tokens written since reset = RoPE offset of the next token
    # int32 at 0 between steps: the CUDA persistent kernels' barrier and counter words for this side's steps (and the
    # encoder's RVQ), kept so that no launch zeroes words of its own first; not stream state
    counters: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """The per-row state (views without the scratch row) and the counter."""
        b = self.pos.shape[0]
        return [c[:b] for c in self.cache] + [self.pos]

    def rows(self, n: int) -> KVState:
        """Rows ``[0, n)`` as a state of ``n`` streams sharing this one's memory; its scratch row is row ``n`` (the
        torch path writes inactive rows' keys there), so row ``n`` must hold no stream. The counters are shared."""
        return KVState(cache=self.cache[:, : n + 1], pos=self.pos[:n], counters=self.counters)


def init_kv_state(
    batch_size: int, num_layers: int, num_heads: int, head_dim: int, capacity: int, device, dtype=torch.float32
) -> KVState:
    shape = (num_layers, batch_size + 1, 2, num_heads, capacity, head_dim)
    return KVState(
        cache=torch.zeros(shape, device=device, dtype=dtype),
        pos=torch.zeros(batch_size, device=device, dtype=torch.long),
        # a streaming step's rows: two tokens a stream (one frame at 25 Hz)
        counters=torch.zeros(dsm_kernels.counter_words(2 * batch_size, num_heads), device=device, dtype=torch.int32),
    )


class StepConstants:
    """Small constant tensors a step needs (index ranges, scalars), built on first use and then reused, so that
    a captured step launches nothing to make them. The first call with a new shape must happen before capture
    (``cuda_graphed`` warms up first)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self._cache: dict = {}

    def arange(self, n: int, step: int = 1) -> torch.Tensor:
        """``[0, step, ..., (n - 1) * step]`` (int64)."""
        key = ("arange", n, step)
        if key not in self._cache:
            self._cache[key] = torch.arange(0, n * step, step, device=self.device, dtype=torch.long)
        return self._cache[key]

    def full(self, value, dtype) -> torch.Tensor:
        key = ("full", value, dtype)
        if key not in self._cache:
            self._cache[key] = torch.full((), value, device=self.device, dtype=dtype)
        return self._cache[key]


def transformer_forward(
    x: torch.Tensor,
    layers: list[LayerWeights],
    num_heads: int,
    context: int,
    freqs: torch.Tensor,
    kv: KVState | None,
    exec_mask: torch.Tensor | None,
    consts: StepConstants,
    backend: str | None = None,
    step_weights: DecoderWeights | None = None,
    owned: bool = False,
) -> torch.Tensor:
    """Run the transformer on conv-layout ``x`` ``[B, C, T]``; returns ``[B, C, T]`` (a transposed view). ``owned``:
    ``x`` is a buffer no one else reads, which a step may update in place.

    With ``kv`` (streaming) keys go to a ring of exactly ``context`` slots and all ``T`` new tokens are written
    before attending, so after wrap-around the first of the two tokens of a Mimi call sees one key fewer (§2.6),
    exactly like the reference. Without ``kv`` (whole file) every query sees the last ``context`` positions.
    ``backend``: the ``dsm_kernels`` backend of :func:`dsm_kernels.mimi_rope_kv` (None: by device); off the
    reference backend a streaming call of at most ``dsm_kernels.gemv_max_rows()`` tokens runs as one
    ``dsm_kernels.mimi_transformer`` step on ``step_weights`` (:meth:`LayerWeights.step_weights` of ``layers``): the
    GEMV kernels, or on CUDA one persistent kernel for all layers.
    ``kv`` is updated in place; rows with a false ``exec_mask`` keep it bitwise unchanged. ``freqs``: see
    :func:`rope_freqs`.
    """
    b, c, t = x.shape
    hd = c // num_heads
    if kv is not None and step_weights is not None and gemv_path(b * t, backend, x.device):
        return _transformer_step(x, step_weights, context, kv, exec_mask, backend, owned)
    h = x.transpose(1, 2).reshape(b * t, c)
    trange = consts.arange(t)
    neg_inf, zero = consts.full(float("-inf"), torch.float32), consts.full(0.0, torch.float32)
    if kv is None:
        pos_q = trange.expand(b, -1)
        delta = trange.view(-1, 1) - trange
        mask = torch.where((delta >= 0) & (delta < context), zero, neg_inf)  # [T, T]
        write = None
    else:
        assert exec_mask is not None
        capacity = kv.cache[0].shape[3]
        assert capacity == context, "the ring must hold exactly the attention context"
        pos = kv.pos
        pos_q = pos.view(-1, 1) + trange  # [B, T] absolute positions of the new tokens
        mask = _ring_mask(pos_q, capacity, consts)
        rows = torch.where(exec_mask, consts.arange(b), consts.full(b, torch.long)).view(-1, 1)  # b: scratch row
        write = (rows, torch.remainder(pos_q, capacity))
    # RoPE positions as moshi computes them: the stream's offset in fp32, plus t in fp32. Past 2**24 tokens (7.8
    # days at 25 Hz) this rounds apart from the exact offset + t converted once, and so would the codes.
    ts = pos_q.float() if kv is None else kv.pos.float().view(-1, 1) + trange.float()
    rot = rope_angles(freqs, ts)  # [B, T, 3, 1, D/2]

    for i, lw in enumerate(layers):
        y = F.layer_norm(h, (c,), lw.norm1_w, lw.norm1_b, 1e-5)
        qkv = F.linear(y, lw.in_proj)
        if write is None:
            qkv = qkv.view(b, t, 3, num_heads, hd // 2, 2)
            qkv = torch.view_as_real(torch.view_as_complex(qkv) * rot).view(b, t, 3, num_heads, hd)
            q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        else:
            # RoPE, then k and v -> their ring slots (inactive rows: the scratch row); one kernel on Triton
            cache = kv.cache[i]
            q = dsm_kernels.mimi_rope_kv(qkv.view(b, t, 3, num_heads, hd), rot, cache, write[0], write[1],
                                         backend=backend)
            k, v = cache[:b, 0], cache[:b, 1]
        a = F.scaled_dot_product_attention(q, k, v, mask, dropout_p=0.0)
        a = a.transpose(1, 2).reshape(b * t, c)
        if lw.out_proj_scaled is not None:
            h = torch.addmm(h, a, lw.out_proj_scaled)
        else:
            h = torch.addcmul(h, lw.ls1, F.linear(a, lw.out_proj))
        y = F.layer_norm(h, (c,), lw.norm2_w, lw.norm2_b, 1e-5)
        z = F.gelu(F.linear(y, lw.linear1))
        if lw.linear2_scaled is not None:
            h = torch.addmm(h, z, lw.linear2_scaled)
        else:
            h = torch.addcmul(h, lw.ls2, F.linear(z, lw.linear2))
    if kv is not None:
        kv.pos.add_(exec_mask, alpha=t)
    return h.view(b, t, c).transpose(1, 2)


def _ring_mask(pos_q: torch.Tensor, capacity: int, consts: StepConstants) -> torch.Tensor:
    """Additive attention mask ``[B, 1, T, S]`` of new tokens at positions ``pos_q`` ``[B, T]`` over a ring of
    ``capacity`` slots once they are written (see :func:`transformer_forward`)."""
    # Absolute position held by each slot (negative: never written). Inactive rows get a mask as if active: their
    # outputs are garbage anyway and their state is not written.
    last = pos_q[:, -1:]
    pos_k = last - torch.remainder(last - consts.arange(capacity), capacity)  # [B, S]
    delta = pos_q[:, :, None] - pos_k[:, None]  # [B, T, S]; delta < context holds since capacity == context
    zero, neg_inf = consts.full(0.0, torch.float32), consts.full(float("-inf"), torch.float32)
    return torch.where((delta >= 0) & (pos_k[:, None] >= 0), zero, neg_inf)[:, None]


def _transformer_step(x, weights: DecoderWeights, context: int, kv: KVState, exec_mask, backend, owned: bool):
    """The streaming transformer for a few tokens (``B * T <= GEMV_MAX_B``) as one ``dsm_kernels.mimi_transformer``
    step: on Triton five GEMV-kernel launches a layer where :func:`transformer_forward`'s torch path takes nine (and no
    mask ops), on CUDA one persistent kernel for every layer. Same math; only the order of each dot product's fp32 sum
    differs (like cuBLAS picking another kernel), so the codes of chaotic deep RVQ levels may differ from the torch
    path's in rare frames."""
    b, c, t = x.shape
    assert exec_mask is not None
    assert kv.cache.shape[4] == context, "the ring must hold exactly the attention context"
    h = x.transpose(1, 2)
    if not (owned and h.is_contiguous()):  # the step updates h in place: a buffer of our own, time-major
        h = torch.empty(b, t, c, dtype=x.dtype, device=x.device)
        h.copy_(x.transpose(1, 2))
    dsm_kernels.mimi_transformer(weights, h.view(b * t, c), kv.pos, exec_mask, kv.cache, tokens=t,
                                 counters=kv.counters, backend=backend)  # fmt: skip
    return h.transpose(1, 2)
