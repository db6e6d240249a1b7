"""Streaming STT runtime: word/VAD events vs Kyutai's rules, chunking, slots, audio errors, moshi parity, CLIs.

Most tests use a cheap stateful stand-in codec (same streaming contract as Mimi) so that they run in seconds on 2
cores; the moshi parity test and the CLI tests use the real Mimi of the tiny-stt random checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_transcript import ref_python_rule, ref_rust_rule

from dsm.audio import AudioError, load_audio, resample
from dsm.checkpoint import resolve_checkpoint
from dsm.generate import Generator
from dsm.mimi import Mimi
from dsm.mimi_graph import mimi_buckets
from dsm.model import LMModel
from dsm.stt import (
    EndWord,
    Finished,
    Marker,
    NoFreeSlotError,
    Partial,
    StreamClosedError,
    STTOptions,
    STTRuntime,
    VADStep,
    Word,
    transcribe_files,
)
from dsm.tokenizer import Tokenizer

SPEECH = Path("/work/shared/testdata/speech/arctic_a0007.wav")  # 16 kHz, 4 s; read in place, never copied


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only spin on a busy 2-core box


@pytest.fixture(scope="session")
def ckpt(tiny_stt_ckpt) -> Path:
    return tiny_stt_ckpt  # conftest: shared with the server and Mimi tests


@pytest.fixture(scope="session")
def files(ckpt):
    return resolve_checkpoint(ckpt)


@pytest.fixture(scope="session")
def lm(files) -> LMModel:
    return LMModel.from_checkpoint(files, dtype=torch.float32)


@pytest.fixture(scope="session")
def tok(files) -> Tokenizer:
    return Tokenizer(files.tokenizer)


@pytest.fixture(scope="session")
def mimi(files) -> Mimi:
    return Mimi.from_file(files.mimi_weights)


@dataclasses.dataclass
class StubState:
    prev: torch.Tensor
    exec_mask: torch.Tensor

    def reset(self, mask):
        self.prev[mask] = 0
        self.exec_mask |= mask

    def set_exec_mask(self, mask):
        self.exec_mask.copy_(mask)

    @property
    def batch_size(self):
        return self.exec_mask.shape[0]

    def rows(self, n):
        return StubState(self.prev[:n], self.exec_mask[:n])


class StubCodec:
    """Stand-in for Mimi: codes of a frame depend on it and on the row's previous frame (state frozen by the exec
    mask, zeroed by reset)."""

    device = torch.device("cpu")

    def init_state(self, batch_size, encoder=True, decoder=True):
        return StubState(torch.zeros(batch_size, 1920), torch.ones(batch_size, dtype=torch.bool))

    def encode_step(self, pcm, state):
        out = []
        for x in pcm[:, 0].split(1920, dim=-1):
            feat = (x + 0.5 * state.prev).reshape(x.shape[0], 32, 60).abs().sum(-1)
            state.prev.copy_(torch.where(state.exec_mask[:, None], x, state.prev))
            out.append(((feat * 997).long() + 131 * torch.arange(32)) % 2048)
        return torch.stack(out, dim=-1)


class Forcer:
    """``on_text`` hook replacing each stream's token at its step ``i`` by ``seqs[name][i]`` (pad beyond)."""

    def __init__(self, seqs=None):
        self.rt, self.seqs = None, dict(seqs or {})

    def __call__(self, tokens):
        for s in self.rt.streams:
            seq = self.seqs.get(s.name)
            if seq is not None and s.slot < tokens.shape[0]:  # the engine hands over rows [0, bucket)
                tokens[s.slot] = seq[s.steps] if s.steps < len(seq) else 3


def runtime(lm, tok, config, codec=None, forcer=None, engine=False, **opts) -> STTRuntime:
    max_streams = opts.pop("max_streams", 2)
    rt = STTRuntime(lm, codec or StubCodec(), tok, config, max_streams=max_streams, options=STTOptions(**opts),
                    on_text=forcer, engine=engine)
    if forcer is not None:
        forcer.rt = rt
    return rt


def run_alone(rt: STTRuntime, pcm: torch.Tensor, slot: int) -> tuple[list[int], list]:
    """``pcm`` as the only stream of the fresh runtime ``rt``, in row ``slot`` (the slots below are taken, then
    given back): its tokens and events."""
    held = [rt.open_stream(f"hold{i}") for i in range(slot)]
    s = rt.open_stream("x")
    for h in held:
        h.close()
    assert s.slot == slot
    events = s.push(pcm) + s.flush()
    return s.tokens, events


def noise(n: int, seed: int) -> torch.Tensor:
    return 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(seed))


def forced_stream(tok: Tokenizer, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    words = [tok.encode(w) for w in ("hello", "world", "paper", "alpha beta", "hangar")]
    y = []
    while len(y) < n:
        r = rng.random()
        y += [3] if r < 0.4 else [0, *rng.choice(words)] if r < 0.8 else rng.choice(words) if r < 0.9 else [2]
    return y[:n]


def config_26b_like(files):
    return dataclasses.replace(files.config, stt_config={"audio_delay_seconds": 2.5,
                                                         "audio_silence_prefix_seconds": 1.0})


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alignment,model,engine", [("pytorch", "1b-like", False), ("rust", "1b-like", False),
                                                    ("pytorch", "2.6b-like", False), ("rust", "2.6b-like", False),
                                                    ("rust", "2.6b-like", True)])
def test_forced_words_follow_both_rules(lm, tok, files, alignment, model, engine):
    config = files.config if model == "1b-like" else config_26b_like(files)
    prefix, delay, asr_delay = (0, 0.5, 6) if model == "1b-like" else (13, 2.5, 32)
    seqs = {f"s{i}": forced_stream(tok, 120, seed=i) for i in range(3)}
    forcer = Forcer(seqs)
    rt = runtime(lm, tok, config, forcer=forcer, alignment=alignment, max_streams=3, engine=engine)
    assert rt.n_prefix_frames == prefix and rt.asr_delay_in_tokens == asr_delay
    lengths = {"s0": 1920 * 30 + 5, "s1": 1920 * 9, "s2": 100}
    streams = {n: rt.open_stream(n) for n in seqs}
    events = {n: [] for n in seqs}
    for n, s in streams.items():
        events[n] += s.push(noise(lengths[n], seed=len(n)), process=False)
    rt.run()
    for n, s in streams.items():
        events[n] += s.flush()
        events[n] += s.events()
    for n, s in streams.items():
        ev = events[n]
        flush = math.ceil(delay * 12.5) + (alignment == "rust")
        steps = prefix + math.ceil(lengths[n] / 1920) + flush
        assert s.finished and s.steps == steps == len(s.tokens)
        assert s.tokens == (seqs[n] + [3] * steps)[:steps]
        # Rust rule, times relative to the pushed audio (prefix removed, clipped at 0)
        shift = prefix / 12.5
        ref = [(k, *[max(0.0, v - shift) if isinstance(v, float) else v for v in rest])
               for k, *rest in ref_rust_rule(s.tokens, asr_delay)]
        got = [("Word", e.tokens, e.start_time) if isinstance(e, Word) else ("EndWord", e.stop_time)
               for e in ev if isinstance(e, Word | EndWord)]
        assert got[: len(ref)] == ref
        extra = got[len(ref) :]  # finish(): the pending word and/or the end of the unended one
        assert len(extra) <= 2 and all(k in ("Word", "EndWord") for k, *_ in extra)
        for e in ev:
            if isinstance(e, Word):
                assert e.text == tok.decode(list(e.tokens))
        # Partial: the pending word, and the text so far ends with it
        partials = [e for e in ev if isinstance(e, Partial)]
        assert all(p.text.endswith(p.pending) for p in partials)
        assert isinstance(ev[-1], Finished) and ev[-1].transcript is s.transcript
        offset = int(prefix / 12.5) + delay
        assert [(w.text, (w.start, w.end)) for w in s.transcript.words] == ref_python_rule(
            s.tokens, tok, 12.5, 0, 3, offset)
        rust_words = s.words("rust").words
        assert [w.text for w in rust_words] == [e.text for e in ev if isinstance(e, Word) and e.text]
        assert all(w.end >= w.start for w in rust_words)
    assert rt.free_slots == 3


def test_stream_without_history_gives_the_same_events_and_keeps_nothing(lm, tok, files):
    """history=False (the server's streams): the same events, token for token, as a stream with history, beside it
    on the same runtime, but for a Partial's text, its pending word alone; it keeps no tokens, words or text
    (bounded memory however long it runs: the whole text so far in each Partial grew with it), words() says why, and
    its Finished has no transcript."""
    seq = forced_stream(tok, 80, seed=4)
    forcer = Forcer({"kept": seq, "bare": seq})
    rt = runtime(lm, tok, files.config, forcer=forcer, alignment="rust", max_streams=2)
    kept, bare = rt.open_stream("kept"), rt.open_stream("bare", history=False)
    events = {}
    for s in (kept, bare):
        s.push(noise(1920 * 40, seed=1), process=False)
    rt.run()
    for s in (kept, bare):
        events[s.name] = [dataclasses.replace(e, stream="x") for e in s.flush() + s.events()]
    partials = {k: [e for e in v if isinstance(e, Partial)] for k, v in events.items()}
    assert all(e.text == e.pending for e in partials["bare"]) and bare._text == ""
    assert any(e.text != e.pending and e.text.endswith(e.pending) for e in partials["kept"])
    for k, v in events.items():
        events[k] = [dataclasses.replace(e, text=e.pending) if isinstance(e, Partial) else e for e in v]
    assert events["kept"][:-1] == events["bare"][:-1]
    assert sum(isinstance(e, Word) for e in events["bare"]) >= 3
    assert isinstance(events["bare"][-1], Finished) and events["bare"][-1].transcript is None
    assert events["kept"][-1].transcript.words and len(kept.tokens) == kept.steps
    assert bare.tokens == [] and bare._raw == [] and bare.steps == kept.steps
    with pytest.raises(RuntimeError, match="history=False"):
        bare.words()


