"""Streaming speech-to-text: many audio streams share one model state, one 80 ms frame per step (DSM-SPEC §5).

Example::

    rt = STTRuntime.from_checkpoint(resolve_checkpoint(hf_repo="kyutai/stt-1b-en_fr"), max_streams=8)
    s = rt.open_stream("mic", sample_rate=16000)
    for ev in s.push(chunk):  # any length, any rate (soxr streaming resampler to 24 kHz)
        ...                    # Word / EndWord / Partial / VADStep events
    events = s.flush()         # end of input: silence pushed at once, last words arrive, then Finished

Each stream owns a slot (a row of :class:`STTStepper`'s batched Mimi and LM states). A step runs every stream that
has a full frame queued; the others are masked (their state is frozen). A finished stream frees its slot, which is
reset when reused. Input alignment (§5.2): ``"pytorch"`` (step t sees frame t, frame 0 discarded — the DSM python
scripts) or ``"rust"`` (step t sees frame t−1 — moshi-server). Word times follow either the offline python rule or
the server's streaming rule (§5.3); see :mod:`dsm.transcript`.

Times are seconds of the pushed audio: the silence prefix this runtime inserts (stt-2.6b: 13 frames) is
subtracted from the Rust-rule times (exactly 13/12.5 s) and, as the DSM script does, ``int(13/12.5) = 1`` s from the
python-rule times; the silence of each ``flush(end=False)`` is taken out of later times (a time inside such a silence
is its start). At the end of input, a word the server would still hold (no closing ``0``/``3``, or no ``EndWord``)
is emitted and ended at the current time, so that no text is lost.
"""

from __future__ import annotations

import contextlib
import errno
import math
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .audio import MIN_SAMPLE_RATE, AudioError, ClippedAudioWarning, load_audio, validate_pcm
from .engine import Engine, EngineFull, bucket_for, int64_value, serialized
from .generate import check_temperature, check_token_range
from .host_copies import HostReads, to_device
from .memory import first_line, out_of_memory
from .mimi import FRAME_SIZE, SAMPLE_RATE
from .mimi_graph import GraphedMimiStep, mimi_buckets
from .transcript import (
    FRAME_RATE,
    RawEndWord,
    RawWord,
    RustWordTracker,
    Transcript,
    default_asr_delay_in_tokens,
    pair_rust_words,
    python_offset_seconds,
    python_words,
)

ALIGNMENTS = ("pytorch", "rust")
TIMESTAMP_RULES = ("python", "rust")
# stt_config keys a config may omit: the defaults of Kyutai's STT scripts (stt-1b sets 0.5 s / 0, stt-2.6b 2.5 / 1)
DEFAULT_AUDIO_DELAY_SECONDS = 5.0
DEFAULT_SILENCE_PREFIX_SECONDS = 1.0


class NoFreeSlotError(EngineFull):
    """Every slot of the runtime is taken by an open stream (an :class:`~dsm.engine.EngineFull`: one class for a
    service to catch, from the runtime or the engine under it)."""


class StreamClosedError(RuntimeError):
    """Audio pushed to a stream after its end of input."""


# ---------------------------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Word:
    """A finished word (moshi-server ``Word``, Rust rule §5.3): text and start time in seconds of the pushed audio
    (the server's time minus the silence prefix this runtime inserted, clipped at 0)."""

    stream: str
    text: str
    start_time: float
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class EndWord:
    """End time of the last :class:`Word` (moshi-server ``EndWord``)."""

    stream: str
    stop_time: float


@dataclass(frozen=True)
class Partial:
    """The pending (not yet closed) word changed; ``text`` is the whole transcript so far including it (for a stream
    opened with ``history=False``, which keeps no transcript, the pending word alone)."""

    stream: str
    pending: str
    text: str


@dataclass(frozen=True)
class VADStep:
    """Semantic VAD (stt-1b extra heads, §5.4): per head P(class 0) = P(pause >= 0.5/1/2/3 s)."""

    stream: str
    step_idx: int
    probs: tuple[float, ...]
    end_of_turn: bool


@dataclass(frozen=True)
class Marker:
    """Echo of :meth:`STTStream.marker`: all audio pushed before it, plus the model delay, has been processed."""

    stream: str
    id: int


@dataclass(frozen=True)
class Finished:
    """The stream ended (after :meth:`STTStream.flush`); its slot is free."""

    stream: str
    transcript: Transcript | None  # None for a stream opened with history=False


Event = Word | EndWord | Partial | VADStep | Marker | Finished


@dataclass(frozen=True)
class STTOptions:
    alignment: str = "pytorch"  # "pytorch" (DSM python scripts) or "rust" (moshi-server), §5.2
    silence_prefix: bool = True  # prepend stt_config.audio_silence_prefix_seconds of zeros (stt-2.6b: 13 frames)
    timestamps: str = "python"  # rule for Finished.transcript: "python" (offline script) or "rust" (server)
    asr_delay_in_tokens: int | None = None  # Rust rule shift; default 6 (0.5 s models) / 32 (2.5 s)
    vad_head: int = 2  # end of turn when P(class 0) of this head > vad_threshold (Kyutai: head 2, 0.5)
    vad_threshold: float = 0.5
    temp: float = 0.0  # text temperature (0 = greedy, as the DSM scripts)
    # Every step runs every slot (the LM's and Mimi's): a stream's outputs are then the same bits whatever the other
    # streams do, at the cost of the whole batch's step at any load. Default: buckets (see dsm.engine, mimi_buckets).
    batch_invariant: bool = False

    def __post_init__(self):
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {self.alignment!r}")
        if self.timestamps not in TIMESTAMP_RULES:
            raise ValueError(f"timestamps must be one of {TIMESTAMP_RULES}, got {self.timestamps!r}")
        if self.asr_delay_in_tokens is not None and (isinstance(self.asr_delay_in_tokens, bool) or not isinstance(
                self.asr_delay_in_tokens, int) or self.asr_delay_in_tokens < 0):
            raise ValueError(f"asr_delay_in_tokens must be None or an int >= 0, got {self.asr_delay_in_tokens!r}")
        if not 0 <= self.vad_threshold <= 1:  # NaN too: the end of turn would never fire
            raise ValueError(f"vad_threshold must be a probability in [0, 1], got {self.vad_threshold!r}")
        check_temperature(self.temp, "temp")


