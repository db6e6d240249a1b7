"""The fused glue of a temporal decode step (add + RMSNorm, RoPE of q/k, SiLU gate): every backend against its
reference op on fresh random inputs.

Tolerance: fp32 within 1e-5 relative (reduction order differs); bf16 within 3x the reference's own bf16 error
against an fp32 reference on the same (bf16-rounded) inputs, plus one bf16 ulp of the value (the interpreter's
fp32 -> bf16 cast truncates).
"""

import pytest
import torch

from dsm_kernels import reference, resolve
from dsm_kernels.testing import (
    aot_compile,
    aot_script_main,
    kernel_device,
    max_abs_err,
    poison_,
    strided,
)

BACKENDS = [pytest.param("triton"), pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16]


def _check(got, lp_ref, f32_ref, dtype, name):
    got, lp_ref, f32_ref = got.float().cpu(), lp_ref.float().cpu(), f32_ref.float().cpu()
    assert not torch.isnan(got).any(), f"{name}: NaN (unwritten output?)"
    if dtype == torch.float32:
        tol = 1e-5 * f32_ref.abs().max().item() + 1e-6
        assert max_abs_err(got, f32_ref) <= tol, f"{name}: {max_abs_err(got, f32_ref):.3g} > {tol:.3g}"
        return
    ref_err = (lp_ref - f32_ref).abs()
    bound = 3 * ref_err.max().item() + 2.0**-7 * f32_ref.abs() + 1e-6
    bad = (got - f32_ref).abs() > bound
    assert not bad.any(), f"{name}: {int(bad.sum())} elements off, max err {max_abs_err(got, f32_ref):.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,D,delta,scale", [(1, 2048, False, False), (3, 2048, True, False), (5, 2560, True, True),
                                             (2, 100, True, True), (64, 1024, True, False)])  # fmt: skip
def test_add_rms_norm(backend, dtype, B, D, delta, scale):
    dev = kernel_device(backend)
    g = torch.Generator().manual_seed(B * 7 + D)
    x = (3 * torch.randn(B, D, generator=g)).to(dtype)
    dl = torch.randn(B, D, generator=g).to(dtype) if delta else None
    sc = (0.1 + torch.rand(D, generator=g)).to(dtype) if scale else None
    alpha = (0.5 + torch.rand(1, 1, D, generator=g)).to(dtype)
    eps = 1e-8
    x_lp, y_lp = reference.add_rms_norm_ref(x.clone(), alpha, eps, delta=dl, scale=sc)
    up = (lambda t: None if t is None else t.double())  # noqa: E731
    x_64, y_64 = reference.add_rms_norm_ref(x.double(), alpha.double(), eps, delta=up(dl), scale=up(sc))

    fn = resolve("add_rms_norm", backend, dev)
    xd = x.to(dev)
    out = poison_(torch.empty(B, D, dtype=dtype, device=dev))
    move = (lambda t: None if t is None else t.to(dev))  # noqa: E731
    x_got, y_got = fn(xd, alpha.to(dev), eps, delta=move(dl), scale=move(sc), out=out)
    assert y_got.data_ptr() == out.data_ptr() and x_got.data_ptr() == xd.data_ptr()
    _check(x_got, x_lp, x_64, dtype, "x")
    _check(y_got, y_lp, y_64, dtype, "y")


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_rms_norm_rounds_the_scaled_delta_like_the_reference(backend):
    # fp16 (the interpreter rounds it to nearest): the residual equals the reference's bit for bit only if
    # scale * delta is rounded to fp16 before the add, as the reference and the module do
    dev = kernel_device(backend)
    g = torch.Generator().manual_seed(3)
    x, dl = (torch.randn(4, 256, generator=g).half() for _ in range(2))
    sc, alpha = (0.1 + torch.rand(256, generator=g)).half(), torch.ones(256).half()
    exp = reference.add_rms_norm_ref(x.clone(), alpha, 1e-8, delta=dl, scale=sc)[0]
    got = resolve("add_rms_norm", backend, dev)(x.to(dev), alpha.to(dev), 1e-8, delta=dl.to(dev), scale=sc.to(dev))[0]
    assert torch.equal(got.cpu(), exp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Hkv,D,max_pos", [(1, 16, 16, 128, 10), (3, 20, 20, 128, 3000), (4, 8, 2, 64, 100000),
                                                (2, 3, 3, 16, 7)])  # fmt: skip
