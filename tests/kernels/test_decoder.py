"""The temporal transformer's decode step (``dsm_kernels.decoder_step``) on every backend against the reference ops,
on fresh random weights and caches: the Triton composition, and the persistent CUDA kernel (``csrc/decoder.cu``) on
the GPU and emulated on the CPU (``cuda_emu``).

fp32: logits, z, the residual stream and the written K/V within 1e-5 of the reference (relative to their scale).
bf16 and fp16: logits within 3x the reference's own error against fp32. Rows sit at different positions (the ring of
pages wraps past the context) and the last row of several is inactive (not written, zero attention).
"""

from __future__ import annotations

import os

import pytest
import torch

import dsm_kernels
from dsm_kernels.decoder import decoder_step_ref
from dsm_kernels.testing import (
    cast_decoder_weights,
    decoder_inputs,
    mimi_transformer_inputs,
    random_decoder_weights,
    random_mimi_transformer_weights,
)

needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)
PERSISTENT = [pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("cuda_emu")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "NaN/inf never passes"
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


def device_of(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" else "cpu")


def run(backend, w, ins, blocks=3):
    """``(z, logits)`` of one step on ``backend``; ``ins`` (from :func:`decoder_inputs`) is updated in place."""
    if backend == "cuda_emu":
        import cuda_emu

        return cuda_emu.decoder_step_emu(w, **ins, blocks=blocks)
    if backend == "cuda":
        from dsm_kernels.cuda_ops import decoder_step_cuda

        return decoder_step_cuda(w, **ins, blocks=blocks)
    return dsm_kernels.decoder_step(w, **ins, backend=backend)


def assert_step_matches_reference(w, B, backend, blocks=3, **kw):
    dev = device_of(backend)
    ref, mine = decoder_inputs(w, B, device=dev, **kw), decoder_inputs(w, B, device=dev, **kw)
    z_ref, lg_ref = decoder_step_ref(w, **ref)
    z, lg = run(backend, w, mine, blocks)
    assert z.shape == z_ref.shape and lg.shape == lg_ref.shape
    assert rel(lg, lg_ref) < 1e-5 and rel(z, z_ref) < 1e-5
    assert rel(mine["x"], ref["x"]) < 1e-5  # the residual stream, updated in place
    for name in ("k_cache", "v_cache"):  # this step's K/V written where the reference writes them, nothing else
        assert rel(mine[name], ref[name]) < 1e-5, name


CASES = {  # weights, rows, grid blocks
    "b1-rope": (dict(layers=2), 1, 1),
    "b3-layerscale": (dict(layers=2, scales=True), 3, 3),
    "b4-no-rope-d32": (dict(layers=1, heads=2, rope=False), 4, 5),
    "b2-wide-hidden": (dict(layers=1, heads=4, hidden=136, vocab=300), 2, 7),
    "b2-cross": (dict(layers=2, cross=True), 2, 3),  # the TTS layout: cross-attention to the condition pages
    "b4-cross-layerscale": (dict(layers=1, cross=True, scales=True), 4, 6),
}


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(case):
    kw, B, _ = CASES[case]
    assert_step_matches_reference(random_decoder_weights(**kw, seed=len(case)), B, "triton")


@pytest.mark.parametrize("backend", PERSISTENT)
@pytest.mark.parametrize("case", list(CASES))
def test_persistent_fp32_matches_reference(case, backend):
    kw, B, blocks = CASES[case]
    w = random_decoder_weights(**kw, seed=len(case), device=device_of(backend))
    assert_step_matches_reference(w, B, backend, blocks)


@pytest.mark.parametrize("backend", PERSISTENT)
def test_v_cache_laid_out_unlike_k_cache(backend):
    """A V pool whose strides differ from the K pool's (every other page of a larger buffer): the persistent kernel
    reads both with K's strides, so the step runs the single ops (the binding refused it; its emulation wrote V into
    the wrong page)."""
    w = random_decoder_weights(layers=1, seed=3, device=device_of(backend))

    def inputs():
        ins = decoder_inputs(w, 2, device=device_of(backend))
        v = ins["v_cache"]
        big = torch.zeros(v.shape[0], 2 * v.shape[1], *v.shape[2:], dtype=v.dtype, device=v.device)
        big[:, ::2] = v
        ins["v_cache"] = big[:, ::2]
        return ins

    ref, mine = inputs(), inputs()
    z_ref, lg_ref = decoder_step_ref(w, **ref)
    z, lg = run(backend, w, mine)
    assert rel(lg, lg_ref) < 1e-5 and rel(z, z_ref) < 1e-5
    for name in ("k_cache", "v_cache"):
        assert rel(mine[name], ref[name]) < 1e-5, name


@pytest.mark.parametrize("backend", PERSISTENT)
def test_persistent_long_context_wraps_the_ring(backend):
    """Positions far past a 100-position context with 8-position pages: each row attends over its last 100 keys, read
    from a ring of 13 pages in a shuffled order, in 7 splits over 7 blocks' warps, merged by the last split."""
    w = random_decoder_weights(layers=1, seed=9, device=device_of(backend))
    assert_step_matches_reference(w, 3, backend, 7, context=100, page_size=8, positions=torch.tensor([99, 123, 517]))


@pytest.mark.parametrize("backend", PERSISTENT)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_persistent_low_precision_within_3x_reference_error(dtype, backend):
    dev = device_of(backend)
    w32 = random_decoder_weights(layers=2, scales=True, seed=4, device=dev)
    w16 = cast_decoder_weights(w32, dtype)
    _, lg32 = decoder_step_ref(w32, **decoder_inputs(w32, 3, device=dev))
    _, lg16 = decoder_step_ref(w16, **decoder_inputs(w32, 3, dtype=dtype, device=dev))
    _, lg = run(backend, w16, decoder_inputs(w32, 3, dtype=dtype, device=dev), 2)
    ref_err = rel(lg16, lg32)
    assert ref_err > 0
    assert rel(lg, lg32) <= 3 * ref_err + 1e-6, (rel(lg, lg32), ref_err)


@pytest.mark.parametrize("backend", PERSISTENT)
def test_persistent_fp8_cache_matches_reference(backend):
    """e4m3 K/V pages (the fp8 cache option; the TTS layout, whose voice pages stay in the model dtype): the step on
    the persistent kernel, not handed to the single ops, against the reference on the same fp8 pages. fp32 weights:
    logits within 1e-4, the K/V it writes the reference's bytes (a rounding tie may flip one in ~1e3); bf16 weights:
    within 3x the reference's own error against fp32 weights (the same fp8 pages on both sides)."""
    from dsm_kernels.cuda_ops import decoder_unsupported

    fp8 = torch.float8_e4m3fn
    dev = device_of(backend)
    w32 = random_decoder_weights(layers=2, cross=True, scales=True, seed=9, device=dev)
    ins = decoder_inputs(w32, 3, kv_dtype=fp8, device=dev)
    assert decoder_unsupported(w32, ins["x"], ins["k_cache"], ins["cross"]) is None
    ref = decoder_inputs(w32, 3, kv_dtype=fp8, device=dev)
    z_ref, lg_ref = decoder_step_ref(w32, **ref)
    z, lg = run(backend, w32, ins, 3)
    assert rel(lg, lg_ref) < 1e-4 and rel(z, z_ref) < 1e-4
    for name in ("k_cache", "v_cache"):
        same = (ins[name].view(torch.uint8) == ref[name].view(torch.uint8)).float().mean()
        assert same > 0.999 and rel(ins[name].float(), ref[name].float()) < 0.07, (name, float(same))
    w16 = cast_decoder_weights(w32, torch.bfloat16)
    _, lg16 = decoder_step_ref(w16, **decoder_inputs(w32, 3, dtype=torch.bfloat16, kv_dtype=fp8, device=dev))
    _, lg = run(backend, w16, decoder_inputs(w32, 3, dtype=torch.bfloat16, kv_dtype=fp8, device=dev), 2)
    ref_err = rel(lg16, lg_ref)
    assert ref_err > 0 and rel(lg, lg_ref) <= 3 * ref_err + 1e-6, (rel(lg, lg_ref), ref_err)


@pytest.mark.parametrize("backend", PERSISTENT)
def test_persistent_output_does_not_depend_on_the_grid(backend, monkeypatch):
    """A row's dot products are one warp's whichever block owns it: the same bits for any block count, and however
    the weight stream is chunked (emulated: slots of ~1.2 KB, several chunks a phase; of 240 B, where a RoPE or gate
    pair of rows is larger than a slot and is read from global memory)."""
    dev = device_of(backend)
    w = cast_decoder_weights(random_decoder_weights(layers=2, scales=True, seed=5, device=dev), torch.bfloat16)
    outs = [run(backend, w, decoder_inputs(w, 4, dtype=torch.bfloat16, device=dev), blocks) for blocks in (1, 2, 5)]
    if backend == "cuda_emu":
        for smem in ("6000", "2000"):
            monkeypatch.setenv("DSM_CUDA_EMU_SMEM", smem)
            outs.append(run(backend, w, decoder_inputs(w, 4, dtype=torch.bfloat16, device=dev), 2))
    for z, lg in outs[1:]:
        assert torch.equal(z, outs[0][0]) and torch.equal(lg, outs[0][1])


@needs_triton
@pytest.mark.parametrize("backend", PERSISTENT)
def test_persistent_hands_other_steps_to_the_single_ops(backend):
    """Heads wider than 128 (or grouped K/V heads) run the single ops: the same results."""
    from dsm_kernels.cuda_ops import decoder_unsupported

    dev = device_of(backend)
    w = random_decoder_weights(dim=512, heads=2, layers=1, seed=6, device=dev)
    ins = decoder_inputs(w, 2, device=dev)
    assert decoder_unsupported(w, ins["x"], ins["k_cache"], None) == "head dim 256, heads 2/2"
    plain = random_decoder_weights(layers=1, seed=6, device=dev)  # condition pages for a model without cross-attention
    plain_ins = decoder_inputs(plain, 2, device=dev)
    assert "cross-attention in some layers" in decoder_unsupported(plain, plain_ins["x"], plain_ins["k_cache"],
                                                                   object())
    assert_step_matches_reference(w, 2, backend)


def test_validate_kernels_checks_the_persistent_step(cuda_emulated):
    from dsm_kernels.validate import _decoder_rows

    rows = _decoder_rows("cuda", torch.device("cpu"), quick=True)
    assert len(rows) == 3 and all(r.ok for r in rows), rows
    assert cuda_emulated["decoder_step"] == 3  # fp32, bf16, fp8 pages: each on the persistent kernel


def test_dispatch():
    from dsm_kernels.cuda_ops import decoder_step_cuda

    assert dsm_kernels._load(dsm_kernels._OPS["decoder_step"]["cuda"]) is decoder_step_cuda
    w = random_decoder_weights(layers=1, seed=7)
    with pytest.raises(ValueError, match="decoder_step: x has shape"):
        dsm_kernels.decoder_step(w, **dict(decoder_inputs(w, 2), x=torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="decoder_step: 5 rows"):
        dsm_kernels.decoder_step(w, **decoder_inputs(w, 5))


GPU_SHAPES = {  # 2 layers of each released layout
    "stt-1b": dict(dim=2048, heads=16, layers=2, hidden=5632, vocab=8001),
    "stt-2.6b": dict(dim=2048, heads=32, layers=2, hidden=5632, vocab=4001),
    "tts-1.6b": dict(dim=2048, heads=16, layers=2, hidden=5632, vocab=8001, cross=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("shapes", list(GPU_SHAPES))
def test_gpu_persistent_real_shapes_bf16_and_graph_replay(shapes, B):
    """The released layers' shapes (context 750 in pages of 16; TTS: 625 voice positions in pages of 125): bf16
    within 3x the reference's own error, and bit-identical when replayed from a CUDA graph."""
    from dsm_kernels.cuda_ops import decoder_step_cuda

    w32 = random_decoder_weights(**GPU_SHAPES[shapes], device="cuda", seed=11)
    w16 = cast_decoder_weights(w32, torch.bfloat16)
    kw = dict(context=750, page_size=16, positions=torch.tensor([745, 2000, 30, 9][:B]), cross_length=625,
              cross_page_size=125, device="cuda")  # fmt: skip
    _, lg32 = decoder_step_ref(w32, **decoder_inputs(w32, B, **kw))
    _, lg16 = decoder_step_ref(w16, **decoder_inputs(w32, B, dtype=torch.bfloat16, **kw))
    _, lg = decoder_step_cuda(w16, **decoder_inputs(w32, B, dtype=torch.bfloat16, **kw))
    assert rel(lg, lg32) <= 3 * rel(lg16, lg32) + 1e-6
    static = decoder_inputs(w32, B, dtype=torch.bfloat16, **kw)
    x0 = static["x"].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        decoder_step_cuda(w16, **static)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    static["x"].copy_(x0)
    with torch.cuda.graph(graph):
        z, out = decoder_step_cuda(w16, **static)
    for _ in range(3):
        static["x"].copy_(x0)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, lg)


# Mimi's streaming transformer (dsm_kernels.mimi_transformer): the same persistent kernel with LayerNorms, GELU FFNs,
# no head, and a K/V ring per stream whose first token of a step must not see the slot its second token overwrote.
MIMI_CASES = {  # streams, tokens a step, active streams, grid blocks
    "b1-t2-wrapped": (1, 2, None, 3),
    "b2-t2-one-paused": (2, 2, [True, False], 4),
    "b1-t4": (1, 4, None, 2),
    "b4-t1": (4, 1, None, 5),
}


def run_mimi(backend, w, ins, blocks=3) -> None:
    if backend == "cuda_emu":
        import cuda_emu

        return cuda_emu.mimi_transformer_emu(w, **ins, blocks=blocks)
    if backend == "cuda":
        from dsm_kernels.cuda_ops import mimi_transformer_cuda

        return mimi_transformer_cuda(w, **ins, blocks=blocks)
    return dsm_kernels.mimi_transformer(w, **ins, backend=backend)


def assert_mimi_matches_reference(w, backend, B, tokens, active=None, blocks=3, tol=1e-5, **kw):
    """``h`` of the active streams' rows and the whole ring (new K/V where the reference writes them, nothing for a
    paused stream) within ``tol`` of the reference."""
    from dsm_kernels.cuda_ops import mimi_unsupported
    from dsm_kernels.decoder import mimi_transformer_ref

    dev = device_of(backend)
    ref, mine = (mimi_transformer_inputs(w, B, tokens=tokens, active=active, device=dev, **kw) for _ in range(2))
    if backend != "triton":  # the persistent kernel takes it (not the single ops)
        assert mimi_unsupported(w, mine["h"], mine["cache"]) is None
    before = mine["cache"].clone()
    mimi_transformer_ref(w, **ref)
    run_mimi(backend, w, mine, blocks)
    rows = ref["exec_mask"].repeat_interleave(tokens)
    assert torch.equal(mine["pos"].cpu(), ref["pos"].cpu())  # the active streams' advanced by tokens
    assert not torch.equal(ref["pos"].cpu(), mimi_transformer_inputs(w, B, tokens=tokens, active=active, **kw)["pos"])
    assert rel(mine["h"][rows], ref["h"][rows]) < tol
    assert rel(mine["cache"], ref["cache"]) < tol
    for b in (~ref["exec_mask"]).nonzero().flatten().tolist():
        assert torch.equal(mine["cache"][:, b], before[:, b]), "a paused stream's ring was written"


@needs_triton
@pytest.mark.parametrize("backend", ["triton", *PERSISTENT])
@pytest.mark.parametrize("case", list(MIMI_CASES))
def test_mimi_transformer_matches_reference(case, backend):
    B, tokens, active, blocks = MIMI_CASES[case]
    w = random_mimi_transformer_weights(layers=2, seed=len(case), device=device_of(backend))
    assert_mimi_matches_reference(w, backend, B, tokens, active, blocks)


@needs_triton
@pytest.mark.parametrize("backend", ["reference", "triton", *PERSISTENT])
def test_mimi_transformer_on_rows_of_a_larger_state(backend):
    """A server steps rows [0, n) of its Mimi state (``dsm.mimi.MimiState.rows``): ``pos``, ``exec_mask`` and ``h``
    prefixes, the ring a strided ``[L, n + 1, ...]`` slice of ``[L, N + 1, ...]``. Bit for bit the step of an n-row
    state of the same values, and no row from n on written."""
    from dsm_kernels.cuda_ops import mimi_unsupported

    dev = device_of(backend)
    w = random_mimi_transformer_weights(layers=2, seed=5, device=dev)
    N, n, tokens = 5, 2, 2
    whole = mimi_transformer_inputs(w, N, tokens=tokens, active=[True, False, True, True, True], device=dev)
    rows = dict(h=whole["h"][: n * tokens], pos=whole["pos"][:n], exec_mask=whole["exec_mask"][:n],
                cache=whole["cache"][:, : n + 1], tokens=tokens, counters=whole["counters"])
    alone = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in rows.items()}
    assert not rows["cache"].is_contiguous() and alone["cache"].is_contiguous()
    if backend in ("cuda", "cuda_emu"):  # the persistent kernel takes it (not the single ops)
        assert mimi_unsupported(w, rows["h"], rows["cache"]) is None
    before = {k: v.clone() for k, v in whole.items() if isinstance(v, torch.Tensor)}
    run_mimi(backend, w, rows)
    run_mimi(backend, w, alone)
    for k in ("h", "pos"):
        assert torch.equal(rows[k], alone[k]), k
    assert torch.equal(rows["cache"], alone["cache"])
    assert not torch.equal(whole["cache"][:, 0], before["cache"][:, 0])  # the active stream wrote its ring
    assert torch.equal(whole["cache"][:, n:], before["cache"][:, n:])
    assert torch.equal(whole["pos"][n:], before["pos"][n:]) and torch.equal(whole["h"][n * tokens :],
                                                                            before["h"][n * tokens :])


@pytest.mark.parametrize("backend", PERSISTENT)
def test_mimi_transformer_output_does_not_depend_on_the_grid(backend):
    dev = device_of(backend)
    w = random_mimi_transformer_weights(layers=2, seed=8, device=dev)
    outs = []
    for blocks in (1, 2, 5):
        ins = mimi_transformer_inputs(w, 2, device=dev)
        run_mimi(backend, w, ins, blocks)
        outs.append((ins["h"], ins["cache"]))
    for h, cache in outs[1:]:
        assert torch.equal(h, outs[0][0]) and torch.equal(cache, outs[0][1])


def test_mimi_transformer_checks_its_inputs():
    w = random_mimi_transformer_weights(layers=1, seed=2)
    ins = mimi_transformer_inputs(w, 2)
    with pytest.raises(ValueError, match="mimi_transformer: h has shape"):
        dsm_kernels.mimi_transformer(w, **dict(ins, tokens=3))
    with pytest.raises(ValueError, match="mimi_transformer: cache has shape"):
        dsm_kernels.mimi_transformer(w, **dict(ins, cache=ins["cache"][:, :2]))
    with pytest.raises(ValueError, match="mimi_transformer: 6 rows"):
        dsm_kernels.mimi_transformer(w, **mimi_transformer_inputs(w, 3))
    with pytest.raises(ValueError, match="no text head"):
        dsm_kernels.decoder_step(w, **decoder_inputs(random_decoder_weights(layers=1), 1))


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 2])
def test_gpu_mimi_transformer_released_shapes_and_graph_replay(B):
    """Mimi's 8 layers (512 wide, 8 heads of 64, FFN 2048, ring of 250) in fp32 against the reference ops on the GPU
    (5e-5: 8 layers of fp32 sums in another order than cuBLAS's), and bit-identical from a CUDA graph."""
    from dsm_kernels.cuda_ops import mimi_transformer_cuda

    w = random_mimi_transformer_weights(dim=512, heads=8, layers=8, hidden=2048, device="cuda", seed=12)
    assert_mimi_matches_reference(w, "cuda", B, 2, blocks=0, tol=5e-5, capacity=250)
    static = mimi_transformer_inputs(w, B, capacity=250, device="cuda")
    h0, cache0 = static["h"].clone(), static["cache"].clone()
    mimi_transformer_cuda(w, **static)  # eager: its pointer table is built outside the capture
    eager = static["h"].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(graph):
        mimi_transformer_cuda(w, **static)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        static["h"].copy_(h0)
        static["cache"].copy_(cache0)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static["h"], eager)


def test_validate_kernels_checks_the_mimi_step(cuda_emulated):
    from dsm_kernels.validate import _mimi_transformer_rows

    rows = _mimi_transformer_rows("cuda", torch.device("cpu"), quick=True)
    assert len(rows) == 2 and all(r.ok for r in rows), rows
    assert cuda_emulated["mimi_transformer"] == 2


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("context", [0, 25])
def test_a_context_past_the_ring_is_refused_by_the_dispatch(backend, context):
    """decoder_step's dispatch check had no context bound (paged_decode_attention's has): the persistent CUDA kernel
    took a context past the ring of pages_per_slot * page_size slots and attended over overwritten positions."""
    w = random_decoder_weights(layers=1)
    ins = decoder_inputs(w, 2, context=24, page_size=4)  # a ring of 6 pages x 4 slots
    ins["context"] = context
    with pytest.raises(ValueError, match=rf"^decoder_step: context {context} must be in \[1, pages_per_slot \* "
                                         r"page_size = 24\]"):
        dsm_kernels.decoder_step(w, **ins, backend=backend)
