"""Streaming text-to-speech over a DSM TTS checkpoint (DSM-SPEC §6).

Pieces, from the text side to the audio side:

* :class:`EntryBuilder` / :func:`script_to_entries` — text → word entries (§6.2), incrementally, turn by turn;
* :class:`StateMachine` — the rule-based text-stream controller (§6.3): forced/maximum padding, new-word requests,
  speaker tokens, the second (lookahead) text stream multiplexed into one id, and :meth:`StateMachine.can_step`,
  the streaming-input guard of §6.7;
* :class:`LMStepper` — the only place that steps the LM (today a :class:`dsm.generate.Generator` in out-of-sync
  mode over ``max_batch`` slots; the batched engine replaces it);
* :class:`TTSRuntime` — many :class:`TTSStream` at once, one batch row (slot) each: streams join and leave, a row
  is stepped only when its state machine cannot run out of input (unless the stream's text was ended), audio
  frames go through a streaming Mimi per row (the first ``delay_steps`` frames skipped, PCM clipped to [-1, 1]).

Stepping rule (refines §6.7, same results as with the whole text known): a row runs when its text was ended, or
when the step cannot consume an entry (current word's tokens still queued, or forced padding), or when the front
entry is a break, or when N+1 words are queued (N = lookahead). So the two initial forced pads run before any text.
A row finishes once ``offset >= end_step + delay_steps + final_padding + 2`` (the server's rule; moshi's
``generate`` stops 2 steps earlier), or at ``max_gen_length`` (``truncated``). Text ended before any word gives no
audio and never takes a slot. Time to first audio is measured per stream on the host
(:attr:`TTSStream.time_to_first_audio`: first pushed text → first PCM chunk).

Voices are ``kyutai/tts-voices`` embedding files (``speaker_wavs`` fp32 ``[1, 512, 125]``, §6.6). The ``cfg``
conditioning of CFG-distilled checkpoints is set per stream (``cfg=2.0`` → ``"2.0"``); checkpoints without a
``cfg`` conditioner use real CFG (batch doubling) with the runtime-wide :attr:`TTSConfig.cfg_coef`.
"""

from __future__ import annotations

import math
import numbers
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import CheckpointError, CheckpointFiles, check_model_files, hub_file
from .conditioning import TensorInput
from .engine import EngineFull, bucket_for, check_seed, serialized
from .generate import Generator, check_temperature
from .host_copies import HostReads, copy_from_host, to_device
from .mimi import Mimi
from .mimi_graph import GraphedMimiStep, mimi_buckets
from .model import LMModel, default_dtype
from .tokenizer import Tokenizer

FRAME_RATE = 12.5
SAMPLE_RATE = 24000
FRAME_SIZE = 1920
NEW_WORD, MAIN_SPEAKER, OTHER_SPEAKER, PAD = 0, 1, 2, 3
ZERO, UNGENERATED = -1, -2
MAX_SPEAKERS = 5  # cross-attention speaker slots (moshi TTSModel.max_speakers)
VOICE_FRAMES = 125  # 10 s of voice latents at 12.5 Hz
VOICE_REPO = "kyutai/tts-voices"
DEFAULT_VOICE = "expresso/ex03-ex01_happy_001_channel1_334s.wav"  # the DSM scripts' default
_EVENT_RE = re.compile(r"(?:<break\s+time=\"([0-9]+(?:.[0-9]*)?)s\"\s*/?>)|(?:\s+)")  # moshi's script_to_entries
_SERVER_EVENT_RE = re.compile(r"(?:<break\s+time=\"([0-9.]+)s\"\s*/>)|(?:\s+)")  # moshi-server's (self-closing only)
TEXT_RULES = ("python", "server")


def own_rows(t: torch.Tensor, rows: Iterable[int]) -> list[torch.Tensor]:
    """Copies of rows of a host tensor of the whole step: a row's view would keep the step's whole batch
    alive for as long as a stream keeps its frames, or a consumer its PCM chunks (a long stream among 256: 256x its
    own bytes). Through numpy: a copy costs about what a view does (torch's per-row clone is ~4x that)."""
    if t.dtype == torch.bfloat16:  # no numpy dtype
        return [t[b].clone() for b in rows]
    a = t.numpy()
    return [torch.from_numpy(a[b].copy()) for b in rows]


class TTSInputError(ValueError):
    """Text that cannot be spoken (too long a word, text after end-of-text...)."""


class VoiceError(ValueError):
    """A voice that cannot be found or loaded; the message names the file."""


# ---------------------------------------------------------------------------------------------------------------
# Text → entries (§6.2)
# ---------------------------------------------------------------------------------------------------------------


# How a break is named in the transcript under the server's rules (moshi-server's Text messages): '<break time="Xs">'
BREAK_WORD = '<break time="'


@dataclass
class Entry:
    """One word (``tokens`` non-empty) or one break (no tokens, ``padding`` steps of silence)."""

    tokens: list[int]
    text: str
    padding: int = 0


class EntryBuilder:
    """Incremental ``script_to_entries``: :meth:`add` appends text to the current turn, :meth:`next_turn` starts
    the next one (turns alternate main/other speaker; a turn with no words just passes the speech to the other).

    Each :meth:`add` call holds whole words (a word never spans two calls). Words of more than
    ``max_word_tokens`` tokens raise :class:`TTSInputError` (defined limit instead of tying up a slot for an
    unbounded time on one token stream).
    """

    def __init__(self, tokenizer: Tokenizer, multi_speaker: bool = True, padding_between: int = 1,
                 max_word_tokens: int = 64, frame_rate: float = FRAME_RATE, max_break_s: float | None = None,
                 rules: str = "python"):
        self.tokenizer, self.multi_speaker = tokenizer, multi_speaker
        self.padding_between, self.max_word_tokens, self.frame_rate = padding_between, max_word_tokens, frame_rate
        self.max_break_s = max_break_s
        if rules not in TEXT_RULES:
            raise ValueError(f"text rules must be one of {TEXT_RULES}, got {rules!r}")
        self.server = rules == "server"
        self.turn = 0
        self._first_content = True
        self._last_speaker: int | None = None

    def next_turn(self) -> None:
        self.turn += 1
        self._first_content = True

    def _word(self, word: str) -> Entry:
        tokens = self.tokenizer.encode(word)
        if len(tokens) > self.max_word_tokens:
            shown = word if len(word) <= 40 else f"{word[:37]}..."
            raise TTSInputError(f"word {shown!r} ({len(word)} characters) is {len(tokens)} tokens long, more than "
                                f"max_word_tokens={self.max_word_tokens}; split it or raise the limit")
        if self._first_content:
            speaker = self.turn % 2
            if self.multi_speaker and self._last_speaker != speaker:
                self._last_speaker = speaker
                tokens.insert(0, (MAIN_SPEAKER, OTHER_SPEAKER)[speaker])
            self._first_content = False
        padding = max(0, self.padding_between + len(tokens) - 1) if self.padding_between > 0 else 0
        return Entry(tokens, word, padding)

    def add(self, text: str) -> list[Entry]:
        """Entries of ``text`` (normalised as the reference: ’→', ':'→space, parentheses dropped, break tags).

        ``rules="server"`` reads text as moshi-server's preprocessing does before the python state machine
        (DSM-SPEC §6.2): en dashes dropped too, only self-closing break tags, and a break of X s is
        ``max(1, int(X · 12.5))`` pad steps (truncated, not rounded; none for X = 0)."""
        saved = self._first_content, self._last_speaker
        try:
            return self._add(text)
        except Exception:  # all or nothing: a refused push must not eat the turn's speaker token
            self._first_content, self._last_speaker = saved
            raise

    def _add(self, text: str) -> list[Entry]:
        try:  # lone surrogates (non-UTF-8 bytes in argv) would fail in the tokenizer binding with a RuntimeError
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TTSInputError(f"text is not valid Unicode ({e})") from None
        line = text.replace("\u2019", "'").replace(":", " ").replace("(", "").replace(")", "")
        if self.server:
            line = line.replace("\u2013", "")
        out: list[Entry] = []
        pos = 0
        event_re = _SERVER_EVENT_RE if self.server else _EVENT_RE
        for match in event_re.finditer(line):  # one pass: re-slicing the rest after each word was quadratic
            word, pos = line[pos : match.start()], match.end()
            if word:
                out.append(self._word(word))
            if match.group(1):
                try:  # the tag pattern is moshi's, whose '.' matches any character: "1x5s" gets here
                    seconds = float(match.group(1))
                except ValueError:
                    raise TTSInputError(f"bad break tag {match.group(0)!r}: the time must be a number of seconds, "
                                        'e.g. <break time="1.5s"/>') from None
                if self.max_break_s is not None:
                    seconds = min(seconds, self.max_break_s)
                if not math.isfinite(seconds):  # e.g. "1e400s" (float: inf): no number of steps
                    raise TTSInputError(f"bad break tag {match.group(0)!r}: the time is too long")
                if not self.server:
                    out.append(Entry([], "", int(round(seconds * self.frame_rate))))
                elif seconds > 0:  # a pseudo-word of the transcript, as moshi-server's Text messages name it
                    out.append(Entry([], f'{BREAK_WORD}{seconds:.2f}s">', max(1, int(seconds * self.frame_rate))))
        if line[pos:]:
            out.append(self._word(line[pos:]))
        return out


