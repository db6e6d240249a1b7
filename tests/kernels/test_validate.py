"""``dsm validate-kernels`` can fail: a wrong or NaN kernel output is a FAIL row, every op of the dispatch table has
a check, rows name the backend that really ran, and the printed bound is the one applied."""

from __future__ import annotations

import pytest
import torch

import dsm_kernels
from dsm_kernels import validate
from dsm_kernels.validate import Row, _row, print_table, validate_kernels


def test_every_dispatch_op_has_a_check():
    assert validate.checked_ops() == set(dsm_kernels.op_names())


def test_row_reports_the_applied_bound_at_the_closest_element():
    exp = torch.tensor([1.0, 100.0, 5.0])
    got = exp + torch.tensor([0.5, 2.0, 0.0])
    bound = 0.1 + 0.01 * exp.abs()  # 0.11, 1.1, 0.15: element 0 fails by the most relative margin
    r = _row("op", "triton", "c", got, exp, bound, "m")
    assert not r.ok and r.err == 0.5 and abs(r.bound - 0.11) < 1e-6
    r = _row("op", "triton", "c", exp + 0.01, exp, bound, "m")
    assert r.ok and r.err <= r.bound


def test_nan_and_shape_never_pass():
    exp = torch.zeros(4)
    got = torch.zeros(4)
    got[2] = float("nan")
    assert not _row("op", "triton", "c", got, exp, 1e9, "m").ok
    assert not _row("op", "triton", "c", torch.zeros(5), exp, 1e9, "m").ok


def _validate_broken(monkeypatch, breaks):
    """The quick validation of the checks of the ops in ``breaks`` only, each op's kernels handed out as
    ``breaks[op](kernel)`` (a broken kernel); the other ops' kernels as they are."""
    real = validate.resolve

    def resolve(op, backend, device):
        fn = real(op, backend, device)
        return breaks[op](fn) if op in breaks else fn

    monkeypatch.setattr(validate, "resolve", resolve)
    monkeypatch.setattr(validate, "_CHECKS", {k: v for k, v in validate._CHECKS.items() if k[0] in breaks})
    monkeypatch.setattr(validate, "checked_ops", lambda: set(dsm_kernels.op_names()))
    return validate_kernels("cpu", quick=True)


def test_a_wrong_kernel_fails(monkeypatch):
    """A kernel 8 bf16 ulps off, one that writes NaN and one with a wrong integer are each reported as FAIL."""
    rows = _validate_broken(monkeypatch, {
        "silu_mul": lambda fn: lambda h, out=None: (fn(h).float() * (1 + 8 * 2.0**-8)).bfloat16(),
        "rvq_decode_upsample": lambda fn: lambda *a, out=None: fn(*a, out=out).fill_(float("nan")),
        "kv_slots": lambda fn: lambda *a: tuple(t + 1 for t in fn(*a)),
    })
    by_op = {r.op: r for r in rows}
    assert not by_op["silu_mul"].ok and not by_op["rvq_decode_upsample"].ok and not by_op["kv_slots"].ok
    assert "NaN" in by_op["rvq_decode_upsample"].measure
    assert by_op["mimi_rope_kv"].ok and by_op["mimi_convtr_overlap"].ok  # the untouched ops of a check still pass


def test_rows_name_the_backend_that_ran(monkeypatch):
    """With a CUDA backend, only the ops that have a CUDA kernel of their own get cuda rows (the others fall back to
    Triton and are checked once, as Triton)."""
    monkeypatch.setattr(validate, "available_backends", lambda device=None: ["reference", "cuda"])
    rows = validate_kernels("cpu", quick=True)  # cuda is not available on the CPU: every row is an error row
    assert {r.op for r in rows} == {op for op in dsm_kernels.op_names() if "cuda" in dsm_kernels.op_backends(op)}
    assert all(r.backend == "cuda" and not r.ok for r in rows)


