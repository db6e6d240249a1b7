"""fp8 (e4m3) KV cache through the engine on CPU (reference kernels, and the emulated persistent CUDA step): valid
tokens past the context wrap, and a stream's output does not depend on the other streams (isolation) with fp8 pages
too."""

from __future__ import annotations

import pytest
import torch

from dsm.bench import random_model
from dsm.engine import Engine
from dsm.presets import preset_config

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def stt():
    return random_model(preset_config("tiny-stt"), "cpu", torch.bfloat16)[0]


def _inputs(model, seed, steps, rows):
    cfg = model.cfg
    n_in = cfg.num_codebooks - cfg.dep_q - 1
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.card, (steps, rows, n_in), generator=g)


def test_fp8_engine_valid_tokens(stt):
    steps = 3 * stt.cfg.context + 5  # well past the ring wrap
    eng = Engine(stt, max_slots=2, kv_dtype=FP8, use_sampling=False)
    assert eng.state.kv.k.dtype == FP8 and eng.state.kv.v.dtype == FP8
    slots = [eng.open(), eng.open()]
    audio = _inputs(stt, 0, steps, 2)
    texts = []
    for t in range(steps):
        out = eng.step(audio[t])
        assert torch.isfinite(out.text_logits.float()).all(), f"step {t}: non-finite logits"
        texts.append(out.text_token[slots].clone())
    texts = torch.stack(texts)
    assert bool(((texts >= 0) & (texts < stt.cfg.text_card)).all()), texts
    kv = eng.state.kv.k.float()
    assert bool(torch.isfinite(kv).all()) and float(kv.abs().max()) > 0  # written, finite fp8 values


def _run(model, audio, others: bool, steps: int):
    """Slot 0 fed ``audio``; with ``others``, slots 1..3 run beside it on other inputs (one fixed bucket)."""
    eng = Engine(model, max_slots=4, buckets=(4,), kv_dtype=FP8, use_sampling=False)
    eng.open()
    noise = _inputs(model, 99, steps, 4)
    if others:
        for _ in range(3):
            eng.open()
    toks, logits = [], []
    for t in range(steps):
        inp = noise[t].clone()
        inp[0] = audio[t]
        if others and t == steps // 2:  # a leave and a join mid-stream
            eng.close(2)
            eng.open()
        out = eng.step(inp)
        toks.append(out.text_token[0].clone())
        logits.append(out.text_logits[0].clone())
    return torch.stack(toks), torch.stack(logits)


def test_fp8_stream_isolation(stt):
    steps = 2 * stt.cfg.context + 7
    audio = _inputs(stt, 5, steps, 1)[:, 0]
    alone_t, alone_l = _run(stt, audio, False, steps)
    among_t, among_l = _run(stt, audio, True, steps)
    assert torch.equal(alone_t, among_t)
    assert torch.equal(alone_l, among_l)  # bit-identical: one fixed bucket, rows independent


def test_fp8_cache_really_quantizes(stt):
    """The fp8 engine's logits differ from the bf16 engine's (else the option would be a no-op), yet stay close."""
    steps = stt.cfg.context + 3
    audio = _inputs(stt, 1, steps, 1)
    res = {}
    for dt in (torch.bfloat16, FP8):
        eng = Engine(stt, max_slots=1, kv_dtype=dt, use_sampling=False)
        eng.open()
        res[dt] = torch.stack([eng.step(audio[t]).text_logits[0].float().clone() for t in range(steps)])
    diff = (res[FP8] - res[torch.bfloat16]).abs().max()
    assert 0 < float(diff) < 0.5 * float(res[torch.bfloat16].abs().max()), diff


def test_fp8_engine_on_the_emulated_persistent_step_equals_reference(cuda_emulated):
    """The CUDA configuration at 2 streams with fp8 pages: every step on the persistent decode-step kernel (it takes
    e4m3 pages: written as the append op rounds, read upcast), the reference's tokens and logits past the ring wrap
    (fp32 weights, greedy)."""
    model = random_model(preset_config("tiny-stt"), "cpu", torch.float32)[0]
    steps = model.cfg.context + 4
    audio = _inputs(model, 3, steps, 2)
    out = {}
    for backend in ("cuda", "reference"):
        eng = Engine(model, max_slots=2, buckets=(2,), kv_dtype=FP8, use_sampling=False, backend=backend)
        eng.open(), eng.open()
        res = [eng.step(audio[t]) for t in range(steps)]
        out[backend] = (torch.stack([r.text_token for r in res]), torch.stack([r.text_logits.float() for r in res]))
    assert cuda_emulated["decoder_step"] == steps  # not handed to the single ops
    assert torch.equal(out["cuda"][0], out["reference"][0])
    err = (out["cuda"][1] - out["reference"][1]).abs().max()
    assert float(err) <= 1e-4 * float(out["reference"][1].abs().max()), err
