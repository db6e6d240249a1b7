"""Parity of the dsm model and generator with the `moshi` reference (test-only oracle), fp32 on CPU.

* Kyutai's own LM test vectors (LayerNorm, sin positions, plain FFN, delays, schedule, low-rank embeddings).
* Random weights, STT-like and TTS-like configs: greedy streaming tokens identical to moshi's LMGen, text logits
  within 1e-5 relative, over >= 50 steps (past the KV ring wrap-around).
* Our streaming steps equal our own teacher-forced forward.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parents[1]))
from moshi_oracle import dsm_lm_from_moshi, moshi_lm_assets, moshi_lm_from_config  # noqa: E402

from dsm.conditioning import TensorInput  # noqa: E402
from dsm.config import parse_config  # noqa: E402
from dsm.generate import Generator  # noqa: E402
from dsm.model import LMModel  # noqa: E402

REL_TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only spin on a busy 2-core box


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _ce_per_stream(logits, targets, mask):
    """Mean cross-entropy per stream over valid positions (own implementation, not moshi's)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    nll = torch.where(mask, nll, torch.zeros_like(nll))
    return nll.mean(dim=(0, 2))


MOSHI_TEST_LM = dict(
    delays=[0, 1, 2, 4], n_q=3, dep_q=3, card=32, text_card=48, dim=16, num_layers=2, num_heads=1, hidden_scale=1,
    depformer_dim=16, depformer_multi_linear=True, depformer_weights_per_step=True,
    depformer_weights_per_step_schedule=[0, 1, 1], depformer_low_rank_embeddings=8, depformer_num_heads=1,
    depformer_gating="silu", context=4,
)


@pytest.mark.parametrize("dep", ["absent", None, 0.02])
def test_depformer_layer_scale_follows_moshi(dep):
    """moshi's depformer takes every main-transformer keyword it is not given a depformer_ one for: a config.json
    without depformer_layer_scale inherits layer_scale, and an explicit null means none. The checkpoint's expected
    tensors and the model's parameters both follow moshi's (they disagreed: the model built none, the file check
    wanted inherited ones), through a config written back by lm_to_dict (moshi is built from that)."""
    from dsm.checkpoint import expected_lm_tensors, stack_projections

    cfg_dict = {**MOSHI_TEST_LM, "layer_scale": 0.01}
    if dep != "absent":
        cfg_dict["depformer_layer_scale"] = dep
    theirs = set(stack_projections(moshi_lm_from_config(cfg_dict).state_dict()))
    lm_cfg = parse_config(cfg_dict).lm
    assert set(expected_lm_tensors(lm_cfg)) == set(LMModel(lm_cfg).state_dict()) == theirs
    assert any(k.startswith("depformer.") and "layer_scale" in k for k in theirs) == (dep is not None)


def test_kyutai_lm_test_vectors():
    """moshi's own test_lm.py check: masks equal, per-stream cross-entropy within 1e-6 relative."""
    assets = moshi_lm_assets()
    model = LMModel(parse_config(MOSHI_TEST_LM).lm)
    model.load_state_dict(load_file(assets / "test_lm_model.safetensors"), strict=True)
    model.eval()
    codes = load_file(assets / "test_lm_codes.safetensors")["codes"]
    ref = load_file(assets / "test_lm_out.safetensors")
    with torch.no_grad():
        logits, mask, text_logits, text_mask = model(codes)
    assert torch.equal(mask, ref["mask"]) and torch.equal(text_mask, ref["text_mask"])
    for ours, theirs, targets, m in ((logits, ref["logits"], codes[:, 1:], mask),
                                    (text_logits, ref["text_logits"], codes[:, :1], text_mask)):
        ce, ce_ref = _ce_per_stream(ours, targets, m), _ce_per_stream(theirs, targets, m)
        assert ((ce - ce_ref).abs() / ce_ref).max() <= 1e-6
        # Stronger than moshi's own check: the valid logits themselves agree.
        assert _rel_err(ours[m], theirs[m]) < REL_TOL


STT_LIKE = dict(
    delays=[0] * 33, n_q=32, dep_q=0, card=64, text_card=40, dim=64, num_layers=2, num_heads=4, context=12,
    extra_heads_num_heads=4, extra_heads_dim=6, gating="silu", norm="rms_norm_f32", positional_embedding="rope",
    max_period=100000.0, hidden_scale=4.125, depformer_multi_linear=True,
)

TTS_LIKE = dict(
    delays=[0, 0] + [2] * 7, n_q=8, dep_q=8, card=48, text_card=30, dim=64, num_layers=2, num_heads=4, context=10,
    gating="silu", norm="rms_norm_f32", positional_embedding="rope", max_period=10000.0, hidden_scale=4.125,
    depformer_dim=32, depformer_num_heads=2, depformer_num_layers=2, depformer_dim_feedforward=96,
    depformer_multi_linear=True, depformer_weights_per_step=True,
    depformer_weights_per_step_schedule=[0, 1, 2, 2, 3, 3, 3, 3], depformer_low_rank_embeddings=8,
    depformer_pos_emb="none", demux_second_stream=True, cross_attention=True,
    conditioners={
        "speaker_wavs": {"type": "tensor", "tensor": {"dim": 16}},
        "cfg": {"type": "lut", "lut": {"n_bins": 3, "dim": 8, "tokenizer": "noop",
                                       "possible_values": ["1.0", "2.0", "3.0"]}},
        "control": {"type": "lut", "lut": {"n_bins": 1, "dim": 64, "tokenizer": "noop", "possible_values": ["ok"]}},
    },
    fuser={"sum": ["control", "cfg"], "cross": ["speaker_wavs"], "cross_attention_pos_emb": True,
           "cross_attention_pos_emb_scale": 1.0},
)


def _run_both(cfg, steps, batch, *, gen_kwargs, inputs=None, conditions=None, moshi_conditions=None,
              text_forcer=None, seed=0):
    """Run moshi LMGen and our Generator greedily side by side; returns per-step (ref, ours) outputs."""
    from moshi.models.lm import LMGen

    mm = moshi_lm_from_config(cfg, seed=seed)
    dm = dsm_lm_from_moshi(cfg, mm)
    ref_logits, our_logits = [], []
    gen = LMGen(mm, use_sampling=False, temp=0, temp_text=0, condition_tensors=moshi_conditions, **gen_kwargs)
    ours = Generator(dm, use_sampling=False, **gen_kwargs)
    state = ours.init_state(batch, conditions=conditions)
    outs = []
    with gen.streaming(batch):
        for t in range(steps):
            hooks = {}
            if text_forcer is not None:
                hooks = dict(on_text_hook=lambda tok, t=t: text_forcer(t, tok))
            gen.on_text_logits_hook = lambda x: ref_logits.append(x.clone())
            gen.on_text_hook = hooks.get("on_text_hook")
            u = inputs[:, :, t : t + 1] if inputs is not None else torch.zeros(batch, 0, 1, dtype=torch.long)
            r = gen.step_with_extra_heads(u)
            o = ours.step(state, u, on_text_logits=lambda x: our_logits.append(x.clone()),
                          on_text=(lambda tok, t=t: text_forcer(t, tok)) if text_forcer else None)
            outs.append((r, o))
    return outs, ref_logits, our_logits, dm


def _check(outs, ref_logits, our_logits, min_frames):
    frames = 0
    for r, o in outs:
        if r is None:
            assert o.tokens is None
            continue
        ref_tokens, ref_heads = r
        assert torch.equal(o.tokens, ref_tokens[..., 0]), (o.tokens, ref_tokens[..., 0])
        frames += 1
    assert frames >= min_frames
    for a, b in zip(our_logits, ref_logits, strict=True):
        assert _rel_err(a, b.reshape(a.shape).float()) < REL_TOL


def test_stt_like_greedy_parity():
    steps, batch = 55, 3
    g = torch.Generator().manual_seed(1)
    audio = torch.randint(0, 64, (batch, 32, steps), generator=g)
    audio[1, 5, 10:20] = -1  # zero tokens on one stream
    outs, rl, ol, dm = _run_both(STT_LIKE, steps, batch, gen_kwargs={}, inputs=audio)
    _check(outs, rl, ol, min_frames=steps)
    # VAD extra heads: same probabilities as moshi's step_with_extra_heads.
    r, o = outs[-1]
    for ours, theirs in zip(dm.extra_head_probs(o.z), r[1], strict=True):
        assert _rel_err(ours, theirs[:, 0]) < REL_TOL
    # and the step's own: P(class 0) of every head, every step (softmax in fp32 from the same logits)
    for r, o in outs:
        assert o.extra_probs.shape == (batch, 4) and o.extra_probs.dtype == torch.float32
        assert _rel_err(o.extra_probs, torch.stack([h[:, 0, 0] for h in r[1]], 1).float()) < REL_TOL


def _tts_conditions(batch, with_null: bool):
    from moshi.conditioners import ConditionAttributes, TensorCondition, dropout_all_conditions

    g = torch.Generator().manual_seed(3)
    voices = torch.randn(batch, 6, 16, generator=g)
    mask = torch.ones(batch, 6, dtype=torch.bool)
    mask[:, 4:] = False  # padded speaker slots use the learnt padding
    cfg_values = ["2.0", "1.0", "3.0"][:batch]
    ours = {"speaker_wavs": TensorInput(voices, mask), "cfg": cfg_values, "control": ["ok"] * batch}
    attrs = [ConditionAttributes(text={"cfg": cfg_values[b], "control": "ok"},
                                 tensor={"speaker_wavs": TensorCondition(voices[b : b + 1], mask[b : b + 1])})
             for b in range(batch)]
    if with_null:
        attrs = attrs + dropout_all_conditions(attrs)
    return ours, attrs


@pytest.mark.parametrize("mode", ["plain", "cfg", "cfg_no_text"])
def test_tts_like_greedy_parity(mode):
    """Depformer (schedule, low-rank, demux), cross-attention, conditioners, CFG; text forced to demuxed ids."""
    steps, batch = 52, 2
    gen_kwargs = {}
    if mode != "plain":
        gen_kwargs = dict(cfg_coef=2.0, cfg_is_no_text=(mode == "cfg_no_text"))
    cfg = dict(TTS_LIKE)
    mm_probe = moshi_lm_from_config(cfg)  # only to build the condition tensors with moshi's own provider
    ours_cond, attrs = _tts_conditions(batch, with_null=mode != "plain")
    cond_tensors = mm_probe.condition_provider.prepare_and_provide(attrs)
    V = cfg["text_card"] + 1

    def forcer(t, tok):
        # Every 3rd step force a multiplexed (second stream) id as the TTS state machine does.
        if t % 3 == 1:
            tok[:] = ((t % 5) + 1) * V + (t % 7)

    outs, rl, ol, _ = _run_both(cfg, steps, batch, gen_kwargs=gen_kwargs, conditions=ours_cond,
                                moshi_conditions=cond_tensors, text_forcer=forcer)
    _check(outs, rl, ol, min_frames=steps - 2)


def test_streaming_equals_teacher_forced():
    """Our streaming steps (paged KV cache, fused embedding, per-frame depformer) reproduce our teacher-forced
    forward: text logits of every step and depformer logits of every codebook."""
    from dsm.conditioning import condition_tensors
    from dsm.model import _delay

    cfg = parse_config(TTS_LIKE).lm
    model = dsm_lm_from_moshi(TTS_LIKE, moshi_lm_from_config(TTS_LIKE, seed=5))
    B, T, dq = 2, 24, cfg.dep_q
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, cfg.card, (B, cfg.num_codebooks, T), generator=g)
    codes[:, 0] = torch.randint(0, cfg.text_card, (B, T), generator=g)
    codes[0, 3, 5] = -1
    conds, _ = _tts_conditions(B, with_null=False)
    total, cross = condition_tensors(model.condition_provider, cfg.fuser, conds)
    init = model.initial_tokens(B, "cpu")[:, :, None]
    delayed = torch.cat([init, _delay(codes, cfg.delays, init)], dim=2)
    with torch.no_grad():
        z_tf, text_tf = model.forward_text(delayed[:, :, :-1], total, cross)
        dep_tf = model.depformer_teacher_forced(delayed[:, :, 1:], z_tf)
    gen = Generator(model, use_sampling=False)
    state = gen.init_state(B, conditions=conds)
    for s in range(T):
        nxt = delayed[:, :, s + 1]
        text_logits = []

        def force_text(tok, nxt=nxt):
            tok[:] = nxt[:, 0]

        out = gen.step(state, None, depformer_replace_tokens=nxt[:, 1 : 1 + dq], on_text=force_text,
                       on_text_logits=text_logits.append)
        assert _rel_err(text_logits[0], text_tf[:, 0, s]) < REL_TOL
        assert _rel_err(out.z, z_tf[:, s]) < REL_TOL
        recorded = []

        def replay(k, logits, nxt=nxt, recorded=recorded):
            recorded.append(logits)
            return nxt[:, k + 1]  # the next stream's (delayed) token is what the depformer is fed

        with torch.no_grad():
            model.depformer_step(nxt[:, 0], out.z, replay)
        for k in range(dq):
            assert _rel_err(recorded[k], dep_tf[:, k, s]) < REL_TOL
