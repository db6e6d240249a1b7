"""The whole model step (fused embedding, paged attention, sampling at temperature > 0) gives the same tokens on
every available kernel backend as on the reference ops (Triton runs on CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from moshi_oracle import dsm_lm_from_moshi, moshi_lm_from_config  # noqa: E402

import dsm_kernels  # noqa: E402
from dsm.generate import Generator  # noqa: E402

CFG = dict(
    delays=[0, 0, 2, 2, 2], n_q=4, dep_q=4, card=32, text_card=30, dim=32, num_layers=2, num_heads=2, context=5,
    gating="silu", norm="rms_norm_f32", positional_embedding="rope", max_period=10000.0, hidden_scale=4.125,
    depformer_dim=16, depformer_num_heads=2, depformer_num_layers=1, depformer_dim_feedforward=48,
    depformer_multi_linear=True, depformer_weights_per_step=True, depformer_pos_emb="none", demux_second_stream=True,
)


def _tokens(model, backend, device):
    g = Generator(model, temp=0.8, temp_text=0.7, top_k=10, top_k_text=5, backend=backend, support_out_of_sync=True)
    state = g.init_state(2, seed=5)
    return torch.stack([g.step(state).tokens.cpu() for _ in range(8)])  # past the context-5 ring wrap


def _check(backend: str, device: str) -> None:
    assert backend in dsm_kernels.available_backends(device), dsm_kernels.available_backends(device)
    model = dsm_lm_from_moshi(CFG, moshi_lm_from_config(CFG)).to(device)
    assert torch.equal(_tokens(model, backend, device), _tokens(model, "reference", device))


def test_model_tokens_triton_equal_reference():
    _check("triton", "cuda" if torch.cuda.is_available() else "cpu")


STT_CFG = dict(CFG, delays=[0, 2, 2, 2, 2], dep_q=0)


def test_generator_takes_a_frame_sliced_from_a_longer_input():
    """``Generator.step``'s documented ``[B, n_in, 1]`` input, sliced from ``[B, n_in, T]`` codes as moshi's callers
    do, is not row-contiguous: the Triton embedding kernel (the one a GPU runs) refused it with a ValueError."""
    model = dsm_lm_from_moshi(STT_CFG, moshi_lm_from_config(STT_CFG))
    codes = torch.randint(0, 32, (2, 4, 6), generator=torch.Generator().manual_seed(0))
    got = []
    for backend in ("triton", "reference"):
        g = Generator(model, use_sampling=False, backend=backend)
        state = g.init_state(2)
        got.append(torch.stack([g.step(state, codes[:, :, t : t + 1]).text_token for t in range(6)]))
    assert torch.equal(got[0], got[1])


def _engine_tokens(model, backend, batch, steps=6):
    from dsm.bench import _random_conditions
    from dsm.engine import Engine

    eng = Engine(model, max_slots=batch, buckets=(batch,), backend=backend, temp=0.8, temp_text=0.7, top_k=10,
                 top_k_text=5, seed=3)  # fmt: skip
    for b in range(batch):
        eng.open(conditions=_random_conditions(model, b))
    outs = [eng.step() for _ in range(steps)]
    return torch.stack([o.tokens.cpu() for o in outs]), torch.stack([o.text_logits.float().cpu() for o in outs])


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu), "cuda_emu"])
@pytest.mark.parametrize("batch", [2, 6], ids=["gemv-path", "cublas-path"])
def test_tts_engine_tokens_equal_reference(batch, backend, request):
    """A conditioned model (cross-attention to the voice, depth transformer, delays) on the Triton kernels, as the
    engine steps it, samples the reference's tokens with the same text logits. At batch <= 4 it runs the GEMV path
    (the cross-attention's query and output GEMVs included), above it F.linear. tiny-tts with 8 codebooks, for the
    interpreter's speed. The CUDA backend runs the decode step (cross-attention included) and the depth transformer as
    persistent kernels at batch <= 4; above, the voice cross-attention on its decode-attention kernel over
    125-position condition pages."""
    from dsm.bench import random_model
    from dsm.presets import preset_config

    device = "cuda" if torch.cuda.is_available() and backend != "cuda_emu" else "cpu"
    calls = None
    if backend == "cuda_emu":  # the CUDA configuration with csrc/'s kernels emulated on the CPU
        calls = request.getfixturevalue("cuda_emulated")
        backend = "cuda"
    cfg = dict(preset_config("tiny-tts"), num_layers=1, depformer_num_layers=1, n_q=8, dep_q=8, delays=[0, 0] + [2] * 7)
    cfg["depformer_weights_per_step_schedule"] = cfg["depformer_weights_per_step_schedule"][:8]
    model = random_model(cfg, device, torch.float32)[0]
    ln = model.transformer.layers[0].norm_cross
    with torch.no_grad():  # a LayerNorm that is not an RMSNorm in disguise (zero bias, zero-mean input)
        ln.bias.normal_(0, 0.5, generator=torch.Generator(device).manual_seed(1))
    assert model.transformer.layers[0].cross_attention is not None
    tok, logits = _engine_tokens(model, backend, batch)
    tok_ref, logits_ref = _engine_tokens(model, "reference", batch)
    assert torch.equal(tok, tok_ref)
    # fp32: the logits agree closely (tokens alone would miss a small error such as a LayerNorm taken for an RMSNorm)
    assert float((logits - logits_ref).abs().max()) <= 1e-4 * float(logits_ref.abs().max())
    if calls is not None:  # text sampling, depth transformer and both attentions ran on CUDA kernels (the input
        # column, its embedding and the K/V slots are one Triton kernel, frame_embed, on every backend)
        assert calls["sample_tokens"] and calls["depformer_frame"] >= 3, calls
        if batch <= 4:  # the persistent decode step, voice cross-attention included, and the persistent depformer
            assert calls["decoder_step"] == 6 and not calls["paged_decode_attention"], calls
        else:  # the single ops: self- and voice cross-attention on the decode-attention kernel
            assert calls["paged_decode_attention"] >= 12, calls


@pytest.mark.gpu
def test_model_tokens_cuda_equal_reference():
    _check("cuda", "cuda")


def test_model_tokens_emulated_cuda_equal_reference(cuda_emulated):
    """The same on the CPU with the CUDA kernels emulated (tests/kernels/cuda_emu.py)."""
    _check("cuda", "cpu")
    assert all(cuda_emulated[op] for op in ("sample_tokens", "decoder_step")), cuda_emulated  # (frame_embed: Triton)
    assert cuda_emulated["decoder_step"] == 8  # every step at 2 rows: the persistent decode-step kernel