def script_to_entries(tokenizer: Tokenizer, turns: Sequence[str], multi_speaker: bool = True,
                      padding_between: int = 1, max_word_tokens: int = 64) -> list[Entry]:
    """All entries of a script (list of turns, the first one by the main speaker)."""
    b = EntryBuilder(tokenizer, multi_speaker, padding_between, max_word_tokens)
    out: list[Entry] = []
    for i, turn in enumerate(turns):
        if i:
            b.next_turn()
        out += b.add(turn)
    return out


# ---------------------------------------------------------------------------------------------------------------
# State machine (§6.3)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class MachineState:
    entries: deque[Entry]
    remaining_padding: int
    forced_padding: int
    queued: deque[int] = field(default_factory=deque)
    lookahead_queued: deque[int] = field(default_factory=deque)
    end_step: int | None = None
    consumption_times: list[int] = field(default_factory=list)
    transcript: list[tuple[str, int]] = field(default_factory=list)
    log: list[tuple[int, int]] = field(default_factory=list)  # per step (sampled, forced input id)

    def tokens_ahead(self, n: int) -> list[int]:
        for entry in self.entries:
            if entry.tokens:
                n -= 1
                if n == 0:
                    return entry.tokens
        return []


@dataclass(frozen=True)
class StateMachine:
    """``card`` = text_card + 1 (multiplexing base); ``second_stream_ahead`` = lookahead N (0: no second stream)."""

    card: int
    second_stream_ahead: int = 0
    max_padding: int = 8
    initial_padding: int = 2

    def new_state(self, entries: Iterable[Entry] = ()) -> MachineState:
        return MachineState(deque(entries), self.initial_padding, self.initial_padding)

    @staticmethod
    def may_pop(state: MachineState) -> bool:
        """Whether the next step may consume an entry (or end the text)."""
        return not state.queued and state.forced_padding <= 0

    def can_step(self, state: MachineState, text_ended: bool) -> bool:
        """§6.7: stepping now gives the same result as with the whole text known (a step that may pop the front
        entry needs it, and, for a word, the N-th following word of the lookahead stream)."""
        if text_ended or not self.may_pop(state):
            return True
        if not state.entries:
            return False
        if not state.entries[0].tokens or not self.second_stream_ahead:
            return True
        need = self.second_stream_ahead + 1  # words queued; stop counting there (the text may be a whole book)
        for e in state.entries:
            if e.tokens:
                need -= 1
                if not need:
                    return True
        return False

    def process(self, step: int, state: MachineState, token: int) -> tuple[int, bool]:
        """(input id replacing the sampled ``token``, whether an entry was consumed); ``step`` = row offset."""
        consumed = False
        if token not in (NEW_WORD, PAD):
            token = PAD
        if state.queued or state.forced_padding > 0:
            token = PAD
        elif state.remaining_padding <= 0:
            token = NEW_WORD
        if token == NEW_WORD:
            if state.entries:
                entry = state.entries.popleft()
                state.consumption_times.append(step)
                consumed = True
                # a word, or a break's pseudo-word under the server's rules; not a word without tokens ("\u200b"),
                # which moshi leaves out
                if entry.tokens or entry.text.startswith(BREAK_WORD):
                    state.transcript.append((entry.text, step))
                if entry.tokens:
                    state.queued.extend(entry.tokens)
                    if self.second_stream_ahead:
                        state.lookahead_queued.extend(state.tokens_ahead(self.second_stream_ahead))
                    state.remaining_padding = self.max_padding
                else:
                    token = PAD
                state.forced_padding = entry.padding
            else:
                token = NEW_WORD if self.second_stream_ahead and state.end_step is None else PAD
                if state.end_step is None:
                    state.end_step = step
        if token == PAD:
            if state.remaining_padding > 0:
                state.remaining_padding -= 1
            if state.forced_padding > 0:
                state.forced_padding -= 1
            out = state.queued.popleft() if state.queued else PAD
        else:
            out = NEW_WORD
        if self.second_stream_ahead:
            second = ZERO
            if out == NEW_WORD:
                second = NEW_WORD
                out = state.queued.popleft() if state.queued else PAD
            elif state.lookahead_queued:
                second = state.lookahead_queued.popleft()
            out = (second + 1) * self.card + out
        return out, consumed


# ---------------------------------------------------------------------------------------------------------------
# Voices (§6.6)
# ---------------------------------------------------------------------------------------------------------------


def load_voice(path: str | Path, dim: int = 512) -> torch.Tensor:
    """``speaker_wavs`` of a voice embedding file, checked: fp32 ``[1, dim, 125]``."""
    path = Path(path)
    if not path.is_file():
        raise VoiceError(f"{path}: voice file not found")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = sorted(f.keys())
            if "speaker_wavs" not in keys:
                raise VoiceError(f"{path}: voice file has no 'speaker_wavs' tensor (it holds {keys})")
            t = f.get_tensor("speaker_wavs")
    except VoiceError:
        raise
    except Exception as e:  # safetensors raises several error types for foreign/corrupt files
        raise VoiceError(f"{path}: not a valid safetensors voice file ({type(e).__name__}: {e})") from None
    check_voice(t, str(path), dim)
    return t


def check_voice(t: torch.Tensor, where: str = "voice", dim: int = 512) -> None:
    if t.dtype != torch.float32:
        raise VoiceError(f"{where}: 'speaker_wavs' must be float32, got {t.dtype}")
    if tuple(t.shape) != (1, dim, VOICE_FRAMES):
        raise VoiceError(f"{where}: 'speaker_wavs' must have shape [1, {dim}, {VOICE_FRAMES}], got {list(t.shape)}")
    if not torch.isfinite(t).all():  # would silently turn every cross-attention output, hence the speech, to noise
        raise VoiceError(f"{where}: 'speaker_wavs' holds NaN or infinite values")


