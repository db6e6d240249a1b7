"""A reduced real-shape checkpoint (width 2048, 2 layers, real vocabularies) written by dsm in the released layout
loads with moshi's loader and with ours, and both models agree (greedy tokens and text logits), fp32 on CPU."""

from __future__ import annotations

import pytest
import torch

from dsm.checkpoint import resolve_checkpoint, write_random_checkpoint
from dsm.config import CheckpointConfig
from dsm.generate import Generator
from dsm.model import LMModel
from dsm.presets import preset_config

STEPS = 4


def _reduced(name: str) -> dict:
    cfg = preset_config(name)
    cfg["num_layers"] = 2
    cfg["context"] = 4  # small, so the KV ring wraps within the few steps
    if cfg.get("dep_q"):
        cfg["depformer_num_layers"] = 1
    return cfg


def _moshi_lm(files):
    from moshi.models import loaders

    info = loaders.CheckpointInfo.from_hf_repo(
        "local/unused", moshi_weights=files.lm_weights, mimi_weights=files.mimi_weights,
        tokenizer=files.tokenizer, config_path=files.config_path)
    return info.get_moshi(device="cpu", dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["stt-1b-en_fr", "tts-1.6b-en_fr"])
def test_reduced_real_shape_checkpoint_loads_in_both(tmp_path, preset):
    from moshi.models.lm import LMGen

    out = write_random_checkpoint(_reduced(preset), tmp_path / preset, seed=3, mimi=False, tokenizer=False)
    # moshi's loader needs the files to exist; Mimi and tokenizer are not read by get_moshi.
    cfg = CheckpointConfig.from_file(out / "config.json")
    (out / cfg.mimi_name).write_bytes(b"")
    (out / cfg.tokenizer_name).write_bytes(b"")
    files = resolve_checkpoint(out)
    theirs = _moshi_lm(files).eval()
    ours = LMModel.from_checkpoint(files, dtype=torch.float32)
    lm = ours.cfg
    B = 2
    g = torch.Generator().manual_seed(0)
    conditions, moshi_cond = None, None
    if lm.conditioners:
        from moshi.conditioners import ConditionAttributes, TensorCondition

        from dsm.conditioning import TensorInput

        voices = torch.randn(B, 10, 512, generator=g)
        mask = torch.ones(B, 10, dtype=torch.bool)
        conditions = {"speaker_wavs": TensorInput(voices, mask), "cfg": ["2.0"] * B, "control": ["ok"] * B}
        attrs = [ConditionAttributes(text={"cfg": "2.0", "control": "ok"},
                                     tensor={"speaker_wavs": TensorCondition(voices[b : b + 1], mask[b : b + 1])})
                 for b in range(B)]
        moshi_cond = theirs.condition_provider.prepare_and_provide(attrs)
    n_in = lm.num_codebooks - lm.dep_q - 1
    inputs = torch.randint(0, lm.card, (B, n_in, STEPS), generator=g)
    ref_logits, our_logits = [], []
    gen = LMGen(theirs, use_sampling=False, temp=0, temp_text=0, condition_tensors=moshi_cond,
                on_text_logits_hook=lambda x: ref_logits.append(x.clone()))
    ours_gen = Generator(ours, use_sampling=False)
    state = ours_gen.init_state(B, conditions=conditions)
    with gen.streaming(B):
        for t in range(STEPS):
            r = gen.step(inputs[:, :, t : t + 1])
            o = ours_gen.step(state, inputs[:, :, t], on_text_logits=lambda x: our_logits.append(x.clone()))
            if r is not None:
                assert torch.equal(o.tokens, r[..., 0])
    for a, b in zip(our_logits, ref_logits, strict=True):
        b = b.reshape(a.shape)
        assert torch.isfinite(a).all()
        assert float((a - b).abs().max() / b.abs().max()) < 1e-5
