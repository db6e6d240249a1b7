"""config.json parsing: presets round-trip, errors name the file and the field."""

from __future__ import annotations

import json

import pytest

from dsm.config import CheckpointConfig, ConfigError, config_to_dict, parse_config
from dsm.presets import PRESETS, REAL_PRESETS, TTS_SCHEDULE, preset_config


@pytest.mark.parametrize("name", PRESETS)
def test_preset_round_trip(name):
    cfg = parse_config(preset_config(name), name)
    again = parse_config(config_to_dict(cfg), name)
    assert again == cfg
    assert again.lm == cfg.lm
    assert parse_config(json.loads(json.dumps(config_to_dict(again))), name) == cfg


@pytest.mark.parametrize("name", PRESETS)
def test_preset_from_file(tmp_path, name):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(preset_config(name)))
    assert CheckpointConfig.from_file(path) == parse_config(preset_config(name))


def test_preset_config_is_fresh_and_unknown_preset_fails():
    a = preset_config("tiny-tts")
    a["dim"] = 1
    assert preset_config("tiny-tts")["dim"] == 64
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        preset_config("nope")


def test_real_preset_values():
    stt1, stt2, tts = (parse_config(preset_config(n), n) for n in REAL_PRESETS)
    assert (stt1.lm.dim, stt1.lm.num_heads, stt1.lm.num_layers, stt1.lm.text_card, stt1.lm.context) == (
        2048, 16, 16, 8000, 750)
    assert (stt1.lm.extra_heads_num_heads, stt1.lm.extra_heads_dim) == (4, 6)
    assert (stt2.lm.num_heads, stt2.lm.num_layers, stt2.lm.text_card, stt2.lm.context) == (32, 48, 4000, 375)
    for c in (stt1, stt2):
        assert c.lm.dep_q == 0 and c.lm.delays == (0,) * 33 and c.lm.max_period == 1e5
        assert c.model_type == "stt" and c.mimi_name == "mimi-pytorch-e351c8d8@125.safetensors"
    assert stt1.tokenizer_name == "tokenizer_en_fr_audio_8000.model"
    assert stt2.tokenizer_name == "tokenizer_en_audio_4000.model"
    assert stt1.stt_config["audio_delay_seconds"] == 0.5 and stt2.stt_config["audio_delay_seconds"] == 2.5
    lm = tts.lm
    assert tts.moshi_name == "dsm_tts_1e68beda@240.safetensors"
    assert tts.mimi_name == "tokenizer-e351c8d8-checkpoint125.safetensors"
    assert tts.tokenizer_name == "tokenizer_spm_8k_en_fr_audio.model"
    assert lm.delays == (0, 0) + (2,) * 31 and lm.dep_q == 32 and lm.context == 500 and lm.max_period == 1e4
    assert lm.dep_schedule == TTS_SCHEDULE and lm.dep_weight_sets == 11 and lm.dep_num_in == 11
    assert lm.depformer_low_rank_embeddings == 128 and lm.dep_ffn_dim == 3072 and lm.depformer_dim == 1024
    assert lm.demux_second_text_stream and lm.cross_attention
    assert {c.name: (c.type, c.dim, c.n_bins) for c in lm.conditioners} == {
        "speaker_wavs": ("tensor", 512, 0), "cfg": ("lut", 16, 7), "control": ("lut", 2048, 1)}
    assert lm.fuser.sum == ("control", "cfg") and lm.fuser.cross == ("speaker_wavs",)
    assert tts.tts_config == {"audio_delay": 1.28, "second_stream_ahead": 2}


def test_tiny_presets_share_the_real_family():
    stt = parse_config(preset_config("tiny-stt")).lm
    tts = parse_config(preset_config("tiny-tts")).lm
    assert (stt.n_q, stt.dep_q, stt.card, stt.positional_embedding, stt.norm, stt.gating) == (
        32, 0, 2048, "rope", "rms_norm_f32", "silu")
    assert stt.extra_heads_num_heads == 4
    assert (tts.n_q, tts.dep_q, tts.delays, tts.dep_schedule) == (32, 32, (0, 0) + (2,) * 31, TTS_SCHEDULE)
    assert tts.demux_second_text_stream and tts.cross_attention and tts.depformer_low_rank_embeddings


