"""Paged KV cache: ``append_kv`` and decode attention of every backend against the references.

Tolerances (reference-relative, flash-attn rule): kernel error vs the fp32 reference (same cache values upcast)
<= 3 x the error of the reference run in the cache dtype + 1e-5. The reference upcasts internally, so its own
error is the final rounding to the dtype; 3x leaves room for a different accumulation order. On CPU the
interpreter's fp32->bf16/fp16 cast truncates, so one more ulp is allowed there. fp32: 1e-5 absolute (online vs
one-shot softmax). append_kv: exact.

fp8 (e4m3) caches: append_kv must equal the reference bit for bit (clamp to +-448, round to nearest even; NaN in the
input stays NaN, checked on the GPU only: the interpreter's fp8 cast turns NaN into 384). Decode over fp8 pages is
checked tightly against the fp32 reference on the same fp8 values upcast (the bf16 rule above with bf16 q/out;
1e-5 x max|v| with fp32 q/out), and against an fp32-cache reference (values never quantized) within 1.5 x the
reference's own fp8 error against it + 1e-5.
"""

import pytest
import torch
from kernel_backends import BACKENDS, kernel_device, resolve

from dsm_kernels import reference
from dsm_kernels.testing import assert_close_verbose, max_abs_err, poison_, ref_relative_atol, strided

KV_LENS = [1, 7, 749, 750, 751, 1501, 0]  # around context 750, plus an inactive slot


def _pool(B, H, D, S, context, dtype, device, seed=0):
    """A shared pool whose pages are dealt to slots in a random order, plus spare pages; garbage everywhere."""
    g = torch.Generator().manual_seed(seed)
    pps = -(-context // S)  # pages per slot: the ring never overwrites a row still in the window
    num_pages = B * pps + 3
    k_cache = torch.randn(num_pages, S, H, D, generator=g).to(dtype)
    v_cache = torch.randn(num_pages, S, H, D, generator=g).to(dtype)
    block_table = torch.randperm(num_pages, generator=g)[: B * pps].view(B, pps).int()
    q = torch.randn(B, H, D, generator=g).to(dtype)
    return [x.to(device) for x in (q, k_cache, v_cache, block_table)]


def _check(backend, device, q, k_cache, v_cache, block_table, seq_lens, context, **kw):
    dtype = q.dtype
    fn = resolve("paged_decode_attention", backend, device)
    out = poison_(torch.empty_like(q))
    got = fn(q, k_cache, v_cache, block_table, seq_lens, context=context, out=out, **kw)
    assert got.data_ptr() == out.data_ptr()
    cpu = [x.cpu() for x in (q, k_cache, v_cache, block_table, seq_lens)]
    exp32 = reference.paged_decode_attention_ref(
        *[x.float() if x.is_floating_point() else x for x in cpu], context=context
    )
    exp_lowp = reference.paged_decode_attention_ref(*cpu, context=context)
    atol = ref_relative_atol(exp_lowp, exp32, factor=3.0) if dtype != torch.float32 else 1e-5
    # The interpreter's fp32->bf16/fp16 cast truncates (ENV.md section 1): allow that one extra ulp there only.
    rtol = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}.get(dtype, 0.0) if device.type == "cpu" else 0.0
    assert_close_verbose(got.cpu(), exp32, atol=atol, rtol=rtol, name=f"{backend} {dtype} {tuple(q.shape)}")
    inactive = (seq_lens == 0).cpu()
    assert bool((got.cpu()[inactive] == 0).all()), "inactive slots must give exact zeros"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,H,D,page_size",
    [(torch.bfloat16, h, d, s) for h, d in [(16, 128), (32, 64), (8, 64)] for s in (16, 64)]
    + [
        (torch.float16, 16, 128, 16),
        (torch.float16, 8, 64, 64),
        (torch.float32, 16, 128, 64),
        (torch.float32, 8, 64, 16),
        (torch.float32, 4, 16, 16),  # the tiny test models' heads
        (torch.bfloat16, 6, 32, 64),  # a head count that is not a power of 2
    ],
)
def test_decode_boundaries(backend, dtype, H, D, page_size):
    """kv_len around context 750 (ring wrap at 1501), ragged, one inactive slot, pages dealt randomly."""
    device = kernel_device(backend)
    context = 750
    q, kc, vc, bt = _pool(len(KV_LENS), H, D, page_size, context, dtype, device)
    seq_lens = torch.tensor(KV_LENS, dtype=torch.int32, device=device)
    _check(backend, device, q, kc, vc, bt, seq_lens, context)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 96), (torch.float32, 48), (torch.float16, 80)])