def resolve_voice(name: str | Path, model_id: dict | None = None, repo: str = VOICE_REPO,
                  local_files: bool = True) -> Path:
    """Local path of a voice: an existing file, ``hf://owner/repo/path``, or a ``kyutai/tts-voices`` name such as
    ``expresso/ex03-ex01_happy_001_channel1_334s.wav`` (the checkpoint's ``.{sig}@{epoch}.safetensors`` suffix is
    appended). ``local_files=False`` (a name from a client): names of ``repo`` only, never a local path, another
    repository or a path that leaves the repository."""
    s = str(name)
    if not s.strip():  # Path("") is "." (a directory): "is a directory" named nothing the user gave
        raise VoiceError(f"empty voice name {s!r}")
    if not local_files:
        parts = s.replace("\\", "/").split("/")
        if ":" in s or s.startswith("/") or ".." in parts or s.endswith(".safetensors"):
            raise VoiceError(f"{s!r}: only voice names of {repo} are accepted here")
    else:
        try:
            is_file, is_dir = Path(s).is_file(), Path(s).is_dir()
        except OSError as e:  # e.g. a name longer than the file system takes: was a traceback
            shown = s if len(s) <= 60 else f"{s[:57]}..."
            raise VoiceError(f"voice {shown!r}: not a usable path ({e.strerror or e})") from None
        if is_file:
            return Path(s)
        if is_dir:
            raise VoiceError(f"{s}: is a directory, not a voice file")
    if s.startswith("hf://"):
        parts = s.removeprefix("hf://").split("/")
        repo, fname = "/".join(parts[:2]), "/".join(parts[2:])
    elif s.endswith(".safetensors"):
        raise VoiceError(f"{s}: voice file not found")
    else:
        suffix = f".{model_id['sig']}@{model_id['epoch']}.safetensors" if model_id else ".safetensors"
        fname = s + suffix
    try:
        return hub_file(repo, fname)
    except CheckpointError as e:
        raise VoiceError(f"unknown voice {s!r}: not a local file and not fetchable from hf://{repo}/{fname} ({e})"
                         ) from None