def _bad(mutate, match, name="tiny-tts"):
    data = preset_config(name)
    mutate(data)
    with pytest.raises(ConfigError, match=match):
        parse_config(data, "/some/dir/config.json")


def test_error_delays_length():
    def mutate(d):
        d["delays"] = d["delays"][:-1]
    _bad(mutate, r"/some/dir/config.json: field 'delays': has 32 entries, expected n_q \+ 1 = 33")


def test_error_schedule_length():
    def mutate(d):
        d["depformer_weights_per_step_schedule"] = d["depformer_weights_per_step_schedule"][:-1]
    _bad(mutate, r"config.json: field 'depformer_weights_per_step_schedule': has 31 entries, expected dep_q = 32")


def test_error_unknown_key():
    _bad(lambda d: d.update(dimm=3), r"/some/dir/config.json: unknown field 'dimm'")


def test_error_wrong_type():
    _bad(lambda d: d.update(num_layers="2"), r"config.json: field 'num_layers': expected an integer, got '2'")
    _bad(lambda d: d.update(causal=1), r"field 'causal': expected a boolean")
    _bad(lambda d: d.update(delays=[0, "a"]), r"field 'delays': expected a list of integers")


def test_error_contradictions():
    _bad(lambda d: d.update(dep_q=40), r"field 'dep_q'")
    _bad(lambda d: d.update(num_heads=5), r"field 'num_heads'")
    _bad(lambda d: d.update(norm="batch_norm"), r"field 'norm': unknown norm")
    _bad(lambda d: d.update(cross_attention=False), r"field 'fuser.cross'")
    _bad(lambda d: d["fuser"].update(sum=["control", "nope"]), r"field 'fuser': uses condition 'nope'")
    _bad(lambda d: d.pop("fuser"), r"field 'cross_attention'")
    _bad(lambda d: d["conditioners"]["cfg"].update(type="mlp"), r"field conditioners.cfg.type")
    _bad(lambda d: d.update(stt_config={"audio_delay_secs": 1}), r"field 'stt_config': unknown key")


def test_error_from_file_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=f"{path}: not valid JSON"):
        CheckpointConfig.from_file(path)
    data = preset_config("tiny-stt")
    data["n_q"] = 31
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=f"{path}: field 'delays'"):
        CheckpointConfig.from_file(path)
    with pytest.raises(ConfigError, match="config file not found"):
        CheckpointConfig.from_file(tmp_path / "missing.json")


def test_error_non_finite_numbers_and_bad_bytes(tmp_path):
    """JSON's NaN and Infinity parse as floats: a NaN audio delay used to fail at the first stream as a ValueError
    traceback, and a config that is not UTF-8 as a UnicodeDecodeError one."""
    _bad(lambda d: d["stt_config"].update(audio_delay_seconds=float("nan")),
         r"field 'stt_config.audio_delay_seconds': expected a finite number, got nan", name="tiny-stt")
    _bad(lambda d: d["tts_config"].update(audio_delay=float("inf")), r"'tts_config.audio_delay': expected a finite")
    _bad(lambda d: d.update(positional_scale=float("-inf")), r"field 'positional_scale': expected a finite number")
    _bad(lambda d: d.update(extra_heads_dim=0), r"field 'extra_heads_dim': must be positive, got 0", name="tiny-stt")
    path = tmp_path / "config.json"
    data = preset_config("tiny-stt")
    data["tokenizer_name"] = "caf@.model"  # latin-1 bytes for "café"
    path.write_bytes(json.dumps(data).encode().replace(b"caf@", b"caf\xe9"))
    with pytest.raises(ConfigError, match=f"{path}: not UTF-8 text \\(byte 0xe9 at offset"):
        CheckpointConfig.from_file(path)


def test_error_loader_metadata_types():
    """File names and sub-configs are typed too: a numeric moshi_name used to fail as an AttributeError traceback
    when resolving the files, a string audio delay only at the first step."""
    _bad(lambda d: d.update(moshi_name=1), r"config.json: field 'moshi_name': expected a string, got 1")
    _bad(lambda d: d.update(tokenizer_name=None), r"field 'tokenizer_name': expected")
    _bad(lambda d: d.update(model_id="x"), r"field 'model_id': expected an object")
    _bad(lambda d: d["tts_config"].update(audio_delay="1.28"), r"field 'tts_config.audio_delay': expected a finite")
    _bad(lambda d: d["tts_config"].update(second_stream_ahead=-2), r"field 'tts_config.second_stream_ahead': must be")
    _bad(lambda d: d["stt_config"].update(audio_delay_seconds="0.5"), r"field 'stt_config.audio_delay_seconds'",
         name="tiny-stt")