def test_table_columns_align(capsys):
    rows = [Row("a", "triton", "short", 1e-3, 2e-3, True, "m"),
            Row("a_much_longer_op_name", "cuda", "a case name far longer than the others", 5.0, 1.0, False, "m")]
    print_table(rows)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "1/2 passed"
    ends = {line.index(word) + len(word) for line, word in zip(lines[:3], ("bound", "0.002", "1"), strict=True)}
    assert len(ends) == 1, lines


@pytest.mark.parametrize("k_fault", ["nan", "doubled"])
def test_kernels_broken_where_only_a_side_output_shows_fail(monkeypatch, k_fault):
    """Found by a probe, each passed: NaN written into the K cache (Python's max() of the per-tensor errors kept the
    first, a finite one), an append that zeroes the slots it must not touch (both sides went through nan_to_num,
    so the poison equalled 0), and a residual add + RMSNorm that never writes the residual back (only the normed
    output was compared). On a CPU the K/V caches were also the reference's own tensors (.cpu() and .to() alias
    there), so any wrong K passed."""
    def bad_k(fn):
        def nan_k(qkv, pos, inv, kc, vc, slots, h, hkv, out=None):
            q = fn(qkv, pos, inv, kc, vc, slots, h, hkv, out=out)
            rows = kc.view(kc.shape[0] * kc.shape[1], -1)
            rows[slots] = float("nan") if k_fault == "nan" else rows[slots] * 2
            return q
        return nan_k

    def zeroing(fn):
        def append(kc, vc, k, v, slots):
            kc.zero_()
            vc.zero_()
            return fn(kc, vc, k, v, slots)
        return append

    ops = ("rope_append_kv", "append_kv", "add_rms_norm")
    rows = [r for r in _validate_broken(monkeypatch, {
        "rope_append_kv": bad_k,
        "append_kv": zeroing,
        "add_rms_norm": lambda fn: lambda x, *a, **kw: fn(x.clone(), *a, **kw),  # the caller's x is never updated
    }) if r.backend != "reference"]
    failed = {(r.op, r.case) for r in rows if not r.ok}
    assert {op for op, _ in failed} == set(ops), rows
    assert ("add_rms_norm", "B8 D2048 bf16 residual") in failed and ("add_rms_norm", "B8 D2048 bf16") not in failed


def test_a_sampler_off_by_one_in_one_row_fails(monkeypatch):
    """One mismatched row of 64 passed whatever it was (a near tie was assumed); now only a near tie of the two
    exp-race scores, or a token tied with the k-th value, may differ from the reference. The rows cover bf16 logits
    without CFG too (the kernels' narrow top-k keys)."""
    def off_by_one(fn):
        def next_token(logits, *a, **kw):
            out = fn(logits, *a, **kw)
            out[10] = (out[10] + 1) % logits.shape[1]
            return out
        return next_token

    rows = [r for r in _validate_broken(monkeypatch, {"sample_tokens": off_by_one}) if r.backend != "reference"]
    assert {r.case for r in rows} == {"B64 V2049 k0 fp32 cfg", "B64 V2049 k250 bf16"} and not any(r.ok for r in rows)


def test_a_depformer_returning_wrong_bf16_tokens_fails(monkeypatch):
    """The bf16 depformer rows compared logits only, up to the first codebook whose tokens differed: a kernel
    returning token 0 everywhere beside right logits passed. At temperature 0 each token must be its logits'
    argmax."""
    def zero_bf16_tokens(fn):
        def zero_tokens(w, *a, **kw):
            tok, lg = fn(w, *a, **kw)
            return (torch.zeros_like(tok) if w.in_proj.dtype == torch.bfloat16 else tok), lg
        return zero_tokens

    rows = [r for r in _validate_broken(monkeypatch, {"depformer_frame": zero_bf16_tokens}) if r.backend != "reference"]
    assert rows and all(r.ok == r.case.endswith("fp32") for r in rows), rows
