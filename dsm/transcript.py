"""Words and timestamps from STT text-token streams, and transcript output formats (DSM-SPEC §5.3).

Two timestamp rules, both exactly as Kyutai implements them:

* :func:`python_words` — the offline DSM script (``stt_from_file_pytorch.py``): segments between ``0`` tokens, the
  last segment closed by ``eos`` or 1 s, multi-word segments split by token counts.
* :class:`RustWordTracker` — the streaming rule of ``moshi-core::asr`` (moshi-server): a ``Word`` when a ``0``/``3``
  closes pending tokens, its ``EndWord`` at the next ``0``, times shifted by ``asr_delay_in_tokens``.

Output formats follow whisper's writers: ``txt`` (one segment per line), ``json``, ``srt``, ``vtt``, ``tsv``
(integer milliseconds).
"""

from __future__ import annotations

import errno
import html
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

FRAME_RATE = 12.5
END_OF_PADDING_ID = 0  # word boundary
PADDING_ID = 3  # "nothing spoken here"; ids <= PADDING_ID are never text
FORMATS = ("txt", "json", "srt", "vtt", "tsv")


class _Tokenizer(Protocol):
    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class TimedWord:
    text: str
    start: float  # seconds
    end: float  # seconds


@dataclass
class Segment:
    start: float
    end: float
    text: str
    words: list[TimedWord]


@dataclass
class Transcript:
    """A finished transcript: words with times, plus where they came from."""

    name: str
    words: list[TimedWord]
    duration: float = 0.0  # seconds of input audio
    timestamps: str = "python"  # rule used for the word times
    meta: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)

    def segments(self, max_gap: float = 1.0, max_chars: int = 80) -> list[Segment]:
        return make_segments(self.words, max_gap=max_gap, max_chars=max_chars)


# ---------------------------------------------------------------------------------------------------------------
# Python (offline) rule
# ---------------------------------------------------------------------------------------------------------------


def python_offset_seconds(n_prefix_frames: int, audio_delay_seconds: float, frame_rate: float = FRAME_RATE) -> float:
    """The DSM script's time offset: ``int(n_prefix_frames / frame_rate) + audio_delay_seconds`` (pitfall 24)."""
    return int(n_prefix_frames / frame_rate) + audio_delay_seconds


def python_words(tokens: Sequence[int], tokenizer: _Tokenizer, offset_seconds: float,
                 frame_rate: float = FRAME_RATE) -> list[TimedWord]:
    """Words of a full token list (one token per step) by the DSM offline script's rule (DSM-SPEC §5.3)."""
    y = [int(t) for t in tokens]
    out: list[TimedWord] = []

    def stamp(a: float, b: float) -> tuple[float, float]:
        return max(0.0, a / frame_rate - offset_seconds), max(0.0, b / frame_rate - offset_seconds)

    def segment(start: int, end: float) -> None:
        ids = [t for t in y[start : math.ceil(end)] if t > PADDING_ID]
        text = tokenizer.decode(ids)
        words = text.split()
        if not words:
            return
        if len(words) == 1:
            out.append(TimedWord(text, *stamp(start, end)))
            return
        for w in words[:-1]:
            n = len(tokenizer.encode(w))
            out.append(TimedWord(w, *stamp(start, start + n)))
            start += n
        out.append(TimedWord(words[-1], *stamp(start, end)))

    bounds = [i for i, t in enumerate(y) if t == END_OF_PADDING_ID]
    if not bounds:
        return []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        segment(a + 1, b)
    last = bounds[-1] + 1
    eos = [i for i in range(last, len(y)) if y[i] == tokenizer.eos_id]
    segment(last, eos[0] if eos else min(len(y), last + frame_rate))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Rust (streaming) rule
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawWord:
    tokens: tuple[int, ...]
    start_time: float


@dataclass(frozen=True)
class RawEndWord:
    stop_time: float


def default_asr_delay_in_tokens(audio_delay_seconds: float) -> int:
    """moshi-server's ``asr_delay_in_tokens``: 6 for stt-1b (0.5 s), 32 for stt-2.6b (2.5 s, pitfall 20)."""
    known = {0.5: 6, 2.5: 32}
    return known.get(float(audio_delay_seconds), int(audio_delay_seconds * FRAME_RATE))


