"""Triton depformer frame (``dsm_kernels.depformer``) against the reference loop on fresh random weights.

fp32: logits within 1e-5 relative, identical greedy and sampled tokens. bf16: the Triton error against the fp32
reference is at most 3x the reference's own bf16 error (interpreter bf16 stores truncate, so a little extra).
Shapes are small (interpreter speed); the real TTS shapes run under ``-m gpu``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import dsm_kernels
from dsm_kernels.reference import depformer_frame_ref
from dsm_kernels.testing import (
    aot_script_main,
    cast_depformer_weights,
    depformer_inputs,
    random_depformer_weights,
)

ROOT = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)


make_weights = random_depformer_weights
cast = cast_depformer_weights
inputs = depformer_inputs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "NaN/inf never passes"
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


def run_triton(w, args, **kw):
    from dsm_kernels.depformer import depformer_frame_triton

    return depformer_frame_triton(w, **args, return_logits=True, **kw)


CASES = {  # (schedule, layers, heads, batch, split, demux, head_norm)
    "q4-b1": ((0, 1, 2, 3), 1, 2, 1, None, True, False),
    "q8-b3-split2": ((0, 1, 2, 2, 3, 3, 3, 3), 2, 2, 3, 2, False, True),
    "q32-b3-split3": ((0,) * 4 + (1,) * 12 + (2,) * 16, 1, 4, 3, 3, True, False),  # dep_q 32, shared sets
}
# Greedy and sampled draws at every shape but dep_q 32, which is drawn sampled only: the temperature is a per-row
# branch of the sampler (the head's last program on the GEMV path), the same code at any codebook count, so greedy
# q32 ran the q8-b3 greedy case's branch again at 4x the codebooks (~17 s of the interpreter); the sampled q32 draw
# covers everything that depends on dep_q (32 attention positions, shared weight sets, tokens fed back).
TEMP_CASES = [(t, c) for c in CASES for t in ("greedy", "sampled") if (t, c) != ("greedy", "q32-b3-split3")]


@needs_triton
@pytest.mark.parametrize("path", ["gemv", "splitk"])
@pytest.mark.parametrize("temp,case", [pytest.param({"greedy": 0.0, "sampled": 0.8}[t], CASES[c], id=f"{t}-{c}")
                                       for t, c in TEMP_CASES])
def test_fp32_matches_reference(case, temp, path):
    schedule, layers, heads, B, split, demux, head_norm = case
    w = make_weights(schedule=schedule, layers=layers, heads=heads, demux=demux, head_norm=head_norm,
                     seed=len(schedule))
    args = inputs(w, B, temp=temp)
    tok_ref, lg_ref = depformer_frame_ref(w, **args, return_logits=True)
    tok, lg = run_triton(w, args, split=split, path=path)
    assert tok.shape == (B, len(schedule)) and tok.dtype == torch.int64
    assert torch.equal(tok, tok_ref), (tok, tok_ref)
    assert rel(lg, lg_ref) < 1e-5
    if temp > 0:  # the draw really samples (not argmax everywhere)
        assert not torch.equal(tok_ref, lg_ref.argmax(-1))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_splitk_attention_launch_equals_inline(dtype, monkeypatch):
    """Above ATTN_INLINE_ROWS rows the split-K path runs the attention as its own launch, every (head, row) at once:
    the same tokens as the reference, and the same bits as the QKV kernel's last program running it inline."""
    import dsm_kernels.depformer as dep

    w = make_weights(schedule=(0, 1, 2, 2, 3), layers=2, heads=2, seed=11)
    w = cast(w, dtype) if dtype != torch.float32 else w
    args = inputs(w, 6, temp=0.0)
    args["z"] = args["z"].to(dtype)
    tok, lg = run_triton(w, args, split=2, path="splitk")
    monkeypatch.setattr(dep, "ATTN_INLINE_ROWS", 6)
    tok_inline, lg_inline = run_triton(w, args, split=2, path="splitk")
    assert torch.equal(tok, tok_inline) and torch.equal(lg, lg_inline)
    if dtype == torch.float32:
        tok_ref, lg_ref = depformer_frame_ref(w, **args, return_logits=True)
        assert torch.equal(tok, tok_ref) and rel(lg, lg_ref) < 1e-5


