"""Sampling: every backend against ``sample_tokens_ref``.

Exact checks: temperature <= 0 is the argmax (lowest index on ties); every sample lies in the top-k set; same
(seed, step) gives the same tokens; tokens equal the reference's, except where the reference's own best two
exp-race scores are within 1e-5 relative (a near tie, decided by last-bit differences in exp/log).
Statistical check: frequencies of 2^20 draws (the reference's noise and formula, vectorised; the kernel itself draws
2^20 on a GPU and 2^16 in the interpreter) match the renormalised top-k softmax: cosine > 0.999 and every token within
5 standard errors.
"""

import pytest
import torch
from kernel_backends import BACKENDS, kernel_device, resolve

from dsm_kernels import reference
from dsm_kernels.testing import poison_, sample_score_gap, sample_tokens_torch


def _inputs(B, V, device, dtype=torch.float32, seed=0, cfg=False):
    g = torch.Generator().manual_seed(seed * 7919 + B * 31 + V)
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
    null = (torch.randn(B, V, generator=g) * 3).to(dtype) if cfg else None
    temp = torch.rand(B, generator=g) * 1.5 + 0.1
    seeds = torch.randint(-(2**40), 2**40, (B,), generator=g)
    steps = torch.randint(0, 2**34, (B,), generator=g)
    move = lambda x: None if x is None else x.to(device)  # noqa: E731
    return move(logits), move(null), move(temp), move(seeds), move(steps)


def _run(backend, device, logits, temp, top_k, seeds, steps, null=None, cfg_coef=1.0):
    fn = resolve("sample_tokens", backend, device)
    out = poison_(torch.empty(logits.shape[0], dtype=torch.int64, device=device))
    got = fn(logits, temp, top_k, seeds, steps, null_logits=null, cfg_coef=cfg_coef, out=out)
    assert got.data_ptr() == out.data_ptr()
    return got.cpu()