class RustWordTracker:
    """Per-stream word state of ``moshi-core::asr`` (``ItemState``); :meth:`push` takes one token per step."""

    def __init__(self, asr_delay_in_tokens: int, frame_rate: float = FRAME_RATE):
        self.delay = asr_delay_in_tokens
        self.frame_rate = frame_rate
        self.step_idx = 0
        self.word_tokens: list[int] = []
        self.unended = False
        self.last_stop_time = 0.0

    def push(self, token: int) -> list[RawWord | RawEndWord]:
        out: list[RawWord | RawEndWord] = []
        self.step_idx += 1
        if self.step_idx < self.delay:
            return out
        if token in (END_OF_PADDING_ID, PADDING_ID):
            if self.word_tokens:
                out.append(RawWord(tuple(self.word_tokens), self.last_stop_time))
                self.word_tokens = []
                self.unended = True
        else:
            self.word_tokens.append(int(token))
        if token == END_OF_PADDING_ID:
            stop = (self.step_idx - self.delay) / self.frame_rate
            if self.unended:
                self.unended = False
                out.append(RawEndWord(stop))
            self.last_stop_time = stop
        return out

    def finish(self) -> list[RawWord | RawEndWord]:
        """End of input (an extension: the Rust server never ends a stream this way): emit pending tokens as a word
        and end an unended word at the current time."""
        out: list[RawWord | RawEndWord] = []
        if self.word_tokens:
            out.append(RawWord(tuple(self.word_tokens), self.last_stop_time))
            self.word_tokens = []
            self.unended = True
        if self.unended:
            self.unended = False
            out.append(RawEndWord(max(self.last_stop_time, (self.step_idx - self.delay) / self.frame_rate)))
        return out


