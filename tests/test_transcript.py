"""Word/timestamp rules against plain re-implementations of Kyutai's scripts, and the output formats."""

from __future__ import annotations

import json
import random

import pytest
import torch

from dsm.tokenizer import Tokenizer, train_random_tokenizer
from dsm.transcript import (
    FORMATS,
    RawEndWord,
    RawWord,
    RustWordTracker,
    TimedWord,
    Transcript,
    default_asr_delay_in_tokens,
    format_timestamp,
    make_segments,
    output_formats,
    pair_rust_words,
    python_offset_seconds,
    python_words,
    to_srt,
    to_vtt,
    write_transcript,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer(train_random_tokenizer(tmp_path_factory.mktemp("tok") / "t.model", 200, seed=0))


# ---- references, written after the DSM scripts / moshi-core, as plainly as possible ------------------------------


def ref_python_rule(tokens, tokenizer, frame_rate, end_of_padding_id, padding_token_id, offset_seconds):
    """``tokens_to_timestamped_text`` of DSM ``scripts/stt_from_file_pytorch.py`` (torch ops as there)."""
    text_tokens = torch.tensor(tokens).view(-1)
    out = []

    def _tstmp(a, b):
        return max(0, a / frame_rate - offset_seconds), max(0, b / frame_rate - offset_seconds)

    def _decode(t):
        t = t[t > padding_token_id]
        return tokenizer.decode(t.numpy().tolist())

    def _decode_segment(start, end):
        text = _decode(text_tokens[start : int(torch.tensor(end).ceil())])
        words_inside_segment = text.split()
        if len(words_inside_segment) == 0:
            return
        if len(words_inside_segment) == 1:
            out.append((text, _tstmp(start, end)))
        else:
            for adjacent_word in words_inside_segment[:-1]:
                n_tokens = len(tokenizer.encode(adjacent_word))
                out.append((adjacent_word, _tstmp(start, start + n_tokens)))
                start += n_tokens
            out.append((words_inside_segment[-1], _tstmp(start, end)))

    (segment_boundaries,) = torch.where(text_tokens == end_of_padding_id)
    if not segment_boundaries.numel():
        return []
    for i in range(len(segment_boundaries) - 1):
        _decode_segment(int(segment_boundaries[i]) + 1, int(segment_boundaries[i + 1]))
    last_segment_start = int(segment_boundaries[-1]) + 1
    boundary_token = torch.tensor([tokenizer.eos_id])
    (end_of_last_segment,) = torch.where(torch.isin(text_tokens[last_segment_start:], boundary_token))
    if not end_of_last_segment.numel():
        last_segment_end = min(text_tokens.shape[-1], last_segment_start + frame_rate)
    else:
        last_segment_end = last_segment_start + int(end_of_last_segment[0])
    _decode_segment(last_segment_start, last_segment_end)
    return out


def ref_rust_rule(tokens, asr_delay_in_tokens):
    """``moshi-core::asr::State::step_tokens`` word bookkeeping for one batch item, as a plain loop."""
    msgs = []
    step_idx, word_tokens, unended_word, last_stop_time = 0, [], False, 0.0
    for text_token in tokens:
        step_idx += 1
        if step_idx >= asr_delay_in_tokens:
            if text_token == 3 or text_token == 0:
                if word_tokens:
                    msgs.append(("Word", tuple(word_tokens), last_stop_time))
                    word_tokens = []
                    unended_word = True
            else:
                word_tokens.append(text_token)
            if text_token == 0:
                stop_time = (step_idx - asr_delay_in_tokens) / 12.5
                if unended_word:
                    unended_word = False
                    msgs.append(("EndWord", stop_time))
                last_stop_time = stop_time
    return msgs


def random_stream(tok: Tokenizer, n: int, seed: int) -> list[int]:
    """Plausible STT output: pads, word boundaries, words of 1-3 pieces, sometimes eos, sometimes no boundary."""
    rng = random.Random(seed)
    words = [tok.encode(w) for w in ("hello", "world", "the", "paper", "x", "alpha beta", "hangar", "a")]
    y: list[int] = []
    while len(y) < n:
        r = rng.random()
        if r < 0.45:
            y.append(3)
        elif r < 0.7:
            y += [0, *rng.choice(words)]
        elif r < 0.8:
            y += rng.choice(words)  # words glued without a boundary
        elif r < 0.85:
            y.append(tok.eos_id)
        else:
            y.append(rng.randrange(4, 200))
    return y[:n]


def as_tuples(words):
    return [(w.text, (w.start, w.end)) for w in words]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("prefix_frames,delay", [(0, 0.5), (13, 2.5)])
def test_python_rule_matches_script(tok, seed, prefix_frames, delay):
    y = random_stream(tok, 40 + 7 * seed, seed)
    offset = python_offset_seconds(prefix_frames, delay)
    assert offset == int(prefix_frames / 12.5) + delay
    ours = python_words(y, tok, offset)
    ref = ref_python_rule(y, tok, 12.5, 0, 3, offset)
    assert as_tuples(ours) == ref


def test_python_rule_edge_cases(tok):
    w = tok.encode("hello")
    assert python_words([], tok, 0.5) == []
    assert python_words([3, 3, *w, 3], tok, 0.0) == []  # no boundary: nothing (as the script)
    # last segment ends at eos, else at min(N, start + 12.5 frames)
    assert as_tuples(python_words([0, *w, 3, 2, 3], tok, 0.0)) == [("hello", (1 / 12.5, (2 + len(w)) / 12.5))]
    long = [0, *w] + [3] * 30
    assert python_words(long, tok, 0.0)[0].end == pytest.approx(13.5 / 12.5)
    assert python_words(long, tok, 5.0)[0].start == 0.0  # clipped at 0


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("delay_tokens", [0, 1, 6, 32])
def test_rust_rule_matches_loop(tok, seed, delay_tokens):
    y = random_stream(tok, 60, seed)
    tr = RustWordTracker(delay_tokens)
    ours = []
    for t in y:
        for e in tr.push(t):
            ours.append(("Word", e.tokens, e.start_time) if isinstance(e, RawWord) else ("EndWord", e.stop_time))
    assert ours == ref_rust_rule(y, delay_tokens)


def test_rust_rule_finish_and_pairing(tok):
    w, v = tok.encode("hello"), tok.encode("world")
    tr = RustWordTracker(0)
    raw = [e for t in [3, 0, *w, 3, 3, 0, *v] for e in tr.push(t)]
    assert [type(e) for e in raw] == [RawWord, RawEndWord]
    raw += tr.finish()  # pending "world" is emitted and ended at the current step
    assert tr.finish() == []
    words = pair_rust_words(raw, tok)
    n = 2 + len(w) + 3
    assert as_tuples(words) == [("hello", (2 / 12.5, n / 12.5)), ("world", (n / 12.5, (n + len(v)) / 12.5))]
    shifted = pair_rust_words(raw, tok, shift=0.1)
    assert shifted[0].start == pytest.approx(2 / 12.5 - 0.1) and shifted[0].end == pytest.approx(n / 12.5 - 0.1)


def test_rust_rule_words_of_no_text_are_no_words_of_the_transcript(tok):
    """Tokens that decode to nothing (eos, bos, a lone "▁") between two boundaries make a server Word of text "": the
    transcript leaves it out, as the python rule does (it gave "hello  hello" and an empty SRT/VTT cue)."""
    w, blank = tok.encode("hello"), tok.piece_to_id("\u2581")
    assert tok.decode([blank]) == "" and tok.decode([2]) == ""
    tr = RustWordTracker(0)
    raw = [e for t in [0, *w, 3, 0, 2, 3, 3, 0, blank, 0] + [3] * 30 + [0, *w, 0] for e in tr.push(t)] + tr.finish()
    assert sum(isinstance(e, RawWord) for e in raw) == 4  # the server's events are kept as they are
    t = Transcript("x", pair_rust_words(raw, tok))
    assert [w.text for w in t.words] == ["hello", "hello"] and t.text == "hello hello"
    assert to_srt(t).count("hello") == 2 and "\n\n\n" not in to_srt(t) and "\n\n\n" not in to_vtt(t)
    assert [w.text for w in python_words([0, *w, 3, 0, 2, 3, 3, 0, *w, 0], tok, 0.0)] == ["hello", "hello"]


def test_default_asr_delay():
    assert default_asr_delay_in_tokens(0.5) == 6
    assert default_asr_delay_in_tokens(2.5) == 32  # not 31 (pitfall 20)


# ---- formats ----------------------------------------------------------------------------------------------------

WORDS = [TimedWord("Hello", 0.0, 0.4), TimedWord("world.", 0.5, 0.9), TimedWord("Next", 2.5, 2.8),
         TimedWord("one", 2.9, 3661.5)]


def test_segments():
    segs = make_segments(WORDS)
    assert [s.text for s in segs] == ["Hello world.", "Next one"]
    assert make_segments([TimedWord("a", 0, 1), TimedWord("b", 3, 4)])[1].start == 3  # pause > 1 s
    assert len(make_segments([TimedWord("abcd", i, i + 0.5) for i in range(40)], max_chars=20)) == 10
    assert make_segments([]) == []


def test_timestamps_format():
    assert format_timestamp(0.0) == "00:00.000"
    assert format_timestamp(3661.5, True, ",") == "01:01:01,500"
    assert format_timestamp(61.0004) == "01:01.000"
    assert format_timestamp(-1) == "00:00.000"


def test_writers(tmp_path):
    t = Transcript("clip", WORDS, duration=3700.0)
    paths = write_transcript(t, tmp_path / "out", "clip", FORMATS)
    got = {p.suffix[1:]: p.read_text() for p in paths}
    assert got["txt"] == "Hello world.\nNext one\n"
    assert got["srt"] == ("1\n00:00:00,000 --> 00:00:00,900\nHello world.\n\n"
                          "2\n00:00:02,500 --> 01:01:01,500\nNext one\n\n")
    assert got["vtt"] == ("WEBVTT\n\n00:00.000 --> 00:00.900\nHello world.\n\n"
                          "00:02.500 --> 01:01:01.500\nNext one\n\n")
    assert got["tsv"] == "start\tend\ttext\n0\t900\tHello world.\n2500\t3661500\tNext one\n"
    data = json.loads(got["json"])
    assert data["text"] == "Hello world. Next one"
    assert data["segments"][1]["words"][0] == {"word": "Next", "start": 2.5, "end": 2.8}
    assert len(data["words"]) == 4
    empty = Transcript("e", [])
    assert write_transcript(empty, tmp_path, "e", ["txt"])[0].read_text() == ""


def test_output_formats():
    assert output_formats("all") == FORMATS
    assert output_formats("srt,json") == ("srt", "json")
    assert output_formats("txt, srt,txt") == ("txt", "srt")  # each written once
    with pytest.raises(ValueError, match="unknown output format"):
        output_formats("docx")


def test_writers_keep_cues_valid_for_any_word_text(tmp_path):
    """Words with line breaks, `-->` (also inside `--->`), `&` and `<`: every SRT/VTT cue stays one timing line and
    one text line, VTT text is escaped markup (so `>` never ends a `-->`), TXT/TSV keep one line per segment; JSON
    keeps the text as it is."""
    import html
    import re

    words = [TimedWord("a--->b", 0.0, 0.5), TimedWord("x&<i>y", 0.5, 1.0), TimedWord("two\n\nlines", 1.0, 1.5),
             TimedWord("crlf\r\nend", 1.5, 2.0), TimedWord("été 日本", 2.0, 2.5)]
    t = Transcript("c", words)
    got = {p.suffix[1:]: p.read_text(encoding="utf-8") for p in write_transcript(t, tmp_path, "c", FORMATS)}
    for fmt in ("srt", "vtt"):
        cues = got[fmt].removeprefix("WEBVTT\n\n").split("\n\n")
        assert cues[-1] == "" and len(cues) == 2, got[fmt]  # one segment, one cue
        lines = cues[0].split("\n")
        text = lines[-1]
        assert len(lines) == (3 if fmt == "srt" else 2) and "-->" not in text and "\r" not in text, lines
    assert re.sub(r"&(amp|lt|gt);", "", got["vtt"].split("\n")[3]).count("&") == 0
    assert "<" not in got["vtt"].split("\n")[3] and html.unescape(got["vtt"].split("\n")[3]).startswith("a--->b x&<i>y")
    assert "été 日本" in got["srt"] and "été 日本" in got["vtt"]
    assert got["txt"].count("\n") == 1 and got["tsv"].count("\n") == 2
    assert json.loads(got["json"])["words"][2]["text"] == "two\n\nlines"


def test_segments_span_overlapping_words():
    """A segment's cue covers all its words: overlapping or out-of-order word times never give an end before the
    start (an invalid SRT/VTT cue) or cut a longer earlier word short."""
    t = Transcript("o", [TimedWord("late", 5.0, 6.0), TimedWord("early.", 3.0, 4.0)])
    assert to_srt(t) == "1\n00:00:03,000 --> 00:00:06,000\nlate early.\n\n"
    segs = make_segments([TimedWord("long", 5.0, 9.0), TimedWord("short", 5.5, 6.0), TimedWord("bad", 7.0, 6.5)])
    assert [(s.start, s.end) for s in segs] == [(5.0, 9.0)]


def test_timestamps_round_up_across_units():
    """Rounding to the millisecond carries into seconds, minutes and hours (never `00:00:60,000`)."""
    assert format_timestamp(59.9996, True, ",") == "00:01:00,000"
    assert format_timestamp(3599.9996, True, ",") == "01:00:00,000"
    assert format_timestamp(359999.9996) == "100:00:00.000"
    vtt = to_vtt(Transcript("h", [TimedWord("late", 3600.0, 3601.0)]))
    assert vtt.endswith("01:00:00.000 --> 01:00:01.000\nlate\n\n")
