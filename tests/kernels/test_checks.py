"""The dispatch point's input checks (``dsm_kernels.checks``): malformed shapes that a kernel would read or write out
of bounds with (or the reference would broadcast) raise the same ValueError, naming the tensor, on every backend."""

import re

import numpy as np
import pytest
import torch

import dsm_kernels as K
from dsm_kernels.reference import rvq_level_ranges
from dsm_kernels.testing import depformer_inputs, kernel_device, random_depformer_weights

BACKENDS = [pytest.param("reference"), pytest.param("triton"), pytest.param("cuda", marks=pytest.mark.gpu)]


def _z(*shape, dtype=torch.float32, dev="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=dev)


def _pool(dev, dtype=torch.float32):  # 4 pages of 2 rows, 2 heads of dim 4
    return _z(4, 2, 2, 4, dtype=dtype, dev=dev), _z(4, 2, 2, 4, dtype=dtype, dev=dev)


def _attention(dev, bt_rows=2, lens=2, context=4):
    kc, vc = _pool(dev)
    bt = torch.arange(2 * bt_rows, dtype=torch.int32, device=dev).view(bt_rows, 2)
    seq = torch.ones(lens, dtype=torch.int32, device=dev)
    return lambda b: K.paged_decode_attention(_z(2, 2, 4, dev=dev), kc, vc, bt, seq, context=context, backend=b)


def _append(dev, slots=2, v_dtype=torch.float32):
    kc, vc = _z(4, 2, 2, 4, dev=dev), _z(4, 2, 2, 4, dtype=v_dtype, dev=dev)
    slot = torch.arange(slots, device=dev)
    return lambda b: K.append_kv(kc, vc, _z(2, 2, 4, dev=dev), _z(2, 2, 4, dev=dev), slot, backend=b)


def _rope(dev, positions=2):  # B 2, H = Hkv = 2, D 4
    kc, vc = _pool(dev)
    pos, inv, slot = torch.arange(positions, device=dev), torch.ones(2, device=dev), torch.arange(2, device=dev)
    return lambda b: K.rope_append_kv(_z(2, 24, dev=dev), pos, inv, kc, vc, slot, 2, 2, backend=b)


def _qkv(dev, alpha=(8,), positions=2):
    kc, vc = _pool(dev)
    pos, inv, slot = torch.arange(positions, device=dev), torch.ones(2, device=dev), torch.arange(2, device=dev)
    return lambda b: K.qkv_rope_gemv(_z(2, 8, dev=dev), _z(24, 8, dev=dev), torch.ones(alpha, device=dev), 1e-5, pos,
                                     inv, kc, vc, slot, 2, 2, backend=b)  # fmt: skip


def _gemv(dev, rows=6, gate=False, alpha=None):
    a = None if alpha is None else torch.ones(alpha, device=dev)
    return lambda b: K.gemv(_z(1, 4, dev=dev), _z(rows, 4, dev=dev), alpha=a, eps=1e-5, gate=gate, backend=b)


def _norm(dev, alpha=4, scale=None):
    s = None if scale is None else torch.ones(scale, device=dev)
    return lambda b: K.add_rms_norm(_z(2, 4, dev=dev), torch.ones(alpha, device=dev), 1e-5, delta=_z(2, 4, dev=dev),
                                    scale=s, backend=b)  # fmt: skip


def _embed(dev):
    tok = torch.zeros(2, 2, dtype=torch.long, device=dev)
    return lambda b: K.multistream_embed(tok, _z(5, 4, dev=dev), _z(1, 5, 4, dev=dev), cond=_z(1, 4, dev=dev),
                                         backend=b)  # fmt: skip


def _sample(dev, temp=(2,), seeds=(2,), null=None):
    def call(b):
        nl = None if null is None else _z(*null, dev=dev)
        return K.sample_tokens(_z(2, 8, dev=dev), torch.ones(temp, device=dev), 0,
                               torch.zeros(seeds, dtype=torch.long, device=dev),
                               torch.zeros(2, dtype=torch.long, device=dev), null_logits=nl, backend=b)  # fmt: skip

    return call


def _depformer(dev):
    w = random_depformer_weights(device=dev)
    args = dict(depformer_inputs(w, 2, temp=0.8, device=dev), temperature=torch.ones(1, device=dev))
    return lambda b: K.depformer_frame(w, **args, backend=b)


def _rvq_decode(dev):
    codes, mask = torch.zeros(1, 2, 3, dtype=torch.long, device=dev), torch.ones(1, dtype=torch.bool, device=dev)
    return lambda b: K.rvq_decode_upsample(codes, _z(2, 4, 8, dev=dev), _z(8, 1, 4, dev=dev), _z(1, 8, 2, dev=dev),
                                           mask, out=_z(1, 8, 6, dev=dev), backend=b)


def _rvq_encode(dev):  # 2 groups of 1 level, codebooks [2, 4, 4 + 2]
    out = torch.zeros(1, 2, 2, dtype=torch.long, device=dev)
    return lambda b: K.rvq_encode(_z(1, 8, 3, dev=dev), _z(2, 4, 6, dev=dev), (1, 1), rvq_level_ranges((1, 1), dev),
                                  out=out, backend=b)  # fmt: skip


def _conv_pad(dev, mask_dtype=torch.int32, phase_dtype=torch.int32, ctx_shape=(2, 1, 2, 2)):
    mask = torch.ones(1, dtype=mask_dtype, device=dev)
    phase = torch.zeros(1, dtype=phase_dtype, device=dev)
    return lambda b: K.mimi_conv_pad(_z(1, 2, 3, dev=dev), _z(*ctx_shape, dev=dev), phase, mask, backend=b)


def _ones_mask(dev, B=2):
    return torch.ones(B, dtype=torch.bool, device=dev)


def _rope_kv(dev, rows=2, dtype=torch.float32):  # B 2, T 1, H 2, D 4, ring of 3
    rot = torch.ones(2, 1, 3, 1, 2, dtype=torch.complex64, device=dev)
    slots = torch.zeros(2, 1, dtype=torch.long, device=dev)
    qkv, cache = _z(2, 1, 3, 2, 4, dtype=dtype, dev=dev), _z(3, 2, 2, 3, 4, dtype=dtype, dev=dev)
    rows_t = torch.zeros(rows, 1, dtype=torch.long, device=dev)
    return lambda b: K.mimi_rope_kv(qkv, rot, cache, rows_t, slots, backend=b)


def _ring_attention(dev, cache_rows=3):
    pos = torch.zeros(2, dtype=torch.long, device=dev)
    return lambda b: K.mimi_ring_attention(_z(2, 1, 2, 4, dev=dev), _z(cache_rows, 2, 2, 3, 4, dev=dev), pos,
                                           backend=b)  # fmt: skip


def _residual_out(dev):
    return lambda b: K.mimi_residual_out(_z(1, 4, 3, dev=dev), _z(6, 4, 1, dev=dev), None, _z(1, 5, 3, dev=dev),
                                         backend=b)  # fmt: skip


def _convtr_overlap(dev):
    return lambda b: K.mimi_convtr_overlap(_z(2, 3, 5, dev=dev), _z(2, 3, 3, dev=dev), None, _ones_mask(dev),
                                           backend=b)  # fmt: skip


def _convtr_gemv(dev):  # 4 -> 3 channels, 4 taps, stride 2: partial needs 2 columns
    return lambda b: K.mimi_convtr_gemv(_z(2, 4, 1, dev=dev), _z(3, 4, 4, dev=dev), None, 2, _z(2, 3, 3, dev=dev),
                                        _ones_mask(dev), backend=b)  # fmt: skip


def _frame(dev, which):
    cache, offsets = torch.zeros(2, 3, 4, dtype=torch.long, device=dev), torch.zeros(2, dtype=torch.long, device=dev)
    delays = torch.zeros(3, dtype=torch.long, device=dev)
    if which == "inputs":
        return lambda b: K.frame_inputs(cache, offsets, _ones_mask(dev), delays, torch.zeros(2, dtype=torch.long,
                                        device=dev), None, 1, backend=b)  # fmt: skip
    if which == "commit":
        return lambda b: K.frame_commit(cache, offsets, _ones_mask(dev), delays, torch.zeros(1, dtype=torch.long,
                                        device=dev), None, 0, backend=b)  # fmt: skip
    # embed: one audio table for the ring's 2 audio streams (the step would read past the tables)
    bt, pos = torch.zeros(2, 3, dtype=torch.int32, device=dev), torch.zeros(2, dtype=torch.long, device=dev)
    return lambda b: K.frame_embed(cache, offsets, _ones_mask(dev), delays, torch.zeros(3, dtype=torch.long,
                                   device=dev), None, 3, _z(5, 4, dev=dev), _z(1, 5, 4, dev=dev), bt, pos, 16,
                                   backend=b)  # fmt: skip


def _kv_slots(dev):
    bt = torch.zeros(2, 3, dtype=torch.int32, device=dev)
    pos = torch.zeros(2, dtype=torch.long, device=dev)
    return lambda b: K.kv_slots(bt, pos, torch.ones(2, dtype=torch.int32, device=dev), 16, backend=b)


CASES = {  # name: (call builder, start of the expected message)
    "embed-cond-one-row": (_embed, "multistream_embed: cond has shape (1, 4), expected [2, 4]"),
    "norm-alpha": (lambda d: _norm(d, alpha=3), "add_rms_norm: alpha has shape (3,)"),
    "norm-scale": (lambda d: _norm(d, scale=2), "add_rms_norm: scale has shape (2,)"),
    "gemv-alpha-0d": (lambda d: _gemv(d, alpha=()), "gemv: alpha has shape ()"),
    "gemv-alpha-short": (lambda d: _gemv(d, alpha=(3,)), "gemv: alpha has shape (3,)"),
    "gemv-gate-odd-rows": (lambda d: _gemv(d, rows=5, gate=True), "gemv: weight has shape (5, 4); gate=True"),
    "qkv-alpha-0d": (lambda d: _qkv(d, alpha=()), "qkv_rope_gemv: alpha has shape ()"),
    "qkv-positions-short": (lambda d: _qkv(d, positions=1), "qkv_rope_gemv: positions has shape (1,), expected [2]"),
    "rope-positions-short": (lambda d: _rope(d, positions=1), "rope_append_kv: positions has shape (1,), expected"),
    "depformer-temperature": (_depformer, "depformer_frame: temperature has shape (1,), expected [2]"),
    "attn-block-table-short": (lambda d: _attention(d, bt_rows=1), "paged_decode_attention: block_table has shape"),
    "attn-seq-lens-short": (lambda d: _attention(d, lens=1), "paged_decode_attention: seq_lens has shape (1,)"),
    "attn-context-past-ring": (lambda d: _attention(d, context=5), "paged_decode_attention: context 5 must be in"),
    "append-slots-short": (lambda d: _append(d, slots=1), "append_kv: slot_mapping has shape (1,), expected [2]"),
    "append-cache-dtypes": (lambda d: _append(d, v_dtype=torch.bfloat16), "append_kv: v_cache (4, 2, 2, 4) "
                            "torch.bfloat16 must match k_cache"),
    "sample-temperature-column": (lambda d: _sample(d, temp=(2, 1)), "sample_tokens: temperature has shape (2, 1)"),
    "sample-seeds-column": (lambda d: _sample(d, seeds=(2, 1)), "sample_tokens: seeds has shape (2, 1)"),
    "sample-null-logits": (lambda d: _sample(d, null=(2, 7)), "sample_tokens: null_logits has shape (2, 7)"),
    "rvq-decode-out": (_rvq_decode, "rvq_decode_upsample: out has shape (1, 8, 6), expected [1, 6, 8]"),
    "rvq-encode-out": (_rvq_encode, "rvq_encode: out has shape (1, 2, 2), expected [1, 2, 3]"),
    "conv-pad-int-mask": (_conv_pad, "mimi_conv_pad: exec_mask must be torch.bool"),
    "conv-pad-one-half": (lambda d: _conv_pad(d, torch.bool, ctx_shape=(1, 2, 2)),
                          "mimi_conv_pad: ctx has shape (1, 2, 2), expected [2, 1, 2, *]"),
    "conv-pad-phase-int64": (lambda d: _conv_pad(d, torch.bool, torch.int64),
                             "mimi_conv_pad: phase must be an int32 tensor of shape (1,), got torch.int64 (1,)"),
    "rope-kv-rows": (lambda d: _rope_kv(d, rows=1), "mimi_rope_kv: rows has shape (1, 1) (1 values), expected 2"),
    "rope-kv-fp64": (lambda d: _rope_kv(d, dtype=torch.float64), "mimi_rope_kv: qkv must be torch.float32"),
    "ring-attention-rows": (lambda d: _ring_attention(d, cache_rows=1), "mimi_ring_attention: cache (1, 2, 2, 3, 4) "
                            "has 1 rows for the 2 rows of q"),
    "residual-out-x": (_residual_out, "mimi_residual_out: x has shape (1, 5, 3), expected [1, 6, 3]"),
    "convtr-overlap-short": (_convtr_overlap, "mimi_convtr_overlap: y has shape (2, 3, 5): 5 columns, fewer than"),
    "convtr-gemv-partial": (_convtr_gemv, "mimi_convtr_gemv: partial has shape (2, 3, 3), expected [2, 3, 2]"),
    # stride == taps leaves no overlap: the reference failed on a size mismatch, Triton divided by zero
    "convtr-gemv-stride-k": (lambda d: lambda b: K.mimi_convtr_gemv(
        _z(2, 4, 1, dev=d), _z(3, 4, 4, dev=d), None, 4, _z(2, 3, 0, dev=d), _ones_mask(d), backend=b),
        "mimi_convtr_gemv: stride 4 with 4 taps"),
    "convtr-overlap-empty": (lambda d: lambda b: K.mimi_convtr_overlap(
        _z(2, 3, 4, dev=d), _z(2, 3, 0, dev=d), None, _ones_mask(d), backend=b),
        "mimi_convtr_overlap: partial has shape (2, 3, 0): an empty tail"),
    "silu-mul-odd": (lambda d: lambda b: K.silu_mul(_z(2, 5, dev=d), backend=b), "silu_mul: h has shape (2, 5): an"),
    "frame-inputs-initial": (lambda d: _frame(d, "inputs"), "frame_inputs: initial has shape (2,), expected [3]"),
    "frame-commit-text": (lambda d: _frame(d, "commit"), "frame_commit: text_token has shape (1,), expected [2]"),
    "frame-embed-tables": (lambda d: _frame(d, "embed"), "frame_embed: audio_tables (1, 5, 4) holds 1 tables for the "
                           "2 audio columns of cache (2, 3, 4)"),
    "kv-slots-int-write": (_kv_slots, "kv_slots: write must be torch.bool, got torch.int32"),
    # float ids: the kernels' int64 casts truncated them (token 1.7 embedded row 1) where the reference refused them
    "embed-float-ids": (lambda d: lambda b: K.multistream_embed(
        torch.full((2, 2), 1.7, device=d), _z(5, 4, dev=d), _z(1, 5, 4, dev=d), backend=b),
        "multistream_embed: tokens must be an integer tensor, got torch.float32"),
    "append-float-slots": (lambda d: lambda b: K.append_kv(*_pool(d), _z(2, 2, 4, dev=d), _z(2, 2, 4, dev=d),
                                                           torch.tensor([0.0, 3.5], device=d), backend=b),
                           "append_kv: slot_mapping must be an integer tensor, got torch.float32"),
    "attn-float-seq-lens": (lambda d: lambda b: K.paged_decode_attention(
        _z(2, 2, 4, dev=d), *_pool(d), torch.zeros(2, 2, dtype=torch.int32, device=d), torch.ones(2, device=d),
        context=4, backend=b), "paged_decode_attention: seq_lens must be an integer tensor, got torch.float32"),
    "sample-float-seeds": (lambda d: lambda b: K.sample_tokens(
        _z(2, 8, dev=d), torch.ones(2, device=d), 0, torch.ones(2, device=d), torch.zeros(2, dtype=torch.long,
                                                                                            device=d), backend=b),
        "sample_tokens: seeds must be an integer tensor, got torch.float32"),
    "kv-slots-bool-positions": (lambda d: lambda b: K.kv_slots(
        torch.zeros(2, 3, dtype=torch.int32, device=d), torch.ones(2, dtype=torch.bool, device=d),
        torch.ones(2, dtype=torch.bool, device=d), 16, backend=b),
        "kv_slots: positions must be an integer tensor, got torch.bool"),
    "sample-empty-vocabulary": (lambda d: lambda b: K.sample_tokens(  # Triton divided by zero
        _z(2, 0, dev=d), torch.ones(2, device=d), 0, *torch.zeros(2, 2, dtype=torch.long, device=d), backend=b),
        "sample_tokens: logits has shape (2, 0): an empty vocabulary"),
    "embed-no-column": (lambda d: lambda b: K.multistream_embed(  # the Triton kernel read column 0: a segfault
        torch.zeros(2, 0, dtype=torch.long, device=d), _z(5, 4, dev=d), _z(1, 5, 4, dev=d), backend=b),
        "multistream_embed: tokens (2, 0) has no token column"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_malformed_input_raises_the_same_error(case, backend):
    build, message = CASES[case]
    call = build(kernel_device(backend))
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        call(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float_top_k_or_step_is_refused(backend):
    """top_k and the noise counter's scale and offset are integers: a float was truncated by the kernels' int() (top_k
    2.5 kept the 2 largest logits) and refused by the reference's torch.topk."""
    dev = kernel_device(backend)
    ids = torch.zeros(2, dtype=torch.long, device=dev)
    args = (_z(2, 8, dev=dev), torch.ones(2, device=dev))
    for kw, name in ((dict(top_k=2.5), "top_k"), (dict(step_scale=1.5), "step_scale"),
                     (dict(step_offset=0.5), "step_offset")):  # fmt: skip
        top_k = kw.pop("top_k", 2)
        with pytest.raises(TypeError, match=f"^sample_tokens: {name} must be an integer"):
            K.sample_tokens(*args, top_k, ids, ids, **kw, backend=backend)
    w = random_depformer_weights(device=dev)
    with pytest.raises(TypeError, match="^depformer_frame: top_k must be an integer, got 2.5"):
        K.depformer_frame(w, **dict(depformer_inputs(w, 2, temp=0.8, device=dev), top_k=2.5), backend=backend)
    assert K.sample_tokens(*args, torch.tensor(2), ids, ids, step_scale=np.int64(3), backend=backend).shape == (2,)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_a_top_k_outside_the_vocabulary_keeps_every_token(backend):
    """The reference keeps every token unless 0 < top_k < vocab; the CUDA binding read top_k as a 32-bit int, so
    2**32 + 3 kept 3 tokens there."""
    dev = kernel_device(backend)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g).to(dev)
    seeds, steps, temp = torch.arange(6, device=dev), torch.full((6,), 7, device=dev), torch.ones(6, device=dev)
    want = K.sample_tokens(logits, temp, 0, seeds, steps, backend=backend)
    for top_k in (2**32 + 3, 50, -1):
        assert torch.equal(K.sample_tokens(logits, temp, top_k, seeds, steps, backend=backend), want), top_k
    w = random_depformer_weights(device=dev)
    inputs = depformer_inputs(w, 3, temp=1.0, device=dev)
    want = K.depformer_frame(w, **dict(inputs, top_k=0), backend=backend)
    assert torch.equal(K.depformer_frame(w, **dict(inputs, top_k=2**32 + 3), backend=backend), want)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_inputs_give_empty_outputs(backend):
    dev = kernel_device(backend)
    w = random_depformer_weights(device=dev)
    args = {k: v[:0] if isinstance(v, torch.Tensor) else v for k, v in depformer_inputs(w, 1, temp=0.8, device=dev)
            .items()}  # fmt: skip
    tokens, logits = K.depformer_frame(w, **args, return_logits=True, backend=backend)
    assert tokens.shape == (0, w.dep_q) and logits.shape == (0, w.dep_q, w.card)
    assert K.conv1d_gemv(_z(0, 4, 3, dev=dev), _z(6, 4, 2, dev=dev), backend=backend).shape == (0, 6, 2)
    ctx = torch.arange(48.0, device=dev).view(2, 2, 4, 3)  # no new column: the input is the context, carried over
    phase = torch.ones(1, dtype=torch.int32, device=dev)
    out = K.mimi_conv_pad(_z(2, 4, 0, dev=dev), ctx, phase, torch.ones(2, dtype=torch.bool, device=dev),
                          backend=backend)  # fmt: skip
    assert torch.equal(out, torch.arange(24.0, 48.0, device=dev).view(2, 4, 3))
    assert torch.equal(ctx[0], out) and torch.equal(ctx[1], out)
    # the reference failed at B = 0 (view() cannot infer a size of 0 rows); the kernels gave (0, heads)
    assert K.head_probs(_z(0, 8, dev=dev), _z(12, 8, dev=dev), 2, backend=backend).shape == (0, 2)


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_layouts_the_reference_takes(backend):
    """Transposed logits, a q strided along head_dim, a non-contiguous block table: copied by the wrappers (small),
    not refused, so every backend answers like the reference."""
    dev = kernel_device(backend)
    g = torch.Generator().manual_seed(0)
    logits, null = (torch.randn(8, 3, generator=g).t() for _ in range(2))  # [3, 8], strides (1, 3)
    temp, seeds, steps = torch.tensor([0.0, 1.0, 0.7]), torch.arange(3), torch.arange(3) + 5
    exp = K.sample_tokens(logits, temp, 4, seeds, steps, null_logits=null, cfg_coef=2.0, backend="reference")
    got = K.sample_tokens(*(t.to(dev) for t in (logits, temp)), 4, seeds.to(dev), steps.to(dev),
                          null_logits=null.to(dev), cfg_coef=2.0, backend=backend)  # fmt: skip
    assert torch.equal(got.cpu(), exp)

    q = torch.randn(2, 16, 2, generator=g).transpose(1, 2)  # [B 2, H 2, D 16], head_dim stride 2
    kc, vc = (torch.randn(4, 2, 2, 16, generator=g) for _ in range(2))
    bt = torch.tensor([[0, 2], [1, 3]], dtype=torch.int32).t().contiguous().t()  # column-major
    seq = torch.tensor([3, 1], dtype=torch.int32)
    exp = K.paged_decode_attention(q, kc, vc, bt, seq, context=4, backend="reference")
    got = K.paged_decode_attention(*(t.to(dev) for t in (q, kc, vc, bt, seq)), context=4, backend=backend)
    torch.testing.assert_close(got.cpu(), exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton"])
def test_triton_layouts_and_dtypes(backend):
    """Mimi's decode tables are fp32 (a bf16 one is refused by name) and too large to copy per call (a table not
    contiguous is a ValueError naming it), like the embedding's."""
    dev = kernel_device(backend)
    g = torch.Generator().manual_seed(1)
    codes, tables = torch.randint(0, 4, (2, 3, 2), generator=g), torch.randn(3, 4, 8, generator=g)
    up = (torch.randn(8, 1, 4, generator=g), torch.randn(2, 8, 2, generator=g), torch.tensor([True, False]))
    on_dev = [t.clone().to(dev) for t in (codes, *up)]  # partial is updated in place
    with pytest.raises(ValueError, match=r"^rvq_decode_upsample: tables must be torch.float32"):
        K.rvq_decode_upsample(on_dev[0], tables.bfloat16().to(dev), *on_dev[1:], backend=backend)
    with pytest.raises(ValueError, match=r"^rvq_decode_upsample: tables \(3, 4, 8\) with strides"):
        K.rvq_decode_upsample(on_dev[0], tables.transpose(0, 1).contiguous().transpose(0, 1).to(dev), *on_dev[1:],
                              backend=backend)
    got = K.rvq_decode_upsample(on_dev[0], tables.to(dev), *on_dev[1:], backend=backend)
    exp = K.rvq_decode_upsample(codes, tables, *up, backend="reference")
    torch.testing.assert_close(got.cpu(), exp, rtol=1e-6, atol=1e-6)
    tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
    with pytest.raises(ValueError, match=r"^multistream_embed: text_table \(5, 4\) with strides \(1, 5\)"):
        K.multistream_embed(tok, _z(4, 5, dev=dev).t(), _z(1, 5, 4, dev=dev), backend=backend)