def random_voice(seed: int = 0, dim: int = 512) -> torch.Tensor:
    """Deterministic N(0, 1) ``speaker_wavs`` ``[1, dim, 125]``: the voice used with random checkpoints."""
    return torch.randn(1, dim, VOICE_FRAMES, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# LM stepping (the part the batched engine replaces)
# ---------------------------------------------------------------------------------------------------------------


class LMStepper:
    """Steps ``max_batch`` LM slots with hooks (moshi ``LMGen`` semantics, out-of-sync mode: every slot has its
    own offset and frames come back for every row, -2 where not yet valid)."""

    def __init__(self, model: LMModel, max_batch: int, default_conditions: dict, *, n_q: int, delay_steps: int,
                 temp: float, top_k: int, top_k_text: int, cfg_coef: float = 1.0, seed: int = 0,
                 backend: str | None = None):
        self.gen = Generator(model, use_sampling=temp > 0, temp=temp, temp_text=temp, top_k=top_k,
                             top_k_text=top_k_text, cfg_coef=cfg_coef, cfg_is_no_text=True,
                             support_out_of_sync=True, backend=backend, depformer_steps=n_q,
                             audio_delay_steps=delay_steps)
        self.state = self.gen.init_state(max_batch, default_conditions, seed=seed)
        self.conditions = default_conditions  # per-slot values, kept to rebuild all rows (CFG doubling)
        self.dep_q = model.cfg.dep_q
        self.device = self.gen.device

    def start(self, slot: int, conditions: dict, seed: int) -> None:
        """Restart ``slot`` as a fresh stream with ``conditions`` (batch-1 condition values) and sampling ``seed``
        (the sampler's noise depends on (seed, offset, stream) only, so a stream samples the same in any slot)."""
        B = self.state.batch_size
        self.state.seeds[slot] = seed
        mask = torch.zeros(B, dtype=torch.bool, device=self.device)
        mask[slot] = True
        self.gen.reset(self.state, mask)
        self.conditions = _set_row(self.conditions, slot, conditions)
        if self.gen.cfg_rows == 1:
            self.gen.set_conditions(self.state, conditions, rows=[slot])
        else:
            self.gen.set_conditions(self.state, self.conditions)

    def stop(self, slot: int) -> None:
        """Nothing to release: each row owns its KV ring for the stepper's lifetime."""

    def step(self, active: torch.Tensor, text_only: bool, on_text_logits: Callable | None,
             on_text: Callable) -> torch.Tensor:
        """Step the ``active`` [B] bool rows (a host tensor); returns the un-delayed frames [B, 1 + dep_q] on the
        device (-2 where invalid). The audio before each codebook's delay is -1: the generator's
        ``audio_delay_steps``, on the device."""
        copy_from_host(self.state.exec_mask, active)
        replace = None
        if text_only:
            replace = torch.full((self.state.batch_size, self.dep_q), ZERO, dtype=torch.long, device=self.device)
        out = self.gen.step(self.state, None, depformer_replace_tokens=replace, on_text_logits=on_text_logits,
                            on_text=on_text, check_hooks=False)  # (see EngineStepper.step)
        return out.tokens


class EngineStepper:
    """:class:`LMStepper`'s interface over :class:`dsm.engine.Engine`: paged KV pages per stream, batch buckets and
    CUDA graphs on a GPU. Used when no real CFG row doubling is asked (the released TTS is CFG-distilled)."""

    def __init__(self, model: LMModel, max_batch: int, *, n_q: int, delay_steps: int, temp: float, top_k: int,
                 top_k_text: int, seed: int = 0, backend: str | None = None, cross_pages: int | None = None,
                 buckets: tuple[int, ...] | None = None):
        from .engine import Engine

        self.engine = Engine(model, max_slots=max_batch, backend=backend, seed=seed, cross_pages=cross_pages,
                             use_sampling=temp > 0, temp=temp, temp_text=temp, top_k=top_k, top_k_text=top_k_text,
                             depformer_steps=n_q, audio_delay_steps=delay_steps, buckets=buckets)
        self.dep_q = model.cfg.dep_q
        self.device = self.engine.device

    def start(self, slot: int, conditions: dict, seed: int) -> None:
        self.stop(slot)
        self.engine.open(conditions, seed=seed, slot=slot)

    def stop(self, slot: int) -> None:
        """Return the slot's KV pages to the pool (its stream is finished)."""
        if slot in self.engine.slots:
            self.engine.close(slot)

    def step(self, active: torch.Tensor, text_only: bool, on_text_logits: Callable | None,
             on_text: Callable) -> torch.Tensor:
        rows = active.nonzero()[:, 0].tolist()
        replace = None
        if text_only:  # the engine's rows [0, bucket)
            replace = torch.full((self.engine.bucket_for(rows), self.dep_q), ZERO, dtype=torch.long,
                                 device=self.device)
        # The hook is the runtime's own and writes ids it knows valid (the state machine's, from a tokenizer checked
        # against the text table at load): no range check, a host wait for the device.
        out = self.engine.step(None, rows, on_text_logits=on_text_logits, on_text=on_text,
                               depformer_replace_tokens=replace, check_hooks=False)
        return out.tokens  # rows [0, bucket), which covers every active row


def _set_row(conditions: dict, slot: int, new: dict) -> dict:
    out = {}
    for name, v in conditions.items():
        if isinstance(v, TensorInput):
            t, m = v.tensor.clone(), v.mask.clone()
            t[slot], m[slot] = new[name].tensor[0], new[name].mask[0]
            out[name] = TensorInput(t, m)
        else:
            out[name] = [*v[:slot], new[name][0], *v[slot + 1 :]]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TTSConfig:
    """Generation settings; defaults are moshi ``TTSModel``'s (temp 0.6, top-k 250 / text 25, n_q 32)."""

    n_q: int = 32
    temp: float = 0.6
    top_k: int = 250
    top_k_text: int = 25
    cfg_coef: float = 1.0  # real CFG (batch doubling); only for checkpoints without a `cfg` conditioner
    initial_padding: int = 2
    max_padding: int = 8
    final_padding: int = 4
    padding_between: int = 1
    padding_bonus: float = 0.0
    max_gen_length: int = 30000
    max_word_tokens: int = 64
    # Longest `<break time="Xs"/>` honoured (None: as asked, like moshi's python TTSModel; the server caps at 10 s,
    # as moshi-server does, so that one tag cannot hold a slot for hours).
    max_break_s: float | None = None
    # How text becomes entries: "python" (moshi's TTSModel) or "server" (moshi-server's preprocessing, as its
    # clients get; see EntryBuilder.add). dsm serve-tts uses "server".
    text_rules: str = "python"
    # Peak the PCM is clamped to: 1.0 as moshi's TTSModel clips; moshi-server clamps to 0.99 (dsm serve-tts too).
    pcm_limit: float = 1.0
    max_batch: int = 1
    seed: int = 0
    # Pages of the engine's shared voice K/V pool (125 condition positions each, a voice slot; one copy of the 4
    # padding pages of a one-voice stream, and of a voice several streams use). None: room for 5 distinct voices in
    # every slot. Fewer bound the memory; a stream that does not fit waits for a slot whose stream ends.
    condition_pages: int | None = None
    # While some streams are still in their first delay_steps (text only, no depth transformer) and others are
    # producing audio, run up to this many text-only steps of the former between full steps (moshi-server's
    # `interleaved_text_only`): new streams reach their first audio sooner, at no cost to a stream's output.
    interleaved_text_only: int = 2
    # Every step runs every slot (the LM's and Mimi's): a stream's outputs are then the same bits whatever the other
    # streams do, at the cost of the whole batch's step at any load. Default: buckets (see dsm.engine, mimi_buckets).
    batch_invariant: bool = False

    def __post_init__(self):
        # NaN compares false, so each check also refuses it
        check_temperature(self.temp, "TTSConfig.temp")
        for name in ("top_k", "top_k_text"):
            if getattr(self, name) < 0:
                raise ValueError(f"TTSConfig.{name} must be >= 0 (0: no top-k), got {getattr(self, name)}")
        check_seed(self.seed, "TTSConfig.seed")
        if not (isinstance(self.padding_bonus, numbers.Real) and math.isfinite(self.padding_bonus)):
            # NaN or an infinity in the pad logit: the text sampler never asks for a word (max padding always)
            raise ValueError(f"TTSConfig.padding_bonus must be a finite number, got {self.padding_bonus!r}")
        if self.max_break_s is not None and not 0 <= self.max_break_s < math.inf:
            raise ValueError(f"TTSConfig.max_break_s must be None or a finite number >= 0, got {self.max_break_s}")
        if not (isinstance(self.pcm_limit, numbers.Real) and 0 < self.pcm_limit <= 1):
            raise ValueError(f"TTSConfig.pcm_limit must be a number in (0, 1], got {self.pcm_limit!r}")
        if self.text_rules not in TEXT_RULES:
            raise ValueError(f"TTSConfig.text_rules must be one of {TEXT_RULES}, got {self.text_rules!r}")
        for name, least in (("max_batch", 1), ("max_gen_length", 1), ("max_word_tokens", 1), ("initial_padding", 0),
                            ("max_padding", 0), ("final_padding", 0), ("padding_between", 0),
                            ("interleaved_text_only", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"TTSConfig.{name} must be an integer >= {least}, got {value!r}")
        if self.condition_pages is not None and (isinstance(self.condition_pages, bool)
                                                 or not isinstance(self.condition_pages, int)):
            raise ValueError(f"TTSConfig.condition_pages must be None or an integer, got {self.condition_pages!r}")


class TTSStream:
    """One utterance (or dialogue) being spoken. Push text, :meth:`end` it, read PCM as it is produced."""

    def __init__(self, runtime: TTSRuntime, conditions: dict, on_pcm: Callable[[torch.Tensor], None] | None,
                 seed: int = 0):
        self.runtime = runtime
        self.conditions, self.seed = conditions, seed
        self.on_pcm = on_pcm
        self.builder = EntryBuilder(runtime.tokenizer, runtime.multi_speaker, runtime.config.padding_between,
                                    runtime.config.max_word_tokens, max_break_s=runtime.config.max_break_s,
                                    rules=runtime.config.text_rules)
        self.machine = runtime.machine.new_state()
        self.text_ended = False
        self.slot: int | None = None
        self.offset = 0  # LM steps done
        self.frames: list[torch.Tensor] = []  # un-delayed frames [1 + dep_q] (as moshi TTSResult.frames, per row)
        self.pending: deque[torch.Tensor] = deque()
        self.samples = 0
        self.done = False
        self.truncated = False
        self.cancelled = False
        self.n_words = 0
        self.opened_at = time.perf_counter()
        self.first_text_at: float | None = None
        self.first_pcm_at: float | None = None

    @property
    def _lock(self) -> threading.RLock:  # the runtime's: a stream's calls touch the runtime's batch (see serialized)
        return self.runtime._lock

    def __repr__(self) -> str:
        where = "done" if self.done else f"slot {self.slot}" if self.slot is not None else "waiting"
        return (f"TTSStream({where}, words={self.n_words}, steps={self.offset}, samples={self.samples}, "
                f"text_ended={self.text_ended}, cancelled={self.cancelled}, truncated={self.truncated})")

    # ---- input
    @serialized
    def push(self, text: str) -> int:
        """Add whole words to the current turn; returns the number of entries added."""
        if self.text_ended:
            what = "cancelled" if self.cancelled else "ended (push after end())"
            raise TTSInputError(f"text was already {what} for this stream")
        if not isinstance(text, str):
            raise TTSInputError(f"push takes text (str), got {type(text).__name__}")
        entries = self.builder.add(text)
        if entries and self.first_text_at is None:
            self.first_text_at = time.perf_counter()
        self.machine.entries.extend(entries)
        self.n_words += sum(1 for e in entries if e.tokens)
        return len(entries)

    @serialized
    def next_turn(self) -> None:
        """Start the next dialogue turn (the other speaker)."""
        if self.text_ended:
            raise TTSInputError("text was already ended for this stream (next_turn after end())")
        self.builder.next_turn()

    @serialized
    def end(self) -> None:
        """No more text: the stream may now always be stepped and finishes after its last word."""
        self.text_ended = True

    @serialized
    def cancel(self) -> None:
        """Stop now: the stream leaves its slot (or the queue) at once, done, and produces nothing more (its last
        step's PCM, not handed over yet, is dropped); PCM already handed over can still be read. The other streams
        are untouched."""
        self.runtime._cancel(self)

    # ---- output
    @serialized
    def read(self) -> torch.Tensor:
        """PCM produced since the last read (float32 [N], 24 kHz, in [-1, 1])."""
        chunks = list(self.pending)
        self.pending.clear()
        return torch.cat(chunks) if chunks else torch.zeros(0)

    @property
    def ready(self) -> bool:
        return not self.done and self.runtime.machine.can_step(self.machine, self.text_ended)

    @property
    def end_step(self) -> int | None:
        return self.machine.end_step

    @property
    def transcript(self) -> list[tuple[str, int]]:
        return self.machine.transcript

    @property
    def time_to_first_audio(self) -> float | None:
        """Seconds from the first text (or the opening) to the first PCM frame, measured on the host."""
        if self.first_pcm_at is None:
            return None
        return self.first_pcm_at - (self.first_text_at or self.opened_at)

    def _deliver(self, pcm: torch.Tensor) -> None:
        if self.first_pcm_at is None:
            self.first_pcm_at = time.perf_counter()
        self.samples += pcm.numel()
        if self.on_pcm is not None:
            self.on_pcm(pcm)
        else:
            self.pending.append(pcm)


class TTSRuntime:
    """Batched streaming TTS: ``config.max_batch`` slots over one LM and one streaming Mimi (``mimi=None``: frames
    only, no PCM).

    Threads: the runtime's and its streams' methods hold the runtime's lock, so streams may be fed and read from
    several threads; their calls run one at a time. ``on_pcm`` callbacks run holding it: they may call the runtime
    from their own thread, but must not wait for another thread that does."""

    def __init__(self, model: LMModel, mimi: Mimi | None, tokenizer: Tokenizer, tts_config: dict,
                 model_id: dict | None = None, config: TTSConfig | None = None, backend: str | None = None,
                 engine: bool = True):
        self.model, self.mimi, self.tokenizer = model, mimi, tokenizer
        self.config = config = config or TTSConfig()
        cfg = model.cfg
        if cfg.dep_q == 0 or not cfg.conditioners:
            raise ValueError("not a TTS checkpoint (needs a depth transformer and conditioners)")
        if not 1 <= config.n_q <= cfg.dep_q:
            raise ValueError(f"n_q must be in [1, {cfg.dep_q}], got {config.n_q}")
        self.model_id = model_id or {}
        self.delay_steps = int(tts_config["audio_delay"] * FRAME_RATE)
        lookahead = int(tts_config.get("second_stream_ahead", 0))
        if lookahead and not cfg.demux_second_text_stream:
            raise ValueError("second_stream_ahead > 0 needs demux_second_stream in the LM config")
        self.machine = StateMachine(cfg.text_card + 1, lookahead, config.max_padding, config.initial_padding)
        self.conditioners = {c.name: c for c in cfg.conditioners}
        self.multi_speaker = "speaker_wavs" in self.conditioners
        cfg_cond = self.conditioners.get("cfg")
        self.cfg_values = tuple(cfg_cond.possible_values or ()) if cfg_cond is not None else ()
        if config.cfg_coef != 1.0 and self.cfg_values:
            raise ValueError("this checkpoint is CFG-distilled: pass the coefficient per stream (cfg=...), not as "
                             "TTSConfig.cfg_coef")
        self.device = next(model.parameters()).device
        B = config.max_batch
        if config.cfg_coef == 1.0 and engine:
            self.stepper = EngineStepper(model, B, n_q=config.n_q, delay_steps=self.delay_steps, temp=config.temp,
                                         top_k=config.top_k, top_k_text=config.top_k_text, seed=config.seed,
                                         backend=backend, cross_pages=config.condition_pages,
                                         buckets=(B,) if config.batch_invariant else None)
        else:  # real CFG doubles the rows: the plain generator handles it
            self.stepper = LMStepper(model, B, self._conditions([None] * B, [None] * B), n_q=config.n_q,
                                     delay_steps=self.delay_steps, temp=config.temp, top_k=config.top_k,
                                     top_k_text=config.top_k_text, cfg_coef=config.cfg_coef, seed=config.seed,
                                     backend=backend)
        if config.condition_pages is not None and isinstance(self.stepper, EngineStepper):
            # a bound that no stream fits in fails here (without one, the pool is sized to fit every slot)
            self.stepper.engine.check_conditions(self._conditions([None], [None]))
        # Mimi decodes the smallest of these row prefixes holding every stream
        self.mimi_buckets = (B,) if config.batch_invariant else mimi_buckets(B)
        self.mimi_state = mimi.init_state(B, encoder=False) if mimi is not None else None
        if mimi is not None:  # the codes' clamp (-1: not generated yet) and the PCM's clip replay inside Mimi's graph
            limit = float(config.pcm_limit)
            self._decode_step = GraphedMimiStep(
                lambda codes, state: mimi.decode_step(codes.clamp(min=0), state).clamp(-limit, limit), self.mimi_state)
        else:
            self._decode_step = None
        self.slots: list[TTSStream | None] = [None] * B
        self.waiting: deque[TTSStream] = deque()
        self._pending: Callable[[], list[Exception]] | None = None  # the last step's hand-over (see step())
        self._text_only_streak = 0  # consecutive interleaved text-only steps
        self._lock = threading.RLock()  # held by the runtime's and its streams' calls (see dsm.engine.serialized)

    def __repr__(self) -> str:
        busy = sum(s is not None for s in self.slots)
        return (f"TTSRuntime(streams {busy}/{len(self.slots)} in slots, {len(self.waiting)} waiting, n_q="
                f"{self.config.n_q}, device={self.device}, audio={self.mimi is not None})")

    @classmethod
    def from_checkpoint(cls, files: CheckpointFiles, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, config: TTSConfig | None = None,
                        backend: str | None = None, audio: bool = True) -> TTSRuntime:
        """Load LM, Mimi (unless ``audio`` is False: frames only) and tokenizer of a TTS checkpoint. ``dtype``: the
        LM's (default: bfloat16 on CUDA, float32 elsewhere, as ``STTRuntime.from_checkpoint`` and ``dsm speak``)."""
        config = config or TTSConfig()
        dtype = dtype or default_dtype(device)  # as STTRuntime's and dsm speak's (bf16 on a CPU was slow)
        if not files.config.tts_config:
            raise CheckpointError(f"{files.config_path}: not a TTS checkpoint (no tts_config)")
        if "audio_delay" not in files.config.tts_config:
            raise CheckpointError(f"{files.config_path}: field 'tts_config.audio_delay' is missing (the text's lead "
                                  "over the audio, in seconds)")
        tokenizer = Tokenizer(files.tokenizer)
        check_model_files(files, tokenizer.vocab_size, config.n_q)
        model = LMModel.from_checkpoint(files, device=device, dtype=dtype)
        mimi = Mimi.from_file(files.mimi_weights, n_q=config.n_q, device=device) if audio else None
        return cls(model, mimi, tokenizer, files.config.tts_config, files.config.model_id, config, backend)

    @serialized
    def warm_up(self) -> None:
        """Capture the engine's step graphs (with the default conditions) and Mimi's decode graphs for every batch
        bucket before the first stream (a no-op on a CPU or with streams open; no engine graphs on the CFG-doubling
        stepper)."""
        if any(s is not None for s in self.slots):
            return
        if self._decode_step is not None:
            codes = torch.zeros(1, self.config.n_q, 1, dtype=torch.long, device=self.mimi.device)
            self._decode_step.warm_up(codes, self.mimi_buckets)
        if isinstance(self.stepper, EngineStepper) and not self.stepper.engine.slots:
            # every TTS step runs the state machine's text hook between the phases: no plain one-graph steps
            self.stepper.engine.warm_up(self._conditions([None], [None]), plain=False)

    # ---- conditioning
    @property
    def voice_dim(self) -> int:
        return self.conditioners["speaker_wavs"].dim if self.multi_speaker else 0

    def voice_tensor(self, voice: str | Path | torch.Tensor, *, local_files: bool = True) -> torch.Tensor:
        """A voice's ``speaker_wavs`` tensor from a tensor, a file or a voice name (``local_files=False``: names of
        the voice repository only, as a server takes them from its clients)."""
        if isinstance(voice, torch.Tensor):
            check_voice(voice, "voice tensor", self.voice_dim)
            return voice.detach()  # values, not a graph: the conditioning reads them with .numpy()
        return load_voice(resolve_voice(voice, self.model_id, local_files=local_files), self.voice_dim)

    def _conditions(self, voices: list[list[torch.Tensor] | None], cfgs: list[float | None]) -> dict:
        out: dict = {}
        B = len(voices)
        if self.multi_speaker:
            t = torch.zeros(B, MAX_SPEAKERS, VOICE_FRAMES, self.voice_dim)
            mask = torch.zeros(B, MAX_SPEAKERS, VOICE_FRAMES, dtype=torch.bool)
            for b, vs in enumerate(voices):
                for i, v in enumerate(vs or []):
                    t[b, i], mask[b, i] = v[0].t(), True
            out["speaker_wavs"] = TensorInput(t.view(B, -1, self.voice_dim), mask.view(B, -1))
        if "control" in self.conditioners:
            out["control"] = [None if v is None else "ok" for v in voices]
        if "cfg" in self.conditioners:
            out["cfg"] = [None if c is None else self._cfg_value(c) for c in cfgs]
        return out

    def check_cfg(self, cfg: float | None) -> None:
        """ValueError unless :meth:`open_stream` takes ``cfg`` (a checkpoint without a cfg conditioner takes any)."""
        if cfg is not None and self.cfg_values:
            self._cfg_value(cfg)

    def _cfg_value(self, cfg: float) -> str:
        value = format(float(cfg), ".1f")
        if value not in self.cfg_values:
            raise ValueError(f"cfg={cfg}: this checkpoint supports cfg in {', '.join(self.cfg_values)}")
        return value

    # ---- streams
    @serialized
    def open_stream(self, voice: str | Path | torch.Tensor | Sequence | None = None, cfg: float | None = 2.0,
                    on_pcm: Callable[[torch.Tensor], None] | None = None, seed: int | None = None) -> TTSStream:
        """A new stream. ``voice``: a voice file/name/tensor, or a list of up to 5 (speaker slots; the python
        server passes the same voice twice), or None (every slot is the learnt padding). ``cfg``: the distilled
        CFG coefficient (None: unconditioned; ignored by checkpoints without a ``cfg`` conditioner). ``on_pcm``:
        called with each PCM chunk (else :meth:`TTSStream.read`). ``seed``: sampling seed (default
        ``config.seed``). The stream takes a slot at the next step where one is free."""
        one = str | Path | torch.Tensor
        if voice is None:
            voices: list[torch.Tensor] = []
        elif isinstance(voice, one):
            voices = [self.voice_tensor(voice)]
        else:  # a numpy array or load_file()'s dict was iterated: "File name too long", "unknown voice 'speaker_wavs'"
            many = isinstance(voice, list | tuple)
            bad = next((v for v in voice if not isinstance(v, one)), None) if many else voice
            if many and bad is None:
                voices = [self.voice_tensor(v) for v in voice]
            else:
                raise VoiceError(f"a voice is a file path, a voice name or a torch tensor (or a list of up to "
                                 f"{MAX_SPEAKERS}), got {type(bad).__name__}" + (" in a list" if many else ""))
        if len(voices) > MAX_SPEAKERS:
            raise VoiceError(f"at most {MAX_SPEAKERS} voices per stream, got {len(voices)}")
        if voices and not self.multi_speaker:
            raise VoiceError("this checkpoint takes no voice conditioning")
        if not self.cfg_values:
            cfg = None
        conds = self._conditions([voices], [cfg])
        stream = TTSStream(self, conds, on_pcm, self.config.seed if seed is None else check_seed(seed))
        self.waiting.append(stream)
        return stream

    @staticmethod
    def _empty(stream: TTSStream) -> bool:
        """Ended before any entry: finishes with no audio (rather than the reference's final-padding noise)."""
        return stream.text_ended and not stream.machine.entries and not stream.machine.consumption_times

    def _admit(self) -> None:
        for b, s in enumerate(self.slots):
            if s is not None and self._empty(s):
                self._finish(b)
        free = deque(b for b, s in enumerate(self.slots) if s is None)
        while free and self.waiting:
            stream = self.waiting.popleft()
            if self._empty(stream):
                stream.done = True
                continue
            slot = free[0]
            try:
                self.stepper.start(slot, stream.conditions, stream.seed)
            except EngineFull:
                if any(s is not None for s in self.slots):  # its voice pages will be free when a stream ends
                    self.waiting.appendleft(stream)
                    break
                stream.done = stream.cancelled = stream.text_ended = True  # it cannot fit even alone
                raise
            except Exception:  # this stream cannot start: drop it alone; the slot stays free for the others
                stream.done = stream.cancelled = stream.text_ended = True
                raise
            free.popleft()
            stream.slot = slot
            self.slots[slot] = stream
            if self.mimi is not None:
                mask = torch.zeros(len(self.slots), dtype=torch.bool, device=self.mimi.device)
                mask[slot] = True
                self.mimi_state.reset(mask)
        for stream in [s for s in self.waiting if self._empty(s)]:  # even while every slot is busy
            self.waiting.remove(stream)
            stream.done = True

    # ---- stepping
    @serialized
    def step(self) -> int:
        """One LM step for every slot whose stream is ready; returns how many rows ran (0: nothing to do).

        A step's frames and PCM reach the streams at the next call, once it has queued its own step (or when
        nothing is left to run): the host's work on them (and the streams' ``on_pcm`` callbacks) runs while the
        device computes. A stream is ``done`` once its last PCM has been handed over."""
        self._admit()
        rows = [b for b, s in enumerate(self.slots) if s is not None and s.ready]
        if not rows:
            errors = self._settle()
            if errors:
                raise errors[0]
            return 0
        text_rows = [b for b in rows if self.slots[b].offset < self.delay_steps]
        if text_rows and len(text_rows) < len(rows) and self._text_only_streak < self.config.interleaved_text_only:
            rows = text_rows  # the audio rows wait one step
            self._text_only_streak += 1
        else:
            self._text_only_streak = 0
        B = len(self.slots)
        active = torch.zeros(B, dtype=torch.bool)
        active[rows] = True
        text_only = all(self.slots[b].offset < self.delay_steps for b in rows)
        machine, bonus = self.machine, self.config.padding_bonus

        def on_text_logits(logits: torch.Tensor) -> None:
            logits[..., PAD] += bonus

        def on_text(tokens: torch.Tensor) -> None:
            values = tokens.tolist()
            for b in rows:
                s = self.slots[b]
                forced, consumed = machine.process(s.offset, s.machine, values[b])
                s.machine.log.append((values[b], forced))
                values[b] = forced
            copy_from_host(tokens, torch.tensor(values, dtype=tokens.dtype))

        on_device = self.stepper.step(active, text_only, on_text_logits if bonus else None, on_text)
        # Which rows have a frame, which Mimi decodes and which finish depend on counts only: decided now, with
        # Mimi's decode queued before the host reads anything (the frames and the PCM then come back with one wait,
        # at the next call).
        max_delay, streams = self.model.cfg.max_delay, {b: self.slots[b] for b in rows}
        decode = [b for b in rows if streams[b].offset >= max_delay + self.delay_steps] if self.mimi is not None else []
        reads = HostReads()
        frames_at = reads.read(on_device)
        pcm_at = reads.read(self._decode(decode, on_device)) if decode else None
        last, framed = [], []
        for b, st in streams.items():
            st.offset += 1
            if st.offset > max_delay:  # the frame of this step exists (the delays are behind it)
                framed.append(b)
            end = st.machine.end_step
            if end is not None and st.offset >= end + self.delay_steps + self.config.final_padding + 2:
                last.append(st)
            elif st.offset >= self.config.max_gen_length:
                st.truncated = True
                last.append(st)
        for st in last:  # the slot is free for the next step; the stream is done once its frames are handed over
            self._release(st)
        errors = self._settle()  # the previous step's frames and PCM, while the device runs this one

        def hand_over() -> list[Exception]:
            host = reads.wait()
            kept = [b for b in framed if not streams[b].cancelled]
            for b, frame in zip(kept, own_rows(host[frames_at], kept), strict=True):
                streams[b].frames.append(frame)
            errs = self._deliver([(b, streams[b]) for b in decode], host[pcm_at]) if decode else []
            for st in last:
                st.done = True
            return errs

        self._pending = hand_over
        if errors:  # a stream's on_pcm raised: raised once every stream has its frame and its bookkeeping
            raise errors[0]
        return len(rows)

    def _settle(self) -> list[Exception]:
        """Hand the last step's frames and PCM to its streams; returns what their callbacks raised."""
        pending, self._pending = self._pending, None
        return pending() if pending is not None else []

    def _decode(self, rows: list[int], frames: torch.Tensor) -> torch.Tensor:
        """Queue Mimi's decode of the rows' codes, read from the step's device frames [rows, 1 + dep_q] (no copy
        through the host); returns the PCM [B, 1, 1920] on Mimi's device, clamped to ±config.pcm_limit."""
        B, n_q = len(self.slots), self.config.n_q
        mask = torch.zeros(B, dtype=torch.bool)
        mask[rows] = True
        self.mimi_state.set_exec_mask(to_device(mask, self.mimi.device))
        n = self.mimi_rows()
        codes = frames[:n, 1 : 1 + n_q]
        if codes.shape[0] < n:  # the engine returns rows [0, its bucket), which may hold fewer rows
            codes = torch.cat([codes, codes.new_zeros(n - codes.shape[0], *codes.shape[1:])])
        with torch.no_grad():
            return self._decode_step(codes[..., None].to(self.mimi.device))

    def mimi_rows(self) -> int:
        """The rows ``[0, n)`` Mimi decodes: the smallest bucket holding every slot with a stream (the rows above
        hold none, as :meth:`dsm.mimi.MimiState.rows` needs). In a runtime past the smallest bucket (128 slots), a few
        streams pay that bucket's decode, not every slot's."""
        return bucket_for(self.mimi_buckets, (b for b, s in enumerate(self.slots) if s is not None))

    def _deliver(self, rows: list[tuple[int, TTSStream]], pcm: torch.Tensor) -> list[Exception]:
        """Hand each (row, stream) its frame of ``pcm`` [B, 1, 1920] (host); returns what the callbacks raised (each
        stream is still served)."""
        errors: list[Exception] = []
        for (_, st), chunk in zip(rows, own_rows(pcm[:, 0], [b for b, _ in rows]), strict=True):
            if st.cancelled:  # cancelled by an earlier stream's callback
                continue
            try:
                st._deliver(chunk)
            except Exception as e:  # one stream's callback must not cost the others their frame
                errors.append(e)
        return errors

    def _cancel(self, stream: TTSStream) -> None:
        """Stop ``stream`` now: frames of its last step not handed over yet are dropped with it."""
        if stream.done:
            return
        stream.text_ended = stream.cancelled = True
        if stream.slot is not None:
            self._finish(stream.slot)
        elif stream in self.waiting:
            self.waiting.remove(stream)
            stream.done = True
        else:  # its slot is already free: its last step's frames were waiting to be handed over
            stream.done = True

    def _release(self, stream: TTSStream) -> None:
        """Free the stream's slot (its KV pages back to the pool)."""
        self.slots[stream.slot] = None
        self.stepper.stop(stream.slot)
        stream.slot = None

    def _finish(self, slot: int) -> None:
        s = self.slots[slot]
        self._release(s)
        s.done = True

    @serialized
    def pump(self) -> int:
        """Step while some stream can progress; returns the number of steps."""
        n = 0
        while self.step():
            n += 1
        return n

    @serialized
    def run(self, streams: Sequence[TTSStream] | None = None) -> None:
        """Step until ``streams`` (default: every open stream) are done; their text must have been ended."""
        todo = list(streams) if streams is not None else [s for s in self.slots if s] + list(self.waiting)
        for s in todo:
            if not s.text_ended:
                raise TTSInputError("run() needs the text of every stream ended (call stream.end())")
        while not all(s.done for s in todo):
            # A stream with no words finishes in a step that runs nothing.
            if not self.step() and not all(s.done for s in todo):
                raise self._stalled()

    def _stalled(self) -> RuntimeError:
        """Why a stream whose text was ended cannot progress: the slots are held by streams waiting for text."""
        hungry = sum(1 for s in self.slots if s is not None and not s.text_ended)
        return RuntimeError(f"no stream can progress: {hungry} of the {len(self.slots)} slots hold a stream waiting "
                            f"for more text (push words or end() it), {len(self.waiting)} stream(s) wait for a slot")

    def speak(self, text: str | Sequence[str], voice=None, cfg: float | None = 2.0) -> Iterator[torch.Tensor]:
        """Speak ``text`` (a string, or a list of dialogue turns), yielding PCM chunks as soon as they exist."""
        stream = self.open_stream(voice, cfg)
        try:
            for i, turn in enumerate([text] if isinstance(text, str) else text):
                if i:
                    stream.next_turn()
                stream.push(turn)
            stream.end()
            while not stream.done:
                if not self.step() and not stream.done:
                    raise self._stalled()
                pcm = stream.read()
                if pcm.numel():
                    yield pcm
        finally:  # abandoned (the caller closed the generator) or failed: the slot is not left generating for no one
            if not stream.done:
                stream.cancel()

    def synthesize(self, text: str | Sequence[str], voice=None, cfg: float | None = 2.0) -> torch.Tensor:
        """Whole utterance as float32 PCM [N] (24 kHz)."""
        chunks = list(self.speak(text, voice, cfg))
        return torch.cat(chunks) if chunks else torch.zeros(0)


__all__ = ["DEFAULT_VOICE", "Entry", "EntryBuilder", "LMStepper", "MachineState", "StateMachine", "TTSConfig",
           "TTSInputError", "TTSRuntime", "TTSStream", "VoiceError", "load_voice", "random_voice", "resolve_voice",
           "script_to_entries"]


# ---------------------------------------------------------------------------------------------------------------
# `dsm speak`
# ---------------------------------------------------------------------------------------------------------------


def setup_speak_parser(p) -> None:
    """Arguments of ``dsm speak``."""
    from .cli_args import add_checkpoint_args, nonnegative_int, parse_device, parse_dtype, temperature
    from .presets import TTS_PRESETS

    p.add_argument("text", metavar="TEXT|FILE|-", help="text to speak, a text file or pipe, or - for stdin")
    p.add_argument("-o", "--output", metavar="OUT.wav", help="output wav (16-bit, 24 kHz); - = raw float32 to stdout")
    p.add_argument("--raw", action="store_true", help="stream raw little-endian float32 PCM (24 kHz mono) to stdout")
    p.add_argument("--voice", help="voice embedding file (.safetensors with speaker_wavs [1,512,125]) or a "
                   f"{VOICE_REPO} name (default: {DEFAULT_VOICE}; with --random-weights: a fixed random voice, "
                   "torch.randn seed 0)")
    add_checkpoint_args(p, required=False)
    p.add_argument("--preset", choices=TTS_PRESETS, help="with --random-weights: model preset")
    p.add_argument("--random-weights", action="store_true",
                   help="use a random checkpoint of --preset, written once to ~/.cache/dsm/random/<preset>-seed0")
    p.add_argument("--turns", action="store_true", help="dialogue: each non-empty line is a turn, speakers alternate")
    p.add_argument("--cfg", type=float, default=2.0, help="CFG coefficient (distilled cfg condition; default 2.0)")
    p.add_argument("--temp", type=temperature, default=0.6, help="sampling temperature (0 = greedy; default 0.6)")
    p.add_argument("--top-k", type=int, default=250)
    p.add_argument("--top-k-text", type=int, default=25)
    p.add_argument("--n-q", type=int, default=32, help="audio codebooks to generate (default 32)")
    p.add_argument("--padding-between", type=nonnegative_int, default=1,
                   help="padding steps after each word, beyond its tokens (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", type=parse_device, default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", type=parse_dtype, default=None,
                   help="LM dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="report time to first audio and speed on stderr")
    p.set_defaults(func=cmd_speak)


def _read_text(arg: str) -> str:
    """The text to speak: ``arg`` itself, or the UTF-8 text of the file it names (``-``: stdin)."""
    from .cli_args import read_stdin_bytes

    try:
        if arg == "-":
            # Decoded here, strictly: the text layer can pass undecodable bytes on as surrogates (C locale), which
            # the tokenizer then refuses with a traceback.
            return read_stdin_bytes().decode("utf-8")
        try:  # a pipe too: `dsm speak <(cmd)` names /dev/fd/N, whose name was spoken
            is_file = Path(arg).is_file() or Path(arg).is_fifo()
        except OSError:  # e.g. a text longer than a file name may be (ENAMETOOLONG): it is the text
            return arg
        return Path(arg).read_text(encoding="utf-8") if is_file else arg
    except UnicodeDecodeError as e:
        raise TTSInputError(f"{'stdin' if arg == '-' else arg}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise TTSInputError(f"{arg}: cannot read ({e})") from None


def cmd_speak(args) -> int:
    import sys
    import wave

    from tqdm import tqdm

    from .cli_args import UsageError, device_or_default, model_files_from_args, stdout_to_devnull
    from .tokenizer import TokenizerError

    def fail(msg: str) -> int:
        print(f"dsm speak: error: {msg}", file=sys.stderr)
        return 1

    raw = args.raw or args.output == "-"
    if not raw and not args.output:  # flags that do not go together: usage errors (exit 2), as argparse's
        raise UsageError("give -o OUT.wav, or --raw / -o - for raw float32 PCM on stdout")
    if args.raw and args.output not in (None, "-"):
        raise UsageError(f"--raw writes to stdout, not to {args.output}: give one of them")
    if not raw and Path(args.output).suffix.lower() != ".wav":
        raise UsageError(f"{args.output}: dsm speak writes WAV files (name it *.wav), or raw PCM with --raw")
    if not raw and not (parent := Path(args.output).parent).is_dir():  # before loading the model
        return fail(f"{args.output}: {parent} " + ("is not a directory" if parent.exists() else
                                                   "does not exist (a directory)"))
    if raw and sys.stdout is None:  # started with stdout closed (>&-)
        return fail("raw PCM goes to stdout, which is closed")
    files = model_files_from_args(args)
    try:
        text = _read_text(args.text)
    except TTSInputError as e:
        return fail(str(e))
    turns = [t for t in text.splitlines() if t.strip()] if args.turns else [text]
    if not any(t.strip() for t in turns):
        return fail("no text to speak (empty input)")
    device = device_or_default(args.device)
    try:
        config = TTSConfig(n_q=args.n_q, temp=args.temp, top_k=args.top_k, top_k_text=args.top_k_text,
                           padding_between=args.padding_between, seed=args.seed)
        rt = TTSRuntime.from_checkpoint(files, device=device, dtype=args.dtype, config=config)
        voice = args.voice
        if voice is not None and not rt.multi_speaker:  # it was ignored without a word
            return fail(f"--voice {voice}: this checkpoint takes no voice conditioning")
        if voice is None:
            voice = random_voice(0, rt.voice_dim) if args.random_weights else DEFAULT_VOICE
        stream = rt.open_stream(voice if rt.multi_speaker else None, cfg=args.cfg)
        for i, turn in enumerate(turns):
            if i:
                stream.next_turn()
            stream.push(turn)
        stream.end()
    except (TTSInputError, VoiceError, TokenizerError, ValueError) as e:
        return fail(str(e))
    if rt._empty(stream):  # e.g. "()": no word is left once parentheses and colons are dropped
        return fail("no words to speak in the text")

    out = sys.stdout.buffer if raw else None
    wav = None
    if not raw:
        try:  # opened here, not by wave.open, whose half-built writer then fails again when collected
            out_file = open(args.output, "wb")  # noqa: SIM115 (closed after the wav, below)
        except OSError as e:
            return fail(f"{args.output}: cannot write ({e.strerror or e})")
        wav = wave.open(out_file, "wb")
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
    bar = tqdm(total=stream.n_words, unit="word", desc="speaking", file=sys.stderr,
               disable=args.no_progress or stream.n_words < 20)
    start = time.perf_counter()
    dest = "stdout" if raw else args.output
    try:
        try:
            while not stream.done:
                if not rt.step() and not stream.done:  # (a call that runs nothing may hand the last PCM over)
                    return fail("generation stalled")
                bar.update(len(stream.machine.transcript) - bar.n)
                pcm = stream.read()
                if not pcm.numel():
                    continue
                if out is not None:
                    out.write(pcm.numpy().astype("<f4").tobytes())
                    out.flush()
                else:
                    wav.writeframes((pcm.clamp(-1, 1) * 32767).round().to(torch.int16).numpy().tobytes())
        finally:
            bar.close()
            if wav is not None:
                try:
                    wav.close()  # flushes: can fail too (disk full)
                finally:
                    out_file.close()
    except BrokenPipeError:  # the reader went away (`dsm speak --raw ... | head -c N`)
        stdout_to_devnull()
        return fail("stdout was closed before all the audio was written (broken pipe)")
    except OSError as e:  # e.g. a full disk: one line, not a traceback
        return fail(f"{dest}: cannot write ({e.strerror or e})")
    elapsed = time.perf_counter() - start
    if args.verbose:
        seconds = stream.samples / SAMPLE_RATE
        ttfa = stream.time_to_first_audio
        print(f"time to first audio: {ttfa * 1000:.1f} ms (host, first text -> first PCM frame)" if ttfa is not None
              else "time to first audio: no audio", file=sys.stderr)
        print(f"audio: {seconds:.2f} s, {stream.offset} LM steps, {stream.n_words} words, generated in "
              f"{elapsed:.2f} s ({seconds / max(elapsed, 1e-9):.2f}x real time) on {device}", file=sys.stderr)
    if stream.truncated:  # the audio written so far stays; the exit status says the text was not all spoken
        steps = config.max_gen_length
        return fail(f"stopped at max_gen_length={steps} steps ({steps / FRAME_RATE:.0f} s of audio): the rest of the "
                    "text was not spoken (split it)")
    return 0