@pytest.mark.parametrize("timestamps", ["python", "rust"])
def test_flush_without_ending_keeps_the_pushed_audios_times(lm, tok, files, timestamps):
    """flush(end=False) inserts silence (a frame's padding + the flush frames) the caller never pushed: later word
    times leave it out. Stream "a" flushes mid-way; stream "b" pushes the same silence as audio: the same tokens, and
    a's times are b's with that silence taken out (a time inside it is its start)."""
    seq = forced_stream(tok, 120, seed=7)
    rt = runtime(lm, tok, files.config, forcer=Forcer({"a": seq, "b": seq}), timestamps=timestamps)
    x1, x2 = noise(1920 * 10 + 700, seed=1), noise(1920 * 12, seed=2)
    gap = 1920 - 700 + rt.n_flush_frames * 1920
    a, b = rt.open_stream("a"), rt.open_stream("b")
    ev = {"a": a.push(x1) + a.flush(end=False) + a.push(x2) + a.flush(),
          "b": b.push(x1) + b.push(torch.zeros(gap)) + b.push(x2) + b.flush()}
    assert a.tokens == b.tokens and a.finished and b.finished
    start, dur = x1.shape[0] / 24000, gap / 24000

    def moved(t):
        return t if t <= start else max(start, t - dur)

    wa, wb = a.transcript.words, b.transcript.words
    assert len(wa) == len(wb) >= 4 and any(w.start > start + dur for w in wb)  # words on both sides of the gap
    for x, y in zip(wa, wb, strict=True):
        assert x.text == y.text and x.start == pytest.approx(moved(y.start)) and x.end == pytest.approx(moved(y.end))
    times = {n: [e.start_time if isinstance(e, Word) else e.stop_time for e in ev[n] if isinstance(e, Word | EndWord)]
             for n in ev}
    assert len(times["a"]) == len(times["b"]) and all(
        x == pytest.approx(moved(y)) for x, y in zip(times["a"], times["b"], strict=True))
    assert a.transcript.duration == pytest.approx((x1.shape[0] + x2.shape[0]) / 24000)


def test_a_stream_without_history_keeps_few_gaps_and_the_same_times(lm, tok, files):
    """Without history, a stream flushing at every turn sums the gaps its events are past, instead of keeping (and
    walking, at every word) one per flush for as long as it runs; its events' times stay those of a stream with
    history."""
    seq = forced_stream(tok, 600, seed=11)
    rt = runtime(lm, tok, files.config, forcer=Forcer({"kept": seq, "bare": seq}))
    kept, bare = rt.open_stream("kept"), rt.open_stream("bare", history=False)
    ev, most = {"kept": [], "bare": []}, 0
    for turn in range(12):
        x = noise(1920 * 3 + 100 * turn, seed=turn)
        for s in (kept, bare):
            ev[s.name] += s.push(x) + s.flush(end=turn == 11)
        most = max(most, len(bare._gaps))
    assert len(kept._gaps) == 11 and most <= 2 and bare._gaps_passed > 0
    times = {n: [(type(e).__name__, e.start_time if isinstance(e, Word) else e.stop_time) for e in ev[n]
                 if isinstance(e, Word | EndWord)] for n in ev}
    assert len(times["kept"]) >= 10 and [k for k, _ in times["kept"]] == [k for k, _ in times["bare"]]
    assert [t for _, t in times["bare"]] == pytest.approx([t for _, t in times["kept"]], abs=1e-9)  # summed apart


def test_vad_events_and_end_of_turn(lm, tok, files):
    pcm = noise(1920 * 12, seed=3)
    probe = runtime(lm, tok, files.config, max_streams=1)
    s = probe.open_stream("v")
    vads = [e for e in s.push(pcm) + s.flush() if isinstance(e, VADStep)]
    assert len(vads) == 12 + 7 and [v.step_idx for v in vads] == list(range(1, 20))
    # reference: the same codes through a bare Generator, P(class 0) of each head in fp32
    codec, gen = StubCodec(), Generator(lm, use_sampling=False)
    cst, gst = codec.init_state(1), gen.init_state(1)
    padded = torch.cat([pcm, torch.zeros(7 * 1920)])
    for i, v in enumerate(vads):
        codes = codec.encode_step(padded[None, None, i * 1920 : (i + 1) * 1920], cst)
        out = gen.step(gst, codes[..., 0])
        ref = [float(torch.softmax(h(out.z).float(), -1)[0, 0]) for h in lm.extra_heads]
        assert v.probs == pytest.approx(ref, abs=1e-6)
    thr = float(np.median([v.probs[2] for v in vads]))
    rt = runtime(lm, tok, files.config, max_streams=1, vad_threshold=thr)
    s = rt.open_stream("v")
    eot = [e.end_of_turn for e in s.push(pcm) + s.flush() if isinstance(e, VADStep)]
    assert eot == [v.probs[2] > thr for v in vads] and any(eot) and not all(eot)


def test_flush_without_ending_delivers_words_at_once(lm, tok, files):
    """Voice-agent flush at end of turn: the silence frames run immediately; the stream stays open."""
    hello = tok.encode("hello")
    seq = [3] * 6 + [0, *hello] + [3] * 7 + [0, *tok.encode("world")] + [3] * 30
    forcer = Forcer({"agent": seq})
    rt = runtime(lm, tok, files.config, forcer=forcer, max_streams=1)
    s = rt.open_stream("agent")
    ev = s.push(noise(1920 * 6 + 100, 1))
    assert s.steps == 6 and not any(isinstance(e, Word) for e in ev) and len(s.queue) == 100
    ev = s.flush(end=False)
    assert s.steps == 7 + 7 and not s.finished  # the partial frame padded, then 7 silence frames
    words = [e for e in ev if isinstance(e, Word)]
    assert [w.text for w in words] == ["hello"] and words[0].start_time == (7 - 6) / 12.5  # step_idx - asr delay
    assert any(isinstance(e, Partial) and e.pending == "hello" for e in ev)
    ev = s.push(noise(1920 * 8, 2)) + s.flush()
    assert [e.text for e in ev if isinstance(e, Word)] == ["world"] and isinstance(ev[-1], Finished)
    assert ev[-1].transcript.text == "hello world" and s.words("rust").text == "hello world"


def test_a_word_of_no_text_keeps_the_running_text_and_the_transcript_clean(lm, tok, files):
    """eos alone between boundaries is a server Word of text "" (sent as is), but no word of the running text of
    Partial events nor of the Rust-rule transcript (they read "hello  world" before)."""
    hello, world = tok.encode("hello"), tok.encode("world")
    seq = [3] * 6 + [0, *hello] + [3] * 3 + [0, 2] + [3] * 3 + [0, *world] + [3] * 30
    rt = runtime(lm, tok, files.config, forcer=Forcer({"e": seq}), max_streams=1, timestamps="rust")
    s = rt.open_stream("e")
    ev = s.push(noise(1920 * 30, 1)) + s.flush()
    assert [e.text for e in ev if isinstance(e, Word)] == ["hello", "", "world"]
    assert [e.text for e in ev if isinstance(e, Partial)][-1] == "hello world"
    assert all("  " not in e.text for e in ev if isinstance(e, Partial))
    assert s.transcript.text == "hello world" and [w.text for w in s.transcript.words] == ["hello", "world"]


def test_markers_follow_the_server_rule(lm, tok, files):
    rt = runtime(lm, tok, files.config, max_streams=1)
    s = rt.open_stream("m")
    s.push(noise(1920 * 5 + 7, 1), process=False)
    assert s.marker(1) == []  # due at step 0 + 5 queued frames + asr delay 6 = 11
    ev = s.push(noise(1920 * 6, 2))
    steps = [e.step_idx for e in ev if isinstance(e, VADStep)]
    assert steps == list(range(1, 12)) and len(s.queue) == 7
    assert isinstance(ev[-1], Marker) and ev[-1].id == 1 and isinstance(ev[-2], VADStep) and ev[-2].step_idx == 11
    assert s.marker(2) == []  # due at 11 + 0 + 6
    ev = s.flush()
    i = next(i for i, e in enumerate(ev) if isinstance(e, Marker))
    assert ev[i].id == 2 and ev[i - 1].step_idx == 17 and isinstance(ev[-1], Finished)
    rt = runtime(lm, tok, files.config, max_streams=1, asr_delay_in_tokens=50)
    s = rt.open_stream("late")
    s.marker(3)
    ev = s.flush()  # due after the end: echoed at the end, before Finished
    assert [type(e) for e in ev[-2:]] == [Marker, Finished] and ev[-2].id == 3
    s = rt.open_stream("ids")
    for bad in ("x", 1.7, True, 2**63):  # were a bare int() error, or truncated, or accepted
        with pytest.raises(ValueError, match=f"stream ids: a marker id is an int64, got {re.escape(repr(bad))}"):
            s.marker(bad)
    assert s.marker(np.int64(-(2**63))) == []


@pytest.mark.parametrize("engine", [False, True])
@pytest.mark.parametrize("hooked", [False, True])
def test_the_frames_of_a_call_are_read_with_one_wait(lm, tok, files, monkeypatch, engine, hooked):
    """``step(max_frames=k)`` queues its k LM steps and reads their tokens (and VAD probabilities) with one wait for
    the device, not two per frame; the events are those of frame-by-frame steps. With a text hook (which may read a
    stream's step count) each frame is handed over before the next step: one wait per frame."""
    from dsm.host_copies import HostReads

    waits, real = [], HostReads.wait
    monkeypatch.setattr(HostReads, "wait", lambda self: waits.append(len(self._copies)) or real(self))
    reads_per_frame = 2 if lm.extra_heads else 1
    events = {}
    for k in (1, 4):
        forcer = Forcer({"a": forced_stream(tok, 40, seed=1), "b": forced_stream(tok, 40, seed=2)}) if hooked else None
        rt = runtime(lm, tok, files.config, forcer=forcer, engine=engine)
        a, b = rt.open_stream("a"), rt.open_stream("b")
        a.push(noise(1920 * 11, 1), process=False)
        b.push(noise(1920 * 7, 2), process=False)
        waits.clear()
        frames = []
        while n := rt.step(k):
            frames.append(n)
        assert max(frames) == k  # several frames a call (the streams' queues allow it)
        if hooked:
            assert waits == [reads_per_frame] * sum(frames)
        else:
            assert waits == [reads_per_frame * n for n in frames]
        events[k] = (a.events(), b.events())
    assert any(isinstance(e, Word) for e in events[1][0]) or not hooked
    assert events[4] == events[1]