@needs_triton
@pytest.mark.parametrize("path", ["gemv", "splitk"])
def test_bf16_error_within_3x_reference_error(path):
    w32 = make_weights(schedule=(0, 1, 1, 2, 2, 2), layers=2, heads=2, dim=64, hidden=96, card=64, seed=3)
    w16 = cast(w32, torch.bfloat16)
    args32 = inputs(w32, 3, temp=0.0)
    args16 = dict(args32, z=args32["z"].bfloat16())
    tok32, lg32 = depformer_frame_ref(w32, **args32, return_logits=True)
    tok16, lg16 = depformer_frame_ref(w16, **args16, return_logits=True)
    tok, lg = run_triton(w16, args16, split=2, path=path)
    # compare codebooks while all three chains were fed the same tokens
    same = (tok32 == tok16) & (tok16 == tok)
    n = int(same.all(dim=0).long().cumprod(0).sum()) + 1
    n = min(n, tok.shape[1])
    assert n >= 2
    ref_err = rel(lg16[:, :n], lg32[:, :n])
    assert ref_err > 0
    assert rel(lg[:, :n], lg32[:, :n]) <= 3 * ref_err + 1e-6, (rel(lg[:, :n], lg32[:, :n]), ref_err)


@needs_triton
def test_gemv_path_launches_per_codebook():
    """At small batch a codebook is 4 launches per layer and one for the head with its sampling (the head's last
    program samples), after one input projection for the frame: a count that grows is a slowdown on a GPU."""
    from dsm_kernels.testing import LaunchCounter

    w = make_weights(schedule=(0, 1, 2, 3), layers=2, heads=2, seed=4)
    args = inputs(w, 1, temp=0.8)
    with LaunchCounter() as c:
        run_triton(w, args, path="gemv")
    triton_launches = {k: v for k, v in c.counts.items() if k.startswith("triton:")}
    assert triton_launches == {"triton:_gemv_kernel": 1 + 4 * 2 * 3, "triton:_qkv_gemv_kernel": 4 * 2,
                               "triton:_head_sample_kernel": 4}, triton_launches  # fmt: skip


def test_dispatch_resolves():
    assert dsm_kernels.resolve("depformer_frame", None, "cpu") is depformer_frame_ref
    w = make_weights()
    args = inputs(w, 2, temp=0.0)
    assert torch.equal(dsm_kernels.depformer_frame(w, **args), depformer_frame_ref(w, **args))