def test_decode_head_dims_outside_the_cuda_kernel(backend, dtype, D):
    """Head dims the CUDA kernel does not take (it needs head_dim / 8 lanes to divide a warp) run the Triton kernel
    from the cuda backend: right values, not a launch error."""
    from dsm_kernels.cuda_ops import attention_unsupported

    device = kernel_device(backend)
    q, kc, vc, bt = _pool(len(KV_LENS), 3, D, 16, 750, dtype, device)
    assert attention_unsupported(q, kc, vc) is not None
    _check(backend, device, q, kc, vc, bt, torch.tensor(KV_LENS, dtype=torch.int32, device=device), 750)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,num_splits", [(1, None), (1, 1), (1, 3), (3, 5), (17, None)])
def test_decode_batch_and_splits(backend, B, num_splits):
    """Batch sweep and split-K partitioning (1 split, a few, the planner's choice) at the 32x64 / 375 layout."""
    device = kernel_device(backend)
    context, S = 375, 16
    q, kc, vc, bt = _pool(B, 32, 64, S, context, torch.bfloat16, device, seed=B)
    g = torch.Generator().manual_seed(B)
    seq_lens = torch.randint(0, 3 * context, (B,), generator=g, dtype=torch.int32).to(device)
    _check(backend, device, q, kc, vc, bt, seq_lens, context, **({"num_splits": num_splits} if num_splits else {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_empty_batch(backend):
    """No slot at all (every stream closed): an empty output, as the reference's, not an error of the split planner
    (0 blocks made its wave fill 0 / 0)."""
    device = kernel_device(backend)
    q, kc, vc, bt = _pool(0, 2, 16, 4, 8, torch.float32, device)
    got = resolve("paged_decode_attention", backend, device)(q, kc, vc, bt, torch.zeros(0, dtype=torch.int32,
                                                                                        device=device), context=8)
    assert got.shape == (0, 2, 16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_splits", [2, 5])
def test_decode_merges_in_launch_with_counters(backend, num_splits):
    """With a counter buffer the last split of each head merges in the same launch: the output matches the
    reference, every counter is back at 0 afterwards, and the re-armed buffer serves further calls (new queries,
    other slots, one more position) exactly as a fresh one would."""
    device = kernel_device(backend)
    B, H, D, context = 4, 8, 64, 300
    q, kc, vc, bt = _pool(B, H, D, 16, context, torch.bfloat16, device, seed=num_splits)
    counters = torch.zeros(B * H + 3, dtype=torch.int32, device=device)  # spare tail entries stay untouched
    seq_lens = torch.tensor([300, 0, 41, 777], dtype=torch.int32, device=device)
    for step in range(3):
        q = torch.randn(q.shape, generator=torch.Generator().manual_seed(step)).to(q).to(device)
        _check(backend, device, q, kc, vc, bt, seq_lens, context, num_splits=num_splits, counters=counters)
        assert counters.count_nonzero().item() == 0, f"call {step} left counters armed: {counters.tolist()}"
        seq_lens = seq_lens + (seq_lens > 0).int()


def test_decode_num_splits_fills_waves():
    """The CUDA split count: the fewest splits whose last wave of blocks is >= 90% full, else the fullest."""
    from dsm_kernels.cuda_ops import decode_num_splits

    resident = 132 * 5  # an H100's SMs x the decode kernel's 5 blocks per SM (96 registers x 128 threads)
    assert decode_num_splits(400, 16, 750, resident) == 1  # 6400 blocks: 9.7 waves, 97% full
    assert decode_num_splits(64, 16, 750, resident) == 3  # 1024 blocks would be 1.55 waves; 3072 are 4.65
    assert decode_num_splits(1, 16, 750, resident) == 23  # never a full wave: as many as 32-position splits allow
    assert decode_num_splits(1, 16, 40, resident) == 1
    for B in (1, 2, 3, 8, 17, 64, 100, 400, 700):
        s = decode_num_splits(B, 16, 750, resident)
        assert 1 <= s <= 750 // 32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [32, 128])
def test_decode_other_page_sizes(backend, page_size):
    device = kernel_device(backend)
    q, kc, vc, bt = _pool(3, 16, 128, page_size, 500, torch.bfloat16, device, seed=page_size)
    seq_lens = torch.tensor([500, 1234, 129], dtype=torch.int32, device=device)
    _check(backend, device, q, kc, vc, bt, seq_lens, 500)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("counters", [False, True], ids=["merge-kernel", "merged-in-launch"])
def test_decode_over_shared_condition_pages(backend, counters):
    """The TTS voice cross-attention's layout (dsm.kv_cache.CrossKVCache): 625 positions in pages of 125 (not a power
    of two), all visible (seq_lens == context == 625), rows sharing pages (the padding pages every row lists, a voice
    page two rows list), the shared ones in other table positions per row."""
    device = kernel_device(backend)
    g = torch.Generator().manual_seed(5)
    H, D, S, n = 16, 128, 125, 5
    k_cache = torch.randn(12, S, H, D, generator=g).to(torch.bfloat16)
    v_cache = torch.randn(12, S, H, D, generator=g).to(torch.bfloat16)
    table = torch.tensor([[3, 7, 8, 9, 10], [4, 7, 8, 9, 10], [3, 7, 8, 9, 10], [5, 6, 8, 9, 10], [10, 9, 8, 7, 11]],
                         dtype=torch.int32)  # fmt: skip
    q = torch.randn(len(table), H, D, generator=g).to(torch.bfloat16)
    seq_lens = torch.full((len(table),), S * n, dtype=torch.int32)
    kw = {"counters": torch.zeros(len(table) * H, dtype=torch.int32, device=device)} if counters else {}
    dev = [x.to(device) for x in (q, k_cache, v_cache, table, seq_lens)]
    _check(backend, device, *dev, S * n, **kw)
    if counters:
        assert not bool(kw["counters"].any()), "each launch leaves its counters at 0"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_append_kv(backend, dtype):
    device = kernel_device(backend)
    B, H, D, S = 5, 8, 64, 16
    kc = poison_(torch.empty(12, S, H, D, dtype=dtype, device=device))
    vc = poison_(torch.empty_like(kc))
    k = torch.randn(B, 3, H, D, device=device).to(dtype)[:, 1]  # a strided view, like a slice of fused QKV
    v = torch.randn(B, H, D, device=device).to(dtype)
    slot_mapping = torch.tensor([5, -1, 190, 16, 47], device=device)
    kc_ref, vc_ref = kc.clone().cpu(), vc.clone().cpu()
    resolve("append_kv", backend, device)(kc, vc, k, v, slot_mapping)
    reference.append_kv_ref(kc_ref, vc_ref, k.cpu(), v.cpu(), slot_mapping.cpu())
    assert torch.equal(kc.cpu().nan_to_num(7.0), kc_ref.nan_to_num(7.0))  # untouched rows stay poisoned on both
    assert torch.equal(vc.cpu().nan_to_num(7.0), vc_ref.nan_to_num(7.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_ring_matches_dense_window(backend):
    """Append + decode step by step over a ring of 2 pages (context 20, page 16) for 40 steps with staggered slot
    starts, against dense attention over the full history with moshi's mask -- independent of the page layout."""
    device = kernel_device(backend)
    B, H, D, S, context, T = 3, 4, 64, 16, 20, 40
    append = resolve("append_kv", backend, device)
    attend = resolve("paged_decode_attention", backend, device)
    pps = -(-context // S)
    kc = poison_(torch.empty(B * pps + 1, S, H, D, device=device))
    vc = poison_(torch.empty_like(kc))
    block_table = torch.randperm(B * pps + 1)[: B * pps].view(B, pps).int().to(device)
    start = torch.tensor([0, 5, 10])
    g = torch.Generator().manual_seed(1)
    ks, vs, qs = (torch.randn(T, B, H, D, generator=g) for _ in range(3))
    for t in range(T):
        n = (t - start + 1).clamp(min=0)  # tokens written per slot after this step
        pos = n - 1
        slot_mapping = torch.where(pos >= 0, reference.kv_position_to_slot(block_table.cpu(), pos.clamp(min=0), S), -1)
        append(kc, vc, ks[t].to(device), vs[t].to(device), slot_mapping.to(device))
        if t % 3 and t < T - 3:
            continue  # append every step, check every third (the interpreter's launches are slow)
        got = attend(qs[t].to(device), kc, vc, block_table, n.int().to(device), context=context).cpu()
        for b in range(B):
            if n[b] == 0:
                assert bool((got[b] == 0).all())
                continue
            steps = torch.arange(int(start[b]), t + 1)[-context:]  # the slot's last `context` tokens
            att = torch.einsum("hd,thd->ht", qs[t, b], ks[steps, b]) * D**-0.5
            exp = torch.einsum("ht,thd->hd", att.softmax(-1), vs[steps, b])
            assert_close_verbose(got[b], exp, atol=2e-5, name=f"{backend} step {t} slot {b}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("H,D,context", [(16, 128, 750), (32, 64, 375)])
def test_decode_real_shapes_large_batch(backend, H, D, context):
    """Batch 257 at the models' shapes (one split per slot on an H100), ragged lengths incl. inactive slots."""
    device = kernel_device(backend)
    B = 257
    q, kc, vc, bt = _pool(B, H, D, 16, context, torch.bfloat16, device, seed=B)
    seq_lens = torch.randint(0, 4 * context, (B,), dtype=torch.int32, device=device)
    seq_lens[::17] = 0
    _check(backend, device, q, kc, vc, bt, seq_lens, context)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_decode_cuda_graph_replay(backend):
    """append + decode captured once; replays with new inputs written in place match the reference."""
    device = kernel_device(backend)
    B, H, D, S, context = 5, 16, 128, 16, 750
    q, kc, vc, bt = _pool(B, H, D, S, context, torch.bfloat16, device)
    append = resolve("append_kv", backend, device)
    attend = resolve("paged_decode_attention", backend, device)
    k, v = torch.randn(B, H, D, device=device).bfloat16(), torch.randn(B, H, D, device=device).bfloat16()
    seq_lens = torch.tensor([1, 750, 751, 0, 1501], dtype=torch.int32, device=device)
    slot_mapping = torch.full((B,), -1, dtype=torch.int64, device=device)
    out = torch.empty_like(q)

    def step():
        append(kc, vc, k, v, slot_mapping)
        attend(q, kc, vc, bt, seq_lens, context=context, out=out)

    step()  # warm-up (Triton JIT) before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        seq_lens += torch.tensor([1, 1, 1, 0, 1], dtype=torch.int32, device=device)
        pos = (seq_lens.long() - 1).clamp(min=0)
        slot_mapping.copy_(torch.where(seq_lens > 0, reference.kv_position_to_slot(bt, pos, S), -1))
        q.normal_()
        k.normal_()
        v.normal_()
        graph.replay()
        exp = reference.paged_decode_attention_ref(q, kc, vc, bt, seq_lens, context=context)
        exp32 = reference.paged_decode_attention_ref(q.float(), kc.float(), vc.float(), bt, seq_lens, context=context)
        assert_close_verbose(out, exp32, atol=ref_relative_atol(exp, exp32, factor=3.0), name=f"{backend} replay")


FP8 = torch.float8_e4m3fn


def _fp8_values(shape, g, scale=4.0):
    """Post-RoPE-like K/V magnitudes with a few outliers far outside e4m3's range (+-448) and some tiny values."""
    x = torch.randn(shape, generator=g) * scale
    x.view(-1)[::97] *= 300.0  # |x| up to ~1e4: must saturate to +-448, never NaN
    x.view(-1)[5::89] *= 1e-4  # subnormal range of e4m3
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_append_kv_fp8(backend, in_dtype):
    device = kernel_device(backend)
    B, H, D, S = 6, 4, 64, 16
    g = torch.Generator().manual_seed(3)
    kc = poison_(torch.empty(12, S, H, D, device=device)).to(FP8)  # NaN bytes (0x7f) everywhere
    vc = kc.clone()
    k = _fp8_values((B, 3, H, D), g).to(in_dtype).to(device)[:, 1]  # strided view
    v = _fp8_values((B, H, D), g, scale=1.0).to(in_dtype).to(device)
    k[0, 0, :4] = torch.tensor([float("inf"), -float("inf"), 448.0, -500.0])
    v[0, 0, :2] = torch.tensor([-0.0, -1e-9])  # fp8 -0 on every backend
    if device.type == "cuda":  # the interpreter's fp8 cast maps NaN to 384 (see module doc)
        k[1, 1, 1] = float("nan")
    slot_mapping = torch.tensor([5, -1, 190, 16, 47, 100], device=device)
    kc_ref, vc_ref = kc.clone().cpu(), vc.clone().cpu()
    resolve("append_kv", backend, device)(kc, vc, k, v, slot_mapping)
    reference.append_kv_ref(kc_ref, vc_ref, k.cpu(), v.cpu(), slot_mapping.cpu())
    for got, exp, name in ((kc, kc_ref, "k"), (vc, vc_ref, "v")):
        got, exp = got.cpu().view(torch.uint8), exp.view(torch.uint8)
        bad = (got != exp).nonzero()[:5].tolist()
        assert not bad, f"{backend} {name}: bytes differ at {bad}"
    rows = kc_ref.flatten(0, 1)[slot_mapping[slot_mapping >= 0].cpu()].float()
    assert float(rows[~rows.isnan()].abs().max()) == 448.0  # saturated, finite
    assert int(rows.isnan().sum()) == (1 if device.type == "cuda" else 0)
    assert bool(kc_ref.flatten(0, 1)[0].float().isnan().all()), "unwritten rows stay poisoned"


def _fp8_pool(B, H, D, S, context, device, seed):
    """``_pool`` with fp8 K/V pages, plus the fp32 values they quantize (already clamped to +-448, so that the
    fp32-cache reference differs from the fp8 one by e4m3 rounding only)."""
    g = torch.Generator().manual_seed(seed)
    pps = -(-context // S)
    num_pages = B * pps + 3
    k32 = _fp8_values((num_pages, S, H, D), g, 2.0).clamp(-448, 448)
    v32 = _fp8_values((num_pages, S, H, D), g, 1.0).clamp(-448, 448)
    block_table = torch.randperm(num_pages, generator=g)[: B * pps].view(B, pps).int()
    q = (torch.randn(B, H, D, generator=g) * 0.5).bfloat16()
    fp8 = [x.to(device) for x in (q, k32.to(FP8), v32.to(FP8), block_table)]
    return fp8, (k32, v32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,D,S,context,kv_lens", [
    (8, 64, 16, 750, KV_LENS),
    (16, 128, 64, 375, [375, 1, 0, 1000]),
    (4, 16, 16, 16, [3, 16, 17, 40]),  # the tiny test models' heads and context
])  # fmt: skip
def test_decode_fp8_cache(backend, H, D, S, context, kv_lens):
    device = kernel_device(backend)
    (q, kc, vc, bt), (k32, v32) = _fp8_pool(len(kv_lens), H, D, S, context, device, seed=H + D)
    seq_lens = torch.tensor(kv_lens, dtype=torch.int32, device=device)
    # tight: the same fp8 values upcast; bf16 q/out (the bf16 rule), and fp32 q/out within 1e-5 x max|v| (fp32
    # accumulation-order error over values up to 448; a 0.1% error in the kernel is ~1e3 times that)
    _check(backend, device, q, kc, vc, bt, seq_lens, context)
    fn = resolve("paged_decode_attention", backend, device)
    cpu = [x.cpu() for x in (q, kc, vc, bt, seq_lens)]
    out32 = fn(q.float(), kc, vc, bt, seq_lens, context=context, out=poison_(torch.empty_like(q, dtype=torch.float32)))
    exp32 = reference.paged_decode_attention_ref(cpu[0].float(), *cpu[1:], context=context)
    vmax = float(vc.float().abs().max())
    assert_close_verbose(out32.cpu(), exp32, atol=1e-5 * vmax, name=f"{backend} fp8 cache, fp32 q")
    # loose: against never-quantized caches, relative to the reference's own fp8 error
    out = poison_(torch.empty_like(q))
    fn(q, kc, vc, bt, seq_lens, context=context, out=out)
    exp_f32cache = reference.paged_decode_attention_ref(cpu[0].float(), k32, v32, *cpu[3:], context=context)
    exp_fp8 = reference.paged_decode_attention_ref(cpu[0].float(), *cpu[1:], context=context)
    fp8_err = max_abs_err(exp_fp8, exp_f32cache)
    assert fp8_err > 0  # the quantization is real, so the bound below is not vacuous
    assert_close_verbose(out.cpu(), exp_f32cache, atol=1.5 * fp8_err + 1e-5, name=f"{backend} fp8 vs fp32 cache")


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_ring_fp8(backend):
    """Append bf16 K/V into an fp8 ring (context 20, page 16) step by step; decode equals dense attention over the
    same history quantized as the reference quantizes it (clamp, round to e4m3)."""
    device = kernel_device(backend)
    B, H, D, S, context, T = 2, 4, 64, 16, 20, 30
    append = resolve("append_kv", backend, device)
    attend = resolve("paged_decode_attention", backend, device)
    pps = -(-context // S)
    kc = poison_(torch.empty(B * pps + 1, S, H, D, device=device)).to(FP8)
    vc = kc.clone()
    block_table = torch.randperm(B * pps + 1)[: B * pps].view(B, pps).int().to(device)
    start = torch.tensor([0, 7])
    g = torch.Generator().manual_seed(2)
    ks, vs = (_fp8_values((T, B, H, D), g).bfloat16() for _ in range(2))
    qs = torch.randn(T, B, H, D, generator=g) * 0.3
    kq, vq = (x.float().clamp(-448, 448).to(FP8).float() for x in (ks, vs))
    for t in range(T):
        n = (t - start + 1).clamp(min=0)
        pos = n - 1
        slot_mapping = torch.where(pos >= 0, reference.kv_position_to_slot(block_table.cpu(), pos.clamp(min=0), S), -1)
        append(kc, vc, ks[t].to(device), vs[t].to(device), slot_mapping.to(device))
        if t % 4 and t < T - 2:
            continue
        got = attend(qs[t].to(device), kc, vc, block_table, n.int().to(device), context=context).cpu()
        for b in range(B):
            if n[b] == 0:
                assert bool((got[b] == 0).all())
                continue
            steps = torch.arange(int(start[b]), t + 1)[-context:]
            att = torch.einsum("hd,thd->ht", qs[t, b], kq[steps, b]) * D**-0.5
            exp = torch.einsum("ht,thd->hd", att.softmax(-1), vq[steps, b])
            assert_close_verbose(got[b], exp, atol=1e-4, rtol=1e-5, name=f"{backend} fp8 step {t} slot {b}")


def test_triton_takes_strided_slots_and_lengths():
    """slot_mapping and seq_lens as strided or expanded [B] views (the checks and the reference take any layout):
    the Triton kernels read them at unit stride, so they must get them so."""
    device = kernel_device("triton")
    B, H, D, S, context = 3, 2, 8, 4, 8
    q, kc, vc, bt = _pool(B, H, D, S, context, torch.float32, device, seed=3)
    k, v = torch.randn(B, H, D, device=device), torch.randn(B, H, D, device=device)
    slot = strided(torch.tensor([3, -1, 20], device=device), -1)
    k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    resolve("append_kv", "triton", device)(k1, v1, k, v, slot)
    reference.append_kv_ref(k2, v2, k, v, slot)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
    for seq in (strided(torch.tensor([5, 0, 7], dtype=torch.int32, device=device), 0),
                torch.full((), 6, dtype=torch.int32, device=device).expand(B)):
        got = resolve("paged_decode_attention", "triton", device)(q, kc, vc, bt, seq, context=context)
        exp = reference.paged_decode_attention_ref(q, kc, vc, bt, seq, context=context)
        assert_close_verbose(got, exp, atol=1e-5, name=f"seq_lens strides {seq.stride()}")