# ---------------------------------------------------------------------------------------------------------------
# Model stepping (the one piece the batched engine replaces)
# ---------------------------------------------------------------------------------------------------------------


class STTStepper:
    """Batched Mimi encode + one LM step for ``slots`` rows; inactive rows are masked (state frozen).

    ``open() -> slot`` (lowest free, reset), ``close(slot)``, ``step(pcm [B, 1920], active [B]) -> (text tokens [B]
    list, VAD P(class 0) [B, heads] or None)``. The LM runs on :class:`dsm.generate.Generator` (one state of
    ``slots`` rows) or, by default (``engine=True``), on :class:`dsm.engine.Engine` (paged KV pool, batch buckets,
    CUDA graphs); Mimi and the Rust-alignment frame shift stay here.
    """

    def __init__(self, lm, mimi, slots: int, *, alignment: str = "pytorch", temp: float = 0.0,
                 on_text: Callable[[torch.Tensor], None] | None = None, engine: bool = True,
                 batch_invariant: bool = False):
        from .generate import Generator

        if lm.cfg.dep_q != 0:
            raise ValueError(f"not an STT model: dep_q = {lm.cfg.dep_q} (expected 0)")
        self.lm, self.mimi, self.slots, self.alignment, self.on_text = lm, mimi, slots, alignment, on_text
        self.device = next(lm.parameters()).device
        if engine:
            self.engine = Engine(lm, max_slots=slots, use_sampling=temp > 0, temp_text=temp,
                                 buckets=(slots,) if batch_invariant else None)
        else:
            self.engine = None
            self.gen = Generator(lm, use_sampling=temp > 0, temp_text=temp)
            self.gen_state = self.gen.init_state(slots)
        self.used = [False] * slots
        # Mimi steps the smallest of these row prefixes holding every open slot
        self.mimi_buckets = (slots,) if batch_invariant else mimi_buckets(slots)
        self.mimi_state = mimi.init_state(slots, decoder=False)
        self._encode_step = GraphedMimiStep(mimi.encode_step, self.mimi_state)
        self.n_q = lm.cfg.n_q
        self.prev_codes = torch.full((slots, self.n_q), lm.cfg.card, dtype=torch.long, device=self.device)
        self.has_vad = len(lm.extra_heads) > 0
        self._active: tuple[torch.Tensor, torch.Tensor] | None = None  # the last host mask and its device copy

    def open(self) -> int:
        """Reset the lowest free slot and return it (:class:`NoFreeSlotError` if none)."""
        if self.engine is not None:
            if self.engine.num_open >= self.slots:
                raise NoFreeSlotError(f"all {self.slots} stream slots are in use")
            slot = self.engine.open()
        else:
            if all(self.used):
                raise NoFreeSlotError(f"all {self.slots} stream slots are in use")
            slot = self.used.index(False)
            mask = torch.zeros(self.slots, dtype=torch.bool, device=self.device)
            mask[slot] = True
            self.gen.reset(self.gen_state, mask)
        self.used[slot] = True
        mask = torch.zeros(self.slots, dtype=torch.bool, device=self.mimi.device)
        mask[slot] = True
        self.mimi_state.reset(mask)
        self.prev_codes[slot] = self.lm.cfg.card
        return slot

    def close(self, slot: int) -> None:
        if self.used[slot]:
            self.used[slot] = False
            if self.engine is not None:
                self.engine.close(slot)

    def warm_up_mimi(self, frames: int = 1) -> None:
        """Capture Mimi's encode graphs of ``frames`` frames a call for every bucket (a no-op without graphs)."""
        self._encode_step.warm_up(torch.zeros(1, 1, frames * FRAME_SIZE, device=self.mimi.device), self.mimi_buckets)

    def mimi_rows(self) -> int:
        """The rows ``[0, n)`` Mimi steps: the smallest of :func:`~dsm.mimi_graph.mimi_buckets` holding every open
        slot (the rows above hold no stream, as :meth:`dsm.mimi.MimiState.rows` needs; and the active slots are open,
        so the LM's inputs cover them). A few streams pay a few rows' encode, not every slot's."""
        return bucket_for(self.mimi_buckets, (i for i, used in enumerate(self.used) if used))

    @torch.no_grad()
    def encode(self, pcm: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Mimi codes of ``k`` frames for the active rows: pcm ``[B, k * 1920]`` -> ``[n, n_q, k]``, rows ``[0, n)``
        with ``n = mimi_rows()`` (the active rows are open slots: ``n`` covers them)."""
        self.mimi_state.set_exec_mask(self._on_device(active, self.mimi.device))
        n = self.mimi_rows()
        codes = self._encode_step(to_device(pcm[:n], self.mimi.device)[:, None])
        return codes[:, : self.n_q].to(self.device)

    def _all_rows(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[n, n_q]`` of rows ``[0, n)`` as all ``slots`` rows (the plain generator steps every row)."""
        if codes.shape[0] == self.slots:
            return codes
        return torch.cat([codes, codes.new_full((self.slots - codes.shape[0], codes.shape[1]), self.lm.cfg.card)])

    def _on_device(self, active: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The host mask ``active`` on ``device``, copied (without waiting for the device) only when it changed."""
        if active.device.type != "cpu" or torch.device(device) != self.device:
            return to_device(active, device) if active.device.type == "cpu" else active.to(device)
        if self._active is None or not torch.equal(self._active[0], active):
            self._active = (active.clone(), to_device(active, device))  # never the caller's tensor
        return self._active[1]

    def step(self, pcm: torch.Tensor, active: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """One frame: :meth:`encode` then :meth:`lm_step`."""
        return self.lm_step(self.encode(pcm, active)[..., 0], active)

    def lm_step(self, codes: torch.Tensor, active: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """One LM step on one frame of codes ``[B, n_q]``: :meth:`lm_steps` of one frame; returns its text tokens
        and VAD probabilities."""
        got = []
        self.lm_steps(codes[..., None], active, lambda i, tokens, probs: got.append((tokens, probs)))
        return got[0]

    def _checked_hook(self, rows: list[int]) -> Callable[[torch.Tensor], None] | None:
        """The text hook, followed by a check of what it left in the active ``rows`` (the only rows a step commits):
        it replaces the generator's wider check of every row, one host wait a hooked step rather than two."""
        hook, hi = self.on_text, self.lm.cfg.text_card - 1
        if hook is None:
            return None
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)

        def checked(tokens: torch.Tensor) -> None:
            hook(tokens)
            check_token_range(tokens[idx], "on_text (the STT text hook)", hi, lo=0, on_device=True)

        return checked

    @torch.no_grad()
    def lm_steps(self, codes: torch.Tensor, active: torch.Tensor,
                 on_frame: Callable[[int, list[int], torch.Tensor | None], None],
                 defer: bool = False) -> Callable[[], None] | None:
        """LM steps on ``k`` frames of codes ``[n, n_q, k]`` (rows ``[0, n)`` covering the active slots; shifted by a
        frame here for the Rust alignment), queued back to back; then ``on_frame(i, text tokens [rows] list, VAD
        P(class 0) [rows, heads] or None)`` for each frame in order, rows [0, m) with m >= 1 + the highest active
        slot.

        The host reads every frame's outputs after the last step is queued, with one wait for the device (not two
        per frame): the GPU runs the steps without idling between them. With a text hook, which may read the state
        ``on_frame`` keeps (a stream's step count), each frame is handed over before the next step. If a step raises
        (a text hook), the frames before it are still handed to ``on_frame``, then the error propagates.

        A text hook must leave the active rows' tokens decodable, in [0, text_card): it raises otherwise (and the
        step is undone), as a word holding an id the tokenizer cannot decode would fail that stream at every later
        step.

        ``defer`` (no text hook): return without waiting; the returned function waits and hands the frames over."""
        rows = active.nonzero()[:, 0].tolist()  # on the host: no device sync
        on_text = self._checked_hook(rows)
        active = self._on_device(active, self.device)
        rust = self.alignment == "rust"  # step t sees frame t-1 (the initial token at t = 0)
        reads, done = HostReads(), []  # done: the frames whose outputs are read, not handed over yet
        errors: list[Exception] = []  # on_frame's: raised once every frame is handed over (as many as were stepped)
        handed = 0

        def hand_over():
            nonlocal handed
            host = reads.wait()
            frames = done.copy()
            done.clear()  # first: the error path hands over what is left, never a frame twice
            for tokens, probs in frames:
                handed += 1
                try:
                    on_frame(handed - 1, host[tokens].tolist(), host[probs] if probs is not None else None)
                except Exception as e:
                    errors.append(e)

        def finish():
            if done:
                hand_over()
            if errors:
                raise errors[0]

        try:
            for i in range(codes.shape[-1]):
                inp = self.prev_codes if rust else codes[..., i]
                if self.engine is not None:
                    out = self.engine.step(inp, active=rows, on_text=on_text, check_hooks=False)
                else:
                    self.gen_state.exec_mask.copy_(active)
                    out = self.gen.step(self.gen_state, self._all_rows(inp), on_text=on_text, check_hooks=False)
                if rust:  # this frame's codes wait for the next step, which reads them in stream order
                    n = codes.shape[0]
                    torch.where(active[:n, None], codes[..., i], self.prev_codes[:n], out=self.prev_codes[:n])
                # the VAD heads' P(class 0) [rows, heads], computed in the step (Generator.extra_probs)
                done.append((reads.read(out.text_token), reads.read(out.extra_probs) if self.has_vad else None))
                if self.on_text is not None:
                    hand_over()
        except BaseException:
            if done:
                hand_over()
            raise
        if done and defer:
            return finish
        finish()
        return None


# ---------------------------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------------------------


class _SampleQueue:
    """24 kHz samples waiting to be consumed one frame at a time: the pushed chunks (copies: a caller may reuse its
    buffer), so that a push costs its own length, not the length of what waits (a client 60 s ahead of the model
    would otherwise copy those 60 s at every push)."""

    def __init__(self):
        self.chunks: deque[np.ndarray] = deque()
        self.head = 0  # samples of chunks[0] already consumed
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def append(self, x: np.ndarray) -> None:
        if x.size:
            self.chunks.append(np.array(x, dtype=np.float32, copy=True))
            self.size += x.shape[0]

    def pad_to_frame(self) -> int:
        """Zero-pad to a whole frame; returns the samples added."""
        r = len(self) % FRAME_SIZE
        if r:
            self.append(np.zeros(FRAME_SIZE - r, dtype=np.float32))
        return (FRAME_SIZE - r) % FRAME_SIZE

    def pop_into(self, out: np.ndarray) -> None:
        """Move the next ``len(out)`` samples into ``out``."""
        n = out.shape[0]
        if n > self.size:
            raise ValueError(f"{n} samples asked from a queue of {self.size}")
        done = 0
        while done < n:
            chunk = self.chunks[0]
            take = min(n - done, chunk.shape[0] - self.head)
            out[done : done + take] = chunk[self.head : self.head + take]
            done += take
            self.head += take
            if self.head == chunk.shape[0]:
                self.chunks.popleft()
                self.head = 0
        self.size -= n


class STTStream:
    """One audio stream on an :class:`STTRuntime`; created by :meth:`STTRuntime.open_stream`."""

    def __init__(self, runtime: STTRuntime, slot: int, name: str, sample_rate: int, history: bool = True):
        if not isinstance(sample_rate, int | np.integer) or sample_rate < MIN_SAMPLE_RATE:
            raise AudioError(f"stream {name}: sample rate must be an integer >= {MIN_SAMPLE_RATE} Hz, got "
                             f"{sample_rate!r}")
        self.rt, self.slot, self.name, self.sample_rate = runtime, slot, name, int(sample_rate)
        self.queue = _SampleQueue()
        self.history = history
        self.tokens: list[int] = []  # every text token, with history (for words())
        self.steps = 0  # frames consumed since open (Rust ``step_idx``)
        self.in_flight = 0  # frames taken from the queue whose tokens are not handed over yet (overlapped calls)
        self.samples_in = 0  # 24 kHz samples pushed by the caller
        self.clipped_samples = 0  # input samples outside [-1, 1], clipped
        # of the 2-D chunks, fixed by the first: channels first or not, and how many (None: none pushed yet)
        self._layout: bool | None = None
        self._channels: int | None = None
        self.ended = False  # no more input accepted
        self.finished = False  # all input processed, slot freed
        self._events: list[Event] = []
        self._raw: list[RawWord | RawEndWord] = []
        self._text = ""  # finished words so far, space-separated (with history only: it grows with the stream)
        self._markers: deque[tuple[int, int]] = deque()  # (due step, id), in due order
        # silence a flush(end=False) inserted, as (start, seconds) on the model's clock (prefix removed): later words
        # are moved back onto the clock of the pushed audio. Without history, the gaps before every later event's time
        # are summed into _gaps_passed as they go by: a stream flushing at each turn for hours keeps a few, not all.
        self._gaps: deque[tuple[float, float]] = deque()
        self._gaps_passed = 0.0
        self.tracker = RustWordTracker(runtime.asr_delay_in_tokens)
        self.transcript: Transcript | None = None
        self._resampler = self._new_resampler()
        self.queue.append(np.zeros(runtime.n_prefix_frames * FRAME_SIZE, dtype=np.float32))

    def _new_resampler(self):
        if self.sample_rate == SAMPLE_RATE:
            return None
        import soxr

        return soxr.ResampleStream(self.sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    @property
    def _lock(self) -> threading.RLock:  # the runtime's: a stream's calls touch the runtime's batch (see serialized)
        return self.rt._lock

    def __repr__(self) -> str:
        return f"STTStream({self.name!r}, slot={self.slot}, steps={self.steps}, finished={self.finished})"

    # ---- input -------------------------------------------------------------------------------------------------
    @serialized
    def push(self, pcm: torch.Tensor | np.ndarray, sample_rate: int | None = None, process: bool = True,
             channels_first: bool | None = None) -> list[Event]:
        """Queue pcm (floats in [-1, 1]; channels are averaged) at the stream's rate.

        A chunk is ``[T]`` or 2-D: ``[C, T]`` (``channels_first=True``) or ``[T, C]`` (``False``). Unstated, a 2-D
        chunk has the layout of the stream's previous 2-D chunk, and the first is ``[C, T]`` unless its shape may
        well be ``[T, C]`` (``[7, 2]``), which is refused rather than guessed (:func:`dsm.audio.validate_pcm`). The
        2-D chunks of a stream have one channel count.

        With ``process`` the runtime steps until no stream has a full frame queued. Returns (and removes) this
        stream's pending events. An empty chunk is a no-op."""
        if self.ended:
            raise StreamClosedError(f"stream {self.name}: audio pushed after flush()/close()")
        sr = self.sample_rate if sample_rate is None else sample_rate
        if sr != self.sample_rate:
            raise AudioError(f"stream {self.name}: chunk at {sr} Hz but the stream was opened at "
                             f"{self.sample_rate} Hz (open a new stream to change the rate)")
        if isinstance(pcm, np.ndarray | torch.Tensor) and pcm.ndim in (1, 2) and 0 in pcm.shape:
            return self._process() if process else self.events()
        name = f"stream {self.name} ({sr} Hz)"
        if isinstance(pcm, np.ndarray) and pcm.ndim == 1 and pcm.dtype == np.float32 and np.isfinite(pcm).all():
            x = pcm  # a server's chunk: validate_pcm's checks in numpy (its torch ops cost ~30 us a chunk)
        elif isinstance(pcm, np.ndarray | torch.Tensor) and pcm.ndim == 2:
            x = self._downmix(pcm, sr, name, self._layout if channels_first is None else channels_first)
        else:
            x = validate_pcm(pcm, sr, name=name, clip="keep").cpu().numpy()  # CUDA too
        magnitude = np.abs(x)
        over = int(np.count_nonzero(magnitude > 1))
        if over:
            if not self.clipped_samples:  # once per stream: a loud source clips in every chunk
                warnings.warn(f"stream {self.name}: clipped {over} sample(s) outside [-1, 1] (peak "
                              f"{float(magnitude.max()):.3f}); later clipping is counted in clipped_samples",
                              ClippedAudioWarning, stacklevel=2)
            self.clipped_samples += over
            x = np.clip(x, -1.0, 1.0)
        if self._resampler is not None:
            x = np.clip(self._resampler.resample_chunk(x, last=False), -1.0, 1.0)
        self.samples_in += x.shape[0]
        self.queue.append(x)
        return self._process() if process else self.events()

    def _downmix(self, pcm: torch.Tensor | np.ndarray, sr: int, name: str, channels_first: bool | None) -> np.ndarray:
        """A 2-D chunk's channel mean; the first one fixes the stream's layout and channel count."""
        x = validate_pcm(pcm, sr, name=name, mono="keep", clip="keep", channels_first=channels_first)
        if self._channels is not None and x.shape[0] != self._channels:
            layout = "[C, T]" if channels_first is not False else "[T, C]"
            raise AudioError(f"{name}: chunk of shape {tuple(pcm.shape)} read as {layout} has {x.shape[0]} "
                             f"channel(s), but the stream's earlier chunks had {self._channels}")
        self._layout, self._channels = channels_first is not False, x.shape[0]
        return x.mean(dim=0).cpu().numpy()

    @serialized
    def flush(self, end: bool = True, process: bool = True) -> list[Event]:
        """Push ``ceil(audio_delay × 12.5)`` silence frames at once so the last words arrive (§5.5); one more with
        the Rust alignment, where the last audio frame is only seen a step later.

        A partial frame is zero-padded first. ``end=True`` (default) also ends the input: once processed the stream
        emits :class:`Finished` and frees its slot. ``end=False`` keeps the stream open (voice agents flush at each
        end of turn)."""
        if self.ended:
            raise StreamClosedError(f"stream {self.name}: already ended")
        if self._resampler is not None:  # drain the resampler's look-ahead; a fresh one continues after end=False
            tail = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
            self.samples_in += tail.shape[0]
            self.queue.append(np.clip(tail, -1.0, 1.0))
            self._resampler = None if end else self._new_resampler()
        padded = self.queue.pad_to_frame()
        self.queue.append(np.zeros(self.rt.n_flush_frames * FRAME_SIZE, dtype=np.float32))
        if not end:  # the stream goes on after this silence: its words keep the pushed audio's times
            start = self.samples_in / SAMPLE_RATE + self._gaps_passed + sum(g for _, g in self._gaps)
            self._gaps.append((start, (padded + self.rt.n_flush_frames * FRAME_SIZE) / SAMPLE_RATE))
        self.ended = end
        if self.drained:  # nothing left to run (no audio and no flush frames, none in flight)
            self._finish()
        return self._process() if process else self.events()

    @serialized
    def marker(self, marker_id: int) -> list[Event]:
        """Ask for a :class:`Marker` event once the audio queued so far plus ``asr_delay_in_tokens`` steps have run
        (moshi-server's rule, §5.7); pending markers are echoed at the end of the stream at the latest."""
        if (mid := int64_value(marker_id)) is None:  # the wire's int64
            raise ValueError(f"stream {self.name}: a marker id is an int64, got {marker_id!r}")
        due = self.steps + self.in_flight + len(self.queue) // FRAME_SIZE + self.rt.asr_delay_in_tokens
        self._markers.append((due, mid))
        # no more steps for it: echo now
        self._due_markers(all_=self.drained)
        return self.events()

    @property
    def pending_markers(self) -> int:
        """Markers asked and not echoed yet."""
        return len(self._markers)

    @property
    def drained(self) -> bool:
        """The input ended and every frame of it has been handed over (none queued, none in flight)."""
        return self.ended and len(self.queue) < FRAME_SIZE and not self.in_flight

    def _due_markers(self, all_: bool = False) -> None:
        while self._markers and (all_ or self._markers[0][0] <= self.steps):
            self._events.append(Marker(self.name, self._markers.popleft()[1]))

    @serialized
    def close(self) -> None:
        """Abort: drop queued audio and free the slot now (no Finished event); pending markers are echoed."""
        self.ended = True
        self.queue = _SampleQueue()
        self.rt._release(self)
        self._due_markers(all_=True)

    @serialized
    def events(self) -> list[Event]:
        """Take this stream's pending events."""
        out, self._events = self._events, []
        return out

    def _process(self) -> list[Event]:
        self.rt.run()
        return self.events()

    # ---- output ------------------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return not self.finished and len(self.queue) >= FRAME_SIZE

    def _on_step(self, token: int, probs: list[float] | None, finish: bool = False) -> None:
        # Runs for every stream at every step (700 streams: 700 calls per 80 ms frame), so it skips what a step
        # without a new word or marker does not need.
        rt, tracker = self.rt, self.tracker
        if self.history:
            self.tokens.append(token)
        self.steps += 1
        before = len(tracker.word_tokens)
        raw = tracker.push(token)
        if raw:
            self._emit_raw(raw)
        if tracker.word_tokens and len(tracker.word_tokens) != before:
            pending = rt.tokenizer.decode(tracker.word_tokens)
            text = f"{self._text} {pending}" if self._text and pending.strip() else self._text or pending
            self._events.append(Partial(self.name, pending, text))
        if probs is not None:
            options = rt.options
            self._events.append(VADStep(self.name, self.steps, tuple(probs), probs[options.vad_head] >
                                        options.vad_threshold))
        if self._markers:
            self._due_markers()
        if finish:  # the stream's last frame (its queue drained after the input ended)
            self._finish()

    def _emit_raw(self, raw: list[RawWord | RawEndWord]) -> None:
        shift = self.rt.n_prefix_frames / FRAME_RATE
        for e in raw:
            if self.history:
                self._raw.append(e)
            if isinstance(e, RawWord):
                text = self.rt.tokenizer.decode(list(e.tokens))
                if self.history and text.strip():  # a word of no text (eos alone) is no word of the transcript
                    self._text = f"{self._text} {text}" if self._text else text
                self._events.append(Word(self.name, text, self._audio_time(e.start_time - shift), e.tokens))
            else:
                self._events.append(EndWord(self.name, self._audio_time(e.stop_time - shift)))
        if not self.history:  # the tracker's times never go back: no later event falls before its last stop
            passed = self.tracker.last_stop_time - shift
            while self._gaps and sum(self._gaps[0]) <= passed:
                self._gaps_passed += self._gaps.popleft()[1]

    def _audio_time(self, t: float) -> float:
        """Model-clock seconds (prefix removed) -> seconds of the pushed audio: the silence of each earlier
        flush(end=False) is taken out, and a time inside one is its start."""
        out = t - self._gaps_passed
        for start, dur in self._gaps:
            if t <= start:
                break
            out -= min(t - start, dur)
        return max(0.0, out)

    @serialized
    def words(self, rule: str | None = None) -> Transcript:
        """Transcript of the tokens so far by ``rule`` (``"python"`` or ``"rust"``; default: runtime option)."""
        if not self.history:
            raise RuntimeError(f"stream {self.name} was opened with history=False: it keeps no words (use its "
                               "Word events)")
        rt = self.rt
        rule = rule or rt.options.timestamps
        duration = self.samples_in / SAMPLE_RATE
        if rule == "python":
            offset = python_offset_seconds(rt.n_prefix_frames, rt.audio_delay_seconds)
            words = python_words(self.tokens, rt.tokenizer, offset)
        elif rule == "rust":
            raw = list(self._raw)
            if not self.finished:  # what finish() would add, without touching the live tracker
                t = RustWordTracker(self.tracker.delay)
                t.step_idx, t.word_tokens = self.tracker.step_idx, list(self.tracker.word_tokens)
                t.unended, t.last_stop_time = self.tracker.unended, self.tracker.last_stop_time
                raw += t.finish()
            words = pair_rust_words(raw, rt.tokenizer, shift=rt.n_prefix_frames / FRAME_RATE)
        else:
            raise ValueError(f"timestamps rule must be one of {TIMESTAMP_RULES}, got {rule!r}")
        if self._gaps:
            words = [replace(w, start=self._audio_time(w.start), end=self._audio_time(w.end))
                     for w in words]
        return Transcript(self.name, words, duration=duration, timestamps=rule,
                          meta={"alignment": rt.options.alignment, "steps": self.steps})

    def _finish(self) -> None:
        self._emit_raw(self.tracker.finish())
        self._due_markers(all_=True)
        self.finished = True
        self.transcript = self.words() if self.history else None
        self._events.append(Finished(self.name, self.transcript))
        self.rt._release(self)


# ---------------------------------------------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------------------------------------------


class STTRuntime:
    """Shared model + ``max_streams`` slots. Build with :meth:`from_checkpoint` or from loaded parts.

    ``on_text``: a hook that may edit each step's text tokens in place (rows by slot; forced alignment, tests). If it
    raises, the LM step is undone but the audio frames of that call, already encoded, are lost for every stream in it
    (a stream whose last frames they were finishes without them).

    Threads: the runtime's and its streams' methods hold the runtime's lock, so streams may be fed from several
    threads; their calls run one at a time (a ``push`` that steps the model holds the others for the step).
    """

    def __init__(self, lm, mimi, tokenizer, config, *, max_streams: int = 8, options: STTOptions | None = None,
                 on_text: Callable[[torch.Tensor], None] | None = None, engine: bool = True):
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        self.options = options or STTOptions()
        self.tokenizer = tokenizer
        self.config = config
        stt = config.stt_config or {}
        # a config without them takes Kyutai's scripts' defaults (the released configs set both)
        self.audio_delay_seconds = float(stt.get("audio_delay_seconds", DEFAULT_AUDIO_DELAY_SECONDS))
        prefix_s = (float(stt.get("audio_silence_prefix_seconds", DEFAULT_SILENCE_PREFIX_SECONDS))
                    if self.options.silence_prefix else 0.0)
        for key, seconds in (("audio_delay_seconds", self.audio_delay_seconds),
                             ("audio_silence_prefix_seconds", prefix_s)):
            if seconds < 0:  # a negative count of silence frames failed at the first stream or flush
                raise ValueError(f"config stt_config.{key} must be >= 0 seconds, got {seconds}")
        self.n_prefix_frames = math.ceil(prefix_s * FRAME_RATE)
        self.n_flush_frames = math.ceil(self.audio_delay_seconds * FRAME_RATE) + (
            1 if self.options.alignment == "rust" else 0)
        self.asr_delay_in_tokens = (self.options.asr_delay_in_tokens if self.options.asr_delay_in_tokens is not None
                                    else default_asr_delay_in_tokens(self.audio_delay_seconds))
        self.max_streams = max_streams
        self.stepper = STTStepper(lm, mimi, max_streams, alignment=self.options.alignment, temp=self.options.temp,
                                  on_text=on_text, engine=engine, batch_invariant=self.options.batch_invariant)
        self.device = self.stepper.device
        heads = len(lm.extra_heads)
        if heads and not 0 <= self.options.vad_head < heads:
            raise ValueError(f"vad_head {self.options.vad_head} out of range: the model has {heads} VAD heads")
        self.slots: list[STTStream | None] = [None] * max_streams
        self._pending: Callable[[], None] | None = None  # an overlapped call's hand-over (step(overlap=True))
        self.total_steps = 0
        self.opened = 0  # streams opened so far (default stream names)
        self._lock = threading.RLock()  # held by the runtime's and its streams' calls (see dsm.engine.serialized)

    def __repr__(self) -> str:
        return (f"STTRuntime(streams {len(self.streams)}/{self.max_streams} open, alignment="
                f"{self.options.alignment!r}, device={self.device}, engine={self.stepper.engine is not None})")

    @classmethod
    def from_checkpoint(cls, files, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        max_streams: int = 8, options: STTOptions | None = None, **kw) -> STTRuntime:
        """Load LM, Mimi and tokenizer of resolved checkpoint files (``dsm.checkpoint.resolve_checkpoint``)."""
        from .checkpoint import check_model_files
        from .mimi import Mimi
        from .model import LMModel, default_dtype
        from .tokenizer import Tokenizer

        dtype = dtype or default_dtype(device)
        tokenizer = Tokenizer(files.tokenizer)
        check_model_files(files, tokenizer.vocab_size)
        lm = LMModel.from_checkpoint(files, device=device, dtype=dtype)
        mimi = Mimi.from_file(files.mimi_weights, n_q=lm.cfg.n_q, device=device)
        return cls(lm, mimi, tokenizer, files.config, max_streams=max_streams, options=options, **kw)

    @serialized
    def warm_up(self) -> None:
        """Capture the engine's step graphs and Mimi's one-frame encode graphs for every batch bucket before the first
        stream (a no-op on a CPU or with streams open; no engine graphs on the plain generator)."""
        if self.streams:
            return
        self.stepper.warm_up_mimi()
        if self.stepper.engine is not None:
            # the path its steps take: one graph a step, or the phases when a text hook runs between them
            hooked = self.stepper.on_text is not None
            self.stepper.engine.warm_up(plain=not hooked, hooked=hooked)

    # ---- slots -------------------------------------------------------------------------------------------------
    @property
    def streams(self) -> list[STTStream]:
        return [s for s in self.slots if s is not None]

    @property
    def free_slots(self) -> int:
        return sum(s is None for s in self.slots)

    @serialized
    def open_stream(self, name: str | None = None, sample_rate: int = SAMPLE_RATE, history: bool = True) -> STTStream:
        """Take the lowest free slot (reset) for a new stream; :class:`NoFreeSlotError` if all are taken.

        ``history=False``: the stream keeps no token or word history (its events are all it gives: no
        :meth:`STTStream.words`, and its :class:`Finished` has no transcript), so its host memory stays bounded
        however long it runs (a server's connection: 12.5 tokens a second for hours)."""
        if None not in self.slots:
            raise NoFreeSlotError(f"all {self.max_streams} stream slots are in use")
        slot = self.slots.index(None)
        self.opened += 1
        stream = STTStream(self, slot, name if name is not None else f"stream-{self.opened}", sample_rate, history)
        got = self.stepper.open()
        if got != slot:
            self.stepper.close(got)
            raise RuntimeError(f"stepper gave slot {got}, runtime expected {slot}")
        self.slots[slot] = stream
        return stream

    def _release(self, stream: STTStream) -> None:
        if self.slots[stream.slot] is stream:
            self.slots[stream.slot] = None
            self.stepper.close(stream.slot)

    # ---- stepping ----------------------------------------------------------------------------------------------
    @serialized
    def step(self, max_frames: int = 1, overlap: bool = False) -> int:
        """Run every stream with a full frame queued; returns the number of LM steps (0: no stream had a frame).

        With ``max_frames > 1``, up to that many frames (as many as every ready stream has) are Mimi-encoded in one
        call, then stepped one by one: faster offline, same semantics (codes can differ from frame-by-frame encoding
        only by float rounding at distance ties).

        ``overlap`` (offline transcription): the call's steps are queued on the device, and their tokens reach the
        streams at the next call (or :meth:`settle`), after that call has queued its own: the host's work on one
        call's tokens (words, events) runs while the device computes the next. Events arrive a call late, and a
        stream's state (steps, markers) lags its queue meanwhile. A call without ``overlap`` settles first."""
        pending, self._pending = self._pending, None
        if pending is not None and not overlap:
            pending()
            pending = None
        try:
            return self._queue(max_frames, defer=overlap)
        finally:  # even when this call's steps fail: the previous call's frames are not lost
            if pending is not None:
                pending()

    @serialized
    def settle(self) -> None:
        """Hand the streams the tokens of an overlapped call still pending (see :meth:`step`)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending()

    def _queue(self, max_frames: int, defer: bool) -> int:
        ready = [s for s in self.slots if s is not None and s.ready]
        if not ready:
            return 0
        k = max(1, min(max_frames, *(len(s.queue) // FRAME_SIZE for s in ready)))
        # written in place into pinned memory where Mimi is on a GPU: its copy to the device then needs no staging
        pcm_t = torch.empty(self.max_streams, k * FRAME_SIZE, pin_memory=self.stepper.mimi.device.type == "cuda")
        pcm = pcm_t.numpy()
        active = np.zeros(self.max_streams, dtype=np.bool_)  # numpy: a torch element write costs ~5 us on the host
        for s in ready:
            s.queue.pop_into(pcm[s.slot])
            active[s.slot] = True
        pcm[~active] = 0.0
        active = torch.from_numpy(active)
        codes = self.stepper.encode(pcm_t, active)

        handed = 0

        def on_frame(i: int, tokens: list[int], probs: torch.Tensor | None) -> None:
            nonlocal handed
            handed += 1
            self.total_steps += 1
            probs = probs.tolist() if probs is not None else None  # one conversion, not one per stream
            error = None
            for s in ready:
                s.in_flight -= 1
                if self.slots[s.slot] is s:  # not closed meanwhile (overlap)
                    try:  # its last frame once drained (its input may have ended after this call was queued)
                        s._on_step(tokens[s.slot], probs[s.slot] if probs is not None else None, finish=s.drained)
                    except Exception as e:  # one stream's failure does not take this frame from the others
                        e.add_note(f"(in STT stream {s.name!r}, slot {s.slot})")
                        error = error or e
            if error is not None:
                raise error

        for s in ready:
            s.in_flight += k
        try:
            self._pending = self.stepper.lm_steps(codes, active, on_frame, defer=defer)
        except BaseException:
            for s in ready:  # the frames not handed over are lost with the error
                s.in_flight -= k - handed
                if s.drained and self.slots[s.slot] is s:  # its last frames were lost: no step would finish it
                    s._finish()
            raise
        return k

    @serialized
    def run(self, max_steps: int | None = None, max_frames: int = 1) -> int:
        """Step until no stream has a full frame queued (at most ``max_steps``); returns the number of steps."""
        n = 0
        while max_steps is None or n < max_steps:
            k = self.step(max_frames if max_steps is None else max(1, min(max_frames, max_steps - n)))
            if not k:
                break
            n += k
        return n


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FileResult:
    path: Path
    transcript: Transcript | None
    error: str | None = None
    audio_seconds: float = 0.0


def transcribe_files(rt: STTRuntime, paths: Iterable[str | Path], progress: bool = False,
                     on_frames: Callable[[int], None] | None = None, frames_per_call: int = 8,
                     overlap: bool = True) -> Iterator[FileResult]:
    """Transcribe audio files through the runtime, up to its free slots at a time; yields in completion order.

    Unreadable/invalid files yield a :class:`FileResult` with ``error`` set. ``on_frames(n)`` is called after each
    step with the number of frames it processed. ``progress`` shows a tqdm bar (files, with RTFx).
    ``frames_per_call``: Mimi encodes up to this many frames per call, and ``overlap`` overlaps the host's work on a
    call's tokens with the device's next call (see :meth:`STTRuntime.step`)."""
    import time

    todo = [Path(p) for p in paths]
    todo.reverse()
    live: list[tuple[Path, STTStream, float]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="file", desc="transcribe", dynamic_ncols=True)
    t0, done_secs = time.perf_counter(), 0.0
    try:
        while todo or live:
            opened = False
            while todo and rt.free_slots:
                path, s = todo.pop(), None
                try:
                    pcm, _ = load_audio(path)
                    s = rt.open_stream(str(path))
                    s.push(pcm, process=False)
                    s.flush(process=False)
                except (AudioError, MemoryError, RuntimeError) as e:
                    if not isinstance(e, AudioError) and not out_of_memory(e):
                        raise
                    if s is not None:
                        s.close()
                    if bar:
                        bar.update(1)
                    # a file too long for this machine's memory is that file's error: the others go on
                    oom = f"{path}: out of memory reading it ({first_line(e)})"
                    yield FileResult(path, None, str(e) if isinstance(e, AudioError) else oom)
                    continue
                live.append((path, s, pcm.shape[0] / SAMPLE_RATE))
                del pcm  # the stream holds its own copy: a long file is not kept twice while it runs
                opened = True
            n_ready = sum(1 for s in rt.streams if s.ready)
            stepped = rt.step(frames_per_call, overlap=overlap)  # the words of a call while the GPU runs the next
            if stepped and on_frames is not None:
                on_frames(n_ready * stepped)
            finished = [item for item in live if item[1].finished]
            if not (opened or stepped or finished) and (todo or live):
                raise NoFreeSlotError(f"transcribe_files: no progress possible ({rt.free_slots} free slots, "
                                      f"{len(live)} files in flight)")
            for item in finished:
                live.remove(item)
                path, s, secs = item
                s.events()
                done_secs += secs
                if bar:
                    bar.update(1)
                    bar.set_postfix(rtfx=f"{done_secs / max(time.perf_counter() - t0, 1e-9):.1f}")
                yield FileResult(path, s.transcript, None, secs)
    finally:
        if bar:
            bar.close()
        if live:  # abandoned (the caller closed the generator) or failed: the files in flight free their slots
            with contextlib.suppress(Exception):  # a failed call's error is already on its way
                rt.settle()
            for _, s, _ in live:
                if not s.finished:
                    s.close()


# ---------------------------------------------------------------------------------------------------------------
# CLI: dsm transcribe
# ---------------------------------------------------------------------------------------------------------------


def add_model_args(p) -> None:
    """Model source (``--checkpoint`` / ``--hf-repo`` / ``--preset --random-weights``) and runtime options."""
    from .cli_args import add_batch_invariant_arg, add_checkpoint_args, parse_device, parse_dtype, positive_int
    from .presets import STT_PRESETS

    add_checkpoint_args(p, required=False)
    p.add_argument("--preset", choices=STT_PRESETS,
                   help="model preset (with --random-weights: no download; for plumbing and speed tests)")
    p.add_argument("--random-weights", action="store_true", help="use a cached random checkpoint of --preset")
    p.add_argument("--device", type=parse_device, default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", type=parse_dtype, default=None, help="LM dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="streams processed together (default 8)")
    p.add_argument("--alignment", choices=ALIGNMENTS, default="pytorch",
                   help="input alignment: pytorch (DSM scripts) or rust (moshi-server)")
    p.add_argument("--timestamps", choices=TIMESTAMP_RULES, default="python",
                   help="word timestamp rule: python (offline script) or rust (server)")
    p.add_argument("--no-engine", dest="engine", action="store_false",
                   help="run the LM on the plain generator instead of dsm.engine (paged KV pool, batch buckets, "
                        "CUDA graphs on GPU)")
    p.add_argument("--no-silence-prefix", dest="silence_prefix", action="store_false",
                   help="do not prepend the model's silence prefix (stt-2.6b: 1 s)")
    add_batch_invariant_arg(p)


def runtime_from_args(args) -> STTRuntime:
    from .checkpoint import CheckpointError
    from .cli_args import device_or_default, model_files_from_args

    files = model_files_from_args(args)
    if files.config.lm.dep_q:  # checked before any weight is read (STTRuntime would refuse it with a traceback)
        raise CheckpointError(f"{files.config_path}: not an STT checkpoint (dep_q = {files.config.lm.dep_q}: a "
                              "depth transformer, as in a TTS model)")
    device = device_or_default(args.device)
    opts = STTOptions(alignment=args.alignment, timestamps=args.timestamps, silence_prefix=args.silence_prefix,
                      batch_invariant=args.batch_invariant)
    return STTRuntime.from_checkpoint(files, device=device, dtype=args.dtype, max_streams=args.batch_size,
                                      options=opts, engine=args.engine)


def setup_transcribe_cli(p) -> None:
    p.add_argument("audio", nargs="+", metavar="AUDIO",
                   help="audio files (wav, flac, mp3, ogg); - reads one from stdin")
    add_model_args(p)
    p.add_argument("--output-format", "-f", default="all", help="txt, json, srt, vtt, tsv or all (default all)")
    p.add_argument("--output-dir", "-o", default=".", help="directory for the outputs (default .)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_cmd_transcribe)


# Write errors of the place, not of one file's name: the files after it would fail the same way.
_FATAL_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def _cmd_transcribe(args) -> int:
    import sys
    import time

    from .cli_args import check_model_flags
    from .transcript import output_formats, write_transcript

    try:
        formats = output_formats(args.output_format)
    except ValueError as e:
        print(f"dsm transcribe: error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.output_dir)
    # Before the work, not at its end: the directory, or the nearest existing folder above it, must be a directory.
    existing = next((p for p in (out_dir, *out_dir.parents) if p.exists()), out_dir)
    if existing.exists() and not existing.is_dir():
        what = "" if existing == out_dir else f" ({existing} is a file)"
        print(f"dsm transcribe: error: --output-dir {args.output_dir} is not a directory{what}", file=sys.stderr)
        return 2
    # Output names are fixed here, in command-line order: files finish in order of length, and a name made at
    # completion ("a" then "a-1") could go to either input or overwrite another input's ("a-1.wav").
    if args.audio.count("-") > 1:  # stdin holds one file
        print("dsm transcribe: error: '-' (stdin) can be given once", file=sys.stderr)
        return 2
    check_model_flags(args)  # usage errors first
    if all(a != "-" and not Path(a).is_file() for a in args.audio):  # nothing to transcribe: before the model loads
        for a in args.audio:
            what = "is a directory, not an audio file" if Path(a).is_dir() else "audio file not found"
            print(f"dsm transcribe: error: {a}: {what}", file=sys.stderr)
        return 1
    names: dict[Path, list[str]] = {}
    used: set[str] = set()
    inputs = {Path(a).resolve() for a in args.audio if a != "-"}

    def taken(name: str) -> bool:  # by another input's outputs, or an output would be an input (talk.txt -o .)
        return name in used or any((out_dir / f"{name}.{fmt}").resolve() in inputs for fmt in formats)

    for a in args.audio:
        stem = name = "stdin" if a == "-" else Path(a).stem
        n = 0
        while taken(name):
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        names.setdefault(Path(a), []).append(name)
        if name != stem:  # the printed paths alone would not say which input this one is
            print(f"dsm transcribe: note: {a}: written as {name}.* ({stem}.* is taken by an input or its "
                  "transcript)", file=sys.stderr)
    rt = runtime_from_args(args)
    try:  # created once the model loaded, before any audio is transcribed: an unwritable place fails early
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"dsm transcribe: error: --output-dir {args.output_dir}: cannot create ({e.strerror or e})",
              file=sys.stderr)
        return 1
    failed = 0
    t0, secs = time.perf_counter(), 0.0
    for r in transcribe_files(rt, args.audio, progress=args.progress):
        name = names[r.path].pop(0)
        if r.error is not None:
            print(f"dsm transcribe: {r.error}", file=sys.stderr)
            failed += 1
            continue
        try:
            written = write_transcript(r.transcript, out_dir, name, formats)
        except OSError as e:
            print(f"dsm transcribe: error: {e.filename or out_dir}: cannot write ({e.strerror or e})",
                  file=sys.stderr)
            if e.errno in _FATAL_WRITE_ERRORS:  # the next files would fail the same way
                return 1
            failed += 1  # this name only (a directory in the way, a name too long): the other files go on
            continue
        secs += r.audio_seconds  # the files written, as the count below
        for p in written:
            print(p)
    dt = time.perf_counter() - t0
    print(f"{len(args.audio) - failed} file(s), {secs:.1f} s of audio in {dt:.1f} s (RTFx {secs / max(dt, 1e-9):.1f})",
          file=sys.stderr)
    return 1 if failed else 0