def test_model_packing_matches_module_loop():
    """``LMModel.depformer_weights`` + the reference op give the module loop's tokens (folded low-rank tables)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from moshi_oracle import dsm_lm_from_moshi, moshi_lm_from_config

    cfg = dict(delays=[0, 0, 1, 1, 1], n_q=4, dep_q=4, card=32, text_card=30, dim=32, num_layers=1, num_heads=2,
               context=5, gating="silu", norm="rms_norm_f32", positional_embedding="rope", depformer_dim=16,
               depformer_num_heads=2, depformer_num_layers=2, depformer_dim_feedforward=48,
               depformer_multi_linear=True, depformer_weights_per_step=True,
               depformer_weights_per_step_schedule=[0, 1, 1, 1], depformer_low_rank_embeddings=8,
               depformer_pos_emb="none", demux_second_stream=True)  # fmt: skip
    model = dsm_lm_from_moshi(cfg, moshi_lm_from_config(cfg))
    assert model.depformer_weights() is not None and model.depformer_weights() is model.depformer_weights()
    B = 3
    g = torch.Generator().manual_seed(0)
    z, text = torch.randn(B, 32, generator=g), torch.tensor([5, 31 * 7 + 2, -1])
    temp, seeds, steps = torch.full((B,), 0.9), torch.arange(B) + 4, torch.arange(B) * 7
    with torch.no_grad():
        fused = model.depformer_step(text, z, temperature=temp, top_k=6, seeds=seeds, step_base=steps)
        loop = model.depformer_step(
            text, z, lambda k, lg: dsm_kernels.sample_tokens(lg, temp, 6, seeds, steps + k))
    assert torch.equal(fused, loop)


def test_triton_aot_compiles_for_sm90_within_shared_memory(aot_output):
    """The block sizes the launcher picks for the TTS shapes (bf16 and fp32, batch 1 and 64, with the separate
    attention kernel of the split-K path; the GEMV kernels at
    batch 1 and 4) compile for sm_90a and fit an H100 block's shared memory (batch 64 once asked for 246016 B:
    Triton refused it at launch)."""
    assert aot_output(__file__).count("cubin") == 24 + 10


H100_SMEM_PER_BLOCK = 232448


def _aot() -> None:
    import triton

    from dsm_kernels.depformer import ATTN_INLINE_ROWS, _dep_attn_kernel, _linear_kernel, _qkv_attn_kernel, frame_plan
    from dsm_kernels.testing import aot_compile, check_arrival_protocol

    t = TTS
    for dt_name, dt, elem in (("bf16", triton.language.bfloat16, 2), ("fp32", triton.language.float32, 4)):
        for B in (1, 64):
            bm, _, bd, bp, plans = frame_plan(B, t["dim"], t["heads"], 32, 11, t["d_model"], t["hidden"], t["card"],
                                              elem, False, None, 132)  # fmt: skip
            _, _, _, _, _, bk_q, s_q, per_q = plans["qkv"]
            ss_t = triton.next_power_of_2(plans["out"][3])
            cases = [("qkv_attn", _qkv_attn_kernel, {"INPUT": True, "DEMUX": True, "SPLIT": s_q, "K_PER_SPLIT": per_q,
                                                     "BM": bm, "BD": bd, "BK": bk_q, "BP": bp,
                                                     "ATTN": B <= ATTN_INLINE_ROWS, "SS_T": 0}, {"tok_ptr": "*i64"}),
                     ("qkv_attn layer > 0", _qkv_attn_kernel, {"INPUT": False, "DEMUX": False, "SPLIT": s_q,
                      "K_PER_SPLIT": per_q, "BM": bm, "BD": bd, "BK": bk_q, "BP": bp, "ATTN": B <= ATTN_INLINE_ROWS,
                      "SS_T": ss_t}, {"tok_ptr": "*i64"}),
                     ("attn", _dep_attn_kernel, {"BD": bd, "BP": bp}, {})]
            for name, norm, epi in (("in", True, 2), ("head", True, 0), ("out", False, 1)):
                _, _, _, _, bn, bk, s_, per = plans[name]
                cases.append((f"linear {name}", _linear_kernel, {"NORM": norm, "EPI": epi, "HAS_SCALE": epi == 1,
                              "SPLIT": s_, "K_PER_SPLIT": per, "BM": bm, "BN": bn, "BK": bk,
                              "SS_T": ss_t if norm else 0}, {}))  # fmt: skip
            for label, kernel, consts, extra in cases:
                consts = {"DT": dt, **({"DOT_F32": elem == 4} if "DOT_F32" in kernel.arg_names else {}), **consts}
                types = {n: "*" + dt_name for n in kernel.arg_names if n.endswith("_ptr")}
                types |= {"ws_ptr": "*fp32", "cnt_ptr": "*i32", "ssq_ptr": "*fp32", "eps": "fp32", "scale": "fp32",
                          **extra}
                # as at run time: 16-aligned pointers and sizes (B, the position and the vocabulary may not be)
                divisible = [n for n in kernel.arg_names if n not in consts and n not in ("B", "pos", "vt", "eps",
                                                                                          "scale")]  # fmt: skip
                cc = aot_compile(kernel, types, consts, num_warps=4, divisible=divisible)
                assert "sm_90" in cc.asm["ptx"] and len(cc.asm["cubin"]) > 0, label
                if "cnt_ptr" in kernel.arg_names:  # the last split-K program sums the partials
                    check_arrival_protocol(cc.asm["ptx"])
                smem = cc.metadata.shared
                print(f"{label} {dt_name} B={B}: {len(cc.asm['cubin'])} B cubin, {smem} B smem")
                assert smem <= H100_SMEM_PER_BLOCK, f"{label} {dt_name} B={B}: {smem} B shared memory"
    _aot_gemv()


def _aot_gemv() -> None:
    import triton

    from dsm_kernels.gemv_kernels import _gemv_kernel, _head_sample_kernel, _qkv_gemv_kernel, gemv_plan
    from dsm_kernels.sampling import _num_warps
    from dsm_kernels.testing import aot_compile, check_arrival_protocol, prewait_loads

    t, bf16 = TTS, triton.language.bfloat16
    for B in (1, 4):
        cases = []
        for name, N, K, norm, epi in (("in", t["hidden"], t["dim"], True, 2), ("ffo", t["dim"], t["hidden"], False, 1),
                                      ("head", t["card"], t["dim"], True, 0)):  # fmt: skip
            bn, kp, warps = gemv_plan(N, K, gate=epi == 2, sms=132, interp=False)
            cases.append((f"gemv {name}", _gemv_kernel, warps, {"NORM": norm, "EPI": epi, "HAS_SCALE": epi == 1,
                          "BN": bn, "KP": kp}, {}))  # fmt: skip
        D = t["dim"] // t["heads"]
        bn, kp, warps = gemv_plan(3 * t["dim"], t["dim"], sms=132, interp=False, divides=D)
        cases.append(("gemv qkv_attn", _qkv_gemv_kernel, warps, {"INPUT": True, "DEMUX": True, "BN": bn, "KP": kp,
                      "HEAD_D": D, "BD": D, "BP": 32}, {"tok_ptr": "*i64", "cnt_ptr": "*i32"}))  # fmt: skip
        bn, kp, warps = gemv_plan(t["card"], t["dim"], sms=132, interp=False)
        cases.append(("head + sample", _head_sample_kernel, max(warps, _num_warps(t["card"])),
                      {"NORM": 1, "BN": bn, "KP": kp, "NPROG": t["card"] // bn, "BLOCK_V": t["card"]},
                      {"cnt_ptr": "*i32", "temp_ptr": "*fp32", "seed_ptr": "*i64", "step_ptr": "*i64",
                       "tok_ptr": "*i64"}))  # fmt: skip
        for label, kernel, warps, consts, extra in cases:
            consts = {"DT": bf16, "BB": triton.next_power_of_2(B), "PDL": True, **consts}
            types = {n: "*bf16" for n in kernel.arg_names if n.endswith("_ptr")}
            types |= {"eps": "fp32", "scale": "fp32", **extra}
            divisible = [n for n in kernel.arg_names if n not in consts and n not in ("B", "pos", "vt", "eps", "scale",
                                                                                      "top_k")]  # fmt: skip
            cc = aot_compile(kernel, types, consts, num_warps=warps, divisible=divisible)
            assert "sm_90" in cc.asm["ptx"] and len(cc.asm["cubin"]) > 0, label
            ptx = cc.asm["ptx"]  # programmatic dependent launch: weights requested before the wait, nothing else
            assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait") < ptx.index("st.global"), label
            assert prewait_loads(ptx) <= {"w", "wv", "alpha", "beta", "sc"}, (label, prewait_loads(ptx))
            if kernel is not _gemv_kernel:  # the last of a head's programs attends; the head's last one samples
                check_arrival_protocol(ptx)
            print(f"{label} bf16 B={B}: {len(cc.asm['cubin'])} B cubin, {cc.metadata.shared} B smem")
            assert cc.metadata.shared <= H100_SMEM_PER_BLOCK, label


# ---- the persistent CUDA kernel (csrc/depformer.cu): on the GPU, and emulated on the CPU ------------------------
PERSISTENT = [pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("cuda_emu")]
PERSISTENT_CASES = {  # (schedule, layers, heads, batch, demux, head_norm, LayerScale, grid blocks)
    "q4-b1": ((0, 1, 2, 3), 1, 2, 1, True, False, True, 1),
    "q8-b3": ((0, 1, 2, 2, 3, 3, 3, 3), 2, 2, 3, False, True, True, 3),
    "q32-b4": ((0,) * 4 + (1,) * 12 + (2,) * 16, 1, 4, 4, True, False, False, 6),  # dep_q 32, shared sets
}


def run_persistent(backend, w, args, blocks):
    """The persistent kernel's frame (tokens, logits) on ``backend``; the emulated one poisons its outputs and
    scratch first (NaN / -7: what the kernel never wrote shows)."""
    if backend == "cuda_emu":
        import cuda_emu

        return cuda_emu.depformer_frame_emu(w, **args, return_logits=True, blocks=blocks)
    from dsm_kernels.cuda_ops import depformer_frame_cuda

    return depformer_frame_cuda(w, **args, return_logits=True, blocks=blocks)


def persistent_device(backend):
    return torch.device("cuda" if backend == "cuda" else "cpu")


@pytest.mark.parametrize("backend", PERSISTENT)
@pytest.mark.parametrize("temp", [0.0, 0.8], ids=["greedy", "sampled"])
@pytest.mark.parametrize("case", list(PERSISTENT_CASES))
def test_persistent_fp32_matches_reference(case, temp, backend):
    schedule, layers, heads, B, demux, head_norm, scales, blocks = PERSISTENT_CASES[case]
    dev = persistent_device(backend)
    w = make_weights(schedule=schedule, layers=layers, heads=heads, demux=demux, head_norm=head_norm, scales=scales,
                     seed=len(schedule), device=dev)  # fmt: skip
    args = inputs(w, B, temp=temp, device=dev)
    tok_ref, lg_ref = depformer_frame_ref(w, **args, return_logits=True)
    tok, lg = run_persistent(backend, w, args, blocks)
    assert tok.shape == (B, len(schedule)) and tok.dtype == torch.int64
    assert torch.equal(tok, tok_ref), (tok, tok_ref)
    assert rel(lg, lg_ref) < 1e-5
    if temp > 0:  # the draw really samples (not argmax everywhere)
        assert not torch.equal(tok_ref, lg_ref.argmax(-1))


@pytest.mark.parametrize("backend", PERSISTENT)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_persistent_low_precision_error_within_3x_reference_error(dtype, backend):
    dev = persistent_device(backend)
    w32 = make_weights(schedule=(0, 1, 1, 2, 2, 2), layers=2, heads=2, dim=64, hidden=96, card=64, seed=3, device=dev)
    w16 = cast(w32, dtype)
    args32 = inputs(w32, 3, temp=0.0, device=dev)
    args16 = dict(args32, z=args32["z"].to(dtype))
    tok32, lg32 = depformer_frame_ref(w32, **args32, return_logits=True)
    tok16, lg16 = depformer_frame_ref(w16, **args16, return_logits=True)
    tok, lg = run_persistent(backend, w16, args16, 2)
    tok_z32, lg_z32 = run_persistent(backend, w16, args32, 2)  # z in fp32 is cast to the weights' dtype first
    assert torch.equal(tok_z32, tok) and torch.equal(lg_z32, lg)
    same = (tok32 == tok16) & (tok16 == tok)  # codebooks while all three chains were fed the same tokens
    n = min(int(same.all(dim=0).long().cumprod(0).sum()) + 1, tok.shape[1])
    assert n >= 2
    ref_err = rel(lg16[:, :n], lg32[:, :n])
    assert ref_err > 0
    assert rel(lg[:, :n], lg32[:, :n]) <= 3 * ref_err + 1e-6, (rel(lg[:, :n], lg32[:, :n]), ref_err)


@pytest.mark.parametrize("backend", PERSISTENT)
def test_persistent_output_does_not_depend_on_the_grid(backend, monkeypatch):
    """Each row's dot product is one warp's, whichever block owns it: the same bits for any block count, and however
    the weight stream is chunked (emulated: small slots, down to rows read from global memory)."""
    dev = persistent_device(backend)
    w = cast(make_weights(schedule=(0, 1, 2, 2, 3), layers=2, heads=2, dim=64, hidden=96, card=72, seed=5,
                          device=dev), torch.bfloat16)  # fmt: skip
    args = inputs(w, 4, temp=0.8, device=dev)
    args["z"] = args["z"].bfloat16()
    tok, lg = run_persistent(backend, w, args, 1)
    for blocks in (2, 5, 7):
        tok_b, lg_b = run_persistent(backend, w, args, blocks)
        assert torch.equal(tok_b, tok) and torch.equal(lg_b, lg), blocks
    if backend == "cuda_emu":  # slots of 672 B (a few rows a chunk); of 96 B (the layers' rows from global memory)
        for smem in ("5000", "2700"):
            monkeypatch.setenv("DSM_CUDA_EMU_SMEM", smem)
            tok_b, lg_b = run_persistent(backend, w, args, 2)
            assert torch.equal(tok_b, tok) and torch.equal(lg_b, lg), smem


@pytest.mark.parametrize("backend", ["reference", "triton", "triton-splitk", *PERSISTENT])
def test_step_scale_and_offset_make_the_counters(backend):
    """Codebook k's noise counters are ``steps * step_scale + step_offset + k``: the same frame as with the counters
    computed beforehand (as the generator passes its frame offsets and the depth transformer's first stream)."""
    dev = persistent_device(backend)
    w = make_weights(schedule=(0, 1, 2, 3), layers=1, heads=2, seed=8, device=dev)
    args = inputs(w, 2, temp=0.8, device=dev)

    def frame(steps, **kw):
        a = dict(args, steps=steps, **kw)
        if backend == "triton-splitk":  # the path above GEMV_MAX_B rows: split-K GEMMs, then the sampler
            return run_triton(w, a, path="splitk")[0]
        if backend in ("reference", "triton"):
            return dsm_kernels.depformer_frame(w, **a, backend=backend)
        return run_persistent(backend, w, a, 2)[0]

    got = frame(args["steps"], step_scale=33, step_offset=1)
    assert torch.equal(got, frame(args["steps"] * 33 + 1)) and not torch.equal(got, frame(args["steps"]))


@pytest.mark.parametrize("backend", PERSISTENT)
def test_persistent_takes_what_it_can_and_hands_the_rest_to_triton(backend):
    """Past 4 rows, or with rows that are not 16-byte multiples, the frame runs the Triton kernels (same results)."""
    if backend == "cuda_emu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the fallback runs Triton: TRITON_INTERPRET=1 on the CPU")
    from dsm_kernels.cuda_ops import depformer_unsupported

    dev = persistent_device(backend)
    w = make_weights(schedule=(0, 1, 2), seed=6, device=dev)
    assert depformer_unsupported(w, inputs(w, 5, temp=0.0, device=dev)["z"]) == "5 rows (it takes 1..4)"
    odd = make_weights(schedule=(0, 1, 2), dim=36, hidden=50, seed=6, device=dev)
    assert "16-byte rows" in depformer_unsupported(odd, inputs(odd, 1, temp=0.0, device=dev)["z"])
    for weights, B in ((w, 5), (odd, 2)):
        args = inputs(weights, B, temp=0.8, device=dev)
        tok, lg = run_persistent(backend, weights, args, 2)
        tok_ref, lg_ref = depformer_frame_ref(weights, **args, return_logits=True)
        assert torch.equal(tok, tok_ref) and rel(lg, lg_ref) < 1e-5