def _mixed(logits, null, cfg_coef):
    x = logits.float().cpu()
    if null is None:
        return x
    n = null.float().cpu()
    return n + (x - n) * cfg_coef


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [2049, 8001])
@pytest.mark.parametrize("B", [1, 3, 17])
@pytest.mark.parametrize("cfg", [False, True])
def test_greedy_is_argmax(backend, V, B, cfg):
    device = kernel_device(backend)
    logits, null, _, seeds, steps = _inputs(B, V, device, cfg=cfg)
    logits[:, V // 2] = logits[:, V // 3] = 1e4  # exact tie at the top: the lowest index wins
    if null is not None:
        null[:, V // 2] = null[:, V // 3] = 0.0
    temp = torch.tensor([0.0, -1.0] * B, device=device)[:B]
    got = _run(backend, device, logits, temp, 50, seeds, steps, null, 1.5)
    assert torch.equal(got, _mixed(logits, null, 1.5).argmax(-1))
    assert bool((got == V // 3).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V,top_k", [(2049, 1), (2049, 250), (4000, 17), (8001, 250), (8001, 8001), (64, 63)])
def test_samples_in_top_k(backend, V, top_k):
    device = kernel_device(backend)
    B = 24
    logits, _, temp, seeds, steps = _inputs(B, V, device, seed=top_k)
    logits[: B // 2] = logits[: B // 2].round()  # many exact ties: the kept set is every token >= the k-th value
    temp = temp * 4  # hot: the draws spread over the whole kept set
    x = logits.float().cpu()
    kth = x.topk(min(top_k, V), dim=-1).values[:, -1]
    for s in range(6):
        got = _run(backend, device, logits, temp, top_k, seeds, steps + s)
        assert bool((x.gather(1, got[:, None])[:, 0] >= kth).all()), "a sample outside the top-k set"


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_and_step_same_tokens(backend):
    device = kernel_device(backend)
    logits, _, temp, seeds, steps = _inputs(17, 2049, device)
    a = _run(backend, device, logits, temp, 100, seeds, steps)
    b = _run(backend, device, logits.clone(), temp, 100, seeds.clone(), steps.clone())
    c = _run(backend, device, logits, temp, 100, seeds, steps + 1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c), "the step counter must change the noise"


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_step_scale_and_offset_make_the_counter(backend):
    """Row b's noise counter is ``steps[b] * step_scale + step_offset`` (a generator passes its frame offsets and
    its stream's place): the same tokens as the counters computed beforehand, and not those of ``steps`` alone."""
    device = kernel_device(backend)
    logits, _, temp, seeds, steps = _inputs(17, 2049, device)
    fn = resolve("sample_tokens", backend, device)
    got = fn(logits, temp * 4, 0, seeds, steps, step_scale=33, step_offset=5).cpu()
    want = fn(logits, temp * 4, 0, seeds, steps * 33 + 5).cpu()
    plain = fn(logits, temp * 4, 0, seeds, steps).cpu()
    assert torch.equal(got, want) and not torch.equal(got, plain)
    if backend == "reference":  # and the vectorised torch twin (the benchmarks' baseline) agrees
        assert torch.equal(sample_tokens_torch(logits, temp * 4, 0, seeds, steps, step_scale=33, step_offset=5), got)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [2049, 4000, 8001])
@pytest.mark.parametrize("top_k", [0, 1, 50, 250])
@pytest.mark.parametrize("cfg,dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_matches_reference(backend, V, top_k, cfg, dtype):
    device = kernel_device(backend)
    B = 17
    logits, null, temp, seeds, steps = _inputs(B, V, device, dtype=dtype, seed=top_k, cfg=cfg)
    temp[3] = 0.0
    got = _run(backend, device, logits, temp, top_k, seeds, steps, null, 3.0)
    args = [x.cpu() for x in (logits, temp)] + [top_k] + [x.cpu() for x in (seeds, steps)]
    exp = reference.sample_tokens_ref(*args, null_logits=None if null is None else null.cpu(), cfg_coef=3.0)
    assert torch.equal(sample_tokens_torch(*args, null_logits=None if null is None else null.cpu(), cfg_coef=3.0), exp)
    for b in (got != exp).nonzero()[:, 0].tolist():  # allowed only on a near tie of the two scores
        rel = sample_score_gap(_mixed(logits, null, 3.0)[b], temp[b].item(), seeds[b : b + 1], steps[b : b + 1],
                               int(got[b]), int(exp[b]))
        assert rel < 1e-5, f"row {b}: kernel {got[b]} vs reference {exp[b]}, score gap {rel:.3g} is not a near tie"



@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_beyond_the_cuda_kernel(backend):
    """A vocabulary the CUDA kernel does not hold in one block (> SAMPLE_MAX_VOCAB) is sampled by Triton's kernel
    from the cuda backend, with the reference's tokens, not a launch error."""
    from dsm_kernels.cuda_ops import SAMPLE_MAX_VOCAB, sample_unsupported

    device = kernel_device(backend)
    logits, null, temp, seeds, steps = _inputs(3, SAMPLE_MAX_VOCAB + 5, device, dtype=torch.float32, seed=1, cfg=True)
    temp[0] = 0.0
    assert sample_unsupported(logits) is not None
    for top_k in (0, 40):
        got = _run(backend, device, logits, temp, top_k, seeds, steps, null, 2.0)
        args = [x.cpu() for x in (logits, temp)] + [top_k] + [x.cpu() for x in (seeds, steps)]
        assert torch.equal(got.cpu(), reference.sample_tokens_ref(*args, null_logits=null.cpu(), cfg_coef=2.0))

@pytest.mark.parametrize("backend", BACKENDS)
def test_null_logits_of_another_dtype(backend):
    """CFG null logits in another dtype than the logits (the checks and the reference take them, mixing in fp32): the
    CUDA kernel reads both as the logits' dtype, so the cuda backend hands them to Triton's kernel (the binding
    refused them; its emulation read fp16 bytes as fp32)."""
    device = kernel_device(backend)
    logits, null, temp, seeds, steps = _inputs(3, 50, device, seed=2, cfg=True)
    temp[0] = 0.0
    for lg, nl in ((logits, null.half()), (logits.bfloat16(), null)):
        got = _run(backend, device, lg, temp, 5, seeds, steps, nl, 3.0)
        exp = reference.sample_tokens_ref(lg.cpu(), temp.cpu(), 5, seeds.cpu(), steps.cpu(), null_logits=nl.cpu(),
                                          cfg_coef=3.0)  # fmt: skip
        assert torch.equal(got, exp), f"{lg.dtype} logits, {nl.dtype} null: {got.tolist()} vs {exp.tolist()}"


def _check_frequencies(tokens, probs, label):
    n = tokens.numel()
    freq = torch.bincount(tokens, minlength=probs.numel()).double() / n
    cos = torch.nn.functional.cosine_similarity(freq, probs.double(), dim=0)
    assert cos > 0.999, f"{label}: cosine {cos:.5f}"
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    z = ((freq - probs.double()).abs() / se.clamp_min(1e-12))[probs > 0]
    assert float(z.max()) < 5.0, f"{label}: a token frequency is {float(z.max()):.1f} standard errors off"
    assert bool((freq[probs == 0] == 0).all()), f"{label}: drew a token outside the top-k set"


# Not cuda_emu (65536 emulated rows would take minutes): the emulated kernel draws the reference's own tokens
# (test_matches_reference), whose distribution the first half of this test checks over 2^20 draws.
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "cuda_emu"])
def test_distribution_matches_renormalised_top_k(backend):
    device = kernel_device(backend)
    V, top_k, t, rows = 64, 10, 0.8, 4096
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(V, generator=g) * 1.5
    keep = torch.zeros(V, dtype=torch.bool)
    keep[logits.topk(top_k).indices] = True
    probs = torch.where(keep, torch.softmax(logits / t, -1), 0.0)
    probs = probs / probs.sum()
    seeds = torch.arange(rows) * 1_000_003 + 12345
    temp = torch.full((rows,), t)
    batch = logits.expand(rows, V).contiguous()

    # 2^20 draws of the reference's formula (score = p / -log(u) over the kept set), vectorised over (seed, step)
    draws = []
    for chunk in range(8):
        pairs = torch.arange(chunk * 2**17, (chunk + 1) * 2**17)
        u = reference.sampling_uniform_ref(seeds[pairs % rows], pairs // rows, V)
        draws.append(torch.where(keep, torch.softmax(logits / t, -1) / -torch.log(u), -1.0).argmax(-1))
    _check_frequencies(torch.cat(draws), probs, "reference noise, 2^20 draws")

    steps = 256 if device.type == "cuda" else 16  # 2^20 draws on a GPU, 2^16 in the interpreter (~4 s)
    fn = resolve("sample_tokens", backend, device)
    args = [x.to(device) for x in (batch, temp)]
    draws = [fn(*args, top_k, seeds.to(device), torch.full((rows,), s, device=device)).cpu() for s in range(steps)]
    _check_frequencies(torch.cat(draws), probs, f"{backend}, {steps * rows} draws")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replay_reproduces(backend):
    """Captured once, replayed: same tokens for the same (seed, step); new steps written in place change them."""
    device = kernel_device(backend)
    logits, null, temp, seeds, steps = _inputs(64, 8001, device, cfg=True)
    fn = resolve("sample_tokens", backend, device)
    out = torch.empty(64, dtype=torch.int64, device=device)
    fn(logits, temp, 250, seeds, steps, null_logits=null, cfg_coef=2.0, out=out)  # warm-up / compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(logits, temp, 250, seeds, steps, null_logits=null, cfg_coef=2.0, out=out)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert torch.equal(out, first)
    exp = reference.sample_tokens_ref(logits, temp, 250, seeds, steps, null_logits=null, cfg_coef=2.0)
    assert (out == exp).float().mean() > 0.98
    steps += 1
    graph.replay()
    assert not torch.equal(out, first)


# ---- top-k threshold search (radix search over order keys) ----------------------------------------------------------


def _order_key(x: torch.Tensor) -> torch.Tensor:
    """The kernels' order-preserving int32 image of fp32 values (-0 and +0, equal as floats, share +0's key)."""
    b = torch.where(x == 0, 0, x.float().contiguous().view(torch.int32))
    return torch.where(b >= 0, b, b ^ 0x7FFFFFFF)


def _threshold_inputs(B, V, dtype, seed, huge=True):
    """Rows that stress the search: wide and narrow ranges, adjacent floats, ties, subnormals, -inf, all-equal, and
    (``huge``) values up to 3e38, whose softmax overflows (the threshold stays exact; sampling needs finite x / t)."""
    g = torch.Generator().manual_seed(seed)
    tiny = {torch.float32: 1e-40, torch.bfloat16: 1e-36, torch.float16: 1e-6}[dtype]
    wide = torch.randn(V, generator=g).sign() * torch.rand(V, generator=g) ** 8 * (3e38 if huge else 30.0)
    rows = [
        torch.randn(V, generator=g) * 3,
        (torch.randn(V, generator=g) * 3).round(),  # many ties at any threshold
        1.0 + torch.randint(0, 64, (V,), generator=g) * 2.0**-23,  # adjacent floats (bf16/fp16: ties)
        # fp32/fp16 subnormals; bf16: tiny normals (the interpreter's bf16 -> fp32 cast mishandles bf16 subnormals)
        (torch.randn(V, generator=g).abs() + 0.1) * torch.randn(V, generator=g).sign() * tiny,
        torch.where(torch.rand(V, generator=g) < 0.5, float("-inf"), torch.randn(V, generator=g)),
        torch.full((V,), -3.5),  # all equal
        wide,
        torch.where(torch.rand(V, generator=g) < 0.9, -1e30, torch.randn(V, generator=g)),  # very negative
    ]
    x = torch.stack([rows[i % len(rows)] for i in range(B)])
    if dtype != torch.float32:  # bf16/fp16 images; fp16 overflows to +-inf, which is fine for the search
        x = x.to(dtype)
    return x


def _expected_kth_key(x, k):
    """k[b]-th largest key of row b, by torch.topk on the keys."""
    keys = _order_key(x)
    return torch.stack([keys[b].topk(int(k[b])).values[-1] for b in range(x.shape[0])])


def _many_k(x, V):
    """Every row kind of ``x`` with each of several k, from 1 to V - 1: (rows, k)."""
    ks = torch.tensor([1, 2, 17, V // 2, V - 1], dtype=torch.int32)
    return x.repeat(len(ks), 1), ks.repeat_interleave(x.shape[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1000, 8001])
def test_kth_largest_key_is_topk_kth_value(dtype, V):
    """The search returns exactly the k-th largest key (torch.topk on the keys; the value agrees with topk on the
    floats), for many k, on every row kind, with the sampler's radix for V (16, 8) and narrow keys for bf16/fp16."""
    from dsm_kernels.sampling import kth_largest_key_triton

    x, k = _many_k(_threshold_inputs(8, V, dtype, seed=V), V)
    shift = {torch.float32: 0, torch.bfloat16: 16, torch.float16: 13}[dtype]
    got = kth_largest_key_triton(x.to(kernel_device("triton")), k).cpu()
    exp = _expected_kth_key(x, k) >> shift
    assert torch.equal(got, exp), f"rows {(got != exp).nonzero()[:, 0].tolist()}"
    # as a value: the k-th largest float
    val = x.float().gather(1, (_order_key(x) >> shift == got[:, None]).int().argmax(-1, keepdim=True))[:, 0]
    assert torch.equal(val, torch.stack([r.topk(int(kk)).values[-1] for r, kk in zip(x.float(), k, strict=True)]))


def test_kth_largest_key_any_radix():
    """Smaller radixes (more passes, as for very large V) find the same threshold."""
    from dsm_kernels.sampling import kth_largest_key_triton

    for radix in (2, 4, 8):
        for dtype in (torch.float32, torch.bfloat16):
            x, k = _many_k(_threshold_inputs(8, 300, dtype, seed=radix), 300)
            shift = 16 if dtype == torch.bfloat16 else 0
            assert torch.equal(kth_largest_key_triton(x, k, radix=radix), _expected_kth_key(x, k) >> shift), radix


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_keys_select_the_same_threshold(dtype):
    """bf16/fp16 logits: the 16-bit (13-bit) key search picks the same threshold, and so the same kept set, as the
    32-bit search over the same values."""
    from dsm_kernels.sampling import kth_largest_key_triton

    x, k = _many_k(_threshold_inputs(8, 2048, dtype, seed=7), 2048)
    shift = 16 if dtype == torch.bfloat16 else 13
    keys = _order_key(x)
    narrow = kth_largest_key_triton(x, k)
    wide = kth_largest_key_triton(x, k, key_shift=0)
    assert torch.equal(narrow, wide >> shift)
    assert torch.equal(keys >> shift >= narrow[:, None], keys >= wide[:, None])


def test_narrow_keys_are_exact_and_order_preserving():
    """Over every finite bf16 and fp16 value: the fp32 image's low 16 (13) bits are zero and key >> 16 (13) is strictly
    increasing with the value, so the narrow search is exact; the launch picks it only without CFG."""
    import triton.language as tl

    from dsm_kernels.sampling import _key_shift, _passes

    for dtype, shift in ((torch.bfloat16, 16), (torch.float16, 13)):
        v = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).float()
        v = v[v.isfinite()].unique()  # sorted, -0 == +0 merged
        bits = v.view(torch.int32)
        assert bool((bits & ((1 << shift) - 1) == 0).all())
        k = _order_key(v) >> shift
        assert bool((k[1:] > k[:-1]).all())
    assert _key_shift(tl.bfloat16, False) == 16 and _key_shift(tl.float16, False) == 13
    assert _key_shift(tl.bfloat16, True) == _key_shift(tl.float16, True) == _key_shift(tl.float32, False) == 0
    # pass counts: the least n with R**n >= the key range (2**32, 2**16, 2**19)
    assert [_passes(16, s) for s in (0, 16, 13)] == [8, 4, 5] and [_passes(8, s) for s in (0, 16, 13)] == [11, 6, 7]
    for r in (2, 4, 8, 16):
        for s in (0, 13, 16):
            n = _passes(r, s)
            assert r**n >= 2 ** (32 - s) > r ** (n - 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,cfg", [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False),
                                       (torch.bfloat16, True)])  # fmt: skip
@pytest.mark.parametrize("V", [1000, 2048])
def test_edge_cases_match_threshold_semantics(backend, dtype, cfg, V):
    """Tie-heavy, -inf, very negative and all-equal rows, k = 1 and k = V - 1, V not a power of two: tokens equal
    the vectorised reference that keeps every token >= the k-th value (ties included), up to near-tie scores."""
    device = kernel_device(backend)
    B = 8
    x = _threshold_inputs(B, V, dtype, seed=V + 1, huge=False)
    null = (torch.randn(B, V) * 3).to(dtype) if cfg else None
    g = torch.Generator().manual_seed(V)
    temp = torch.rand(B, generator=g) * 4 + 0.5
    seeds, steps = torch.randint(0, 2**40, (B,), generator=g), torch.randint(0, 2**30, (B,), generator=g)
    for top_k in (1, 50, V - 1):
        got = _run(backend, device, *(a.to(device) for a in (x, temp)), top_k, seeds.to(device), steps.to(device),
                   None if null is None else null.to(device), 1.5)  # fmt: skip
        exp = sample_tokens_torch(x, temp, top_k, seeds, steps, null_logits=null, cfg_coef=1.5)
        mixed = _mixed(x, null, 1.5)
        kth = mixed.topk(top_k, dim=-1).values[:, -1]
        assert bool((mixed.gather(1, got[:, None])[:, 0] >= kth).all()), f"k={top_k}: a sample outside the top-k"
        for b in (got != exp).nonzero()[:, 0].tolist():
            p = torch.softmax(mixed[b] / temp[b].item(), -1)
            score = p / -torch.log(reference.sampling_uniform_ref(seeds[b : b + 1], steps[b : b + 1], V)[0])
            rel = (score[exp[b]] - score[got[b]]).abs() / score[exp[b]]
            assert rel < 1e-5, f"k={top_k} row {b}: kernel {got[b]} vs {exp[b]}, score gap {rel:.3g}"


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [2049, 8001])
def test_nan_and_inf_rows_give_ids_in_the_vocabulary(backend, dtype, V):
    """A row with NaN or infinite logits (a diverged stream) gets a token id in [0, V): the next step's embedding
    gather reads that id unchecked, and one past the table would read out of bounds for the whole process. Which id
    is backend-defined (the reference's torch.topk and argmax order NaN their own way)."""
    device = kernel_device(backend)
    B = 8
    x = torch.randn(B, V)
    x[0] = float("nan")
    x[1, V // 2] = float("nan")
    x[2] = float("-inf")
    x[3, 7] = float("inf")
    x[4] = float("inf")
    x[5, 9] = float("nan")
    x[6, V - 1] = float("nan")
    temp = torch.tensor([1.0, 0.7, 1.0, 1.0, 1.0, 0.0, 0.0, 0.5])
    seeds, steps = torch.arange(B), torch.zeros(B, dtype=torch.long)
    for top_k in (0, 1, 250):
        got = _run(backend, device, x.to(dtype).to(device), temp.to(device), top_k, seeds.to(device),
                   steps.to(device)) if backend != "reference" else resolve("sample_tokens", "reference", device)(
                       x.to(dtype), temp, top_k, seeds, steps)  # fmt: skip
        assert bool(((got >= 0) & (got < V)).all()), f"top_k={top_k}: ids out of range: {got.tolist()}"


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("top_k", [0, 1, 250])
def test_a_tiny_temperature_is_its_limit_greedy(backend, top_k):
    """A temperature so small that max(x) / t overflows: the argmax, its limit as t -> 0 (the softmax of inf - inf
    was NaN: the CUDA kernel then drew token 0, outside the top-1 set, and the three backends disagreed). A small
    temperature that does not overflow still samples, as before."""
    device = kernel_device(backend)
    B, V = 6, 2049
    x = torch.randn(B, V, generator=torch.Generator().manual_seed(3)) * 3
    x[:, 7] = 20.0
    x[3:] = -x[3:].abs() - 1  # the max is negative in these rows: max(x) / t overflows to -inf
    x[3:, 9] = -0.25
    temp = torch.tensor([1e-38, 1e-44, 1e-30, 1e-38, 1e-44, 1e-45])
    seeds, steps = torch.arange(B), torch.zeros(B, dtype=torch.long)
    if backend == "reference":
        got = resolve("sample_tokens", "reference", device)(x, temp, top_k, seeds, steps)
    else:
        got = _run(backend, device, x.to(device), temp.to(device), top_k, seeds.to(device), steps.to(device))
    assert got.tolist() == x.argmax(-1).tolist() == [7, 7, 7, 9, 9, 9], got.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_of_one_never_wins(backend):
    """24 bits of 1s make u = (2^24 - 0.5) / 2^24, which rounds to 1.0 in fp32: -log(u) = -0.0 and the reference's
    score p / -0.0 is -inf, so that token never wins. (Triton's unary minus is 0 - x, +0.0 here: a score of +inf,
    a token drawn whatever its probability.)"""
    device = kernel_device(backend)
    V, hit = 2049, 2013  # (seed 1, step 915954746) draws u == 1.0 at token 2013
    seeds, steps = torch.tensor([1, 1]), torch.tensor([915954746, 915954746])
    assert float(reference.sampling_uniform_ref(seeds, steps, V)[0, hit]) == 1.0
    x = torch.linspace(-1.0, 1.0, V).expand(2, V).clone()  # no ties: the top-k sets agree
    x[:, hit], x[:, 0] = -30.0, -40.0  # probability ~1e-16, kept by top-k V - 1
    temp = torch.tensor([1.0, 0.5])
    for top_k in (0, V - 1):
        got = _run(backend, device, x.to(device), temp.to(device), top_k, seeds.to(device), steps.to(device))
        exp = reference.sample_tokens_ref(x, temp, top_k, seeds, steps)
        assert hit not in exp.tolist() and torch.equal(got, exp), (top_k, got.tolist(), exp.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_signed_zeros_tie_at_the_threshold(backend, dtype):
    """-0 and +0 compare equal: with the k-th largest logit at zero, every zero of either sign is kept (a tie, as the
    vectorised reference keeps ``x >= kth``), not only the +0 ones."""
    device = kernel_device(backend)
    B, V = 64, 9
    row = torch.tensor([0.5, 0.0, -0.0, 0.0, -0.0, -0.0, -3.0, -4.0, 0.25])  # top 3: 0.5, 0.25 and a zero
    x = row.expand(B, V).contiguous().to(dtype)
    temp, seeds, steps = torch.ones(B), torch.arange(B) * 7 + 1, torch.arange(B)
    got = _run(backend, device, x.to(device), temp.to(device), 3, seeds.to(device), steps.to(device))
    exp = sample_tokens_torch(x, temp, 3, seeds, steps)
    assert {2, 4, 5} & set(exp.tolist()), "the -0 tokens must win some draws"
    assert torch.equal(got, exp), f"rows {(got != exp).nonzero()[:, 0].tolist()}: {got.tolist()} vs {exp.tolist()}"
