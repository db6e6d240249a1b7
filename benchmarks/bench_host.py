"""Host work per step of the STT and TTS runtimes at N streams, with the model step and Mimi replaced by stand-ins that
cost nothing: what the Python side adds to every frame. The device waits for it (each step's tokens go through the
host: word assembly for STT, the state machine for TTS), so at high stream counts it eats into the frame budget
(80 ms for STT, 40 ms for the TTS p99 goal) on top of the GPU's step time.

    python benchmarks/bench_host.py --streams 64 256 700 [--steps 20]

The ``asr-serv`` rows are ``dsm serve-stt``'s host work a frame: every client's Audio message read and pushed, the
step, the Step/Word messages packed (the reading runs on the event loop, beside the device's step; the rest on the
model thread). An STT runtime holds Mimi's encoder state for every stream on the host (~8 MB a stream). The
``tts-serv`` rows are ``dsm serve-tts``'s: the step, then every connection's Audio and Text messages built.

The ``engine-*`` rows are ``Engine.step`` alone (its CUDA-graph path with the replays stubbed): the host work before
and between a step's launches, which a GPU waits for at small batch.

Runs on any machine (tiny random presets). The stand-in tokens: STT text is padding 85% of steps, a word start 7%,
word pieces 8%; TTS text comes from the state machine as in a real run, audio tokens are random.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from dsm.checkpoint import resolve_checkpoint, write_random_checkpoint
from dsm.cli_args import positive_int


def _times(step, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        out.append(time.perf_counter() - t)
    return 1e3 * statistics.median(out)


def _stub_stt(rt, n: int) -> None:
    """Replace the runtime's Mimi encode and LM steps by stand-ins that cost nothing."""
    from dsm.stt import FRAME_SIZE

    heads = len(rt.stepper.lm.extra_heads)
    g = torch.Generator().manual_seed(0)

    def lm_steps(codes, active, on_frame, defer=False):
        for i in range(codes.shape[-1]):
            r = torch.rand(n, generator=g)
            tok = torch.where(r < 0.85, 3, torch.where(r < 0.92, 0, torch.randint(4, 50, (n,), generator=g)))
            on_frame(i, tok.tolist(), torch.rand(n, heads) if heads else None)

    rt.stepper.encode = lambda pcm, active: torch.zeros(n, rt.stepper.n_q, pcm.shape[1] // FRAME_SIZE,
                                                        dtype=torch.long)
    rt.stepper.lm_steps = lm_steps


def stt_host_ms(files, n: int, steps: int) -> float:
    from dsm.stt import FRAME_SIZE, STTRuntime

    rt = STTRuntime.from_checkpoint(files, max_streams=n)
    _stub_stt(rt, n)
    streams = [rt.open_stream() for _ in range(n)]
    for s in streams:
        s.push(np.zeros(FRAME_SIZE * (steps + 5), dtype=np.float32), process=False)

    def step():
        rt.step()
        for s in streams:
            s.events()

    return _times(step, steps)


def tts_host_ms(files, n: int, steps: int) -> float:
    rt = _stubbed_tts(files, n)
    streams = [rt.open_stream() for _ in range(n)]
    for s in streams:
        s.push(" ".join(["hello world"] * 200))
    rt.step()  # admits every stream (opens its slot: real model work, not timed)

    def step():
        rt.step()
        for s in streams:
            s.read()

    return _times(step, steps, warmup=rt.delay_steps + rt.model.cfg.max_delay + 3)  # timed steps decode audio


def tts_server_host_ms(files, n: int, steps: int) -> float:
    """``dsm serve-tts``'s host work a frame at n streams (PcmMessagePack): the (stubbed) step, then every
    connection's Audio (and Text) messages built."""
    from websockets.protocol import State

    from dsm.server import TTSServer, _TTSConnection

    class Box:  # a connection's outbox on an open socket: posted messages are dropped
        ws = types.SimpleNamespace(state=State.OPEN)

        def post(self, data):
            pass

        def close(self, code=1000, reason=""):
            pass

    rt = _stubbed_tts(files, n)
    server = TTSServer(rt)
    for _ in range(n):
        conn = _TTSConnection("PcmMessagePack", None)
        server._open(conn).push(" ".join(["hello world"] * 200))
        server.connections[conn] = Box()
    rt.step()

    def step():
        server._step()
        for box, payloads, _ in server._outgoing():
            for data in payloads:
                box.post(data)

    return _times(step, steps, warmup=rt.delay_steps + rt.model.cfg.max_delay + 3)