def test_error_conditioner_and_fuser_types():
    lut = lambda **kw: lambda d: d["conditioners"]["cfg"]["lut"].update(**kw)  # noqa: E731
    _bad(lut(dim="16"), r"field 'conditioners.cfg.lut.dim': expected an integer, got '16'")
    _bad(lut(n_bins="7"), r"field 'conditioners.cfg.lut.n_bins': expected an integer")
    _bad(lut(n_bins=0, possible_values=None), r"field conditioners.cfg.lut.n_bins: must be positive")
    _bad(lut(possible_values=7), r"field 'conditioners.cfg.lut.possible_values': expected a list of strings")
    _bad(lut(force_linear="false"), r"field 'conditioners.cfg.lut.force_linear': expected a boolean")
    _bad(lambda d: d["fuser"].update(cross_attention_pos_emb_scale="1"),
         r"field 'fuser.cross_attention_pos_emb_scale': expected a finite")


def test_error_sizes_must_be_positive():
    """Zero or negative sizes and periods: a ConfigError naming the field, not a ZeroDivisionError or a math domain
    error while building the model."""
    _bad(lambda d: d.update(num_heads=0), r"field 'num_heads': must be positive, got 0", name="tiny-stt")
    _bad(lambda d: d.update(kv_repeat=0), r"field 'kv_repeat': must be positive", name="tiny-stt")
    _bad(lambda d: d.update(max_period=0), r"field 'max_period': must be a positive finite number", name="tiny-stt")
    _bad(lambda d: d.update(hidden_scale=float("nan")), r"field 'hidden_scale'", name="tiny-stt")
    _bad(lambda d: d.update(existing_text_padding_id=200), r"field 'existing_text_padding_id': 200 is not a text id",
         name="tiny-stt")
    _bad(lambda d: d.update(depformer_num_heads=0), r"field 'depformer_num_heads': must be positive")
    _bad(lambda d: d.update(depformer_pos_emb="rope", depformer_max_period=-1), r"field 'depformer_max_period'")
    # The unused depformer fields of an STT config (dep_q = 0) are not checked; nor max_period without positions.
    data = preset_config("tiny-stt")
    data.update(depformer_num_heads=0, positional_embedding="none", max_period=0)
    parse_config(data)


def test_error_what_dsm_does_not_build_and_odd_rope_heads():
    """Fields moshi acts on that dsm does not implement (LoRA, a custom Mimi config, multistream TTS) and a model_id
    that cannot name voice files: refused at parse, not ignored (a different model ran) or a KeyError traceback at
    the first voice. An odd RoPE head dim: refused here, not a shape error at the first step."""
    _bad(lambda d: d.update(lora=True, lora_name="lora.safetensors"), r"LoRA adapters \(field 'lora' is true\) are "
         "not supported")
    _bad(lambda d: d.update(mimi_config_name="mimi.json"), r"field 'mimi_config_name'\) are not supported")
    _bad(lambda d: d["tts_config"].update(multistream=True), r"field 'tts_config.multistream'")
    _bad(lambda d: d.update(model_id={"sig": "1e68beda"}), r"field 'model_id': expected \{\"sig\": str")
    _bad(lambda d: d.update(model_id={"sig": 1, "epoch": 2}), r"field 'model_id'")
    _bad(lambda d: d.update(dim=68, num_heads=4, positional_embedding="rope"), r"field 'num_heads': RoPE rotates "
         r"pairs of channels: head dim 17 \(dim 68 / 4 heads\) must be even", name="tiny-stt")
    _bad(lambda d: d.update(depformer_dim=36, depformer_num_heads=4, depformer_pos_emb="rope"),
         r"field 'depformer_num_heads': RoPE .* head dim 9 must be even")
    data = preset_config("tiny-tts")
    data.update(lora=False, model_id={"sig": "1e68beda", "epoch": 240}, dim=68, num_heads=4, positional_embedding="sin")
    parse_config(data)  # no LoRA, a full model_id, an odd head dim without RoPE: fine
