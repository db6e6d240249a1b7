"""Streaming speech-to-text inside your own service: several audio streams share one runtime (one batched model
step for all of them), audio is pushed in chunks as it arrives, and words come back as events.

    python examples/stt_streaming.py a.wav b.flac --hf-repo kyutai/stt-1b-en_fr   # the released model
    python examples/stt_streaming.py                # no download: a random-weight tiny model, synthetic audio

The chunks here are 100 ms; a service pushes whatever its clients send (any size, any sample rate the stream was
opened with). ``push`` runs the model whenever every ready stream has a full 80 ms frame, so the words of all
streams advance together.
"""

from __future__ import annotations

import argparse

import numpy as np

from dsm.audio import load_audio
from dsm.checkpoint import ensure_random_checkpoint, resolve_checkpoint
from dsm.cli_args import parse_device, positive_int
from dsm.stt import EndWord, Finished, STTRuntime, VADStep, Word


def synthetic_audio(seconds: float, seed: int, sr: int = 24000) -> np.ndarray:
    """A harmonic tone with a wobbling pitch (a stand-in for speech when no file is given)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 40 * rng.random() + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    return (0.2 * sum(np.sin(k * phase) / k for k in range(1, 6))).astype(np.float32)


def main(argv: list[str] | None = None) -> dict[str, str]:
    """Runs the streams; returns each stream's words, space-joined."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("audio", nargs="*", help="audio files, one stream each (default: two synthetic streams)")
    p.add_argument("--hf-repo", help="e.g. kyutai/stt-1b-en_fr (default: a random-weight tiny-stt checkpoint)")
    p.add_argument("--device", type=parse_device, default="cpu")
    p.add_argument("--chunk-ms", type=positive_int, default=100)
    args = p.parse_args(argv)

    files = resolve_checkpoint(hf_repo=args.hf_repo) if args.hf_repo else resolve_checkpoint(
        ensure_random_checkpoint("tiny-stt"))
    sources = {a: load_audio(a)[0].numpy() for a in args.audio} or {
        "synthetic-0": synthetic_audio(2.0, 0), "synthetic-1": synthetic_audio(1.3, 1)}
    rt = STTRuntime.from_checkpoint(files, device=args.device, max_streams=len(sources))
    rt.warm_up()  # on a GPU: capture the CUDA graphs before the first client

    streams = {name: rt.open_stream(name) for name in sources}  # sample_rate=... for other input rates
    chunk = 24000 * args.chunk_ms // 1000
    words: dict[str, list[str]] = {name: [] for name in sources}

    def handle(events) -> None:
        for ev in events:
            if isinstance(ev, Word):  # as soon as the model has closed it (moshi-server's rule)
                print(f"[{ev.stream}] {ev.start_time:6.2f}s  {ev.text}")
                words[ev.stream].append(ev.text)
            elif isinstance(ev, EndWord):
                pass  # the end time of the last Word
            elif isinstance(ev, VADStep) and ev.end_of_turn:  # stt-1b's semantic VAD
                print(f"[{ev.stream}] end of turn at step {ev.step_idx}")
            elif isinstance(ev, Finished):  # the slot is free again; ev.transcript has every word with its times
                print(f"[{ev.stream}] finished")

    for start in range(0, max(len(a) for a in sources.values()), chunk):
        for name, pcm in sources.items():
            if start < len(pcm):
                handle(streams[name].push(pcm[start : start + chunk], process=False))
        rt.run()  # one batched model step per frame that every ready stream has
        for s in streams.values():
            handle(s.events())
    for s in streams.values():  # end of input: the model's delay in silence, so the last words come out
        handle(s.flush())
    return {name: " ".join(w) for name, w in words.items()}


if __name__ == "__main__":
    main()