def _stubbed_tts(files, n: int):
    """A TTS runtime of n slots whose LM step and Mimi decode are stand-ins that cost nothing."""
    from dsm.tts import TTSConfig, TTSRuntime

    rt = TTSRuntime.from_checkpoint(files, dtype=torch.float32, config=TTSConfig(max_batch=n))
    g = torch.Generator().manual_seed(0)
    stepper, dep_q, card = rt.stepper, rt.model.cfg.dep_q, rt.model.cfg.card

    def lm_step(active, text_only, on_text_logits, on_text):
        rows = stepper.engine.bucket_for(active.nonzero()[:, 0].tolist())
        text = torch.randint(0, 50, (rows,), generator=g)
        on_text(text)
        audio = torch.randint(0, card, (rows, dep_q), generator=g)
        return torch.cat([text[:, None], audio], 1)

    stepper.step = lm_step
    pcm = torch.zeros(n, 1, 1920)
    rt._decode_step = lambda codes: pcm
    return rt


def engine_host_ms(files, n: int, steps: int) -> float:
    """``Engine.step``'s own host work at ``n`` active streams: the graph path with every replay a no-op that returns
    the first (eager) call's outputs, so only the Python between the launches is timed."""
    from unittest import mock

    from dsm.bench import _random_conditions
    from dsm.cuda_graphs import LazyGraph
    from dsm.engine import Engine
    from dsm.model import LMModel

    def replay(graph):
        if graph.out is None:
            graph.out = graph.fn()
        return graph.out

    model = LMModel.from_checkpoint(files, dtype=torch.float32)
    eng = Engine(model, max_slots=n, buckets=(n,))
    eng.cuda_graphs = True  # the GPU's path through step(), replays stubbed
    for b in range(n):
        eng.open(conditions=_random_conditions(model, b) if model.condition_provider is not None else None)
    n_in = model.cfg.num_codebooks - model.cfg.dep_q - 1
    inputs = torch.zeros(n, n_in, dtype=torch.long) if n_in else None
    with mock.patch.object(LazyGraph, "replay", replay):
        return _times(lambda: eng.step(inputs), steps)


def asr_server_host_ms(files, n: int, steps: int) -> float:
    """``dsm serve-stt``'s host work a frame at n streams: each client's 1920-sample Audio message (float64, as
    Python clients send it) read on the event loop, pushed to its stream, the (stubbed) step, and the Step/Word
    messages packed for every connection."""
    import msgpack

    from dsm.server import ASRServer, _ASRConnection
    from dsm.stt import FRAME_SIZE, STTOptions, STTRuntime

    class Box:  # a connection's outbox: posted messages are dropped
        def post(self, data):
            pass

    rt = STTRuntime.from_checkpoint(files, max_streams=n, options=STTOptions(alignment="rust", timestamps="rust"))
    _stub_stt(rt, n)
    server = ASRServer(rt)
    conns = [_ASRConnection(rt.open_stream(history=False)) for _ in range(n)]
    for c in conns:
        server.connections[c] = Box()
    raw = msgpack.packb({"type": "Audio", "pcm": (np.random.default_rng(0).standard_normal(FRAME_SIZE) * 0.1).tolist()})

    def step():
        for c in conns:
            _, pcm, _ = server._parse(raw)
            c.received += pcm.shape[0]
            server._apply(c, "Audio", pcm)
        server._step()
        for box, payloads, _ in server._outgoing():
            for data in payloads:
                box.post(data)

    return _times(step, steps)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=positive_int, nargs="+", default=[64, 256, 700])
    ap.add_argument("--steps", type=positive_int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        stt = resolve_checkpoint(write_random_checkpoint("tiny-stt", Path(d) / "stt", seed=0, dtype=torch.float32))
        tts = resolve_checkpoint(write_random_checkpoint("tiny-tts", Path(d) / "tts", seed=0, dtype=torch.float32))
        print("runtime  streams  host ms/step (median)")
        for n in [1, *args.streams]:  # the engine's own step (inside the runtimes' rows below)
            print(f"engine-stt {n:5d}  {engine_host_ms(stt, n, args.steps):8.3f}", flush=True)
            print(f"engine-tts {n:5d}  {engine_host_ms(tts, n, args.steps):8.3f}", flush=True)
        for n in args.streams:
            print(f"stt      {n:7d}  {stt_host_ms(stt, n, args.steps):8.2f}", flush=True)
            print(f"tts      {n:7d}  {tts_host_ms(tts, n, args.steps):8.2f}", flush=True)
            print(f"asr-serv {n:7d}  {asr_server_host_ms(stt, n, args.steps):8.2f}", flush=True)
            print(f"tts-serv {n:7d}  {tts_server_host_ms(tts, n, args.steps):8.2f}", flush=True)


if __name__ == "__main__":
    main()
