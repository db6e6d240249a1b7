"""The engine underneath the runtimes, driven by hand: Mimi codes in, text tokens out, streams joining and leaving
at any step of a batch that keeps running. Use this level when your service does its own scheduling (the runtimes
in ``dsm.stt`` and ``dsm.tts`` add input queues, word assembly and the TTS state machine on top of it).

    python examples/engine_loop.py --hf-repo kyutai/stt-1b-en_fr   # the released model
    python examples/engine_loop.py                                 # no download: a random-weight tiny model

On a GPU the engine replays one captured CUDA graph per batch-size bucket; a stream joining or leaving changes which
rows run (the exec mask), never the graphs.
"""

from __future__ import annotations

import argparse

import torch

from dsm.checkpoint import ensure_random_checkpoint, resolve_checkpoint
from dsm.cli_args import parse_device
from dsm.engine import Engine
from dsm.mimi import FRAME_SIZE, Mimi
from dsm.model import LMModel, default_dtype
from dsm.tokenizer import Tokenizer

# stream name -> (first step, last step): "b" joins while "a" runs, "a" leaves while "b" runs, "c" takes a's slot
SCHEDULE = {"a": (0, 11), "b": (4, 19), "c": (14, 24)}


def main(argv: list[str] | None = None) -> dict[str, list[int]]:
    """Runs the schedule; returns each stream's text tokens."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-repo", help="an STT checkpoint (default: a random-weight tiny-stt one)")
    p.add_argument("--device", type=parse_device, default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    files = resolve_checkpoint(hf_repo=args.hf_repo) if args.hf_repo else resolve_checkpoint(
        ensure_random_checkpoint("tiny-stt"))
    model = LMModel.from_checkpoint(files, device=args.device, dtype=default_dtype(args.device))
    mimi = Mimi.from_file(files.mimi_weights, n_q=model.cfg.n_q, device=args.device)
    tokenizer = Tokenizer(files.tokenizer)
    max_slots = 2
    engine = Engine(model, max_slots=max_slots, temp=0, temp_text=0)  # greedy, as Kyutai's STT scripts
    codec = mimi.init_state(max_slots, decoder=False)  # one Mimi encoder state row per slot

    slot_of: dict[str, int] = {}
    tokens: dict[str, list[int]] = {name: [] for name in SCHEDULE}
    g = torch.Generator().manual_seed(0)
    for step in range(max(last for _, last in SCHEDULE.values()) + 1):
        for name, (first, _) in SCHEDULE.items():
            if step == first:  # a stream joins: a free slot, fresh KV pages on demand, its Mimi row reset
                slot_of[name] = engine.open()
                codec.reset(torch.arange(max_slots, device=args.device) == slot_of[name])
        active = sorted(slot_of.values())
        pcm = torch.zeros(max_slots, 1, FRAME_SIZE)
        for slot in active:  # each stream's next 80 ms of audio (noise here; a microphone in a service)
            pcm[slot, 0] = 0.05 * torch.randn(FRAME_SIZE, generator=g)
        mask = torch.zeros(max_slots, dtype=torch.bool)
        mask[active] = True
        codec.set_exec_mask(mask.to(args.device))  # rows of other slots keep their state
        codes = mimi.encode_step(pcm.to(args.device), codec)[:, :, 0]  # [max_slots, n_q]
        out = engine.step(codes.to(args.device), active=active)  # one batched step for every active stream
        text = out.text_token.tolist()
        for name, slot in list(slot_of.items()):
            tokens[name].append(text[slot])
            if step == SCHEDULE[name][1]:  # a stream leaves: its slot and KV pages go back to the pools
                engine.close(slot_of.pop(name))
    pads = {model.cfg.existing_text_padding_id, model.cfg.existing_text_end_padding_id}
    for name, toks in tokens.items():  # the text stream without its padding tokens (no word timing here)
        print(f"{name}: {len(toks)} steps, text {tokenizer.decode([t for t in toks if t not in pads])!r}")
    print(f"KV pages in use after every stream left: {engine.pool.used}")
    return tokens


if __name__ == "__main__":
    main()
