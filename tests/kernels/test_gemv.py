"""The small-batch GEMV op (``dsm_kernels.gemv``; kernels in ``dsm_kernels.gemv_kernels``) against its reference
on fresh random inputs: every epilogue (plain, residual with and without scale, SiLU gate, GELU), with and without
the RMSNorm or LayerNorm prologue, 1..4 rows, sizes that are not powers of two. fp32: 1e-5 relative; bf16: within 3x the
reference's own bf16 error against fp32 (plus one bf16 ulp: the interpreter's bf16 stores truncate). Outputs are
poisoned first (NaN), so an unwritten element fails."""

from __future__ import annotations

import os

import pytest
import torch

import dsm_kernels
from dsm_kernels.reference import gemv_ref, qkv_rope_gemv_ref
from dsm_kernels.testing import poison_, strided

needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(B, N, K, *, norm, epi, scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, generator=g)
    w = torch.randn(2 * N if epi == "gate" else N, K, generator=g) * K**-0.5
    alpha = 1 + 0.1 * torch.randn(K, generator=g) if norm else None
    beta = 0.1 * torch.randn(K, generator=g) if norm == "layer" else None
    res = torch.randn(B, N, generator=g) if epi == "residual" else None
    sc = 0.3 * torch.randn(N, generator=g) if scale else None

    def on(dt, dev):
        def c(t):
            return None if t is None else t.to(dev, dt)

        kw = dict(alpha=c(alpha), beta=c(beta), eps=1e-5, residual=c(res), scale=c(sc), gate=epi == "gate",
                  gelu=epi == "gelu")
        return c(x), c(w), kw

    return on


def _run(fn, x, w, kw):
    if kw["residual"] is not None:
        kw = dict(kw, residual=kw["residual"].clone())
        out = fn(x, w, **kw)
        assert out.data_ptr() == kw["residual"].data_ptr(), "the residual is updated in place"
        return out
    n = w.shape[0] // 2 if kw["gate"] else w.shape[0]
    out = poison_(torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device))
    assert fn(x, w, **kw, out=out) is out
    return out


def _rel(a, b):
    assert torch.isfinite(a).all(), "NaN/inf never passes"
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


CASES = [  # (B, N, K, norm prologue, epilogue, scale)
    (1, 64, 128, "rms", "none", False),
    (3, 100, 72, None, "none", False),
    (2, 96, 160, None, "residual", True),
    (4, 80, 64, "rms", "residual", False),
    (1, 48, 200, "rms", "gate", False),
    (4, 40, 96, None, "gate", False),
    (2, 72, 96, "layer", "none", False),  # the cross-attention query
    (1, 64, 80, "layer", "residual", True),
    (2, 88, 64, "layer", "gelu", False),  # Mimi's FFN input
    (3, 40, 48, None, "gelu", False),
]
IDS = [f"B{c[0]}-{c[4]}{'-' + c[3] if c[3] else ''}" for c in CASES]


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fp32_matches_reference(case):
    B, N, K, norm, epi, scale = case
    x, w, kw = _case(B, N, K, norm=norm, epi=epi, scale=scale, dtype=torch.float32, seed=B * N + K)(torch.float32,
                                                                                                      DEVICE)
    exp = _run(gemv_ref, x.cpu(), w.cpu(), {k: v.cpu() if torch.is_tensor(v) else v for k, v in kw.items()})
    got = _run(lambda *a, **k: dsm_kernels.gemv(*a, **k, backend="triton"), x, w, kw).cpu()
    assert got.shape == exp.shape
    assert _rel(got, exp) < 1e-5


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bf16_within_3x_reference_error(case):
    B, N, K, norm, epi, scale = case
    make = _case(B, N, K, norm=norm, epi=epi, scale=scale, dtype=torch.bfloat16, seed=7 + B * N + K)
    exp32 = _run(gemv_ref, *make(torch.float32, "cpu"))
    lp = _run(gemv_ref, *make(torch.bfloat16, "cpu"))
    got = _run(lambda *a, **k: dsm_kernels.gemv(*a, **k, backend="triton"), *make(torch.bfloat16, DEVICE)).cpu()
    ref_err = (lp.double() - exp32.double()).abs()
    err = (got.double() - exp32.double()).abs()
    assert torch.isfinite(got).all()
    bound = 3 * ref_err.max() + 2.0**-7 * exp32.double().abs()
    assert bool((err <= bound).all()), (float(err.max()), float(ref_err.max()))


