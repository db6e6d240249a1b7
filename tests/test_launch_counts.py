"""Kernel launches per engine step, pinned: a decode step at small batch is launch-bound on a GPU, so an increase in
this count is a slowdown even when every test still passes (counted on the CPU, benchmarks/count_step_launches.py)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "count_step_launches.py"


def _count(preset, layers, batch=2):
    spec = importlib.util.spec_from_file_location("count_step_launches", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return sum(mod.count_step(preset, layers, batch).values())


def test_stt_step_launches_pinned(monkeypatch):
    # batch <= GEMV_MAX_B: 5 per layer (qkv GEMV with its RMSNorm, RoPE and K/V write; attention, its splits merged
    # in the same launch; out GEMV + residual; in GEMV with its RMSNorm and gate; out GEMV + residual), 7 fixed.
    # Measured 2026-11-29: 9 (the semantic-VAD heads, computed in the step, one kernel: 2 before, the heads' GEMM and
    # an fp32 softmax; the sampler computes its noise counters from the frame offsets: one kernel fewer; the positions
    # advanced by the K/V-slot kernel: one fewer); then 7 (the input column, its embedding and the K/V slots in one
    # kernel, frame_embed: 3 before).
    one, two = _count("stt-1b-en_fr", 1), _count("stt-1b-en_fr", 2)
    per_layer, fixed = two - one, 2 * one - two
    assert per_layer <= 5 and fixed <= 7, (per_layer, fixed)
    # above it, cuBLAS GEMMs: 9 per layer (norm, qkv, rope + append, attention, out, norm, in, gate, out)
    one, two = _count("stt-1b-en_fr", 1, batch=8), _count("stt-1b-en_fr", 2, batch=8)
    per_layer, fixed = two - one, 2 * one - two
    assert per_layer <= 9 and fixed <= 7, (per_layer, fixed)
    # DSM_GEMV=0 (the A/B switch) takes the cuBLAS path at every batch
    monkeypatch.setenv("DSM_GEMV", "0")
    one, two = _count("stt-1b-en_fr", 1), _count("stt-1b-en_fr", 2)
    assert two - one == 9, two - one