def test_validate_kernels_checks_the_persistent_kernel(cuda_emulated):
    """``dsm validate-kernels`` on the CUDA backend runs the persistent kernel (here emulated) and passes."""
    from dsm_kernels.validate import _depformer_rows

    rows = _depformer_rows("cuda", torch.device("cpu"), quick=True)
    assert len(rows) == 4 and all(r.ok for r in rows), rows
    assert {r.case.split()[2] for r in rows} == {"persistent"} and cuda_emulated["depformer_frame"] == 4


def test_persistent_is_the_cuda_backend():
    from dsm_kernels.cuda_ops import depformer_frame_cuda

    assert dsm_kernels._load(dsm_kernels._OPS["depformer_frame"]["cuda"]) is depformer_frame_cuda


# ---- GPU: the real TTS shapes ---------------------------------------------------------------------------------
TTS = dict(dim=1024, heads=16, layers=4, hidden=2048, card=2048, d_model=2048, text_vocab=8001,
           schedule=tuple(range(8)) + (8,) * 8 + (9,) * 8 + (10,) * 8)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(("B", "path"), [(1, "gemv"), (1, "splitk"), (4, "gemv"), (8, "splitk"), (64, "splitk")])
def test_gpu_tts_shapes_bf16(B, path):
    w32 = make_weights(**TTS, device="cuda", seed=7)
    w16 = cast(w32, torch.bfloat16)
    args32 = inputs(w32, B, temp=0.0, device="cuda")
    args16 = dict(args32, z=args32["z"].bfloat16())
    tok32, lg32 = depformer_frame_ref(w32, **args32, return_logits=True)
    tok16, lg16 = depformer_frame_ref(w16, **args16, return_logits=True)
    tok, lg = run_triton(w16, args16, path=path)
    same = ((tok32 == tok16) & (tok16 == tok)).all(dim=0).long().cumprod(0)
    n = max(1, min(int(same.sum()) + 1, tok.shape[1]))
    ref_err = rel(lg16[:, :n], lg32[:, :n])
    assert rel(lg[:, :n], lg32[:, :n]) <= 3 * ref_err + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize(("B", "path"), [(2, "gemv"), (8, "splitk")])
