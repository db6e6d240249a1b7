"""Multistream embedding: every backend against ``multistream_embed_ref`` over a shape sweep.

Tolerance: fp32 output must equal the reference to 1e-6 relative (same summation order, so in practice bit-equal);
low-precision output must lie within 1 ulp of the fp32 sum (one rounding; the interpreter's cast truncates).
"""

import pytest
import torch
from kernel_backends import BACKENDS, kernel_device, resolve

from dsm_kernels import multistream_embed, reference
from dsm_kernels.testing import assert_close_verbose, bf16_ulp, poison_


def _inputs(B, K, D, dtype, device, *, text2, cond, Vt=49, Va=33, Q=None):
    g = torch.Generator().manual_seed(B * 1000 + K * 10 + D)
    Q = Q or max(K - 1, 1)
    text = torch.randn(Vt, D, generator=g).to(dtype)
    audio = torch.randn(Q, Va, D, generator=g).to(dtype)
    tokens = torch.randint(-1, Va, (B, K), generator=g)
    vt_hi = Vt * (Vt + 1) if text2 else Vt  # packed ids v = first + Vt * (second + 1)
    tokens[:, 0] = torch.randint(-1, vt_hi, (B,), generator=g)
    tokens[0, :] = -1  # an all-silent slot: exact zeros
    t2 = torch.randn(Vt, D, generator=g).to(dtype) if text2 else None
    c = torch.randn(B, D, generator=g).to(dtype) if cond else None
    move = lambda x: None if x is None else x.to(device)  # noqa: E731
    return move(tokens), move(text), move(audio), move(t2), move(c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,K,D,text2,cond",
    [(1, 1, 64, False, False), (3, 9, 100, True, False), (17, 33, 256, False, True), (3, 33, 2048, True, True)],
)
def test_multistream_embed(backend, dtype, B, K, D, text2, cond):
    device = kernel_device(backend)
    tokens, text, audio, t2, c = _inputs(B, K, D, dtype, device, text2=text2, cond=cond)
    exp32 = reference.multistream_embed_ref(
        tokens.cpu(), text.float().cpu(), audio.float().cpu(),
        text_table2=None if t2 is None else t2.float().cpu(), cond=None if c is None else c.float().cpu(),
    )  # fmt: skip
    fn = resolve("multistream_embed", backend, device)
    out = poison_(torch.empty(B, D, dtype=dtype, device=device))
    got = fn(tokens, text, audio, text_table2=t2, cond=c, out=out)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
    assert bool((got[0] == 0).all()) or cond, "token -1 must embed to an exact zero row"
    if dtype == torch.float32:
        assert_close_verbose(got.cpu(), exp32, atol=1e-6, rtol=1e-6, name=f"{backend} fp32")
    else:
        ulp = bf16_ulp(exp32) if dtype == torch.bfloat16 else bf16_ulp(exp32) / 8  # fp16: 11 mantissa bits
        bad = ~((got.cpu().float() - exp32).abs() <= ulp)
        assert not bool(bad.any()), f"{backend} {dtype}: {int(bad.sum())} elements beyond 1 ulp of the fp32 sum"
    if backend != "cuda_emu":  # the dispatch entry point (no preallocated out) agrees with the explicit call
        via_dispatch = multistream_embed(tokens, text, audio, text_table2=t2, cond=c, backend=backend)
        assert torch.equal(via_dispatch, got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multistream_embed_columns_beyond_the_cuda_kernel(backend):
    """More token columns than the CUDA kernel unrolls (EMBED_MAX_COLUMNS) run Triton's kernel from the cuda
    backend: the reference's sums, not a launch error."""
    from dsm_kernels.cuda_ops import EMBED_MAX_COLUMNS, embed_unsupported

    device = kernel_device(backend)
    tokens, text, audio, t2, c = _inputs(2, EMBED_MAX_COLUMNS + 2, 64, torch.float32, device, text2=True, cond=True)
    assert embed_unsupported(tokens, text, audio, t2) is not None
    got = resolve("multistream_embed", backend, device)(tokens, text, audio, text_table2=t2, cond=c)
    exp = reference.multistream_embed_ref(tokens.cpu(), text.cpu(), audio.cpu(), text_table2=t2.cpu(), cond=c.cpu())
    assert_close_verbose(got.cpu(), exp, atol=1e-6, rtol=1e-6, name=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multistream_embed_cond_of_any_layout(backend):
    """A cond [B, D] not contiguous along D (a transposed view) gives the reference's sums: the CUDA kernel reads
    D-contiguous rows, so its wrapper copies it (the binding refused it; its emulation read the wrong elements)."""
    device = kernel_device(backend)
    tokens, text, audio, _, c = _inputs(3, 4, 32, torch.float32, device, text2=False, cond=True)
    cond = c.t().contiguous().t()
    got = resolve("multistream_embed", backend, device)(tokens, text, audio, cond=cond)
    exp = reference.multistream_embed_ref(tokens.cpu(), text.cpu(), audio.cpu(), cond=c.cpu())
    assert_close_verbose(got.cpu(), exp, atol=1e-6, rtol=1e-6, name=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multistream_embed_out_dtype_and_extra_tables(backend):
    """bf16 tables, fp32 output; more audio tables than token columns (Q > K - 1) must be ignored."""
    device = kernel_device(backend)
    tokens, text, audio, _, c = _inputs(5, 4, 96, torch.bfloat16, device, text2=False, cond=True, Q=8)
    exp = reference.multistream_embed_ref(tokens.cpu(), text.cpu(), audio.cpu(), cond=c.cpu(), out_dtype=torch.float32)
    if backend == "cuda_emu":  # no dispatch entry point: the emulated op itself
        got = resolve("multistream_embed", backend, device)(tokens, text, audio, cond=c, out_dtype=torch.float32)
    else:
        got = multistream_embed(tokens, text, audio, cond=c, out_dtype=torch.float32, backend=backend)
    assert got.dtype == torch.float32
    assert_close_verbose(got.cpu(), exp, atol=1e-6, rtol=1e-6, name=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_multistream_embed_cuda_graph_and_real_shapes(backend):
    """Real shapes (33 tables of 2049 x 2048 bf16, batch 400), captured in a graph and replayed on new tokens."""
    device = kernel_device(backend)
    B, K, D = 400, 33, 2048
    tokens, text, audio, t2, c = _inputs(B, K, D, torch.bfloat16, device, text2=True, cond=True, Vt=8001, Va=2049)
    fn = resolve("multistream_embed", backend, device)
    out = torch.empty(B, D, dtype=torch.bfloat16, device=device)
    fn(tokens, text, audio, text_table2=t2, cond=c, out=out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(tokens, text, audio, text_table2=t2, cond=c, out=out)
    tokens.copy_(torch.randint(-1, 2049, (B, K), device=device))
    graph.replay()
    exp32 = reference.multistream_embed_ref(tokens, text.float(), audio.float(), text_table2=t2.float(), cond=c.float())
    bad = ~((out.float() - exp32).abs() <= bf16_ulp(exp32))
    assert not bool(bad.any()), f"{backend}: {int(bad.sum())} elements beyond 1 ulp after graph replay"