@needs_triton
def test_rejects_what_it_cannot_run():
    from dsm_kernels.gemv_kernels import GEMV_MAX_B, gemv_triton

    x, w = torch.randn(GEMV_MAX_B + 1, 16, device=DEVICE), torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="rows"):
        gemv_triton(x, w)
    with pytest.raises(ValueError, match="weight"):
        gemv_triton(x[:1], w[:, :8])
    with pytest.raises(ValueError, match="residual"):
        gemv_triton(x[:1], w, residual=torch.zeros(1, 9, device=DEVICE))
    with pytest.raises(ValueError, match="GELU"):
        gemv_triton(x[:1], w, gelu=True, gate=True)
    with pytest.raises(ValueError, match="residual"):  # its sum would be rounded to x's dtype, not the residual's
        gemv_triton(x[:1].bfloat16(), w.bfloat16(), residual=torch.zeros(1, 8, device=DEVICE))


@needs_triton
def test_strided_vectors_and_out():
    """alpha, beta, scale, bias, positions, inv_freq and slot_mapping as strided views (the checks and the reference
    take any layout): the kernels read them at unit stride, so they must get them so; an ``out`` whose rows are not
    contiguous is refused, not written at the wrong place."""
    g = torch.Generator().manual_seed(4)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    x, w, res = r(2, 16), r(6, 16), r(2, 6)
    kw = dict(alpha=strided(r(16), 0.0), beta=strided(r(16), 0.0), eps=1e-5, scale=strided(r(6), 0.0))
    got = dsm_kernels.gemv(x, w, residual=res.clone(), **kw, backend="triton")
    assert _rel(got, gemv_ref(x, w, residual=res.clone(), **kw)) < 1e-5
    H, Hkv, D = 2, 1, 8
    wq, alpha = r((H + 2 * Hkv) * D, 16), strided(r(16), 0.0)
    pos = strided(torch.tensor([3, 100], device=DEVICE), 0)
    slot = strided(torch.tensor([1, 9], device=DEVICE), -1)
    inv = strided(torch.exp(torch.arange(D // 2, dtype=torch.float32, device=DEVICE) * -1.1), 0.0)
    k1, v1, k2, v2 = (torch.zeros(4, 4, Hkv, D, device=DEVICE) for _ in range(4))
    q1 = dsm_kernels.qkv_rope_gemv(x, wq, alpha, 1e-5, pos, inv, k1, v1, slot, H, Hkv, backend="triton")
    q2 = qkv_rope_gemv_ref(x, wq, alpha, 1e-5, pos, inv, k2, v2, slot, H, Hkv)
    assert _rel(q1, q2) < 1e-5 and _rel(k1, k2) < 1e-5 and _rel(v1, v2) < 1e-5
    wide = torch.zeros(2, H + 1, D, device=DEVICE)[:, :H]  # rows H + 1 heads apart
    with pytest.raises(ValueError, match="out"):
        dsm_kernels.qkv_rope_gemv(x, wq, alpha, 1e-5, pos, inv, k1, v1, slot, H, Hkv, out=wide, backend="triton")
    xc, wc, bias = r(1, 3, 5), r(4, 3, 2), strided(r(4), 0.0)
    got = dsm_kernels.conv1d_gemv(xc, wc, bias, backend="triton")
    assert _rel(got, torch.nn.functional.conv1d(xc, wc, bias)) < 1e-5


def test_reference_is_the_module_path():
    """The reference computes what the model's modules do: RMSNorm (or LayerNorm), linear, then the residual add or
    the gate."""
    from dsm.layers import Norm

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 32, generator=g).bfloat16(), torch.randn(24, 32, generator=g).bfloat16()
    norm = Norm("rms_norm_f32", 32).bfloat16()
    with torch.no_grad():
        norm.alpha.copy_(1 + 0.1 * torch.randn(norm.alpha.shape, generator=g))
        res = torch.randn(2, 24, generator=g).bfloat16()
        exp = res + torch.nn.functional.linear(norm(x), w)
        got = gemv_ref(x, w, alpha=norm.alpha, eps=norm.eps, residual=res.clone())
        ln = Norm("layer_norm", 32).bfloat16()
        ln.weight.copy_(1 + 0.1 * torch.randn(32, generator=g))
        ln.bias.copy_(0.1 * torch.randn(32, generator=g))
        exp_ln = torch.nn.functional.linear(ln(x), w)
        got_ln = gemv_ref(x, w, alpha=ln.weight, beta=ln.bias, eps=ln.eps)
    assert torch.equal(got, exp) and torch.equal(got_ln, exp_ln)


ROPE_CASES = [  # (B, H, Hkv, D, K, cache dtype)
    (1, 4, 4, 32, 96, torch.float32),
    (3, 4, 2, 16, 64, torch.float32),
    (4, 2, 2, 64, 48, torch.bfloat16),
    (2, 3, 3, 16, 40, torch.float8_e4m3fn),
]


@needs_triton
@pytest.mark.parametrize("case", ROPE_CASES, ids=[f"B{c[0]}-H{c[1]}-kv{c[2]}-D{c[3]}-{c[5]}" for c in ROPE_CASES])
def test_qkv_rope_gemv_matches_reference(case):
    """Projection + RoPE + K/V write against ``qkv_rope_gemv_ref``: q and the written cache rows within fp32 1e-5
    relative (fp32), or one ulp of the stored dtype (bf16 model, bf16/fp8 caches); slot -1 and every other row of
    the caches untouched."""
    from dsm.layers import rope_frequencies

    B, H, Hkv, D, K, cache_dtype = case
    dtype = torch.float32 if cache_dtype == torch.float32 else torch.bfloat16
    g = torch.Generator().manual_seed(B * 31 + D)
    rows = (H + 2 * Hkv) * D
    x = (2 * torch.randn(B, K, generator=g)).to(dtype)
    w = (torch.randn(rows, K, generator=g) * K**-0.5).to(dtype)
    alpha = (1 + 0.1 * torch.randn(K, generator=g)).to(dtype)
    pos = torch.randint(0, 50_000, (B,), generator=g)
    inv_freq = rope_frequencies(D, 10_000.0, "cpu")
    page, pages = 4, 2 * B + 1
    slot = torch.randperm(pages * page, generator=g)[:B]
    if B > 1:
        slot[-1] = -1  # a row that writes nothing
    caches = [torch.randn(pages, page, Hkv, D, generator=g).to(cache_dtype) for _ in range(2)]
    exp_k, exp_v = (c.clone() for c in caches)
    exp_q = qkv_rope_gemv_ref(x, w, alpha, 1e-5, pos, inv_freq, exp_k, exp_v, slot, H, Hkv)
    k, v = (c.to(DEVICE) for c in caches)
    out = poison_(torch.empty(B, H, D, dtype=dtype, device=DEVICE))
    q = dsm_kernels.qkv_rope_gemv(x.to(DEVICE), w.to(DEVICE), alpha.to(DEVICE), 1e-5, pos.to(DEVICE),
                                  inv_freq.to(DEVICE), k, v, slot.to(DEVICE), H, Hkv, out=out, backend="triton")
    assert q.data_ptr() == out.data_ptr()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float8_e4m3fn: 2.0**-3}
    for got, exp, name in ((q, exp_q, "q"), (k, exp_k, "k_cache"), (v, exp_v, "v_cache")):
        got, exp = got.float().cpu(), exp.float()
        assert not torch.isnan(got).any(), name
        t = tol[dtype] if name == "q" else tol[cache_dtype]
        bad = (got - exp).abs() > t * exp.abs() + 1e-5
        assert not bad.any(), f"{name}: {int(bad.sum())} values off, max {float((got - exp).abs().max()):.3g}"
    written = set((slot[slot >= 0] // page).tolist())
    untouched = [p for p in range(pages) if p not in written]
    assert torch.equal(v.cpu()[untouched].float(), caches[1][untouched].float())


@needs_triton
@pytest.mark.parametrize("B", [1, 3])
def test_qkv_rope_gemv_layer_norm_into_a_ring(B):
    """Mimi's form of the op: a LayerNorm prologue, and caches that are its ring ``[rows, 2, H, slots, D]`` seen as
    ``[rows, slots, H, D]`` (strided heads), with a slot -1 row; the ring's other slots stay untouched."""
    from dsm.mimi_modules import rope_freqs

    H, D, K, S = 4, 16, 64, 10
    g = torch.Generator().manual_seed(B)
    x = 2 * torch.randn(B, K, generator=g)
    w = torch.randn(3 * H * D, K, generator=g) * K**-0.5
    alpha, beta = 1 + 0.1 * torch.randn(K, generator=g), 0.1 * torch.randn(K, generator=g)
    pos = torch.randint(0, 5000, (B,), generator=g)
    inv_freq = rope_freqs(D, 10_000.0, "cpu")[0, 0]
    slot = torch.arange(B) * S + torch.randint(0, S, (B,), generator=g)
    if B > 1:
        slot[1] = -1
    ring = torch.randn(B + 1, 2, H, S, D, generator=g)

    def run(cache, dev, fn):
        k, v = (cache[:, j].permute(0, 2, 1, 3) for j in range(2))
        out = poison_(torch.empty(B, H, D, device=dev))
        fn(x.to(dev), w.to(dev), alpha.to(dev), 1e-5, pos.to(dev), inv_freq.to(dev), k, v, slot.to(dev), H, H,
           beta=beta.to(dev), out=out)
        return out.cpu(), cache.cpu()

    exp_q, exp_ring = run(ring.clone(), "cpu", qkv_rope_gemv_ref)
    got_q, got_ring = run(ring.to(DEVICE), DEVICE, lambda *a, **k: dsm_kernels.qkv_rope_gemv(*a, **k,
                                                                                            backend="triton"))
    assert not torch.isnan(got_q).any()
    assert _rel(got_q, exp_q) < 1e-5 and _rel(got_ring, exp_ring) < 1e-5
    assert not torch.equal(exp_ring, ring), "the reference wrote k and v"
    touched = torch.zeros(B + 1, S, dtype=torch.bool)
    for s in slot[slot >= 0].tolist():
        touched[s // S, s % S] = True
    assert torch.equal(got_ring.permute(0, 3, 1, 2, 4)[~touched], ring.permute(0, 3, 1, 2, 4)[~touched])


CONV_CASES = [  # (B, C_in, C_out, KS, stride, dilation, T_in, bias): Mimi's deep SEANet convs and smaller odd ones
    (1, 64, 96, 16, 8, 1, 24, True),  # the encoder's last downsampling (T_out 2)
    (2, 40, 24, 3, 1, 1, 4, True),  # a k3 conv at two streams
    (1, 32, 48, 4, 2, 1, 4, False),  # the 12.5 Hz downsampling (T_out 1), no bias
    (1, 24, 40, 3, 1, 3, 10, True),  # dilated, T_out 4
    (4, 16, 8, 1, 1, 1, 1, False),  # a 1x1 projection at four streams
    (1, 24, 40, 12, 6, 1, 102, True),  # a 25->100 Hz stage's downsampling: 16 columns, 4 at a time
    (4, 16, 24, 3, 1, 1, 18, True),  # 64 columns (the most), four streams
    (3, 8, 12, 3, 1, 2, 9, False),  # 15 columns: the last group of 4 partly empty
]


@needs_triton
@pytest.mark.parametrize("case", CONV_CASES, ids=[f"B{c[0]}-k{c[3]}-s{c[4]}-d{c[5]}" for c in CONV_CASES])
def test_conv1d_gemv_matches_conv1d(case):
    from dsm_kernels.reference import conv1d_gemv_ref

    B, C, N, KS, S, dil, T, bias = case
    g = torch.Generator().manual_seed(B * C + KS)
    x = torch.randn(B, C, T, generator=g)
    w = torch.randn(N, C, KS, generator=g) * (C * KS) ** -0.5
    b = torch.randn(N, generator=g) if bias else None
    exp = conv1d_gemv_ref(x, w, b, S, dil)
    assert exp.shape[0] * exp.shape[2] <= 64
    out = poison_(torch.empty(exp.shape, device=DEVICE))
    got = dsm_kernels.conv1d_gemv(x.to(DEVICE), w.to(DEVICE), None if b is None else b.to(DEVICE), S, dil, out=out,
                                  backend="triton")  # fmt: skip
    assert got.data_ptr() == out.data_ptr()
    assert _rel(got.cpu(), exp) < 1e-5


@needs_triton
def test_conv1d_gemv_rejects_what_it_cannot_run():
    from dsm_kernels.gemv_kernels import conv1d_gemv_triton

    x, w = torch.randn(1, 8, 12, device=DEVICE), torch.randn(4, 8, 3, device=DEVICE)
    with pytest.raises(ValueError, match="output columns"):
        conv1d_gemv_triton(torch.randn(1, 8, 67, device=DEVICE), w)  # 65 columns
    with pytest.raises(ValueError, match="weight"):
        conv1d_gemv_triton(x[..., :4], w[:, :4])
    with pytest.raises(ValueError, match="bias"):
        conv1d_gemv_triton(x[..., :4], w, torch.zeros(5, device=DEVICE))


def test_triton_aot_compiles_for_sm90(aot_output):
    """The GEMV kernels at the shapes the models launch compile for an H100, with the weights requested before the
    PDL wait and nothing else: the temporal step's (bf16, stt-1b) and Mimi's transformer's (fp32, LayerNorm
    prologues, GELU)."""
    assert aot_output(__file__).count("cubin") == 2 * 5 + 4 + 2


# What a PDL kernel may read before its wait: weights and norm/scale/bias parameters, which no kernel of the step
# writes (activations, positions, slots, and the RoPE frequencies that the model builds on the device just before its
# first step may still be in flight from the kernels before it).
_PREWAIT_OK = {"w", "w0", "w1", "wv", "alpha", "beta", "sc", "bias"}


def _aot() -> None:
    import triton

    from dsm_kernels.gemv_kernels import _gemv_kernel, _qkv_rope_gemv_kernel, gemv_plan
    from dsm_kernels.testing import aot_compile, prewait_loads

    tl = triton.language
    for B in (1, 4):
        cases = []
        for name, N, K, norm, epi, dt in (("stt-1b ffn out", 2048, 5632, 0, 1, tl.bfloat16),
                                          ("mimi linear1", 2048, 512, 2, 3, tl.float32),
                                          ("mimi linear2", 512, 2048, 0, 1, tl.float32)):  # fmt: skip
            bn, kp, warps = gemv_plan(N, K, gate=epi == 2, sms=132, interp=False)
            cases.append((name, _gemv_kernel, warps, dt, {"NORM": norm, "EPI": epi, "HAS_SCALE": epi == 1, "BN": bn,
                                                          "KP": kp}))  # fmt: skip
        for name, rows, K, D, norm, dt in (("stt-1b qkv", 3 * 2048, 2048, 128, 1, tl.bfloat16),
                                           ("mimi qkv", 3 * 512, 512, 64, 2, tl.float32)):  # fmt: skip
            bn, kp, warps = gemv_plan(rows, K, sms=132, interp=False)
            cases.append((name, _qkv_rope_gemv_kernel, warps, dt, {"NORM": norm, "BH": max(bn, 2) // 2, "KP": kp,
                                                                   "D": D, "SAT": 0.0}))  # fmt: skip
        for label, kernel, warps, dt, consts in cases:
            consts = {"DT": dt, "BB": triton.next_power_of_2(B), "PDL": True, **consts}
            ptr = "*bf16" if dt == tl.bfloat16 else "*fp32"
            types = {n: ptr for n in kernel.arg_names if n.endswith("_ptr")}
            types |= {"eps": "fp32", "pos_ptr": "*i64", "slot_ptr": "*i64", "f_ptr": "*fp32"}
            divisible = [n for n in kernel.arg_names if n.endswith("_ptr") or n in ("K", "N", "LDX", "LDO")]
            cc = aot_compile(kernel, types, consts, num_warps=warps, divisible=divisible)
            ptx = cc.asm["ptx"]  # programmatic dependent launch: weights requested before the wait
            assert "sm_90" in ptx and len(cc.asm["cubin"]) > 0, label
            assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait") < ptx.index("st.global"), label
            assert prewait_loads(ptx) <= _PREWAIT_OK, (label, prewait_loads(ptx))
            print(f"{label} B={B}: {len(cc.asm['cubin'])} B cubin, {cc.metadata.shared} B smem")
    from dsm_kernels.gemv_kernels import _conv_gemv_kernel

    for name, N, C, KS, BB, elu in (("mimi encoder downsampling", 1024, 512, 16, 2, False),
                                    ("mimi decoder input", 1024, 512, 7, 2, False),
                                    ("mimi 16-column stage", 512, 256, 12, 4, False),
                                    ("mimi decoder transposed-conv taps of ELU", 512 * 16, 1024, 1, 2, True)):
        bn, kp, warps = gemv_plan(N, C * KS, sms=132, interp=False)
        consts = {"KS": KS, "HAS_BIAS": True, "BB": BB, "BN": bn, "KP": kp, "PDL": True, "ELU": elu, "EXACT_ELU": elu}
        types = {n: "*fp32" for n in _conv_gemv_kernel.arg_names if n.endswith("_ptr")}
        cc = aot_compile(_conv_gemv_kernel, types, consts, num_warps=warps)
        ptx = cc.asm["ptx"]
        assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait") < ptx.index("st.global"), name
        assert prewait_loads(ptx) <= _PREWAIT_OK, (name, prewait_loads(ptx))
        print(f"{name}: {len(cc.asm['cubin'])} B cubin, {cc.metadata.shared} B smem")
    # streaming convs reading their stored context in place, its other half written by extra programs (which wait
    # for the previous kernel too: they read its output)
    for name, N, C, KS, P, first in (("mimi decoder input, context", 1024, 512, 7, 6, False),
                                     ("mimi 12.5 Hz downsampling, context", 512, 512, 4, 2, True)):
        bn, kp, warps = gemv_plan(N, C * KS, sms=132, interp=False)
        consts = {"KS": KS, "HAS_BIAS": True, "BB": 1, "BN": bn, "KP": kp, "PDL": True, "CTX": True, "FIRST": first,
                  "BR": 1024 // triton.next_power_of_2(P), "BP": triton.next_power_of_2(P)}
        types = {n: "*fp32" for n in _conv_gemv_kernel.arg_names if n.endswith("_ptr")}
        types |= {"phase_ptr": "*i32", "mask_ptr": "*i1", "first_ptr": "*i1"}
        cc = aot_compile(_conv_gemv_kernel, types, consts, num_warps=warps)
        ptx = cc.asm["ptx"]
        assert ptx.count("griddepcontrol.wait") >= 2, name  # both kinds of program wait before reading x
        print(f"{name}: {len(cc.asm['cubin'])} B cubin, {cc.metadata.shared} B smem")


if __name__ == "__main__":
    from dsm_kernels.testing import aot_script_main

    aot_script_main(_aot, __file__)
