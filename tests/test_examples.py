"""The scripts in examples/ run as documented (their no-download mode: random-weight tiny checkpoints on the CPU), and
what they show holds: the streaming STT's words do not depend on how the audio is chunked, the TTS streams give
finite PCM, and the hand-driven engine returns every page once its streams have left."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dsm-cache")


def test_stt_streaming_words_do_not_depend_on_the_chunking(cache, monkeypatch):
    monkeypatch.setenv("DSM_CACHE_DIR", str(cache))
    stt = _example("stt_streaming")
    words = stt.main([])
    assert set(words) == {"synthetic-0", "synthetic-1"}
    assert any(words.values()), "the random model emitted no word at all: the example shows nothing"
    assert stt.main(["--chunk-ms", "37"]) == words


def test_tts_streaming_gives_finite_pcm(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("DSM_CACHE_DIR", str(cache))
    pcm = _example("tts_streaming").main(["--out-dir", str(tmp_path), "--max-frames", "30"])
    assert len(pcm) == 2
    for audio in pcm:
        assert audio.size > 0 and np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stream-0.wav", "stream-1.wav"]


def test_engine_loop_streams_join_and_leave(cache, monkeypatch, capsys):
    monkeypatch.setenv("DSM_CACHE_DIR", str(cache))
    ex = _example("engine_loop")
    tokens = ex.main(["--device", "cpu"])
    assert {name: len(t) for name, t in tokens.items()} == {n: b - a + 1 for n, (a, b) in ex.SCHEDULE.items()}
    assert "KV pages in use after every stream left: 0" in capsys.readouterr().out
