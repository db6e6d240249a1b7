"""``dsm validate-kernels``: every available backend against the reference ops on fresh random inputs, with the
tests' tolerance rules (tests/kernels), as a table. Runs on a GPU (triton + cuda) or on CPU with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import available_backends, op_backends, op_names, reference, resolve
from .testing import (
    bf16_ulp,
    check_rvq_codes,
    frame_embed_fp32,
    frame_embed_inputs,
    max_abs_err,
    poison_,
    ref_relative_atol,
    sample_score_gap,
)


@dataclass
class Row:
    """One checked case. ``err`` and ``bound`` are in the unit ``measure`` names; for an elementwise bound they are
    taken at the element closest to failing (the largest err/bound), so ``ok`` is ``err <= bound`` as printed."""

    op: str
    backend: str
    case: str
    err: float
    bound: float
    ok: bool
    measure: str


def _row(op, backend, case, got, exp, bound, measure) -> Row:
    """Compare ``got`` with ``exp`` under an elementwise (or scalar) absolute ``bound``; NaN or a shape mismatch
    never passes."""
    got, exp = got.double().cpu(), exp.double().cpu()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(exp)
    if got.shape != exp.shape:
        return Row(op, backend, case, float("inf"), float(bound.max()), False, f"shape {tuple(got.shape)}")
    if bool(torch.isnan(got).any()):
        return Row(op, backend, case, float("inf"), float(bound.max()), False, measure + " (NaN in output)")
    if got.numel() == 0:
        return Row(op, backend, case, 0.0, 0.0, True, measure)
    err = (got - exp).abs()
    i = int((err / bound.clamp_min(1e-300)).flatten().argmax())
    ok = bool((err <= bound).all())
    return Row(op, backend, case, float(err.flatten()[i]), float(bound.flatten()[i]), ok, measure)


def _exact(op, backend, case, pairs) -> Row:
    """Equality of every (got, expected) pair; ``err`` counts the differing values. NaN equals NaN only (the poison
    a kernel must leave where it does not write; a zero there differs)."""

    def differing(a: torch.Tensor, b: torch.Tensor) -> int:
        if a.shape != b.shape:
            return a.numel() + b.numel()
        a, b = a.cpu(), b.cpu()
        if a.dtype.is_floating_point and b.dtype.is_floating_point:
            same = (a == b) | (torch.isnan(a.float()) & torch.isnan(b.float()))
            return int((~same).sum())
        return int((a != b).sum())

    diff = sum(differing(a, b) for a, b in pairs)
    return Row(op, backend, case, float(diff), 0.0, diff == 0, "values differing (exact)")


def _embed_rows(backend, device, quick):
    rows = []
    cases = [(3, 33, 2048, True)] if quick else [(1, 1, 64, False), (17, 33, 2048, False), (3, 33, 2048, True)]
    for B, K, D, demux in cases:
        for dtype in (torch.bfloat16, torch.float32):
            g = torch.Generator().manual_seed(B + K + D)
            Vt, Va = 49, 2049
            text, t2 = (torch.randn(Vt, D, generator=g) for _ in range(2))
            audio = torch.randn(max(K - 1, 1), Va, D, generator=g)
            tokens = torch.randint(-1, Va, (B, K), generator=g)
            tokens[:, 0] = torch.randint(-1, Vt * (Vt + 1) if demux else Vt, (B,), generator=g)
            cond = torch.randn(B, D, generator=g)
            kw = {"text_table2": t2.to(dtype).to(device) if demux else None, "cond": cond.to(device)}
            exp = reference.multistream_embed_ref(
                tokens, text.to(dtype).float(), audio.to(dtype).float(),
                text_table2=t2.to(dtype).float() if demux else None, cond=cond,
            )  # fmt: skip
            fn = resolve("multistream_embed", backend, device)
            out = poison_(torch.empty(B, D, dtype=dtype, device=device))
            got = fn(tokens.to(device), text.to(dtype).to(device), audio.to(dtype).to(device), out=out, **kw).cpu()
            bound = bf16_ulp(exp) if dtype == torch.bfloat16 else 1e-6 * (1 + exp.abs())
            case = f"B{B} K{K} D{D}{' demux' if demux else ''} {dtype}".replace("torch.", "")
            measure = "abs err <= 1 bf16 ulp of the fp32 sum" if dtype == torch.bfloat16 else "abs err <= 1e-6 (1+|x|)"
            rows.append(_row("multistream_embed", backend, case, got, exp, bound, measure))
    return rows


def _attention_rows(backend, device, quick):
    rows = []
    layouts = [(16, 128, 750)] if quick else [(16, 128, 750), (32, 64, 375), (16, 128, 500), (8, 64, 750)]
    for H, D, context in layouts:
        for page_size in (16,) if quick else (16, 64):
            g = torch.Generator().manual_seed(H * D + page_size)
            lens = [1, 7, context - 1, context, context + 1, 2 * context + 1, 0]
            B, pps = len(lens), -(-context // page_size)
            k_cache = torch.randn(B * pps + 2, page_size, H, D, generator=g).to(torch.bfloat16)
            v_cache = torch.randn_like(k_cache, dtype=torch.float32).to(torch.bfloat16)
            bt = torch.randperm(B * pps + 2, generator=g)[: B * pps].view(B, pps).int()
            q = torch.randn(B, H, D, generator=g).to(torch.bfloat16)
            seq_lens = torch.tensor(lens, dtype=torch.int32)
            rows += _attention_case(backend, device, q, k_cache, v_cache, bt, seq_lens, context,
                                    f"{H}x{D} ctx{context} page{page_size} bf16")
            if (H, D, context, page_size) == (16, 128, 750, 16) and not quick:  # --kv-dtype fp8's pages
                rows += _attention_case(backend, device, q, k_cache.to(torch.float8_e4m3fn),
                                        v_cache.to(torch.float8_e4m3fn), bt, seq_lens, context,
                                        f"{H}x{D} ctx{context} page{page_size} fp8 e4m3 cache")  # fmt: skip
    # the TTS voice cross-attention (dsm.kv_cache.CrossKVCache): 5 pages of 125 positions, all visible, shared pages
    g = torch.Generator().manual_seed(625)
    k_cache = torch.randn(9, 125, 16, 128, generator=g).to(torch.bfloat16)
    v_cache = torch.randn_like(k_cache, dtype=torch.float32).to(torch.bfloat16)
    bt = torch.tensor([[1, 5, 6, 7, 8], [2, 5, 6, 7, 8], [1, 5, 6, 7, 8]], dtype=torch.int32)
    q = torch.randn(3, 16, 128, generator=g).to(torch.bfloat16)
    rows += _attention_case(backend, device, q, k_cache, v_cache, bt, torch.full((3,), 625, dtype=torch.int32), 625,
                            "16x128 voice 625 page125 shared bf16")
    return rows


def _attention_case(backend, device, q, k_cache, v_cache, bt, seq_lens, context, label):
    exp32 = reference.paged_decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), bt, seq_lens,
                                                 context=context)  # fmt: skip
    exp_lp = reference.paged_decode_attention_ref(q, k_cache, v_cache, bt, seq_lens, context=context)
    tol = ref_relative_atol(exp_lp, exp32, factor=3.0)
    fn = resolve("paged_decode_attention", backend, device)
    dev = [x.to(device) for x in (q, k_cache, v_cache, bt, seq_lens)]
    # on CPU the Triton interpreter truncates fp32 -> bf16 (one more ulp, as in the tests)
    rtol = 2.0**-7 if device.type == "cpu" else 0.0
    rows = []
    # the splits merged by a second kernel, then in the same launch (the engine's way: counters at 0, which each
    # launch must leave at 0)
    B, H = q.shape[:2]
    for counters in (None, torch.zeros(B * H, dtype=torch.int32, device=device)):
        out = poison_(torch.empty_like(q, device=device))
        got = fn(*dev, context=context, out=out, counters=counters).cpu()
        case = label + (" merged in-launch" if counters is not None else "")
        measure = "abs err <= 3x ref bf16 err" + (" + 1 ulp (interpreter cast)" if rtol else "")
        row = _row("paged_decode_attention", backend, case, got, exp32, tol + rtol * exp32.abs(), measure)
        if counters is not None and bool(counters.any()):
            row.ok, row.measure = False, measure + "; split counters not left at 0"
        rows.append(row)
    return rows


def _append_kv_rows(backend, device, quick):
    rows = []
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float8_e4m3fn, "fp8 e4m3")):  # fp8: --kv-dtype fp8's pages
        kc = poison_(torch.empty(8, 16, 16, 128, dtype=dtype, device=device))
        vc = poison_(torch.empty_like(kc))
        k, v = (torch.randn(4, 16, 128).to(torch.bfloat16) for _ in range(2))
        sm = torch.tensor([3, -1, 100, 127])
        kr, vr = kc.cpu().clone(), vc.cpu().clone()  # copies: on a CPU .cpu() is the kernel's own tensor
        resolve("append_kv", backend, device)(kc, vc, k.to(device), v.to(device), sm.to(device))
        reference.append_kv_ref(kr, vr, k, v, sm)
        pairs = [(kc.cpu(), kr), (vc.cpu(), vr)]  # the untouched slots keep the poison on both sides
        rows.append(_exact("append_kv", backend, f"16x128 page16 {name}, one slot -1", pairs))
    return rows


def _sampling_rows(backend, device, quick):
    """fp32 logits with CFG, and bf16 logits without (the kernels' narrow top-k keys): greedy rows exact, every
    sample inside the top-k set, and a token other than the reference's only on a near tie of the two scores."""
    rows = []
    for V in (2049,) if quick else (2048, 4000, 8001):
        for top_k in (0, 250) if quick else (0, 1, 50, 250):
            # quick: each top-k once, fp32 with CFG for k = 0 and bf16 without for the top-k path
            for dtype, cfg in ((((torch.float32, True),) if top_k == 0 else ((torch.bfloat16, False),)) if quick
                               else ((torch.float32, True), (torch.bfloat16, False))):
                g = torch.Generator().manual_seed(V + top_k)
                B = 64
                logits, null = ((torch.randn(B, V, generator=g) * 3).to(dtype) for _ in range(2))
                null = null if cfg else None
                temp = torch.rand(B, generator=g) + 0.1
                temp[:4] = 0.0
                seeds, steps = (torch.randint(0, 2**40, (B,), generator=g) for _ in range(2))
                fn = resolve("sample_tokens", backend, device)
                out = poison_(torch.empty(B, dtype=torch.int64, device=device))
                kw = dict(null_logits=null.to(device), cfg_coef=2.0) if cfg else {}
                got = fn(logits.to(device), temp.to(device), top_k, seeds.to(device), steps.to(device), out=out,
                         **kw).cpu()  # fmt: skip
                kw = dict(null_logits=null, cfg_coef=2.0) if cfg else {}
                exp = reference.sample_tokens_ref(logits, temp, top_k, seeds, steps, **kw)
                x = null.float() + (logits.float() - null.float()) * 2.0 if cfg else logits.float()
                kth = x.topk(top_k).values[:, -1] if top_k else None
                in_top = top_k == 0 or bool((x.gather(1, got[:, None])[:, 0] >= kth).all())
                greedy_ok = torch.equal(got[:4], x[:4].argmax(-1))
                # a near tie of the two scores, or a token tied with the k-th value (the kernels keep every token at
                # the threshold, torch.topk one of them: test_edge_cases_match_threshold_semantics)
                gaps = [0.0 if top_k and x[b, got[b]] == kth[b] else
                        sample_score_gap(x[b], float(temp[b]), seeds[b : b + 1], steps[b : b + 1], int(got[b]),
                                         int(exp[b])) for b in (got != exp).nonzero()[:, 0].tolist()]  # fmt: skip
                ties = all(gap < 1e-5 for gap in gaps)
                ok = in_top and greedy_ok and ties
                top = "every sample in top-k" if in_top else "a sample OUTSIDE top-k"
                measure = (f"rows != reference of {B} (near ties only: {'yes' if ties else 'NO'}); greedy rows "
                           f"{'ok' if greedy_ok else 'WRONG'}, {top}")
                case = f"B{B} V{V} k{top_k} " + ("fp32 cfg" if cfg else "bf16")
                rows.append(Row("sample_tokens", backend, case, float(len(gaps)), float(B), ok, measure))
    return rows


def _add_rms_norm_rows(backend, device, quick):
    """The fused residual add + RMSNorm of a temporal step (bf16, real widths)."""
    rows = []
    g = torch.Generator().manual_seed(11)
    B = 8
    for D in (2048,) if quick else (1024, 2048, 2560):
        x, delta = (torch.randn(B, D, generator=g).bfloat16() for _ in range(2))
        scale, alpha = (0.5 + torch.rand(D, generator=g)).bfloat16(), (0.5 + torch.rand(D, generator=g)).bfloat16()
        lp = reference.add_rms_norm_ref(x.clone(), alpha, 1e-8, delta=delta, scale=scale)
        ref = reference.add_rms_norm_ref(x.double(), alpha.double(), 1e-8, delta=delta.double(),
                                         scale=scale.double())  # fmt: skip
        out = poison_(torch.empty(B, D, dtype=torch.bfloat16, device=device))
        resid = x.to(device)  # updated in place: the next layer's input, checked as the normed output is
        got = resolve("add_rms_norm", backend, device)(resid, alpha.to(device), 1e-8, delta=delta.to(device),
                                                       scale=scale.to(device), out=out)[1].cpu()  # fmt: skip
        rows.append(_bounded("add_rms_norm", backend, f"B{B} D{D} bf16", got, lp[1], ref[1]))
        rows.append(_bounded("add_rms_norm", backend, f"B{B} D{D} bf16 residual", resid.cpu(), lp[0], ref[0]))
    return rows


def _rope_append_kv_rows(backend, device, quick):
    """RoPE of q/k and the paged K/V write, against the same ops on the CPU: within one ulp of the stored dtype."""
    rows = []
    g = torch.Generator().manual_seed(12)
    B = 8
    layouts = [(16, 128, torch.bfloat16)] if quick else [(16, 128, torch.bfloat16), (20, 128, torch.bfloat16),
                                                         (32, 64, torch.bfloat16), (16, 128, torch.float8_e4m3fn)]
    for H, D, cache_dtype in layouts:
        page = 16
        qkv = torch.randn(B, 3 * H * D, generator=g).bfloat16()
        pos = torch.randint(0, 100_000, (B,), generator=g)
        inv = torch.exp(torch.arange(D // 2, dtype=torch.float32) * (-9.210340371976184 * 2 / D))  # 1e4 period
        slot = torch.randperm(4 * B * page, generator=g)[:B]
        kc, vc = (torch.zeros(4 * B, page, H, D).to(cache_dtype) for _ in range(2))
        k_d, v_d = kc.clone().to(device), vc.clone().to(device)  # the kernel's own: on a CPU .to() would alias
        q_ref = reference.rope_append_kv_ref(qkv, pos, inv, kc, vc, slot, H, H)
        out = poison_(torch.empty(B, H, D, dtype=torch.bfloat16, device=device))
        q = resolve("rope_append_kv", backend, device)(qkv.to(device), pos.to(device), inv.to(device), k_d, v_d,
                                                       slot.to(device), H, H, out=out).cpu()  # fmt: skip
        ulp = 2.0**-7 if cache_dtype == torch.bfloat16 else 2.0**-3
        errs = [float(((a.float() - b.float()).abs() / (b.float().abs() * ulp + 1e-6)).max())
                for a, b in ((q, q_ref), (k_d.cpu(), kc), (v_d.cpu(), vc))]  # fmt: skip
        err = max(math.inf if math.isnan(e) else e for e in errs)  # a NaN in k or v (max() kept the first value)
        name = "fp8" if cache_dtype != torch.bfloat16 else "bf16"
        rows.append(Row("rope_append_kv", backend, f"{H}x{D} page{page} {name} cache", err, 1.0, err <= 1.0,
                        "ulps of the stored dtype (q, k and v)"))  # fmt: skip
    return rows


def _silu_mul_rows(backend, device, quick):
    rows = []
    g = torch.Generator().manual_seed(13)
    for F in (5632,) if quick else (2816, 5632, 6912):
        h = (2 * torch.randn(8, 2 * F, generator=g)).bfloat16()
        out = poison_(torch.empty(8, F, dtype=torch.bfloat16, device=device))
        got = resolve("silu_mul", backend, device)(h.to(device), out=out).cpu()
        rows.append(_bounded("silu_mul", backend, f"B8 F{F} bf16", got, reference.silu_mul_ref(h),
                             reference.silu_mul_ref(h.double())))  # fmt: skip
    return rows


def _head_probs_rows(backend, device, quick):
    rows = []
    g = torch.Generator().manual_seed(17)
    for B in (1,) if quick else (1, 4, 64):  # stt-1b's semantic VAD: 4 heads of 6 classes over d = 2048
        x = torch.randn(B, 2048, generator=g).bfloat16()
        w = (torch.randn(24, 2048, generator=g) * 3 * 2048**-0.5).bfloat16()
        out = poison_(torch.empty(B, 4, dtype=torch.float32, device=device))
        got = resolve("head_probs", backend, device)(x.to(device), w.to(device), 4, out=out).cpu()
        exact = torch.softmax(torch.nn.functional.linear(x.double(), w.double()).view(B, 4, 6), -1)[..., 0]
        rows.append(_bounded("head_probs", backend, f"B{B} 4x6 d2048 bf16", got, reference.head_probs_ref(x, w, 4),
                             exact))  # fmt: skip
    return rows


def _frame_rows(backend, device, quick):
    """The delayed-stream bookkeeping of a step: an STT-like ring (33 streams, delay 6) and a TTS-like one (33
    generated streams, delay 2), exact, including the cache and offsets they update in place."""
    rows = []
    g = torch.Generator().manual_seed(14)
    for K, n_gen, delay in ((33, 1, 6), (33, 33, 2)):
        CT, B2 = delay + 2, 64
        cache = torch.randint(-2, 3000, (B2, K, CT), generator=g)
        offsets = torch.randint(0, 50, (B2,), generator=g)
        ex = torch.rand(B2, generator=g) < 0.8
        delays = torch.tensor([0] + [delay] * (K - 1))
        initial = torch.randint(3000, 4000, (K,), generator=g)
        tok = torch.randint(0, 2048, (B2, K - n_gen), generator=g) if K > n_gen else None
        text, audio = torch.randint(0, 8000, (B2,), generator=g), torch.randint(0, 2048, (B2, n_gen - 1), generator=g)
        c_ref, o_ref = cache.clone(), offsets.clone()
        exp_in = reference.frame_inputs_ref(c_ref, o_ref, ex, delays, initial, tok, n_gen)
        exp_out = reference.frame_commit_ref(c_ref, o_ref, ex, delays, text, audio if n_gen > 1 else None, delay)
        c, o = cache.to(device), offsets.to(device)
        d = [t.to(device) for t in (ex, delays, initial)]
        got_in = resolve("frame_inputs", backend, device)(c, o, d[0], d[1], d[2], None if tok is None else
                                                          tok.to(device), n_gen)  # fmt: skip
        got_out = resolve("frame_commit", backend, device)(c, o, d[0], d[1], text.to(device),
                                                           audio.to(device) if n_gen > 1 else None, delay)
        rows.append(_exact("frame_inputs+commit", backend, f"B{B2} K{K} gen{n_gen} delay{delay}",
                           [(got_in, exp_in), (got_out, exp_out), (c, c_ref), (o, o_ref)]))  # fmt: skip
    return rows


def _frame_embed_rows(backend, device, quick):
    """A step's input column, its embedding and K/V slots in one op: an STT-like ring (bf16 tables) and a TTS-like
    one (demultiplexed text, a condition vector; fp32), the bookkeeping exact, the embedding within one bf16 ulp of
    the fp32 sum (fp32: 1e-6 relative)."""
    rows = []
    D = 64 if quick or device.type == "cpu" else 2048
    for tts, dtype in ((False, torch.bfloat16), (True, torch.float32)):
        inputs = frame_embed_inputs(64, D, tts=tts, dtype=dtype, seed=16)
        exp_in = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        exp = reference.frame_embed_ref(**exp_in)
        got_in = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        out = poison_(torch.empty(64, D, dtype=dtype, device=device))
        got = resolve("frame_embed", backend, device)(**got_in, out=out)
        exp32 = frame_embed_fp32(inputs, exp[1])
        case = f"B64 K33 gen{inputs['n_gen']} D{D} {'demux+cond ' if tts else ''}{str(dtype)[6:]}"
        rows.append(_exact("frame_embed", backend, case + ", bookkeeping",
                           [*zip(got[1:], exp[1:], strict=True), (got_in["cache"], exp_in["cache"]),
                            (got_in["positions"], exp_in["positions"])]))  # fmt: skip
        bound = bf16_ulp(exp32) if dtype == torch.bfloat16 else 1e-6 * (1 + exp32.abs())
        rows.append(_row("frame_embed", backend, case, got[0], exp32, bound,
                         "abs err <= 1 bf16 ulp of the fp32 sum" if dtype == torch.bfloat16 else "abs err <= 1e-6"))
    return rows


def _kv_slots_rows(backend, device, quick):
    g = torch.Generator().manual_seed(15)
    bt = torch.randperm(64 * 24, generator=g).view(64, 24).int()
    pos = torch.randint(0, 5000, (64,), generator=g)
    write = torch.rand(64, generator=g) < 0.8
    exp = reference.kv_slots_ref(bt, pos, write, 16)
    got = resolve("kv_slots", backend, device)(bt.to(device), pos.to(device), write.to(device), 16)
    rows = [_exact("kv_slots", backend, "B64 pages24 page16", list(zip(got, exp, strict=True)))]
    # advancing the written rows' positions in place (as the engine's step does)
    exp_pos, got_pos = pos.clone(), pos.clone().to(device)
    exp = reference.kv_slots_ref(bt, exp_pos, write, 16, True)
    got = resolve("kv_slots", backend, device)(bt.to(device), got_pos, write.to(device), 16, True)
    rows.append(_exact("kv_slots", backend, "B64 pages24 page16, positions advanced",
                       [*zip(got, exp, strict=True), (got_pos, exp_pos)]))
    # Mimi's ring (250 slots a stream, 2 tokens a step): positions before and after its wrap
    exp = reference.mimi_rows_ref(pos, write, 2, 250)
    got = resolve("mimi_rows", backend, device)(pos.to(device), write.to(device), 2, 250)
    return rows + [_exact("mimi_rows", backend, "B64 tokens2 ring250", list(zip(got, exp, strict=True)))]


def _gemv_rows(backend, device, quick):
    """The small-batch GEMV op (every epilogue) and the fused QKV + RoPE + K/V write, bf16, against the reference's
    own bf16 error."""
    rows = []
    small = quick or device.type == "cpu"
    K, N = (64, 48) if small else (2048, 2048)
    for B, epi in ((1, "norm"), (2, "layer_norm"), (3, "residual"), (4, "gate"), (2, "gelu")):
        g = torch.Generator().manual_seed(B)
        x = torch.randn(B, K, generator=g)
        w = torch.randn(2 * N if epi == "gate" else N, K, generator=g) * K**-0.5
        alpha, res = 1 + 0.1 * torch.randn(K, generator=g), torch.randn(B, N, generator=g)
        sc = torch.rand(N, generator=g)

        def run(fn, dt, dev, x=x, w=w, alpha=alpha, res=res, sc=sc, epi=epi):
            kw = {"norm": {"alpha": alpha.to(dev, dt), "eps": 1e-5}, "gate": {"gate": True},
                  "layer_norm": {"alpha": alpha.to(dev, dt), "beta": (alpha - 1).to(dev, dt), "eps": 1e-5},
                  "residual": {"residual": res.to(dev, dt).clone(), "scale": sc.to(dev, dt)},
                  "gelu": {"alpha": alpha.to(dev, dt), "beta": (alpha - 1).to(dev, dt), "eps": 1e-5, "gelu": True},
                  }[epi]  # fmt: skip
            return fn(x.to(dev, dt), w.to(dev, dt), **kw).cpu()

        ref = run(reference.gemv_ref, torch.float64, "cpu")
        lp = run(reference.gemv_ref, torch.bfloat16, "cpu")
        got = run(resolve("gemv", backend, device), torch.bfloat16, device)
        rows.append(_bounded("gemv", backend, f"B{B} N{N} K{K} {epi} bf16", got, lp, ref))
    return rows


def _qkv_rope_gemv_rows(backend, device, quick):
    """The fused RMSNorm + QKV projection + RoPE + paged K/V write, bf16, against the reference's own bf16 error."""
    small = quick or device.type == "cpu"
    K = 64 if small else 2048
    H, D = (2, 16) if small else (16, 128)
    B, page = 2, 16
    g = torch.Generator().manual_seed(11)
    x, alpha = torch.randn(B, K, generator=g), 1 + 0.1 * torch.randn(K, generator=g)
    w = torch.randn(3 * H * D, K, generator=g) * K**-0.5
    pos = torch.tensor([3, 40_000])
    inv_freq = torch.exp(torch.arange(D // 2, dtype=torch.float64) * (-9.210340371976184 * 2 / D))

    def run_qkv(fn, dt, dev):
        kc, vc = (torch.zeros(4, page, H, D, dtype=dt, device=dev) for _ in range(2))
        q = fn(x.to(dev, dt), w.to(dev, dt), alpha.to(dev, dt), 1e-5, pos.to(dev), inv_freq.to(dev, torch.float32 if
               dt != torch.float64 else dt), kc, vc, torch.tensor([5, 17], device=dev), H, H)  # fmt: skip
        return torch.cat([q.flatten(), kc.flatten(), vc.flatten()]).cpu()

    ref = run_qkv(reference.qkv_rope_gemv_ref, torch.float64, "cpu")
    lp = run_qkv(reference.qkv_rope_gemv_ref, torch.bfloat16, "cpu")
    got = run_qkv(resolve("qkv_rope_gemv", backend, device), torch.bfloat16, device)
    return [_bounded("qkv_rope_gemv", backend, f"B{B} {H}x{D} K{K} bf16", got, lp, ref)]


def _depformer_rows(backend, device, quick):
    """The depth-transformer frame on each kernel family (Triton: GEMV and split-K; CUDA: the persistent kernel, and
    its hand-off to Triton past 4 rows): fp32 tokens equal and logits within 1e-5 relative; bf16 logits within 3x the
    reference's own bf16 error while the three chains were fed the same tokens."""
    from .testing import cast_depformer_weights, depformer_inputs, random_depformer_weights

    frame = resolve("depformer_frame", backend, device)
    rows = []
    small = quick or device.type == "cpu"
    shapes = (dict(dim=32, heads=2, layers=1, hidden=48, card=40, d_model=24, schedule=(0, 1, 2, 2)) if small else
              dict(dim=256, heads=4, layers=2, hidden=512, card=512, d_model=384, text_vocab=65,
                   schedule=(0, 1, 2, 2, 3, 3, 3, 3)))  # fmt: skip
    w32 = random_depformer_weights(**shapes, device=device, seed=5)
    w16 = cast_depformer_weights(w32, torch.bfloat16)
    if backend == "cuda":
        families = ((1, ("persistent",)), (3, ("persistent",)), (8, ("triton",)))
    else:
        families = ((1, ("gemv", "splitk")), (3, ("gemv", "splitk")), (8, ("splitk",)))
    for B, paths in families:
        if small and B == 8:
            continue
        for path in paths:
            kw = {"path": path} if backend == "triton" else {}
            a32 = depformer_inputs(w32, B, temp=0.8, device=device)
            tok_ref, lg_ref = reference.depformer_frame_ref(w32, **a32, return_logits=True)
            tok, lg = frame(w32, **a32, return_logits=True, **kw)
            err = max_abs_err(lg, lg_ref) / float(lg_ref.abs().max())
            same = bool(torch.equal(tok, tok_ref))
            rows.append(Row("depformer_frame", backend, f"B{B} q{len(shapes['schedule'])} {path} fp32", err, 1e-5,
                            same and err <= 1e-5, "logit err / max|logit|; tokens " +
                            ("equal" if same else "DIFFER")))  # fmt: skip
            a32 = dict(a32, temperature=torch.zeros_like(a32["temperature"]), top_k=0)
            a16 = dict(a32, z=a32["z"].bfloat16())
            t32, l32 = reference.depformer_frame_ref(w32, **a32, return_logits=True)
            t16, l16 = reference.depformer_frame_ref(w16, **a16, return_logits=True)
            t, lg = frame(w16, **a16, return_logits=True, **kw)
            same = ((t32 == t16) & (t16 == t)).all(dim=0).long().cumprod(0)
            n = max(1, min(int(same.sum()) + 1, t.shape[1]))
            scale = float(l32[:, :n].abs().max())
            ref_err = max_abs_err(l16[:, :n], l32[:, :n]) / scale
            err = max_abs_err(lg[:, :n], l32[:, :n]) / scale
            bound = 3 * ref_err + 1e-6
            # temperature 0: each token is its own logits' argmax (within a bf16 ulp of the max: the logits it returns
            # may be rounded apart from the ones it sampled), as a kernel that returns wrong tokens beside right logits
            # must fail
            lgf, top = lg.float().cpu(), lg.float().cpu().amax(-1)
            greedy = bool((lgf.gather(-1, t.cpu().long()[..., None])[..., 0] >= top - 2.0**-7 * top.abs()).all())
            rows.append(Row("depformer_frame", backend, f"B{B} q{n} {path} bf16", err, bound, err <= bound and greedy,
                            "logit err / max|logit| <= 3x ref bf16 err (codebooks fed equal tokens); greedy tokens "
                            + ("= argmax of its logits" if greedy else "!= ARGMAX of its logits")))  # fmt: skip
    return rows


def _decoder_rows(backend, device, quick):
    """The temporal transformer's step at a few rows (rows at different positions, a ring that wraps, an inactive
    row): fp32 logits within 1e-5 relative of the reference and the written K/V within 1e-5; bf16 logits within 3x
    the reference's own bf16 error; with e4m3 pages, fp32 logits within 1e-4."""
    from .decoder import decoder_step_ref
    from .testing import cast_decoder_weights, decoder_inputs, random_decoder_weights

    step = resolve("decoder_step", backend, device)
    small = quick or device.type == "cpu"
    shapes = dict(dim=64, heads=4, layers=2, hidden=96, vocab=40) if small else \
        dict(dim=512, heads=4, layers=3, hidden=1024, vocab=1000)  # fmt: skip
    w32 = random_decoder_weights(**shapes, scales=True, device=device, seed=3)
    rows = []
    for B in (1, 3):
        ins, mine = decoder_inputs(w32, B, device=device), decoder_inputs(w32, B, device=device)  # written in place
        z_ref, lg_ref = decoder_step_ref(w32, **ins)
        z, lg = step(w32, **mine)
        err = max_abs_err(lg, lg_ref) / float(lg_ref.abs().max())
        kv_err = max(max_abs_err(mine["k_cache"], ins["k_cache"]), max_abs_err(mine["v_cache"], ins["v_cache"]))
        ok = err <= 1e-5 and kv_err <= 1e-5 and max_abs_err(z, z_ref) <= 1e-5 * float(z_ref.abs().max())
        rows.append(Row("decoder_step", backend, f"B{B} L{len(w32.layers)} fp32", err, 1e-5, ok,
                        f"logit err / max|logit| (K/V err {kv_err:.2g})"))  # fmt: skip
        w16 = cast_decoder_weights(w32, torch.bfloat16)
        _, l16 = decoder_step_ref(w16, **decoder_inputs(w32, B, dtype=torch.bfloat16, device=device))
        _, lg = step(w16, **decoder_inputs(w32, B, dtype=torch.bfloat16, device=device))
        scale = float(lg_ref.abs().max())
        ref_err = max_abs_err(l16, lg_ref) / scale
        err = max_abs_err(lg, lg_ref) / scale
        bound = 3 * ref_err + 1e-6
        rows.append(Row("decoder_step", backend, f"B{B} L{len(w32.layers)} bf16", err, bound, err <= bound,
                        "logit err / max|logit| <= 3x ref bf16 err"))  # fmt: skip
        # e4m3 pages (the fp8 cache option), fp32 weights: the same pages on both sides
        fp8 = dict(kv_dtype=torch.float8_e4m3fn, device=device)
        _, lg_ref = decoder_step_ref(w32, **decoder_inputs(w32, B, **fp8))
        _, lg = step(w32, **decoder_inputs(w32, B, **fp8))
        err = max_abs_err(lg, lg_ref) / float(lg_ref.abs().max())
        rows.append(Row("decoder_step", backend, f"B{B} L{len(w32.layers)} fp32, fp8 pages", err, 1e-4, err <= 1e-4,
                        "logit err / max|logit|"))  # fmt: skip
        if small:
            break
    return rows


def _mimi_transformer_rows(backend, device, quick):
    """Mimi's streaming transformer step (one stream whose ring has wrapped, and two streams with one paused): h of
    the active rows and the ring within 1e-5 relative of the reference (fp32, Mimi's only dtype)."""
    from .decoder import mimi_transformer_ref
    from .testing import mimi_transformer_inputs, random_mimi_transformer_weights

    step = resolve("mimi_transformer", backend, device)
    small = quick or device.type == "cpu"
    shapes, S = (dict(dim=64, heads=4, layers=2, hidden=96), 12) if small else \
        (dict(dim=512, heads=8, layers=8, hidden=2048), 250)  # fmt: skip
    w = random_mimi_transformer_weights(**shapes, device=device, seed=3)
    rows = []
    for B, active in ((1, None), (2, [True, False])):
        ref, mine = (mimi_transformer_inputs(w, B, capacity=S, active=active, device=device) for _ in range(2))
        mimi_transformer_ref(w, **ref)
        step(w, **mine)
        live = ref["exec_mask"].repeat_interleave(2)
        err = max_abs_err(mine["h"][live], ref["h"][live]) / float(ref["h"][live].abs().max())
        kv_err = max_abs_err(mine["cache"], ref["cache"]) / float(ref["cache"].abs().max())
        tol = 1e-5 if small else 5e-5  # 8 layers of fp32 sums in another order than cuBLAS's
        rows.append(Row("mimi_transformer", backend, f"B{B} T2 L{len(w.layers)} ring {S} fp32", max(err, kv_err),
                        tol, max(err, kv_err) <= tol, "max of h and ring err / max|ref|"))  # fmt: skip
    return rows


def _mimi_rows(backend, device, quick):
    """Mimi's fp32 kernels at its shapes (narrower on a CPU), against their references: 1e-5 relative to the output's
    scale (the implicit-GEMM convs' tf32x3 products included: a few fp32 ulps)."""
    rows = []
    small = quick or device.type == "cpu"
    C, H, S = (64, 2, 40) if small else (512, 8, 250)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(1, C, 24, generator=g), torch.randn(2 * C, C, 16, generator=g) / (4 * C**0.5)
    b = torch.randn(2 * C, generator=g)
    q, cache = torch.randn(2, 2, H, 64, generator=g), torch.randn(3, 2, H, S, 64, generator=g)
    pos = torch.tensor([5, 3 * S + 7])
    xt, w_rows = torch.randn(1, 2 * C, 2, generator=g), torch.randn(C, 16, 2 * C, generator=g) / 64
    part = torch.randn(1, C, 8, generator=g)
    one = torch.ones(1, dtype=torch.bool)
    xi, res = torch.randn(4, C, 101, generator=g), torch.randn(4, 2 * C, 24, generator=g)  # 96 output columns

    def convtr(fn, dev):
        p = part.clone().to(dev)
        return torch.cat([fn(xt.to(dev), w_rows.to(dev), b[:C].to(dev), 8, p, one.to(dev), elu=True).flatten(),
                          p.flatten()])

    # a streaming conv reading its stored context (k7: 6 columns) in place and writing the context's other half
    ctx0, phase = torch.randn(2, 4, C, 6, generator=g), torch.ones(1, dtype=torch.int32)
    live, w7 = torch.tensor([True, False, True, True]), w[..., :7].contiguous()

    def with_context(xs: torch.Tensor):
        def run(fn, dev):
            ctx = ctx0[:, : xs.shape[0]].clone().to(dev)
            y = fn(xs.to(dev), w7.to(dev), b.to(dev), 1, elu=True, ctx=ctx, phase=phase.to(dev),
                   exec_mask=live[: xs.shape[0]].to(dev))  # fmt: skip
            return torch.cat([y.flatten(), ctx.flatten()])

        return run

    cases = [
        ("conv1d_gemv", f"{C}->{2 * C} k16 s8, 2 columns", lambda fn, dev: fn(x.to(dev), w.to(dev), b.to(dev), 8)),
        ("mimi_ring_attention", f"B2 {H}x64 ring {S}", lambda fn, dev: fn(q.to(dev), cache.to(dev), pos.to(dev))),
        ("mimi_convtr_gemv", f"{2 * C}->{C} k16 s8 of ELU, 2 columns", convtr),
        ("mimi_residual_out", f"{C}->{2 * C} 1x1 + ELU + residual, 24 steps",
         lambda fn, dev: fn(x.to(dev), w[:, :, :1].contiguous().to(dev), b.to(dev), xt[..., :1].expand(1, 2 * C, 24)
                            .contiguous().to(dev))),
        ("conv1d_igemm", f"B4 {C}->{2 * C} k8 s4 of ELU + residual, 96 columns",
         lambda fn, dev: fn(xi.to(dev), w[..., :8].contiguous().to(dev), b.to(dev), 4, residual=res.to(dev),
                            elu=True)),
        ("conv_transpose1d_igemm", f"B4 {2 * C}->{C} k16 s8 of ELU, 24 columns",
         lambda fn, dev: fn(res.to(dev), w.to(dev), b[:C].to(dev), 8, elu=True)),
        ("conv1d_gemv", f"{C}->{2 * C} k7 of ELU, stored context, 2 columns", with_context(xt[:, :C])),
        ("conv1d_igemm", f"B4 {C}->{2 * C} k7 of ELU, stored context (1 row paused), 120 columns",
         with_context(xi[..., :30])),
    ]
    for op, case, run in cases:
        exp = run(getattr(reference, op + "_ref"), "cpu")
        got = run(resolve(op, backend, device), device).cpu()
        bound = 1e-5 * float(exp.abs().max())
        rows.append(_row(op, backend, case + " fp32", got, exp, bound, "abs err <= 1e-5 max|ref|"))
    return rows


def _rvq_encode_rows(backend, device, quick):
    """Mimi's split RVQ encode at its shapes: 2 rows (the CUDA backend's persistent kernel) and 6 (its Triton
    kernels); codes equal to the reference's but where two distances tie within fp32 rounding."""
    rows = []
    g = torch.Generator().manual_seed(4)
    K, D, levels = (64, 32, (1, 3)) if quick or device.type == "cpu" else (2048, 256, (1, 31))
    books = torch.randn(sum(levels), K, D, generator=g) * torch.rand(sum(levels), 1, 1, generator=g)
    aug = torch.stack([reference.augment_codebook(b) for b in books])
    for B, T in ((2, 1), (3, 2)):
        x = torch.randn(B, len(levels) * D, T, generator=g) * 1.5
        want = reference.rvq_encode_ref(x, aug, levels, reference.rvq_level_ranges(levels))
        out = poison_(torch.empty(B, sum(levels), T, dtype=torch.int64, device=device))
        got = resolve("rvq_encode", backend, device)(x.to(device), aug.to(device), levels,
                                                     reference.rvq_level_ranges(levels, device), out=out).cpu()
        allowed = max(1, B * T * len(levels) // 10)
        case = f"B{B} T{T} {sum(levels)} books of {K}x{D}"
        try:
            ties = check_rvq_codes(got, want, x, aug, levels)
            rows.append(Row("rvq_encode", backend, case, float(ties), allowed, ties <= allowed,
                            "code paths differing from reference by an fp32 tie"))  # fmt: skip
        except AssertionError as e:
            rows.append(Row("rvq_encode", backend, case, float("inf"), allowed, False, f"not a tie: {e}"))
    return rows


def _mimi_codec_rows(backend, device, quick):
    """Mimi's RVQ decode with its upsampling, its RoPE + KV ring write, conv state update and transposed-conv
    overlap-add, fp32, at its shapes, with inactive rows that must stay untouched; tolerances as in tests/kernels."""
    rows = []
    g = torch.Generator().manual_seed(4)
    B, T = 3, 2
    K = 64 if quick or device.type == "cpu" else 2048
    C = 512
    tables = torch.randn(33, K, C, generator=g)
    codes = torch.randint(0, K, (B, 32, T), generator=g)
    up_w, partial = torch.randn(C, 1, 4, generator=g), torch.randn(B, C, 2, generator=g)
    mask = torch.tensor([True, False, True])
    exp_p = partial.clone()
    exp = reference.rvq_decode_upsample_ref(codes, tables, up_w, exp_p, mask)
    got_p = partial.clone().to(device)
    got = resolve("rvq_decode_upsample", backend, device)(
        codes.to(device), tables.to(device), up_w.to(device), got_p, mask.to(device),
        out=poison_(torch.empty(B, 2 * T, C, device=device)))
    both_got, both_exp = torch.cat([got.flatten(), got_p.flatten()]), torch.cat([exp.flatten(), exp_p.flatten()])
    rows.append(_row("rvq_decode_upsample", backend, f"B{B} T{T} 32 books of {K}x{C}, upsampling x2", both_got,
                     both_exp, 1e-5 + 1e-6 * both_exp.abs(), "abs err <= 1e-5 + 1e-6 |ref| (output and tail)"))

    H, Dh, S = 8, 64, 250
    qkv = torch.randn(B, T, 3, H, Dh, generator=g)
    cache = torch.randn(B + 1, 2, H, S, Dh, generator=g)
    pos_q = torch.tensor([[S - 1], [7], [3 * S + 5]]) + torch.arange(T)  # row 0 wraps around the ring
    freqs = torch.exp(torch.arange(Dh // 2) * (-9.210340371976184 * 2 / Dh))  # period 1e4; v's factor is 1
    ang = pos_q.float().view(B, T, 1, 1, 1) * torch.stack([freqs, freqs, torch.zeros_like(freqs)]).view(3, 1, -1)
    rot = torch.complex(torch.cos(ang), torch.sin(ang))
    rows_idx = torch.tensor([[0], [B], [2]])  # row 1 inactive: its writes go to the spare ring row B
    slots = torch.remainder(pos_q, S)
    exp_cache = cache.clone()
    exp_q = reference.mimi_rope_kv_ref(qkv, rot, exp_cache, rows_idx, slots)
    got_cache = cache.clone().to(device)
    got_q = resolve("mimi_rope_kv", backend, device)(qkv.to(device), rot.to(device), got_cache, rows_idx.to(device),
                                                     slots.to(device))  # fmt: skip
    rows.append(_row("mimi_rope_kv", backend, f"B{B} T{T} {H}x{Dh} ring {S}",
                     torch.cat([got_q.flatten(), got_cache.flatten()]),
                     torch.cat([exp_q.flatten(), exp_cache.flatten()]),
                     1e-5 + 1e-6 * torch.cat([exp_q.flatten(), exp_cache.flatten()]).abs(),
                     "abs err <= 1e-5 + 1e-6 |ref| (q and ring)"))  # fmt: skip

    phase = torch.zeros(1, dtype=torch.int32)
    for P, elu in ((6, True), (2, False)):
        xc = torch.randn(B, 640, T, generator=g) * 3
        ctx = torch.randn(2, B, 640, P, generator=g)
        exp_ctx = ctx.clone()
        exp = reference.mimi_conv_pad_ref(xc, exp_ctx, phase, mask, elu=elu)
        got_ctx = ctx.clone().to(device)
        got = resolve("mimi_conv_pad", backend, device)(xc.to(device), got_ctx, phase.to(device), mask.to(device),
                                                        elu=elu, out=poison_(torch.empty(B, 640, P + T, device=device)))
        both_got, both_exp = torch.cat([got.flatten(), got_ctx.flatten()]), torch.cat([exp.flatten(),
                                                                                       exp_ctx.flatten()])
        rows.append(_row("mimi_conv_pad", backend, f"B{B} C640 T{T} context {P}{' ELU' if elu else ''}", both_got,
                         both_exp, 1e-7 + 1e-6 * both_exp.abs(), "abs err <= 1e-7 + 1e-6 |ref| (input and state)"))

    y, partial, bias = torch.randn(B, 512, 16, generator=g), torch.randn(B, 512, 8, generator=g), torch.randn(512)
    exp_y, exp_p = y.clone(), partial.clone()
    reference.mimi_convtr_overlap_ref(exp_y, exp_p, bias, mask)
    got_y, got_p = y.clone().to(device), partial.clone().to(device)
    resolve("mimi_convtr_overlap", backend, device)(got_y, got_p, bias.to(device), mask.to(device))
    rows.append(_exact("mimi_convtr_overlap", backend, f"B{B} C512 16 columns, stride 8",
                       [(got_y, exp_y), (got_p, exp_p)]))
    return rows


def _bounded(op, backend, case, got, lp, ref):
    """``got`` within 3x the error of the reference run in bf16 (``lp``) against fp64 (``ref``), plus one bf16 ulp."""
    ref_err = float((lp.double() - ref).abs().max())
    return _row(op, backend, case, got, ref, 3 * ref_err + (2.0**-7) * ref.abs(), "abs err <= 3x ref bf16 err + 1 ulp")


# Every op of the dispatch table, with the function that checks it (an op's cases may cover its partner op).
_CHECKS = {
    ("multistream_embed",): _embed_rows,
    ("paged_decode_attention",): _attention_rows,
    ("append_kv",): _append_kv_rows,
    ("sample_tokens",): _sampling_rows,
    ("add_rms_norm",): _add_rms_norm_rows,
    ("rope_append_kv",): _rope_append_kv_rows,
    ("silu_mul",): _silu_mul_rows,
    ("head_probs",): _head_probs_rows,
    ("frame_inputs", "frame_commit"): _frame_rows,
    ("kv_slots", "mimi_rows"): _kv_slots_rows,
    ("frame_embed",): _frame_embed_rows,
    ("gemv",): _gemv_rows,
    ("qkv_rope_gemv",): _qkv_rope_gemv_rows,
    ("depformer_frame",): _depformer_rows,
    ("decoder_step",): _decoder_rows,
    ("mimi_transformer",): _mimi_transformer_rows,
    ("conv1d_gemv", "mimi_ring_attention", "mimi_convtr_gemv", "mimi_residual_out", "conv1d_igemm",
     "conv_transpose1d_igemm"): _mimi_rows,
    ("rvq_encode",): _rvq_encode_rows,
    ("rvq_decode_upsample", "mimi_rope_kv", "mimi_conv_pad", "mimi_convtr_overlap"): _mimi_codec_rows,
}


def checked_ops() -> set[str]:
    return {op for ops in _CHECKS for op in ops}


def validate_kernels(device: torch.device | str = "cuda", quick: bool = False) -> list[Row]:
    """Check, on ``device``, every available fast backend of every op that has an implementation of its own there
    (an op without a CUDA kernel is checked once, as Triton); returns one :class:`Row` per case."""
    device = torch.device(device)
    missing = set(op_names()) - checked_ops()
    if missing:  # a new op must come with its check
        raise RuntimeError(f"validate-kernels has no check for {sorted(missing)}")
    rows: list[Row] = []
    for backend in available_backends(device):
        if backend == "reference":
            continue
        for ops, check in _CHECKS.items():
            if not all(backend in op_backends(op) for op in ops):
                continue
            try:
                rows += check(backend, device, quick)
            except Exception as e:  # report, keep validating the other ops
                rows.append(Row("+".join(ops), backend, "error", float("inf"), 0.0, False, repr(e)[:160]))
    return rows


def print_table(rows: list[Row]) -> None:
    """The rows as an aligned table: op, backend, case, the error at the element closest to its bound, the bound,
    ok/FAIL, and what the error measures."""
    head = ("op", "backend", "case", "err", "bound", "ok", "measure")
    cells = [(r.op, r.backend, r.case, f"{r.err:.3g}", f"{r.bound:.3g}", "ok" if r.ok else "FAIL", r.measure)
             for r in rows]  # fmt: skip
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head) - 1)]
    right = {3, 4}
    for c in [head, *cells]:
        parts = [c[i].rjust(w) if i in right else c[i].ljust(w) for i, w in enumerate(widths)]
        print("  ".join([*parts, c[-1]]))
    bad = sum(not r.ok for r in rows)
    print(f"{len(rows) - bad}/{len(rows)} passed")


if __name__ == "__main__":
    import sys

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    result = validate_kernels(dev, quick="--quick" in sys.argv)
    print_table(result)
    sys.exit(0 if all(r.ok for r in result) else 1)
