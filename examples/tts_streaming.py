"""Streaming text-to-speech inside your own service: several utterances share one runtime (one batched model step
for all of them), text arrives word by word (as from a language model), and PCM comes out frame by frame.

    python examples/tts_streaming.py --hf-repo kyutai/tts-1.6b-en_fr --voice VOICE.safetensors   # released model
    python examples/tts_streaming.py      # no download: a random-weight tiny model and a random voice

Each stream is written to ``OUT_DIR/stream-N.wav``. A service would send each chunk to its client instead
(``open_stream(on_pcm=...)`` takes a callback in place of ``read()``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from dsm.checkpoint import ensure_random_checkpoint, resolve_checkpoint
from dsm.cli_args import parse_device, positive_int
from dsm.tts import TTSConfig, TTSRuntime, random_voice

TEXTS = ["Hello, this is the first stream speaking.", "And here is a second one, at the same time."]


def main(argv: list[str] | None = None) -> list[np.ndarray]:
    """Speaks the texts; returns each stream's PCM (float32, 24 kHz)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-repo", help="e.g. kyutai/tts-1.6b-en_fr (default: a random-weight tiny-tts checkpoint)")
    p.add_argument("--voice", help="voice file or kyutai/tts-voices name (default: a random voice)")
    p.add_argument("--device", type=parse_device, default="cpu")
    p.add_argument("--out-dir", default="tts_out")
    p.add_argument("--max-frames", type=positive_int, default=None,
                   help="stop each stream after this many steps (demos)")
    args = p.parse_args(argv)

    files = resolve_checkpoint(hf_repo=args.hf_repo) if args.hf_repo else resolve_checkpoint(
        ensure_random_checkpoint("tiny-tts"))
    rt = TTSRuntime.from_checkpoint(files, device=args.device, config=TTSConfig(max_batch=len(TEXTS)))
    rt.warm_up()  # on a GPU: capture the CUDA graphs before the first client
    voice = args.voice or random_voice(dim=rt.voice_dim)

    streams = [rt.open_stream(voice, cfg=2.0, seed=i) for i in range(len(TEXTS))]
    words = [text.split() for text in TEXTS]
    pcm: list[list[torch.Tensor]] = [[] for _ in streams]
    step = 0
    while not all(s.done for s in streams):
        for s, todo in zip(streams, words, strict=True):  # a word per stream and step, as from an upstream LLM
            if todo:
                s.push(todo.pop(0))
            elif not s.text_ended:
                s.end()  # no more text: the stream finishes after its last word
            if args.max_frames is not None and step >= args.max_frames and not s.done:
                s.cancel()  # leaves its slot at once; what was handed over stays readable
        rt.step()  # one batched step: every stream that can progress does
        step += 1
        for i, s in enumerate(streams):
            chunk = s.read()  # the PCM produced since the last read
            if chunk.numel():
                if not pcm[i]:
                    print(f"stream {i}: first audio after {s.time_to_first_audio * 1e3:.0f} ms")
                pcm[i].append(chunk)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = []
    for i, chunks in enumerate(pcm):
        audio = torch.cat(chunks).numpy() if chunks else np.zeros(0, np.float32)
        sf.write(out / f"stream-{i}.wav", audio, 24000)
        print(f"stream {i}: {len(audio) / 24000:.2f} s of audio -> {out / f'stream-{i}.wav'}")
        result.append(audio)
    return result


if __name__ == "__main__":
    main()