def test_gpu_fp32_and_graph_replay(B, path):
    w = make_weights(**TTS, device="cuda", seed=8)
    args = dict(inputs(w, B, temp=0.8, device="cuda"), path=path)
    tok_ref, lg_ref = depformer_frame_ref(w, **{k: v for k, v in args.items() if k != "path"}, return_logits=True)
    tok, lg = run_triton(w, args)
    assert torch.equal(tok, tok_ref) and rel(lg, lg_ref) < 1e-5
    from dsm_kernels.depformer import depformer_frame_triton

    assert_graph_replays_give(lambda: depformer_frame_triton(w, **args), tok_ref)


def assert_graph_replays_give(frame, tokens):
    """``frame()`` captured in a CUDA graph (after an eager call on a side stream) writes ``tokens`` at each replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        frame()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = frame()
    for _ in range(3):
        out.fill_(-7)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, tokens)


@pytest.mark.gpu
def test_gpu_pdl_chain_equals_plain_launches():
    """Programmatic dependent launch changes when kernels start, never what they compute: bit-identical logits and
    tokens with and without it, eagerly and replayed from a CUDA graph (where the launches become graph edges)."""
    from dsm_kernels.depformer import depformer_frame_triton

    w = cast(make_weights(**TTS, device="cuda", seed=9), torch.bfloat16)
    args = inputs(w, 1, temp=0.8, device="cuda")
    tok0, lg0 = depformer_frame_triton(w, **args, return_logits=True, path="gemv", pdl=False)
    tok1, lg1 = depformer_frame_triton(w, **args, return_logits=True, path="gemv", pdl=True)
    assert torch.equal(tok0, tok1) and torch.equal(lg0, lg1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tok2, lg2 = depformer_frame_triton(w, **args, return_logits=True, path="gemv", pdl=True)
    for _ in range(3):
        tok2.fill_(-7)
        lg2.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(tok2, tok0) and torch.equal(lg2, lg0)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 4])
def test_gpu_persistent_tts_shapes(B):
    """The persistent kernel at the TTS shapes: bf16 within 3x the reference's own bf16 error, fp32 equal to the
    reference, bit-identical across grid sizes and under CUDA-graph replay."""
    from dsm_kernels.cuda_ops import depformer_frame_cuda

    w32 = make_weights(**TTS, device="cuda", seed=10)
    args32 = inputs(w32, B, temp=0.8, device="cuda")
    tok_ref, lg_ref = depformer_frame_ref(w32, **args32, return_logits=True)
    tok, lg = depformer_frame_cuda(w32, **args32, return_logits=True)
    assert torch.equal(tok, tok_ref) and rel(lg, lg_ref) < 1e-5
    w16 = cast(w32, torch.bfloat16)
    args16 = dict(args32, z=args32["z"].bfloat16(), temperature=torch.zeros_like(args32["temperature"]))
    tok32, lg32 = depformer_frame_ref(w32, **dict(args32, temperature=args16["temperature"]), return_logits=True)
    tok16, lg16 = depformer_frame_ref(w16, **args16, return_logits=True)
    tok, lg = depformer_frame_cuda(w16, **args16, return_logits=True)
    same = ((tok32 == tok16) & (tok16 == tok)).all(dim=0).long().cumprod(0)
    n = max(1, min(int(same.sum()) + 1, tok.shape[1]))
    assert rel(lg[:, :n], lg32[:, :n]) <= 3 * rel(lg16[:, :n], lg32[:, :n]) + 1e-6
    tok7, lg7 = depformer_frame_cuda(w16, **args16, return_logits=True, blocks=7)
    assert torch.equal(tok7, tok) and torch.equal(lg7, lg)
    assert_graph_replays_give(lambda: depformer_frame_cuda(w16, **args16), tok)


if __name__ == "__main__":
    aot_script_main(_aot, __file__)