def pair_rust_words(events: Sequence[RawWord | RawEndWord], tokenizer: _Tokenizer, shift: float = 0.0,
                    end_default: float | None = None) -> list[TimedWord]:
    """Attach each ``EndWord`` to the preceding ``Word`` (as DSM clients do); times minus ``shift``, clipped at 0.

    A word never ended gets ``end_default`` (or its start). A word whose tokens decode to no text (``eos``, a lone
    ``▁``: the server sends it) is left out, as the python rule does: it would be an empty cue or a double space."""
    words: list[list] = []
    for e in events:
        if isinstance(e, RawWord):
            words.append([tokenizer.decode(list(e.tokens)), e.start_time, None])
        elif words and words[-1][2] is None:
            words[-1][2] = e.stop_time
    out = []
    for text, start, end in words:
        if not text.strip():
            continue
        end = end if end is not None else (end_default if end_default is not None else start)
        s, e = max(0.0, start - shift), max(0.0, end - shift)
        out.append(TimedWord(text, s, max(s, e)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Segments and output formats
# ---------------------------------------------------------------------------------------------------------------


def make_segments(words: Sequence[TimedWord], max_gap: float = 1.0, max_chars: int = 80) -> list[Segment]:
    """Group words into subtitle-sized segments: break on a pause > ``max_gap`` s, after ``.?!`` or past
    ``max_chars`` characters."""
    segs: list[Segment] = []
    cur: list[TimedWord] = []

    def close() -> None:
        if cur:  # spans all its words, even overlapping or out-of-order ones: a cue never ends before it starts
            start = min(w.start for w in cur)
            end = max(start, *(w.end for w in cur))
            segs.append(Segment(start, end, " ".join(w.text for w in cur), list(cur)))
            cur.clear()

    for w in words:
        if cur and (w.start - cur[-1].end > max_gap or sum(len(x.text) + 1 for x in cur) + len(w.text) > max_chars):
            close()
        cur.append(w)
        if w.text.endswith((".", "?", "!")):
            close()
    close()
    return segs


def format_timestamp(seconds: float, always_include_hours: bool = False, decimal_marker: str = ".") -> str:
    """whisper's ``format_timestamp``: ``[hh:]mm:ss.mmm``."""
    ms = round(max(0.0, seconds) * 1000.0)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    hours = f"{h:02d}:" if always_include_hours or h > 0 else ""
    return f"{hours}{m:02d}:{s:02d}{decimal_marker}{ms:03d}"


_LINE_BREAKS = re.compile("[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]+")


def _one_line(text: str) -> str:
    """``text`` with its line breaks as spaces: every format has one line per segment (txt, tsv) or ends a cue at a
    blank line (srt, vtt)."""
    return _LINE_BREAKS.sub(" ", text)


def _cue_text(text: str) -> str:
    """SRT cue text: one line, and no ``-->`` (which starts a timing line). ``-{2,}>`` as a whole, since replacing
    ``-->`` once leaves ``--->`` as ``-->``."""
    return re.sub(r"-{2,}>", "->", _one_line(text))


def to_txt(t: Transcript) -> str:
    return "".join(_one_line(s.text) + "\n" for s in t.segments())


def to_json(t: Transcript) -> str:
    segs = [{"id": i, "start": s.start, "end": s.end, "text": s.text,
             "words": [{"word": w.text, "start": w.start, "end": w.end} for w in s.words]}
            for i, s in enumerate(t.segments())]
    data = {"name": t.name, "text": t.text, "duration": t.duration, "timestamps": t.timestamps, "segments": segs,
            "words": [asdict(w) for w in t.words], **({"meta": t.meta} if t.meta else {})}
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def to_srt(t: Transcript) -> str:
    out = []
    for i, s in enumerate(t.segments(), start=1):
        a = format_timestamp(s.start, True, ",")
        b = format_timestamp(s.end, True, ",")
        out.append(f"{i}\n{a} --> {b}\n{_cue_text(s.text)}\n\n")
    return "".join(out)


def to_vtt(t: Transcript) -> str:
    out = ["WEBVTT\n\n"]
    for s in t.segments():
        # WebVTT cue text is markup: a bare & or < is an error (or a tag), and escaped ">" cannot form "-->".
        text = html.escape(_one_line(s.text), quote=False)
        out.append(f"{format_timestamp(s.start)} --> {format_timestamp(s.end)}\n{text}\n\n")
    return "".join(out)


def to_tsv(t: Transcript) -> str:
    rows = ["start\tend\ttext\n"]
    for s in t.segments():
        rows.append(f"{round(1000 * s.start)}\t{round(1000 * s.end)}\t{_one_line(s.text).replace(chr(9), ' ')}\n")
    return "".join(rows)


WRITERS = {"txt": to_txt, "json": to_json, "srt": to_srt, "vtt": to_vtt, "tsv": to_tsv}


def output_formats(spec: str) -> tuple[str, ...]:
    """``"all"`` or one of :data:`FORMATS` (comma-separated lists accepted) -> formats."""
    if spec == "all":
        return FORMATS
    fmts = tuple(dict.fromkeys(f.strip() for f in spec.split(",") if f.strip()))  # each once, in order given
    bad = [f for f in fmts if f not in WRITERS]
    if bad or not fmts:
        raise ValueError(f"unknown output format {spec!r}; choose from {', '.join(FORMATS)} or all")
    return fmts


def write_transcript(t: Transcript, out_dir: str | Path, stem: str, formats: Sequence[str]) -> list[Path]:
    """Write ``<out_dir>/<stem>.<fmt>`` for every format; returns the paths. All or none: each is written beside
    its place first, and they take their names once every one is written (a failed write left some formats, and
    an empty file in the failing one's place)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.{fmt}" for fmt in formats]
    for p in paths:  # the one way a rename below fails in practice: refused before any output moves
        if p.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(p))
    written: list[Path] = []
    p = paths[0] if paths else out_dir
    try:
        for fmt, p in zip(formats, paths, strict=True):
            tmp = p.with_name(f".{p.name}.partial")
            written.append(tmp)
            tmp.write_text(WRITERS[fmt](t), encoding="utf-8")
        for tmp, p in zip(written, paths, strict=True):
            tmp.replace(p)
    except BaseException as e:
        for tmp in written:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # named by the output that failed, not by its temporary name
            e.filename, e.filename2 = str(p), None
        raise
    return paths