def cuda_syncs(fn) -> list[str]:
    """The host's waits for the device during ``fn()``, as PyTorch's sync debug mode reports them."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "synchroniz" in str(w.message).lower()]


@pytest.mark.gpu
def test_cuda_a_call_of_frames_waits_once(files):
    """On the GPU (real Mimi, the engine's graphs): a call of 4 frames makes the host wait for the device at most
    once (the runtime's read of the tokens; PyTorch may not count an explicit wait). It used to wait twice a frame
    (text tokens, VAD probabilities) and at every copy of the input PCM and of a changed mask."""
    rt = STTRuntime.from_checkpoint(files, device="cuda", max_streams=2)
    rt.warm_up()
    s = rt.open_stream("a")
    s.push(noise(1920 * 40, 1), process=False)
    for _ in range(3):  # Mimi's capture for 4 frames, the engine's eager call and capture
        assert rt.step(4) == 4
    torch.cuda.synchronize()
    syncs = cuda_syncs(lambda: rt.step(4))
    assert len(syncs) <= 1, syncs
    assert s.steps == 16


def test_a_hook_error_keeps_the_frames_before_it(lm, tok, files):
    """A text hook raising at the third of four frames of a call: the two frames before it reach the streams, the
    error propagates, and the runtime steps on afterwards."""

    class Boom(Forcer):
        calls = 0

        def __call__(self, tokens):
            Boom.calls += 1
            if Boom.calls == 3:
                raise RuntimeError("boom")
            super().__call__(tokens)

    rt = runtime(lm, tok, files.config, forcer=Boom(), engine=True)
    s = rt.open_stream("a")
    s.push(noise(1920 * 10, 1), process=False)
    with pytest.raises(RuntimeError, match="boom"):
        rt.step(4)
    assert s.steps == 2 and rt.total_steps == 2 and s.in_flight == 0
    assert rt.step(4) == 4 and s.steps == 6  # the 4 frames of the failed call are gone (documented in STTRuntime)


@pytest.mark.parametrize("engine", [True, False])
def test_a_stream_whose_last_frames_a_hook_error_lost_still_finishes(lm, tok, files, engine):
    """The frames of a call whose text hook raised are lost. When they were an ended stream's last ones, nothing was
    left to step, so the stream never finished: no Finished, its slot held for good. It now finishes without them,
    and its slot serves the next stream."""
    def boom(tokens):
        if s.steps == frames - 2:  # the first step of the last call
            raise RuntimeError("boom")

    rt = runtime(lm, tok, files.config, max_streams=1, engine=engine)
    rt.stepper.on_text = boom
    s = rt.open_stream("a")
    s.push(noise(1920, 1), process=False)
    s.flush(process=False)
    frames = len(s.queue) // 1920
    rt.step(frames - 2)
    s.marker(7)
    with pytest.raises(RuntimeError, match="boom"):
        rt.step(2)
    ev = s.events()
    assert s.steps == frames - 2 and s.finished and rt.free_slots == 1
    assert ev[-2:] == [Marker("a", 7), Finished("a", s.transcript)] and s.transcript.meta["steps"] == frames - 2
    assert rt.open_stream("b").slot == 0


@pytest.mark.parametrize("engine", [True, False])
@pytest.mark.parametrize("bad", ["-1", "text_card"])
def test_a_hook_leaving_an_undecodable_token_is_refused_and_undone(lm, tok, files, engine, bad, monkeypatch):
    """A text hook writing an id the tokenizer cannot decode (-1, or text_card: valid as a model input, not as a
    word) into one stream's row at a step: that step raises and is undone; both streams keep the frames before it and
    step on afterwards (before, the id sat in the stream's word and every later step of every stream raised). The
    runtime's check is the only one: the generator's wider check of every row was a second host wait a step."""
    from dsm.generate import Generator

    monkeypatch.setattr(Generator, "check_hook_tokens", lambda *a: pytest.fail("a second check (host wait)"))
    value = -1 if bad == "-1" else lm.cfg.text_card

    class Bad(Forcer):
        calls = 0

        def __call__(self, tokens):
            super().__call__(tokens)
            Bad.calls += 1
            if Bad.calls == 3:
                tokens[self.rt.streams[0].slot] = value

    rt = runtime(lm, tok, files.config, forcer=Bad(), engine=engine)
    a, b = rt.open_stream("a"), rt.open_stream("b")
    for i, s in enumerate((a, b)):
        s.push(noise(1920 * 10, i), process=False)
    with pytest.raises(ValueError, match=rf"on_text \(the STT text hook\): token ids must be in \[0, "
                                         rf"{lm.cfg.text_card - 1}\]"):
        rt.step(4)
    assert [a.steps, b.steps, a.in_flight, b.in_flight, rt.total_steps] == [2, 2, 0, 0, 2]
    assert rt.step(4) == 4 and a.steps == b.steps == 6
    a.flush(), b.flush()
    assert all(0 <= t < lm.cfg.text_card for t in a.tokens + b.tokens)


def test_one_streams_failure_does_not_take_the_frame_from_the_others(lm, tok, files, monkeypatch):
    """A stream whose host-side work for a token raises (stubbed here): every other stream still gets every frame of
    the call, no frame is handed over twice, nothing stays in flight, and the error names the stream."""
    rt = runtime(lm, tok, files.config, engine=True, max_streams=3)
    streams = [rt.open_stream(n) for n in "abc"]
    for i, s in enumerate(streams):
        s.push(noise(1920 * 8, i), process=False)
    failing = streams[1]
    push, calls = failing.tracker.push, []

    def broken(token):
        calls.append(token)
        if len(calls) == 2:
            raise RuntimeError("tokenizer broke")
        return push(token)

    monkeypatch.setattr(failing.tracker, "push", broken)
    with pytest.raises(RuntimeError, match="tokenizer broke") as info:
        rt.step(4)
    assert "(in STT stream 'b', slot 1)" in info.value.__notes__
    assert [s.steps for s in streams] == [4, 4, 4] and len(calls) == 4
    assert [s.in_flight for s in streams] == [0, 0, 0] and rt.total_steps == 4
    assert rt.step(4) == 4 and [s.steps for s in streams] == [8, 8, 8]


def test_a_call_from_another_thread_waits_for_the_step(lm, tok, files):
    """The runtime's and its streams' calls hold the runtime's lock: a stream opened and fed from another thread
    during a step joins after it. It used to run inside the step (the engine refused the open as if a hook had called
    it); threads feeding their own streams got other streams' frames, lost tokens and leaked slots."""
    from another_thread import CallFromAnotherThread

    def open_and_push():
        late = rt.open_stream("late")
        late.push(noise(1920, 1))
        return late

    other = CallFromAnotherThread(open_and_push)

    def hook(tokens):
        if not other.started:
            other.start_inside_the_step()

    rt = STTRuntime(lm, StubCodec(), tok, files.config, max_streams=2, on_text=hook, engine=True)
    first = rt.open_stream("first")
    first.push(noise(1920, 0))
    late = other.join()
    assert late.slot == 1 and first.steps == late.steps == 1
    assert repr(rt) == "STTRuntime(streams 2/2 open, alignment='pytorch', device=cpu, engine=True)"


@pytest.mark.parametrize("rate", [24000, 16000])
def test_events_do_not_depend_on_chunk_size(lm, tok, files, rate):
    data, sr = sf.read(str(SPEECH), dtype="float32")
    pcm = torch.from_numpy(data[: sr // 2])
    if rate != sr:
        pcm = resample(pcm, sr, rate)
    runs = []
    for chunk in (1, 777, 1920, 5000):
        forcer = Forcer({"c": forced_stream(tok, 40, seed=5)})
        rt = runtime(lm, tok, files.config, forcer=forcer, max_streams=1)
        s = rt.open_stream("c", sample_rate=rate)
        ev = []
        for i in range(0, pcm.shape[0], chunk):
            ev += s.push(pcm[i : i + chunk])
        ev += s.flush()
        runs.append(ev)
    forcer = Forcer({"c": forced_stream(tok, 40, seed=5)})
    rt = runtime(lm, tok, files.config, forcer=forcer, max_streams=1)
    s = rt.open_stream("c", sample_rate=rate)
    s.push(pcm, process=False)
    s.flush(process=False)
    rt.run(max_frames=5)  # several frames per Mimi call
    runs.append(s.events())
    assert any(isinstance(e, Word) for e in runs[0]) and isinstance(runs[0][-1], Finished)
    for ev in runs[1:]:
        assert ev == runs[0]
    assert runs[0][-1].transcript.duration == pytest.approx(0.5, abs=1e-3)


def moshi_reference(files):
    """moshi's LMGen class, LM (fp32) and Mimi (32 codebooks) on the checkpoint's files, for the end-to-end tests."""
    loaders = pytest.importorskip("moshi.models.loaders")
    from moshi.models.lm import LMGen

    info = loaders.CheckpointInfo.from_hf_repo("local/unused", moshi_weights=files.lm_weights,
                                               mimi_weights=files.mimi_weights, tokenizer=files.tokenizer,
                                               config_path=files.config_path)
    ref_lm = info.get_moshi(device="cpu", dtype=torch.float32).eval()
    return LMGen, ref_lm, loaders.get_mimi(str(files.mimi_weights), device="cpu", num_codebooks=32)


def test_rust_alignment_on_the_engine_matches_moshi(lm, tok, files, mimi):
    """Rust alignment (serve-stt's default) on the engine with real Mimi, a second stream joining a later step in
    slot 1, vs moshi fed frame t-1 at step t. The frame shift feeds the audio initial token (card) at a stream's
    first step and in unopened slots: an engine that took ids in [-1, card) only refused every step."""
    LMGen, ref_lm, ref_mimi = moshi_reference(files)
    pcm = load_audio(SPEECH)[0][: 24000 // 2]
    a, b = pcm[:9000], pcm[9000:]

    def moshi_rust(x):  # the DSM script loop with the one-frame shift; 7 + 1 flush frames (the last frame seen late)
        x = torch.nn.functional.pad(x, (0, (-x.shape[0]) % 1920 + 8 * 1920))
        gen, prev, out = LMGen(ref_lm, temp=0, temp_text=0), None, []
        with torch.no_grad(), ref_mimi.streaming(1), gen.streaming(1):
            for i in range(x.shape[0] // 1920):
                codes = ref_mimi.encode(x[None, None, i * 1920 : (i + 1) * 1920])
                out.append(int(gen.step(codes if prev is None else prev)[0, 0, 0]))  # step 0 sees initial tokens
                prev = codes
        return out

    rt = STTRuntime(lm, mimi, tok, files.config, max_streams=2, options=STTOptions(alignment="rust"), engine=True)
    sa = rt.open_stream("a")
    sa.push(a[:5000])
    sb = rt.open_stream("b")  # slot 1, its first step is a's third
    sa.push(a[5000:], process=False)
    sb.push(b, process=False)
    sa.flush(process=False)
    sb.flush()
    assert sa.finished and sb.finished and sb.slot == 1
    assert sa.tokens == moshi_rust(a) and sb.tokens == moshi_rust(b)


@pytest.mark.parametrize("codec,engine", [("stub", False), ("stub", True), ("mimi", False)])
def test_ended_stream_frees_its_slot_without_disturbing_others(lm, tok, files, mimi, codec, engine):
    def make():
        return runtime(lm, tok, files.config, codec=mimi if codec == "mimi" else None, max_streams=2, engine=engine)

    a, b, c = noise(1920 * 2, 1), noise(1920 * 7 + 17, 2), noise(1920 * 4, 3)

    def tokens_and_vad(ev):
        return [e.probs for e in ev if isinstance(e, VADStep)]

    rt = make()
    sa, sb = rt.open_stream("a"), rt.open_stream("b")
    ev_b = sb.push(b[: 1920 * 3], process=False)
    sa.push(a, process=False)
    sa.flush(process=False)
    rt.run()
    assert sa.finished and rt.free_slots == 1 and not sb.finished
    sc = rt.open_stream("c")  # reuses a's slot, reset
    assert sc.slot == sa.slot
    ev_b += sb.push(b[1920 * 3 :])
    ev_c = sc.push(c) + sc.flush()
    ev_b += sb.flush()

    tb, evb = run_alone(make(), b, sb.slot)  # in the same row as in the batched run
    tc, evc = run_alone(make(), c, sc.slot)
    assert sb.tokens == tb and sc.tokens == tc
    assert tokens_and_vad(ev_b) == tokens_and_vad(evb) and tokens_and_vad(ev_c) == tokens_and_vad(evc)
    assert len(set(tb)) > 3  # the tokens depend on the audio: the comparison is not vacuous


class CountingMimi:
    """Mimi, recording how many rows each encode call steps."""

    def __init__(self, mimi):
        self.mimi, self.rows = mimi, []

    def __getattr__(self, name):
        return getattr(self.mimi, name)

    def encode_step(self, pcm, state):
        self.rows.append(pcm.shape[0])
        return self.mimi.encode_step(pcm, state)


def test_mimi_buckets_are_whole_below_the_large_batch_paths(lm, tok, files):
    """A runtime with no more slots than Mimi's smallest bucket encodes every slot (its streams' codes then never
    depend on one another); one with more steps the buckets."""
    assert runtime(lm, tok, files.config, codec=StubCodec(), max_streams=8).stepper.mimi_buckets == (8,)
    assert runtime(lm, tok, files.config, codec=StubCodec(), max_streams=300).stepper.mimi_buckets == (
        128, 192, 256, 300)


@pytest.mark.parametrize("engine", [False, True])
def test_mimi_encodes_the_rows_of_the_open_slots(lm, tok, files, mimi, engine, monkeypatch):
    """Mimi encodes the smallest bucket of rows that holds every open slot, not every slot (buckets of 2, 4, 6 rows
    here, as a large runtime's 128, 192, ...): one stream costs 2 rows, a third stream 4, and 4 still while the
    third is silent but open (its frozen state must stay in step: a bucket by active slots fails here), then 2 again
    once it ends. Every stream's tokens equal its run alone (VAD within batch rounding), including one opened in
    the scratch row Mimi had left behind."""
    monkeypatch.setattr("dsm.stt.mimi_buckets", lambda n: mimi_buckets(n, smallest=2, step=2))
    a, b, c, e = (noise(1920 * n, seed) for n, seed in ((12, 4), (3, 7), (4, 5), (3, 6)))
    codec = CountingMimi(mimi)
    rt = runtime(lm, tok, files.config, codec=codec, max_streams=6, engine=engine)

    def rows_of(run) -> set[int]:
        n = len(codec.rows)
        run()
        assert len(codec.rows) > n
        return set(codec.rows[n:])

    ev = {"a": [], "b": [], "c": [], "e": []}
    sa = rt.open_stream("a")
    assert rows_of(lambda: ev["a"].extend(sa.push(a[: 1920 * 3]))) == {2}
    sb, sc = rt.open_stream("b"), rt.open_stream("c")
    for s, pcm in ((sa, a[1920 * 3 : 1920 * 4]), (sb, b[:1920]), (sc, c[:1920])):
        ev[s.name] += s.push(pcm, process=False)
    assert rows_of(rt.run) == {4}
    ev["a"] += sa.push(a[1920 * 4 : 1920 * 5], process=False)
    ev["b"] += sb.push(b[1920 : 1920 * 2], process=False)
    assert rows_of(rt.run) == {4}  # c silent: frozen, in step
    ev["b"] += sb.push(b[1920 * 2 :], process=False) + sb.flush(process=False)
    assert rows_of(lambda: ev["c"].extend(sc.push(c[1920:]) + sc.flush())) == {4} and sc.finished and sb.finished
    ev["b"] += sb.events()
    assert rows_of(lambda: ev["a"].extend(sa.push(a[1920 * 5 : 1920 * 8]))) == {2}  # row 2: the scratch row
    sd, se = rt.open_stream("d"), rt.open_stream("e")
    assert se.slot == 2
    ev["e"] += se.push(e) + se.flush()
    sd.close()
    ev["a"] += sa.push(a[1920 * 8 :]) + sa.flush()

    def vad(events):
        return torch.tensor([e.probs for e in events if isinstance(e, VADStep)])

    for s, pcm in ((sa, a), (sb, b), (sc, c), (se, e)):  # each in the same row as in the run above
        tokens, events = run_alone(runtime(lm, tok, files.config, codec=mimi, max_streams=6, engine=engine), pcm,
                                   s.slot)
        assert s.tokens == tokens, s.name
        # the engine's LM runs each step on the bucket of the highest active slot: batch rounding
        got, want = vad(ev[s.name]), vad(events)
        assert got.shape == want.shape and got.numel() and (got - want).abs().max() < 1e-6, s.name
    assert len(set(sa.tokens)) > 3  # the tokens depend on the audio: the comparison is not vacuous


def test_batch_invariant_steps_every_slot_and_gives_the_same_bits(lm, tok, files, mimi):
    """``batch_invariant``: the LM and Mimi step every slot, so a stream's VAD probabilities (not only its tokens)
    are the same bits as in its run alone while other streams join, speak and leave (without it they differ in
    the last bits: the LM's buckets)."""
    def make():
        return runtime(lm, tok, files.config, codec=mimi, max_streams=4, engine=True, batch_invariant=True)

    rt = make()
    assert rt.stepper.engine.buckets == (4,) and rt.stepper.mimi_buckets == (4,)
    a, b = noise(1920 * 10, 8), noise(1920 * 3, 9)
    sa = rt.open_stream("a")
    events = sa.push(a[: 1920 * 3])
    sb = rt.open_stream("b")
    sb.push(b, process=False)
    sb.flush(process=False)
    events += sa.push(a[1920 * 3 :]) + sa.flush()
    assert sb.finished
    alone = make().open_stream("a")
    want = alone.push(a) + alone.flush()

    def vad(ev):
        return [e.probs for e in ev if isinstance(e, VADStep)]

    assert sa.tokens == alone.tokens and vad(events) == vad(want) and len(vad(want)) > 10


def test_random_churn_every_stream_equals_its_run_alone(lm, tok, files, mimi, monkeypatch):
    """Streams open, speak, fall silent, finish or are aborted at random steps of a 6-slot runtime (engine, real
    Mimi), so the LM's bucket and Mimi's grow and shrink under them and rows are left behind and taken again. Mimi
    steps any row count from 2 here (a large runtime's buckets step 64 rows), so its codes often cover fewer rows
    than the LM's bucket. Every stream that finishes has the tokens of its run alone in the same slot."""
    monkeypatch.setattr("dsm.stt.mimi_buckets", lambda n: mimi_buckets(n, smallest=2, step=1))
    rng, codec = random.Random(3), CountingMimi(mimi)
    rt = runtime(lm, tok, files.config, codec=codec, max_streams=6, engine=True)
    live, sent, finished, aborted = [], {}, [], 0
    for t in range(28):
        if rt.free_slots and rng.random() < 0.5:
            s = rt.open_stream(f"s{t}")
            live.append(s)
            sent[s.name] = []
        for s in list(live):
            r = rng.random()
            if r < 0.55:  # a frame or two (else silent this step)
                chunk = noise(1920 * rng.randint(1, 2) - rng.randint(0, 700), seed=1000 * t + s.slot)
                s.push(chunk, process=False)
                sent[s.name].append(chunk)
            elif r < 0.63 and sent[s.name]:
                s.flush(process=False)
                live.remove(s)
                finished.append(s)
            elif r < 0.66:
                s.close()
                live.remove(s)
                aborted += 1
        rt.run()
    for s in live:
        s.flush(process=False)
        finished.append(s)
    rt.run()
    assert len(finished) >= 5 and aborted >= 1 and all(s.finished for s in finished)
    assert {3, 5} <= set(codec.rows), set(codec.rows)  # fewer rows than the LM's buckets (4, 6)
    for s in finished:
        pcm = torch.cat(sent[s.name]) if sent[s.name] else torch.zeros(0)
        tokens, _ = run_alone(runtime(lm, tok, files.config, codec=mimi, max_streams=6, engine=True), pcm, s.slot)
        assert tokens == s.tokens, s.name


def test_audio_errors_and_defined_behaviour(lm, tok, files, tmp_path):
    rt = runtime(lm, tok, files.config, max_streams=2)
    s = rt.open_stream("mic", sample_rate=16000)
    with pytest.raises(AudioError, match=r"stream mic \(16000 Hz\).*NaN"):
        s.push(torch.tensor([0.1, float("nan"), 0.0]))
    for bad in (np.float32("nan"), np.float32("inf")):  # float32 numpy chunks (a server's) are checked in numpy
        with pytest.raises(AudioError, match=r"stream mic \(16000 Hz\): 1 sample\(s\) are NaN or infinite"):
            s.push(np.array([0.1, bad, 0.0], dtype=np.float32))
    with pytest.raises(AudioError, match="mic.*44100 Hz.*opened at 16000 Hz"):
        s.push(torch.zeros(10), sample_rate=44100)
    with pytest.raises(AudioError, match="dtype"):
        s.push(np.zeros(10, dtype=np.int16))
    with pytest.raises(AudioError, match=r"\[T, C\]"):
        s.push(torch.zeros(4000, 2))
    assert s.push(torch.zeros(0)) == [] and s.samples_in == 0  # empty chunk: no-op
    rt.open_stream("other")
    with pytest.raises(NoFreeSlotError, match="2 stream slots"):
        rt.open_stream("third")
    from dsm.engine import EngineFull

    with pytest.raises(EngineFull):  # one class to catch, from the runtime or the engine under it
        rt.open_stream("third")
    s.flush()
    with pytest.raises(StreamClosedError, match="mic"):
        s.push(torch.zeros(10))
    assert s.finished and s.marker(5) == [Marker("mic", 5)]  # no step will come: echoed at once, not never
    with pytest.raises(ValueError, match="alignment"):
        STTOptions(alignment="candle")
    for bad, message in (({"asr_delay_in_tokens": -5}, "asr_delay_in_tokens"), ({"vad_threshold": math.nan},
                         "vad_threshold"), ({"vad_threshold": 1.5}, "vad_threshold"), ({"temp": -1.0}, "temp")):
        with pytest.raises(ValueError, match=message):
            STTOptions(**bad)
    with pytest.raises(ValueError, match="vad_head 4 out of range"):
        runtime(lm, tok, files.config, vad_head=4)
    for key in ("audio_delay_seconds", "audio_silence_prefix_seconds"):  # failed at the first stream or flush
        config = dataclasses.replace(files.config, stt_config={**files.config.stt_config, key: -0.5})
        with pytest.raises(ValueError, match=rf"stt_config.{key} must be >= 0 seconds, got -0.5"):
            runtime(lm, tok, config)
    # multi-channel input is averaged: same events as the mono mean
    x = noise(3000, 7).reshape(1, -1).repeat(2, 1) * torch.tensor([[1.0], [0.5]])
    r1, r2 = runtime(lm, tok, files.config, max_streams=1), runtime(lm, tok, files.config, max_streams=1)
    s1, s2 = r1.open_stream("m"), r2.open_stream("m")
    assert s1.push(x) + s1.flush() == s2.push(x.mean(0)) + s2.flush()
    # a stream with no audio at all: prefix + flush frames, no words
    s3 = r1.open_stream("silent")
    ev = s3.flush()
    assert isinstance(ev[-1], Finished) and ev[-1].transcript.duration == 0.0

    # files: empty, corrupt, missing -> errors naming the file; the good one is transcribed
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 24000)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00junk")
    sf.write(tmp_path / "ok.flac", noise(24000 // 4, 1).numpy(), 24000)
    paths = [tmp_path / n for n in ("empty.wav", "corrupt.wav", "missing.mp3", "ok.flac")]
    res = {r.path.name: r for r in transcribe_files(r1, paths)}
    assert "empty" in res["empty.wav"].error and "cannot decode" in res["corrupt.wav"].error
    assert "not found" in res["missing.mp3"].error and str(tmp_path) in res["missing.mp3"].error
    assert res["ok.flac"].error is None and res["ok.flac"].audio_seconds == 0.25
    # a caller that stops reading (closes the generator at the first result): the files in flight free their slots
    sf.write(tmp_path / "long.flac", noise(24000 * 4, 2).numpy(), 24000)
    r4 = runtime(lm, tok, files.config, max_streams=3)
    results = transcribe_files(r4, [tmp_path / "ok.flac", tmp_path / "long.flac", tmp_path / "long.flac"])
    assert next(results).path.name == "ok.flac" and r4.free_slots == 1
    results.close()
    assert r4.free_slots == 3
    # a model without delay and no audio: nothing to run, the stream finishes at flush
    r0 = runtime(lm, tok, dataclasses.replace(files.config, stt_config={"audio_delay_seconds": 0.0,
                                                                         "audio_silence_prefix_seconds": 0.0}),
                 max_streams=1)
    # a config without stt_config takes Kyutai's scripts' defaults: 5 s of delay, 1 s of silence prefix
    rd = runtime(lm, tok, dataclasses.replace(files.config, stt_config={}), max_streams=1)
    assert (rd.audio_delay_seconds, rd.n_prefix_frames, rd.n_flush_frames) == (5.0, 13, 63)
    ev = r0.open_stream("nodelay").flush()
    assert isinstance(ev[-1], Finished) and ev[-1].transcript.words == [] and r0.free_slots == 1
    r0.open_stream("busy")  # holds the only slot: transcribe_files must not spin
    with pytest.raises(NoFreeSlotError, match="no progress"):
        list(transcribe_files(r0, [tmp_path / "ok.flac"]))


def test_overlapped_calls_give_the_results_of_synchronous_ones(lm, tok, files, tmp_path, monkeypatch):
    """``transcribe_files`` overlaps its calls (a call's words are made while the next call runs): six files of
    different lengths through two slots, each slot reused while a call is still pending, give the tokens, VAD
    probabilities, last frames and transcripts of the synchronous calls (the files land in other slots: a slot is
    freed a call later)."""
    paths = []
    for i, seconds in enumerate([0.3, 1.1, 0.2, 0.7, 1.5, 0.4]):
        paths.append(tmp_path / f"f{i}.wav")
        sf.write(paths[-1], noise(int(24000 * seconds), 10 + i).numpy(), 24000)
    from dsm.stt import STTStream

    got, tokens, real = {}, {}, STTStream._on_step

    def spy(self, token, probs, finish=False):
        tokens[self.rt][self.name].append((token, probs, finish))
        real(self, token, probs, finish)

    monkeypatch.setattr(STTStream, "_on_step", spy)
    for overlap in (False, True):
        rt = runtime(lm, tok, files.config, max_streams=2, engine=True)
        tokens[rt] = {str(p): [] for p in paths}
        got[overlap] = {r.path.name: r.transcript for r in transcribe_files(rt, paths, frames_per_call=3,
                                                                              overlap=overlap)}
        assert rt._pending is None and rt.free_slots == 2
        got[overlap, "tokens"] = tokens[rt]
    assert len(got[True]) == 6 and got[True] == got[False]
    for name, seq in got[True, "tokens"].items():  # files took other slots beside other files: the VAD's fp32 rounds
        want = got[False, "tokens"][name]
        assert [(t, f) for t, _, f in seq] == [(t, f) for t, _, f in want], name
        torch.testing.assert_close(torch.tensor([p for _, p, _ in seq]), torch.tensor([p for _, p, _ in want]))
    assert len({t for seq in got[True, "tokens"].values() for t, _, _ in seq}) > 3  # the tokens move


@pytest.mark.gpu
def test_cuda_overlapped_transcription_equals_the_synchronous_one(files, tmp_path, monkeypatch):
    """On the GPU (real Mimi, bf16 LM, the engine's graphs): overlapped calls give the tokens of synchronous ones (a
    wait that let the host read a call's tokens before the device wrote them would give stale rows here)."""
    from dsm.stt import STTStream

    paths = []
    for i, seconds in enumerate([0.6, 1.3, 0.4, 0.9]):
        paths.append(tmp_path / f"f{i}.wav")
        sf.write(paths[-1], noise(int(24000 * seconds), 20 + i).numpy(), 24000)
    tokens, real = {}, STTStream._on_step

    def spy(self, token, probs, finish=False):
        tokens[self.rt][self.name].append((token, finish))
        real(self, token, probs, finish)

    monkeypatch.setattr(STTStream, "_on_step", spy)
    got = {}
    for overlap in (False, True):
        rt = STTRuntime.from_checkpoint(files, device="cuda", max_streams=2)
        tokens[rt] = {str(p): [] for p in paths}
        list(transcribe_files(rt, paths, frames_per_call=4, overlap=overlap))
        got[overlap] = tokens[rt]
    assert got[True] == got[False]
    assert len({t for seq in got[True].values() for t, _ in seq}) > 3


def test_an_overlapped_call_hands_its_tokens_over_at_the_next(lm, tok, files):
    """``step(overlap=True)``: the call's frames reach the stream at the next call (after it has queued its own) or
    at ``settle()``; a synchronous step settles first; a stream closed while its frames are pending gets none of
    them (no events, no Finished)."""
    rt = runtime(lm, tok, files.config, max_streams=2, engine=True)
    a, b = rt.open_stream("a"), rt.open_stream("b")
    a.push(noise(1920 * 10, 1), process=False)
    b.push(noise(1920 * 10, 2), process=False)
    assert rt.step(4, overlap=True) == 4 and a.steps == 0 and rt._pending is not None
    assert rt.step(4, overlap=True) == 4 and a.steps == b.steps == 4
    b.close()
    rt.settle()
    assert a.steps == 8 and b.steps == 4 and rt._pending is None
    assert not any(isinstance(e, Finished) for e in b.events())
    assert rt.step(2, overlap=True) == 2 and a.steps == 8
    left = rt.n_prefix_frames + 10 - 10  # a's frames not yet queued
    n = rt.step()  # synchronous: the pending call's frames first, then its own
    assert n == min(1, left) and a.steps == 10 + n and rt._pending is None


def test_a_failing_overlapped_call_still_hands_over_the_previous_one(lm, tok, files, monkeypatch):
    """An overlapped call whose own steps fail (here the stepper raises) still hands the previous call's frames to
    the streams before the error propagates: none of them is lost."""
    rt = runtime(lm, tok, files.config, max_streams=1, engine=True)
    a = rt.open_stream("a")
    a.push(noise(1920 * 10, 1), process=False)
    assert rt.step(4, overlap=True) == 4 and a.steps == 0

    def boom(*args, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(rt.stepper, "lm_steps", boom)
    with pytest.raises(RuntimeError, match="boom"):
        rt.step(4, overlap=True)
    assert a.steps == 4 and rt._pending is None and a.in_flight == 0


def test_a_flush_while_the_last_frames_are_in_flight_keeps_them(lm, tok, files):
    """A model without an audio delay adds no flush frames: a flush while an overlapped call still held the stream's
    last frames finished it at once, and those frames' tokens were dropped (the transcript had none of them). It now
    finishes when they are handed over, as without overlap."""
    config = dataclasses.replace(files.config, stt_config={"audio_delay_seconds": 0.0,
                                                          "audio_silence_prefix_seconds": 0.0})
    pcm = noise(1920 * 4, 1)
    ref = runtime(lm, tok, config, max_streams=1, engine=True).open_stream("a")
    ref.push(pcm)
    ref.flush()
    for settle in (True, False):
        rt = runtime(lm, tok, config, max_streams=1, engine=True)
        a = rt.open_stream("a")
        a.push(pcm, process=False)
        assert rt.n_flush_frames == 0 and rt.step(4, overlap=True) == 4 and a.in_flight == 4
        ev = a.flush(process=not settle)
        assert a.finished != settle
        if settle:
            rt.settle()
        ev += a.events()
        assert a.finished and isinstance(ev[-1], Finished) and rt.free_slots == 1
        assert a.tokens == ref.tokens and len(a.tokens) == 4 and a.transcript == ref.transcript


def test_a_marker_during_an_overlapped_call_is_due_as_without_overlap(lm, tok, files):
    """A marker asked while a call's frames are in flight counts them (moshi-server's rule: the audio queued so far
    plus the delay), and a stream whose last frames are in flight echoes it when they are handed over, not before."""
    dues = []
    for overlap in (False, True):
        rt = runtime(lm, tok, files.config, max_streams=1, engine=True)
        a = rt.open_stream("a")
        a.push(noise(1920 * 10, 1), process=False)
        for _ in range(3):
            rt.step(1, overlap=overlap)
        assert a.in_flight == (1 if overlap else 0)
        a.marker(5)
        dues.append(a._markers[-1][0])
        rt.settle()
    assert dues[0] == dues[1]
    rt = runtime(lm, tok, files.config, max_streams=1, engine=True)
    b = rt.open_stream("b")
    b.flush(process=False)
    frames = len(b.queue) // 1920
    assert rt.step(frames, overlap=True) == frames and b.in_flight == frames and not b.queue
    assert not any(isinstance(e, Marker) for e in b.marker(6))  # its frames still to come
    rt.settle()
    ev = b.events()
    assert Marker("b", 6) in ev and isinstance(ev[-1], Finished) and b.in_flight == 0


def test_open_close_markers_and_names(lm, tok, files):
    """A rate no push could use is refused at open (not at every push, holding a slot); close() echoes pending
    markers, and a marker asked after close is echoed at once; default names never repeat."""
    rt = runtime(lm, tok, files.config, max_streams=1)
    with pytest.raises(AudioError, match=">= 1000 Hz"):
        rt.open_stream("slow", sample_rate=500)
    s = rt.open_stream()
    s.push(noise(1920 * 3, 2), process=False)
    assert s.marker(4) == []
    s.close()
    assert s.events() == [Marker(s.name, 4)] and s.marker(5) == [Marker(s.name, 5)]
    t = rt.open_stream()
    assert t.name != s.name


def test_chunk_layout_is_stated_or_unambiguous(lm, tok, files):
    """A short [T, C] chunk ([7, 2]: 7 samples of stereo) was read as 7 channels of 2 samples: 2 wrong samples
    queued in place of 7. It is refused unless its layout is stated; a stream's later 2-D chunks keep the layout and
    channel count of its first, so that a [C, T] stream's short tail ([2, 2]) is not refused."""
    x = noise(2 * 3007, 3).reshape(2, -1)  # [C, T] stereo
    mono = x.mean(0)
    ref = runtime(lm, tok, files.config, max_streams=1).open_stream("m")
    expected = ref.push(mono) + ref.flush()
    rt = runtime(lm, tok, files.config, max_streams=1)
    s = rt.open_stream("m")
    with pytest.raises(AudioError, match=r"stream m.*shape \(7, 2\) looks like \[T, C\].*channels_first=False"):
        s.push(x.T[:7].numpy())
    assert s.samples_in == 0
    ev = s.push(x.T[:7], channels_first=False) + s.push(x.T[7:3000].numpy())  # a [T, C] stream
    with pytest.raises(AudioError, match=r"read as \[T, C\] has 7 channel\(s\), but .* earlier chunks had 2"):
        s.push(x[:, :7])  # [2, 7] read with the stream's [T, C] layout
    ev += s.push(x.T[3000:3005]) + s.push(x[:, 3005:], channels_first=True) + s.flush()
    assert s.samples_in == 3007 and ev == expected
    s = runtime(lm, tok, files.config, max_streams=1).open_stream("m")
    ev = s.push(x[:, :3005]) + s.push(x[:, 3005:])  # a [C, T] stream and its [2, 2] tail
    with pytest.raises(AudioError, match=r"read as \[C, T\] has 7 channel\(s\), but .* earlier chunks had 2"):
        s.push(torch.zeros(7, 2))
    assert ev + s.flush() == expected


def test_loud_stream_warns_once_and_counts_clipped_samples(lm, tok, files):
    from dsm.audio import ClippedAudioWarning

    rt = runtime(lm, tok, files.config, max_streams=1)
    s = rt.open_stream("loud")
    with pytest.warns(ClippedAudioWarning, match="stream loud: clipped 2 sample") as caught:
        for i in range(5):  # a loud source clips in every chunk: one warning, every sample counted
            chunk = [0.5, 1.5, -3.0, 0.2]  # torch and float32 numpy chunks (checked in numpy) alike
            s.push(torch.tensor(chunk) if i % 2 else np.array(chunk, dtype=np.float32), process=False)
    assert len(caught) == 1 and s.clipped_samples == 10
    queued = np.empty(len(s.queue), dtype=np.float32)
    s.queue.pop_into(queued)
    assert np.array_equal(queued[-4:], np.array([0.5, 1.0, -1.0, 0.2], dtype=np.float32))


def test_sample_queue_chunks_and_caller_buffers():
    """The queue keeps copies of the pushed chunks (a caller reusing its buffer changes nothing queued) and hands
    frames across chunk boundaries in order; asking more than it holds is an error, not a short frame."""
    from dsm.stt import _SampleQueue

    q, buf, expected = _SampleQueue(), np.zeros(700, dtype=np.float32), []
    for i in range(9):  # 6300 samples in 700-sample chunks from one reused buffer
        buf[:] = np.arange(700) + 1000 * i
        q.append(buf)
        expected.append(buf.copy())
    q.append(np.zeros(0, dtype=np.float32))
    expected = np.concatenate(expected)
    got = [np.full(n, np.nan, dtype=np.float32) for n in (1920, 1, 1919, 2000)]
    for g in got:
        q.pop_into(g)
    assert np.array_equal(np.concatenate(got), expected[:5840]) and len(q) == 460
    assert q.pad_to_frame() == 1920 - 460 and len(q) == 1920
    with pytest.raises(ValueError, match="1921 samples asked from a queue of 1920"):
        q.pop_into(np.empty(1921, dtype=np.float32))


def test_end_to_end_text_tokens_match_moshi(lm, tok, files, mimi, monkeypatch):
    """Real Mimi + LM of the tiny-stt random checkpoint vs moshi (Mimi encode + greedy LMGen, DSM script loop)."""
    LMGen, ref_lm, ref_mimi = moshi_reference(files)
    pcm, _ = load_audio(SPEECH)
    pcm = pcm[: 2 * 24000]
    n = math.ceil(pcm.shape[0] / 1920)
    padded = torch.nn.functional.pad(pcm, (0, (n + 7) * 1920 - pcm.shape[0]))  # DSM script: + 7 frames of delay
    codes, ref_tokens = [], []
    gen = LMGen(ref_lm, temp=0, temp_text=0)
    with torch.no_grad(), ref_mimi.streaming(1), gen.streaming(1):
        for i in range(n + 7):
            codes.append(ref_mimi.encode(padded[None, None, i * 1920 : (i + 1) * 1920]))
            ref_tokens.append(int(gen.step(codes[-1])[0, 0, 0]))

    rt = STTRuntime(lm, mimi, tok, files.config, max_streams=1)
    s = rt.open_stream("speech")
    s.push(pcm[:30000])
    s.push(pcm[30000:])
    s.flush()
    assert s.tokens == ref_tokens and len(set(ref_tokens)) > 3
    s = rt.open_stream("offline")  # offline: Mimi encodes 8 frames per call
    s.push(pcm, process=False)
    s.flush(process=False)
    assert rt.run(max_frames=8) == n + 7 and s.finished and s.tokens == ref_tokens

    # Rust alignment: step t sees frame t-1; moshi fed the same way on the recorded codes
    rust_ref = []
    gen = LMGen(ref_lm, temp=0, temp_text=0)
    with torch.no_grad(), gen.streaming(1):
        for i in range(n + 8):
            rust_ref.append(int(gen.step(codes[max(i - 1, 0)] if i - 1 < len(codes) else codes[-1])[0, 0, 0]))

    class Replay(StubCodec):
        def encode_step(self, pcm_, state):
            i = int(state.prev[0, 0])
            state.prev += 1
            return codes[min(i, len(codes) - 1)]

    for engine in (False, True):
        rt = STTRuntime(lm, Replay(), tok, files.config, max_streams=2, options=STTOptions(alignment="rust"),
                        engine=engine)
        s = rt.open_stream("speech")
        s.push(pcm)
        s.flush()
        assert s.steps == n + 8 and s.tokens[: n + 8] == rust_ref[: n + 8]
        assert s.tokens[1:] != ref_tokens[1:]  # the alignments really differ
    # the engine-backed stepper on moshi's codes, PyTorch alignment, after a warm-up (its CUDA graphs stood in for by
    # eager calls): the throwaway streams it runs in every bucket must leave no trace
    class Eager:
        def __init__(self, fn, pool):
            self.replay = fn

    monkeypatch.setattr("dsm.engine.LazyGraph", Eager)
    rt = STTRuntime(lm, Replay(), tok, files.config, max_streams=2, engine=True)
    rt.stepper.engine.cuda_graphs = True
    rt.warm_up()
    assert rt.stepper.engine.pool.used == 0
    s = rt.open_stream("speech")
    s.push(pcm)
    s.flush()
    assert s.tokens == ref_tokens


def test_transcribe_cli(ckpt, tmp_path, monkeypatch, capsys):
    from dsm.cli import main

    cache = tmp_path / "cache"
    (cache / "random").mkdir(parents=True)
    (cache / "random" / "tiny-stt-seed0").symlink_to(ckpt)  # what --random-weights would write (and reuse)
    monkeypatch.setenv("DSM_CACHE_DIR", str(cache))
    sf.write(tmp_path / "a.mp3", noise(4000, 1).numpy(), 16000)
    sf.write(tmp_path / "b.ogg", np.stack([noise(5000, 2).numpy()] * 2, axis=1), 24000)  # stereo
    (tmp_path / "bad.ogg").write_bytes(b"OggS nonsense")
    out = tmp_path / "out"
    rc = main(["transcribe", str(tmp_path / "a.mp3"), str(tmp_path / "b.ogg"), str(tmp_path / "bad.ogg"),
               "--preset", "tiny-stt", "--random-weights", "--output-dir", str(out), "--output-format", "all",
               "--batch-size", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "bad.ogg" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.{f}" for s in "ab"
                                                          for f in ("txt", "json", "srt", "vtt", "tsv"))
    data = json.loads((out / "b.json").read_text())
    assert data["duration"] == pytest.approx(5000 / 24000, abs=0.01) and data["meta"]["alignment"] == "pytorch"
    assert main(["transcribe", str(tmp_path / "a.mp3"), "--preset", "tiny-stt", "--no-progress"]) == 2  # usage
    assert "--random-weights" in capsys.readouterr().err


def test_transcribe_cli_with_no_audio_file_fails_before_loading_the_model(tmp_path, capsys, monkeypatch):
    """A mistyped only input was reported after the model had loaded (seconds to minutes for a real one)."""
    import dsm.stt
    from dsm.cli import main

    monkeypatch.setattr(dsm.stt, "runtime_from_args", lambda args: pytest.fail("the model was loaded"))
    assert main(["transcribe", str(tmp_path / "nope.wav"), str(tmp_path), "--preset", "tiny-stt", "--random-weights",
                 "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"dsm transcribe: error: {tmp_path / 'nope.wav'}: audio file not found",
        f"dsm transcribe: error: {tmp_path}: is a directory, not an audio file"]
    assert not (tmp_path / "out").exists()


def test_transcribe_cli_output_names_follow_the_command_line(ckpt, tmp_path, monkeypatch, capsys):
    """Same stems: names by argument order, not by completion order (the short file finishes first), and never
    another input's name ("s-1.wav" is not overwritten by the second "s.wav")."""
    from dsm.cli import main

    cache = tmp_path / "cache"
    (cache / "random").mkdir(parents=True)
    (cache / "random" / "tiny-stt-seed0").symlink_to(ckpt)
    monkeypatch.setenv("DSM_CACHE_DIR", str(cache))
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
    inputs = [tmp_path / "x" / "s.wav", tmp_path / "y" / "s.wav", tmp_path / "s-1.wav"]
    for p, n in zip(inputs, (6000, 500, 200), strict=True):
        sf.write(p, noise(n, n).numpy(), 24000)
    out = tmp_path / "out"
    assert main(["transcribe", *map(str, inputs), "--preset", "tiny-stt", "--random-weights", "--output-dir",
                 str(out), "--output-format", "json", "--batch-size", "3", "--no-progress"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    taken = "is taken by an input or its transcript"
    assert notes == [f"dsm transcribe: note: {inputs[1]}: written as s-1.* (s.* {taken})",
                     f"dsm transcribe: note: {inputs[2]}: written as s-1-1.* (s-1.* {taken})"], notes
    got = {p.name: json.loads(p.read_text())["name"] for p in out.iterdir()}
    assert got == {"s.json": str(inputs[0]), "s-1.json": str(inputs[1]), "s-1-1.json": str(inputs[2])}

def test_transcribe_cli_bad_model_files_are_clear_errors(ckpt, tmp_path, capsys):
    """A corrupt Mimi file or a tokenizer smaller than the model's text vocabulary: one line naming the file, exit 1,
    before any audio is read (the small tokenizer used to fail at the first word with an IndexError)."""
    from dsm.cli import main
    from dsm.tokenizer import train_random_tokenizer

    cfg = json.loads((ckpt / "config.json").read_text())
    sf.write(tmp_path / "a.wav", noise(2000, 1).numpy(), 24000)
    for what, bad in (("mimi_name", "corrupt"), ("tokenizer_name", "small")):
        d = tmp_path / bad
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        for key in ("moshi_name", "mimi_name", "tokenizer_name"):
            if key != what:
                (d / cfg[key]).symlink_to(ckpt / cfg[key])
        if bad == "corrupt":
            (d / cfg[what]).write_bytes(b"\x08" + b"\x00" * 15)
        else:
            train_random_tokenizer(d / cfg[what], 100)
        rc = main(["transcribe", str(tmp_path / "a.wav"), "--checkpoint", str(d), "--no-progress", "-o",
                   str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == 1 and "Traceback" not in err and str(d / cfg[what]) in err, err
    assert "tokenizer has 100 pieces" in err and not (tmp_path / "out").exists()
    # 40 codebooks (Mimi has 32) was a ValueError traceback from Mimi after the whole LM had loaded
    d = tmp_path / "nq40"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**cfg, "n_q": 40, "delays": cfg["delays"] + [cfg["delays"][-1]] * 8}))
    for key in ("moshi_name", "mimi_name", "tokenizer_name"):
        (d / cfg[key]).symlink_to(ckpt / cfg[key])
    assert main(["transcribe", str(tmp_path / "a.wav"), "--checkpoint", str(d), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err == f"dsm transcribe: error: {d / 'config.json'}: field 'n_q' is 40; Mimi has 1 to 32 codebooks\n", err

def test_eval_stt_plumbing(lm, tok, files, tmp_path, capsys):
    from dsm.cli import main
    from dsm.eval_stt import ManifestError, evaluate, read_manifest

    for name, n in (("one.wav", 24000), ("two.wav", 30000)):
        sf.write(tmp_path / name, noise(n, n).numpy(), 24000)
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "one.wav", "text": "Hello, World!"}) + "\n"
                                      + json.dumps({"audio_filepath": str(tmp_path / "two.wav"),
                                                    "text": "the paper"}) + "\n")
    (tmp_path / "m.tsv").write_text("audio\ttext\none.wav\thello world\n")
    pairs = read_manifest(tmp_path / "m.jsonl")
    assert pairs[0] == (tmp_path / "one.wav", "Hello, World!") and read_manifest(tmp_path / "m.tsv")[0][1] == \
        "hello world"

    def spell(text):  # forced tokens that make the model "say" text, word by word
        return [3, 3] + [t for w in text.split() for t in [0, *tok.encode(w), 3]] + [0] + [3] * 20

    forcer = Forcer({str(tmp_path / "one.wav"): spell("hello world"), str(tmp_path / "two.wav"): spell("the hangar")})
    rt = runtime(lm, tok, files.config, forcer=forcer, max_streams=2)
    res = evaluate(rt, pairs)
    assert res.wer == pytest.approx(0.25) and res.n_utterances == 2, res.rows  # 1 substitution / 4 reference words
    assert res.rows[0]["hypothesis"] == res.rows[0]["reference"] == "hello world"
    assert res.audio_seconds == pytest.approx(54000 / 24000) and res.rtfx > 0 and res.n_skipped == res.n_failed == 0
    # a reference of only a zero-width space is empty (it was scored as one word), a missing file is failed, not
    # skipped (the two were counted together)
    res = evaluate(runtime(lm, tok, files.config, forcer=forcer, max_streams=2),
                   [*pairs, (tmp_path / "one.wav", "\u200b"), (tmp_path / "gone.wav", "hello")])
    assert (res.n_utterances, res.n_skipped, res.n_failed, len(res.errors)) == (2, 1, 1, 1)
    assert res.wer == pytest.approx(0.25) and "gone.wav" in res.errors[0]
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ManifestError, match="bad.jsonl:1"):
        read_manifest(tmp_path / "bad.jsonl")
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.tsv")
    (tmp_path / "latin1.tsv").write_bytes("one.wav\thello\ntwo.wav\tcaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"latin1.tsv:2: not UTF-8 text \(byte 0xe9\)"):
        read_manifest(tmp_path / "latin1.tsv")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "m.jsonl").read_bytes())
    assert read_manifest(tmp_path / "bom.jsonl") == pairs
    # NeMo segments of one file were each scored against the whole file's transcript: refused; a whole file's
    # duration (NeMo writes one for every entry) is fine
    nemo = tmp_path / "nemo.jsonl"
    for rows, match in (([{"offset": 0.5, "duration": 0.2}], r"nemo.jsonl:1: offset 0.5: segments of a file"),
                        ([{"duration": 1.0}, {"duration": 0.4}], r"nemo.jsonl:2: duration 0.4 but one.wav is 1.00 s")):
        nemo.write_text("".join(json.dumps({"audio_filepath": "one.wav", "text": "x", **r}) + "\n" for r in rows))
        with pytest.raises(ManifestError, match=match):
            read_manifest(nemo)
    nemo.write_text(json.dumps({"audio_filepath": "one.wav", "text": "x", "duration": 1.04, "offset": 0}) + "\n")
    assert read_manifest(nemo) == [(tmp_path / "one.wav", "x")]
    assert main(["eval-stt", str(tmp_path / "bad.jsonl"), "--checkpoint", str(files.config_path.parent)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_transcribe_cli_wrong_model_and_output_errors(ckpt, tmp_path, monkeypatch, capsys):
    """A TTS checkpoint (was a ValueError traceback after loading its weights), --output-dir below a file (was a
    NotADirectoryError traceback once every file had been transcribed) and a failed write: one line each."""
    import errno

    from dsm.cli import main
    from dsm.presets import preset_config

    sf.write(tmp_path / "a.wav", noise(2000, 1).numpy(), 24000)
    out = tmp_path / "out"
    tts = tmp_path / "tts"
    tts.mkdir()
    cfg = preset_config("tiny-tts")
    (tts / "config.json").write_text(json.dumps(cfg))
    for key in ("moshi_name", "mimi_name", "tokenizer_name"):
        (tts / cfg[key]).write_bytes(b"never read")
    assert main(["transcribe", str(tmp_path / "a.wav"), "--checkpoint", str(tts), "--no-progress", "-o",
                 str(out)]) == 1
    assert f"{tts / 'config.json'}: not an STT checkpoint" in capsys.readouterr().err
    (tmp_path / "f").write_text("")
    assert main(["transcribe", str(tmp_path / "a.wav"), "--checkpoint", str(ckpt), "--no-progress", "-o",
                 str(tmp_path / "f" / "sub")]) == 2
    assert f"{tmp_path / 'f'} is a file" in capsys.readouterr().err

    def disk_full(t, out_dir, stem, formats):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(out_dir) / f"{stem}.txt"))

    monkeypatch.setattr("dsm.transcript.write_transcript", disk_full)
    assert main(["transcribe", str(tmp_path / "a.wav"), "--checkpoint", str(ckpt), "--no-progress", "-o",
                 str(out)]) == 1
    err = capsys.readouterr().err
    assert err == f"dsm transcribe: error: {out / 'a.txt'}: cannot write (No space left on device)\n", err


def test_transcribe_cli_a_name_that_cannot_be_written_loses_no_other_file(ckpt, tmp_path, capsys):
    """A directory where one output goes fails that file only: the files after it are still transcribed and written
    (the run used to stop there, dropping them), and the exit status says one failed."""
    from dsm.cli import main

    for name in ("a", "b", "c"):
        sf.write(tmp_path / f"{name}.wav", noise(1500, len(name)).numpy(), 24000)
    out = tmp_path / "out"
    (out / "b.txt").mkdir(parents=True)
    assert main(["transcribe", *(str(tmp_path / f"{n}.wav") for n in "abc"), "--checkpoint", str(ckpt),
                 "--no-progress", "-o", str(out), "-f", "txt", "--batch-size", "1"]) == 1
    err = capsys.readouterr().err
    assert f"{out / 'b.txt'}: cannot write" in err and "2 file(s)" in err, err
    assert (out / "a.txt").is_file() and (out / "c.txt").is_file()
    # all formats or none: b.json failing left b.txt (empty) beside it; the audio counted is the written files'
    (out / "b.txt").rmdir()
    (out / "b.json").mkdir()
    assert main(["transcribe", str(tmp_path / "b.wav"), "--checkpoint", str(ckpt), "--no-progress", "-o", str(out),
                 "-f", "txt,json"]) == 1
    err = capsys.readouterr().err
    assert f"{out / 'b.json'}: cannot write" in err and "0 file(s), 0.0 s of audio" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.json", "c.txt"]


def test_transcribe_cli_never_writes_over_an_input_and_a_file_past_memory_fails_alone(ckpt, tmp_path, capsys,
                                                                                      monkeypatch):
    """An input named like an output (a WAV called talk.txt, transcribed into its own folder) was overwritten by
    its transcript; its outputs now take the next free name. A file that does not fit in memory is that file's
    error (it was a traceback that lost every other file's output)."""
    import dsm.stt
    from dsm.cli import main

    talk = tmp_path / "talk.txt"
    sf.write(talk, noise(1500, 1).numpy(), 24000, format="WAV")
    before = talk.read_bytes()
    assert main(["transcribe", str(talk), "--checkpoint", str(ckpt), "--no-progress", "-o", str(tmp_path),
                 "-f", "txt"]) == 0
    assert talk.read_bytes() == before and (tmp_path / "talk-1.txt").is_file()
    capsys.readouterr()
    sf.write(tmp_path / "big.wav", noise(1500, 2).numpy(), 24000)
    real = dsm.stt.load_audio

    def load(path):
        if Path(path).name == "big.wav":
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you "
                               "tried to allocate 460800000 bytes")
        return real(path)

    monkeypatch.setattr(dsm.stt, "load_audio", load)
    out = tmp_path / "out"
    assert main(["transcribe", str(tmp_path / "big.wav"), str(talk), "--checkpoint", str(ckpt), "--no-progress",
                 "-o", str(out), "-f", "txt"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'big.wav'}: out of memory reading it ([enforce fail" in err and "1 file(s)" in err, err
    assert [p.name for p in out.iterdir()] == ["talk.txt"]


def test_transcribe_cli_reads_one_file_from_stdin(ckpt, tmp_path, monkeypatch, capsys):
    """`dsm transcribe -` reads a whole audio file from stdin (a pipe from ffmpeg): its outputs are named stdin.*;
    '-' twice is refused (stdin holds one file), and bytes that are not audio are one clear error."""
    import io
    import sys
    import types

    from dsm.cli import main

    cache = tmp_path / "cache"
    (cache / "random").mkdir(parents=True)
    (cache / "random" / "tiny-stt-seed0").symlink_to(ckpt)
    monkeypatch.setenv("DSM_CACHE_DIR", str(cache))
    wav = io.BytesIO()
    sf.write(wav, noise(3000, 3).numpy(), 16000, format="WAV")
    sf.write(tmp_path / "a.wav", noise(2000, 4).numpy(), 24000)

    def stdin(data: bytes):
        monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(data)))

    out = tmp_path / "out"
    stdin(wav.getvalue())
    assert main(["transcribe", "-", str(tmp_path / "a.wav"), "--preset", "tiny-stt", "--random-weights",
                 "--output-dir", str(out), "--output-format", "json", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "stdin.json"]
    capsys.readouterr()
    assert main(["transcribe", "-", "-", "--preset", "tiny-stt", "--random-weights", "--no-progress"]) == 2
    assert "stdin) can be given once" in capsys.readouterr().err
    stdin(b"not audio at all")
    assert main(["transcribe", "-", "--preset", "tiny-stt", "--random-weights", "--output-dir", str(out),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "stdin: cannot decode audio" in err and "Traceback" not in err
    monkeypatch.setattr(sys, "stdin", None)  # started with stdin closed (<&-)
    assert main(["transcribe", "-", "--preset", "tiny-stt", "--random-weights", "--output-dir", str(out),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "stdin: cannot read (stdin is closed)" in err and "Traceback" not in err


def test_transcribe_cli_prints_audio_warnings_as_one_line(ckpt, tmp_path, capsys):
    """Python's warning format showed our source line under the message (``audio.py:85: ClippedAudioWarning: ...``
    then ``warnings.warn(...``); the CLI prints it as it prints errors."""
    from dsm.cli import main

    loud = noise(2000, 3).numpy() * 4
    sf.write(tmp_path / "loud.wav", loud, 24000, subtype="FLOAT")
    assert main(["transcribe", str(tmp_path / "loud.wav"), "--checkpoint", str(ckpt), "--no-progress", "-o",
                 str(tmp_path / "out"), "-f", "txt"]) == 0
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if "clipped" in line]
    assert len(warned) == 1 and warned[0].startswith(f"dsm transcribe: warning: {tmp_path / 'loud.wav'}: clipped"), err
    assert not any("Warning" in line or "warnings.warn" in line for line in err), err
    whole = (tmp_path / "loud.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(whole[: len(whole) // 2])
    assert main(["transcribe", str(tmp_path / "cut.wav"), "--checkpoint", str(ckpt), "--no-progress", "-o",
                 str(tmp_path / "out"), "-f", "txt"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "Warning" not in line and "truncated" in line] == [
        f"dsm transcribe: warning: {tmp_path / 'cut.wav'}: truncated: the header says 8000 bytes of audio, the file "
        "holds 3960 (0.04 s read); was the copy or download interrupted?"], err
