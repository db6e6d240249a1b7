"""Model presets as ``config.json`` dicts in the released layout (moshi ``CheckpointInfo`` keys, DSM-SPEC §8.2).

The three real presets reproduce the hyperparameters and file names of the released Kyutai checkpoints
(``kyutai/stt-1b-en_fr`` in its ``-candle`` flavour with the 4 semantic-VAD extra heads, ``kyutai/stt-2.6b-en``,
``kyutai/tts-1.6b-en_fr``). ``tiny-stt`` / ``tiny-tts`` are structurally identical miniatures (same stream layout,
same Mimi codebooks, same feature set) that are cheap enough for CPU tests.

Every call returns a fresh dict: callers may mutate it.
"""

from __future__ import annotations

import copy
from typing import Any

MIMI_FILE = "mimi-pytorch-e351c8d8@125.safetensors"
MIMI_FILE_TTS = "tokenizer-e351c8d8-checkpoint125.safetensors"

# Depformer weight-set schedule of tts-1.6b-en_fr: one set for each of the first 8 codebooks, then 3 sets of 8.
TTS_SCHEDULE = (*range(8), *([8] * 8), *([9] * 8), *([10] * 8))
CFG_VALUES = ("1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0")


def _stt_common(n_q: int = 32) -> dict[str, Any]:
    return {
        "card": 2048,
        "n_q": n_q,
        "dep_q": 0,
        "delays": [0] * (n_q + 1),
        "existing_text_padding_id": 3,
        "hidden_scale": 4.125,
        "causal": True,
        "layer_scale": None,
        "max_period": 100000.0,
        "gating": "silu",
        "norm": "rms_norm_f32",
        "positional_embedding": "rope",
        # Present but unused in the released STT configs (dep_q = 0 builds no depformer).
        "depformer_dim": 1024,
        "depformer_dim_feedforward": 4224,
        "depformer_num_heads": 16,
        "depformer_num_layers": 6,
        "depformer_layer_scale": None,
        "depformer_multi_linear": True,
        "depformer_context": 8,
        "depformer_max_period": 10000,
        "depformer_gating": "silu",
        "depformer_pos_emb": "none",
        "depformer_weights_per_step": True,
        "conditioners": {},
        "cross_attention": False,
        "lm_gen_config": {"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 50},
    }


def _stt_1b() -> dict[str, Any]:
    cfg = _stt_common()
    cfg.update({
        "dim": 2048,
        "text_card": 8000,
        "num_heads": 16,
        "num_layers": 16,
        "context": 750,
        "extra_heads_num_heads": 4,
        "extra_heads_dim": 6,
        "model_type": "stt",
        "moshi_name": "model.safetensors",
        "mimi_name": MIMI_FILE,
        "tokenizer_name": "tokenizer_en_fr_audio_8000.model",
        "stt_config": {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0},
    })
    return cfg


def _stt_26b() -> dict[str, Any]:
    cfg = _stt_common()
    cfg.update({
        "dim": 2048,
        "text_card": 4000,
        "num_heads": 32,
        "num_layers": 48,
        "context": 375,
        "model_type": "stt",
        "model_id": {"sig": "dabcc802", "epoch": 50},
        "moshi_name": "model.safetensors",
        "mimi_name": MIMI_FILE,
        "tokenizer_name": "tokenizer_en_audio_4000.model",
        "stt_config": {"audio_delay_seconds": 2.5, "audio_silence_prefix_seconds": 1.0},
    })
    return cfg


def _tts_conditioners(dim: int) -> dict[str, Any]:
    return {
        "speaker_wavs": {"type": "tensor", "tensor": {"dim": 512}},
        "cfg": {"type": "lut", "lut": {"n_bins": len(CFG_VALUES), "dim": 16, "tokenizer": "noop",
                                       "possible_values": list(CFG_VALUES)}},
        "control": {"type": "lut", "lut": {"n_bins": 1, "dim": dim, "tokenizer": "noop", "possible_values": ["ok"]}},
    }


def _tts_common(dim: int) -> dict[str, Any]:
    return {
        "card": 2048,
        "n_q": 32,
        "dep_q": 32,
        "delays": [0, 0] + [2] * 31,
        "existing_text_padding_id": 3,
        "hidden_scale": 4.125,
        "causal": True,
        "layer_scale": None,
        "gating": "silu",
        "norm": "rms_norm_f32",
        "positional_embedding": "rope",
        "depformer_layer_scale": None,
        "depformer_multi_linear": True,
        "depformer_gating": "silu",
        "depformer_pos_emb": "none",
        "depformer_weights_per_step": True,
        "depformer_weights_per_step_schedule": list(TTS_SCHEDULE),
        "demux_second_stream": True,
        "conditioners": _tts_conditioners(dim),
        "fuser": {"sum": ["control", "cfg"], "cross": ["speaker_wavs"], "prepend": [],
                  "cross_attention_pos_emb": True, "cross_attention_pos_emb_scale": 1},
        "cross_attention": True,
        "model_type": "tts",
        "lm_gen_config": {"temp": 0.6, "text_temp": 0.6},
        "tts_config": {"audio_delay": 1.28, "second_stream_ahead": 2},
    }


def _tts_16b() -> dict[str, Any]:
    cfg = _tts_common(2048)
    cfg.update({
        "dim": 2048,
        "text_card": 8000,
        "num_heads": 16,
        "num_layers": 16,
        "context": 500,
        "max_period": 10000,
        "depformer_dim": 1024,
        "depformer_dim_feedforward": 3072,
        "depformer_num_heads": 16,
        "depformer_num_layers": 4,
        "depformer_context": 32,
        "depformer_max_period": 10000,
        "depformer_low_rank_embeddings": 128,
        "model_id": {"sig": "1e68beda", "epoch": 240},
        "moshi_name": "dsm_tts_1e68beda@240.safetensors",
        "mimi_name": MIMI_FILE_TTS,
        "tokenizer_name": "tokenizer_spm_8k_en_fr_audio.model",
    })
    return cfg


def _tiny_stt() -> dict[str, Any]:
    cfg = _stt_common()
    cfg.update({
        "dim": 64,
        "text_card": 200,
        "num_heads": 4,
        "num_layers": 2,
        "context": 16,
        "depformer_dim": 32,
        "depformer_dim_feedforward": 132,
        "depformer_num_heads": 2,
        "depformer_num_layers": 2,
        "extra_heads_num_heads": 4,
        "extra_heads_dim": 6,
        "model_type": "stt",
        "moshi_name": "model.safetensors",
        "mimi_name": MIMI_FILE,
        "tokenizer_name": "tokenizer_tiny_200.model",
        "stt_config": {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0},
    })
    return cfg


def _tiny_tts() -> dict[str, Any]:
    cfg = _tts_common(64)
    cfg.update({
        "dim": 64,
        "text_card": 200,
        "num_heads": 4,
        "num_layers": 2,
        "context": 16,
        "max_period": 10000,
        "depformer_dim": 32,
        "depformer_dim_feedforward": 96,
        "depformer_num_heads": 2,
        "depformer_num_layers": 2,
        "depformer_context": 32,
        "depformer_max_period": 10000,
        "depformer_low_rank_embeddings": 16,
        "moshi_name": "dsm_tts_tiny.safetensors",
        "mimi_name": MIMI_FILE_TTS,
        "tokenizer_name": "tokenizer_tiny_200.model",
    })
    return cfg


_BUILDERS = {
    "stt-1b-en_fr": _stt_1b,
    "stt-2.6b-en": _stt_26b,
    "tts-1.6b-en_fr": _tts_16b,
    "tiny-stt": _tiny_stt,
    "tiny-tts": _tiny_tts,
}

PRESETS: tuple[str, ...] = tuple(_BUILDERS)
REAL_PRESETS: tuple[str, ...] = ("stt-1b-en_fr", "stt-2.6b-en", "tts-1.6b-en_fr")
TINY_PRESETS: tuple[str, ...] = ("tiny-stt", "tiny-tts")
STT_PRESETS: tuple[str, ...] = tuple(n for n in PRESETS if "stt" in n)  # what `dsm transcribe --preset` takes
TTS_PRESETS: tuple[str, ...] = tuple(n for n in PRESETS if "tts" in n)  # `dsm speak` / `serve-tts --preset`


def preset_config(name: str) -> dict[str, Any]:
    """A fresh ``config.json`` dict for preset ``name`` (one of :data:`PRESETS`)."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
    return copy.deepcopy(builder())