def test_rope_append_kv_rotation(backend, dtype, B, H, Hkv, D, max_pos):
    """The rotation of q (returned) and k (read back from its cache row) against the reference's own error in
    ``dtype``; v is copied exactly."""
    dev = kernel_device(backend)
    g = torch.Generator().manual_seed(B + H + D)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, generator=g).to(dtype)
    pos = torch.randint(0, max_pos, (B,), generator=g)
    pos[0] = max_pos - 1
    inv_freq = torch.exp(torch.arange(D // 2, dtype=torch.float32) * (-torch.log(torch.tensor(1e4)) * 2 / D))
    q_lp, k_lp = reference.rope_qk_ref(qkv, pos, inv_freq, H, Hkv)
    q_64, k_64 = reference.rope_qk_ref(qkv.double(), pos, inv_freq.double(), H, Hkv)

    page = 4  # row b writes page b, offset 0
    kc, vc = (poison_(torch.empty(B, page, Hkv, D, dtype=dtype, device=dev)) for _ in range(2))
    out = poison_(torch.empty(B, H, D, dtype=dtype, device=dev))
    q = resolve("rope_append_kv", backend, dev)(qkv.to(dev), pos.to(dev), inv_freq.to(dev), kc, vc,
                                                 (torch.arange(B) * page).to(dev), H, Hkv, out=out)  # fmt: skip
    k = kc[:, 0]
    # fp32 angles of large positions: cos/sin of the same fp32 angle, so the fp32 reference is the bound
    q_32, k_32 = reference.rope_qk_ref(qkv.float(), pos, inv_freq, H, Hkv)
    for got, lp, f32, f64, name in ((q, q_lp, q_32, q_64, "q"), (k, k_lp, k_32, k_64, "k")):
        _check(got, lp, f32 if dtype == torch.float32 else f64, dtype, name)
    assert torch.equal(vc[:, 0].cpu(), qkv[:, (H + Hkv) * D :].view(B, Hkv, D))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("B,H,Hkv,D,page", [(1, 16, 16, 128, 16), (5, 4, 2, 64, 8), (3, 3, 3, 16, 4)])
def test_rope_append_kv(backend, cache_dtype, B, H, Hkv, D, page):
    """q rotated as rope_qk_ref, k and v written into their slots' pages (slot -1: untouched), against the reference
    on the same bf16 inputs: the caches hold the same values up to one ulp of the stored dtype."""
    dev = kernel_device(backend)
    g = torch.Generator().manual_seed(B * 13 + D + page)
    qkv = (4 * torch.randn(B, (H + 2 * Hkv) * D, generator=g)).bfloat16()
    pos = torch.randint(0, 50_000, (B,), generator=g)
    inv_freq = torch.exp(torch.arange(D // 2, dtype=torch.float32) * (-9.210340371976184 * 2 / D))
    pages = 2 * B + 1
    slot = torch.randperm(pages * page, generator=g)[:B]
    if B > 1:
        slot[-1] = -1  # a row that writes nothing
    caches = [torch.randn(pages, page, Hkv, D, generator=g).to(cache_dtype) for _ in range(2)]
    exp_k, exp_v = (c.clone() for c in caches)
    exp_q = reference.rope_append_kv_ref(qkv, pos, inv_freq, exp_k, exp_v, slot, H, Hkv)

    k, v = (c.to(dev) for c in caches)
    out = poison_(torch.empty(B, H, D, dtype=torch.bfloat16, device=dev))
    q = resolve("rope_append_kv", backend, dev)(qkv.to(dev), pos.to(dev), inv_freq.to(dev), k, v, slot.to(dev), H,
                                                 Hkv, out=out)  # fmt: skip
    assert q.data_ptr() == out.data_ptr()
    ulp = 2.0**-7 if cache_dtype == torch.bfloat16 else 2.0**-3
    for got, exp, name in ((q, exp_q, "q"), (k, exp_k, "k_cache"), (v, exp_v, "v_cache")):
        got, exp = got.float().cpu(), exp.float()
        assert not torch.isnan(got).any(), name
        bad = (got - exp).abs() > ulp * exp.abs() + 1e-6
        assert not bad.any(), f"{name}: {int(bad.sum())} values off, max {float((got - exp).abs().max()):.3g}"
    written = set((slot[slot >= 0] // page).tolist())
    untouched = [p for p in range(pages) if p not in written]
    assert torch.equal(v.cpu()[untouched].float(), caches[1][untouched].float())  # other pages are left alone


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,F", [(1, 5632), (3, 6912), (7, 100), (64, 2048)])
def test_silu_mul(backend, dtype, B, F):
    dev = kernel_device(backend)
    g = torch.Generator().manual_seed(B * 3 + F)
    h = (2 * torch.randn(B, 2 * F, generator=g)).to(dtype)
    y_lp = reference.silu_mul_ref(h)
    y_64 = reference.silu_mul_ref(h.double())
    out = poison_(torch.empty(B, F, dtype=dtype, device=dev))
    y = resolve("silu_mul", backend, dev)(h.to(dev), out=out)
    assert y.data_ptr() == out.data_ptr()
    _check(y, y_lp, y_64, dtype, "silu_mul")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,heads,C,D", [(1, 4, 6, 2048), (3, 3, 5, 100), (64, 1, 2, 33)])
def test_head_probs(backend, dtype, B, heads, C, D):
    """The class-0 probabilities of stacked heads (stt-1b's VAD: 4 heads of 6 classes over d = 2048), against the
    reference run in fp64 (bf16: within 3x the bf16 reference's own error)."""
    dev = kernel_device(backend)
    g = torch.Generator().manual_seed(B + heads + C + D)
    x = torch.randn(B, D, generator=g).to(dtype)
    w = (torch.randn(heads * C, D, generator=g) * 3 * D**-0.5).to(dtype)
    p_lp = reference.head_probs_ref(x, w, heads)
    p_64 = torch.softmax(torch.nn.functional.linear(x.double(), w.double()).view(B, heads, C), -1)[..., 0]
    out = poison_(torch.empty(B, heads, dtype=torch.float32, device=dev))
    got = resolve("head_probs", backend, dev)(x.to(dev), w.to(dev), heads, out=out)
    assert got.data_ptr() == out.data_ptr()
    _check(got, p_lp, p_64, dtype, "head_probs")


def test_fused_reference_equals_module_path():
    """The reference ops compute exactly what dsm.layers does (bitwise, in bf16)."""
    from dsm.layers import LayerScale, Norm, apply_rope, rope_frequencies

    g = torch.Generator().manual_seed(0)
    d, H, D = 64, 4, 16
    norm, ls = Norm("rms_norm_f32", d), LayerScale(d)
    norm.alpha.data = (0.5 + torch.rand(1, 1, d, generator=g))
    ls.scale.data = torch.rand(d, generator=g)
    norm, ls = norm.bfloat16(), ls.bfloat16()
    x, delta = torch.randn(3, d, generator=g).bfloat16(), torch.randn(3, d, generator=g).bfloat16()
    x_mod = x + ls(delta)
    x_ref, y_ref = reference.add_rms_norm_ref(x.clone(), norm.alpha, norm.eps, delta=delta, scale=ls.scale)
    assert torch.equal(x_ref, x_mod) and torch.equal(y_ref, norm(x_mod))

    qkv = torch.randn(3, 3 * H * D, generator=g).bfloat16()
    pos = torch.tensor([0, 5, 1234])
    q, k = reference.rope_qk_ref(qkv, pos, rope_frequencies(D, 1e4, "cpu"), H, H)
    q_mod = apply_rope(qkv[:, : H * D].view(3, 1, H, D), pos[:, None], 1e4)[:, 0]
    k_mod = apply_rope(qkv[:, H * D : 2 * H * D].view(3, 1, H, D), pos[:, None], 1e4)[:, 0]
    assert torch.equal(q, q_mod) and torch.equal(k, k_mod)

    h = torch.randn(3, 2 * 40, generator=g).bfloat16()
    hv = h.view(3, 2, 40)
    assert torch.equal(reference.silu_mul_ref(h), torch.nn.functional.silu(hv[:, 0]) * hv[:, 1])


def test_triton_takes_strided_vectors():
    """alpha, scale, positions, inv_freq and slot_mapping as strided views (the checks and the reference take any
    layout): the Triton kernels read them at unit stride, so they must get them so."""
    dev = kernel_device("triton")
    g = torch.Generator().manual_seed(2)
    x, delta = torch.randn(3, 16, generator=g).to(dev), torch.randn(3, 16, generator=g).to(dev)
    alpha, scale = (strided(torch.randn(16, generator=g).to(dev), 0.0) for _ in range(2))
    x1, x2 = x.clone(), x.clone()
    _, y1 = resolve("add_rms_norm", "triton", dev)(x1, alpha, 1e-5, delta=delta, scale=scale)
    _, y2 = reference.add_rms_norm_ref(x2, alpha, 1e-5, delta=delta, scale=scale)
    _check(x1, x2, x2, torch.float32, "x")
    _check(y1, y2, y2, torch.float32, "y")
    H, Hkv, D = 2, 1, 8
    qkv = torch.randn(3, (H + 2 * Hkv) * D, generator=g).to(dev)
    pos, slot = strided(torch.tensor([3, 100, 7], device=dev), 0), strided(torch.tensor([1, -1, 9], device=dev), -1)
    inv = strided(torch.exp(torch.arange(D // 2, dtype=torch.float32) * -1.1).to(dev), 0.0)
    k1, v1, k2, v2 = (torch.zeros(4, 4, Hkv, D, device=dev) for _ in range(4))
    q1 = resolve("rope_append_kv", "triton", dev)(qkv, pos, inv, k1, v1, slot, H, Hkv)
    q2 = reference.rope_append_kv_ref(qkv, pos, inv, k2, v2, slot, H, Hkv)
    for got, exp, name in ((q1, q2, "q"), (k1, k2, "k_cache"), (v1, v2, "v_cache")):
        _check(got, exp, exp, torch.float32, name)


def test_triton_aot_compiles_for_sm90(aot_output):
    """The kernels compile for an H100 (the interpreter accepts code that the GPU compiler rejects)."""
    assert aot_output(__file__).count("cubin") == 5


def _aot() -> None:
    from dsm_kernels.fused import _add_rms_norm_kernel, _head_probs_kernel, _rope_append_kernel, _silu_mul_kernel

    bf = "*bf16"
    cases = [
        (_add_rms_norm_kernel, {"x_ptr": bf, "d_ptr": bf, "s_ptr": bf, "a_ptr": bf, "y_ptr": bf, "eps": "fp32"},
         {"HAS_DELTA": True, "HAS_SCALE": True, "BLOCK": 4096}, 8),
        (_silu_mul_kernel, {"h_ptr": bf, "o_ptr": bf}, {"BLOCK": 1024}, 4),
        (_head_probs_kernel, {"x_ptr": bf, "w_ptr": bf, "out_ptr": "*fp32"},
         {"BLOCK_H": 4, "BLOCK_C": 8, "BLOCK_D": 128}, 4),
    ]  # fmt: skip
    for cache, sat in ((bf, 0.0), ("*fp8e4nv", 448.0)):
        cases.append((_rope_append_kernel, {"qkv_ptr": bf, "pos_ptr": "*i64", "f_ptr": "*fp32", "slot_ptr": "*i64",
                                             "q_ptr": bf, "kc_ptr": cache, "vc_ptr": cache},
                      {"HALF": 64, "BLOCK": 64, "SAT": sat}, 2))  # fmt: skip
    for kernel, types, consts, warps in cases:
        cc = aot_compile(kernel, types, consts, num_warps=warps)
        assert "sm_90" in cc.asm["ptx"]
        print(f"{kernel.fn.__name__}: {len(cc.asm['cubin'])} B cubin")


if __name__ == "__main__":
    aot_script_main(_aot, __file__)
