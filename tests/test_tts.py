"""dsm.tts against moshi's TTSModel (test-only oracle) on a random tiny-tts checkpoint, greedy.

The checkpoint's LM weights are re-drawn at unit scale (N(0, 1/fan_in)) with the new-word and pad rows of the text
head amplified, so that greedy decoding samples new-word requests as well as pads and the argmaxes are far from
ties; the conditioners are random too so that the voice and the cfg value matter.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from dsm.checkpoint import resolve_checkpoint, write_random_checkpoint  # noqa: E402
from dsm.mimi_graph import mimi_buckets  # noqa: E402
from dsm.presets import preset_config  # noqa: E402
from dsm.tts import (  # noqa: E402
    PAD,
    Entry,
    StateMachine,
    TTSConfig,
    TTSInputError,
    TTSRuntime,
    VoiceError,
    random_voice,
    script_to_entries,
)

DIALOGUE = ["hello world, this is", "yes (it): <break time=\"0.4s\"/> fine", "ok"]
TEXT = "the quick brown fox jumps over the lazy dog"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    cfg = preset_config("tiny-tts")
    cfg["model_id"] = {"sig": "0000tiny", "epoch": 0}  # moshi's TTSModel needs it (voice suffix)
    d = write_random_checkpoint(cfg, tmp_path_factory.mktemp("tts") / "tiny-tts", dtype=torch.float32)
    f = d / cfg["moshi_name"]
    sd = load_file(f)
    g = torch.Generator().manual_seed(1)
    for k, v in sd.items():
        n = torch.randn(v.shape, generator=g)
        if v.dim() == 1:
            sd[k] = 1 + 0.1 * n
        else:
            emb = "emb" in k and "low_rank" not in k and "out" not in k
            sd[k] = n * (1.0 if emb else v.shape[-1] ** -0.5)
    sd["text_linear.weight"][[0, PAD]] *= 4
    save_file(sd, str(f))
    voice = random_voice(0)
    save_file({"speaker_wavs": voice}, str(d / "voice.safetensors"))
    other = random_voice(7)
    save_file({"speaker_wavs": other}, str(d / "other.safetensors"))
    return resolve_checkpoint(d)


@pytest.fixture(scope="session")
def moshi_tts(ckpt):
    from moshi.models import loaders
    from moshi.models.tts import TTSModel

    cache = {}

    def get(n_q: int):
        if n_q not in cache:
            info = loaders.CheckpointInfo.from_hf_repo(
                "unused/x", moshi_weights=str(ckpt.lm_weights), mimi_weights=str(ckpt.mimi_weights),
                tokenizer=str(ckpt.tokenizer), config_path=str(ckpt.config_path))
            cache[n_q] = TTSModel.from_checkpoint_info(info, n_q=n_q, temp=0, device="cpu", dtype=torch.float32)
        return cache[n_q]

    return get


def runtime(ckpt, audio=False, **kw) -> TTSRuntime:
    kw.setdefault("temp", 0.0)
    return TTSRuntime.from_checkpoint(ckpt, dtype=torch.float32, config=TTSConfig(**kw), audio=audio)


def speak(rt: TTSRuntime, turns: list[str], voice, cfg=2.0):
    s = rt.open_stream(voice, cfg=cfg)
    for i, t in enumerate(turns):
        if i:
            s.next_turn()
        s.push(t)
    s.end()
    rt.run([s])
    return s


def moshi_generate(tts, ckpt, turns, voices, cfg=2.0, padding_between=1):
    entries = [tts.prepare_script(t, padding_between=padding_between) for t in turns]
    cfgs = cfg if isinstance(cfg, list) else [cfg] * len(voices)
    attrs = [tts.make_condition_attributes([Path(ckpt.config_path.parent / v)], cfg_coef=c)
             for v, c in zip(voices, cfgs, strict=True)]
    return tts.generate(entries, attrs)


def assert_same_as_moshi(s, res, b: int, n_q: int):
    """Per-step (sampled, forced) text pairs, consumption times, transcript, end step and every frame."""
    n_log = min(len(s.machine.log), len(res.logged_text_tokens[b]))
    assert s.machine.log[:n_log] == res.logged_text_tokens[b][:n_log]
    assert s.machine.consumption_times == res.all_consumption_times[b]
    assert s.transcript == res.all_transcripts[b]
    assert s.end_step == res.end_steps[b]
    theirs = torch.stack([f[b, :, 0] for f in res.frames])
    n = s.end_step + 16 + 4 - 2  # moshi stops at max(end_step) + delay + final_padding steps, 2 frames less than us
    assert n >= 40 and len(s.frames) == n + 2
    ours = torch.stack(s.frames)[:n, : 1 + n_q]
    bad = (ours != theirs[:n]).nonzero()
    assert not len(bad), f"first mismatch (frame, stream) {bad[0].tolist()}"
    assert (ours[16:, 1:] >= 0).all() and (ours[:16, 1:] == -1).all()


# ---------------------------------------------------------------------------------------------------------------
# Entries and state machine, without a model
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_between", [0, 1])
def test_entries_match_moshi(ckpt, padding_between):
    from moshi.models.tts import TokenIds
    from moshi.models.tts import script_to_entries as moshi_entries
    from sentencepiece import SentencePieceProcessor

    from dsm.tokenizer import Tokenizer

    sp = SentencePieceProcessor(model_file=str(ckpt.tokenizer))
    tok = Tokenizer(ckpt.tokenizer)
    for script in (DIALOGUE, ["", "other speaker first", "main"], ["a <break time=\"1.5s\">b   c\td’e"], ["x"]):
        ref = moshi_entries(sp, TokenIds(201), 12.5, script, multi_speaker=True, padding_between=padding_between)
        ours = script_to_entries(tok, script, padding_between=padding_between)
        assert [(e.tokens, e.text, e.padding) for e in ours] == [(e.tokens, e.text, e.padding) for e in ref]


@pytest.mark.parametrize("lookahead", [0, 2])
def test_state_machine_matches_moshi(ckpt, lookahead):
    from moshi.models import tts as mt

    from dsm.tokenizer import Tokenizer

    entries = script_to_entries(Tokenizer(ckpt.tokenizer), DIALOGUE)
    entries.insert(3, Entry([], "\u200b", 1))  # a word without tokens: moshi leaves it out of the transcript
    ref_m = mt.StateMachine(mt.TokenIds(201), second_stream_ahead=lookahead, max_padding=5, initial_padding=2)
    ours_m = StateMachine(201, lookahead, max_padding=5, initial_padding=2)
    ref = ref_m.new_state([mt.Entry(e.tokens, e.text, e.padding) for e in entries])
    ours = ours_m.new_state(entries)
    g = torch.Generator().manual_seed(0)
    for step in range(120):
        token = int(torch.randint(0, 6, (1,), generator=g))
        assert ours_m.process(step, ours, token) == ref_m.process(step, ref, token), step
    assert ours.end_step == ref.end_step is not None
    assert ours.consumption_times == ref.consumption_times and ours.transcript == ref.transcript


def test_long_word_and_input_errors(ckpt):
    from dsm.tokenizer import Tokenizer

    tok = Tokenizer(ckpt.tokenizer)
    word = "abcdefghij" * 50
    with pytest.raises(TTSInputError, match=r"500 characters.*max_word_tokens=64"):
        script_to_entries(tok, [f"a {word} b"])
    entries = script_to_entries(tok, [word], max_word_tokens=10_000)  # defined behaviour when allowed: one entry
    assert len(entries) == 1 and entries[0].padding == len(entries[0].tokens)
    rt = runtime(ckpt, n_q=2)
    s = rt.open_stream(None)
    with pytest.raises(TTSInputError, match="max_word_tokens"):
        s.push(word)
    s.end()
    with pytest.raises(TTSInputError, match="after end"):
        s.push("more")


def test_empty_text(ckpt):
    rt = runtime(ckpt, n_q=2, max_batch=1)
    s = rt.open_stream(random_voice(0))
    s.push("   ")
    s.end()
    busy = rt.open_stream(random_voice(0))
    busy.push("one two three four")
    busy.end()
    assert rt.step() == 1  # the empty stream finished without a slot; the other one runs
    assert s.done and s.read().numel() == 0 and s.frames == [] and s.slot is None
    rt.run([busy])
    assert busy.done and not busy.truncated
    for text in ["   ", "()"]:  # no word left: no audio, and no error
        assert runtime(ckpt, n_q=2).synthesize(text).numel() == 0
        s = speak(runtime(ckpt, n_q=2), [text], random_voice(0))
        assert s.done and s.frames == [] and s.slot is None
    rt = runtime(ckpt, n_q=2)
    rt.open_stream(None).push("words that are never ended")  # holds the only slot
    with pytest.raises(RuntimeError, match=r"1 of the 1 slots hold a stream waiting for more text.*1 stream\(s\) wait"):
        rt.synthesize("hello")
    rt = runtime(ckpt, n_q=2, max_gen_length=10)  # defined stop for runaway streams
    s = speak(rt, [TEXT], random_voice(0))
    assert s.done and s.truncated and s.offset == 10 and s.end_step is None


def test_voice_errors(ckpt, tmp_path):
    rt = runtime(ckpt, n_q=2)
    bad = {
        "missing.safetensors": None,
        "garbage.safetensors": b"not a safetensors file at all",
        "notensor.safetensors": {"other": torch.zeros(1, 512, 125)},
        "shape.safetensors": {"speaker_wavs": torch.zeros(1, 512, 100)},
        "dtype.safetensors": {"speaker_wavs": torch.zeros(1, 512, 125, dtype=torch.float16)},
        "nan.safetensors": {"speaker_wavs": torch.zeros(1, 512, 125).index_fill_(2, torch.tensor([7]), float("nan"))},
    }
    for name, content in bad.items():
        p = tmp_path / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        elif content is not None:
            save_file(content, str(p))
        with pytest.raises(VoiceError, match=name):
            rt.open_stream(p)
    with pytest.raises(VoiceError, match=r"unknown voice 'no/such/voice.wav'.*kyutai/tts-voices"):
        rt.open_stream("no/such/voice.wav")  # offline: not in the hub cache
    with pytest.raises(VoiceError, match=f"^{tmp_path}: is a directory, not a voice file$"):
        rt.open_stream(tmp_path)  # was "voice file not found"
    with pytest.raises(VoiceError, match="^empty voice name ''$"):
        rt.open_stream("")  # `--voice ""` said ": is a directory, not a voice file"
    with pytest.raises(VoiceError, match=r"^voice 'aaa.*\.\.\.': not a usable path \(File name too long\)$"):
        rt.open_stream("a" * 300)  # an OSError traceback from `dsm speak --voice`
    voice_file = ckpt.config_path.parent / "voice.safetensors"
    for voice, kind in ((random_voice(0).numpy(), "ndarray"), ({"speaker_wavs": random_voice(0)}, "dict"),
                        ([voice_file, random_voice(0).numpy()], "ndarray in a list")):  # were iterated as voices
        with pytest.raises(VoiceError, match=f"a voice is a file path, a voice name or a torch tensor.*got {kind}$"):
            rt.open_stream(voice)
    with pytest.raises(VoiceError, match="shape"):
        rt.open_stream(torch.zeros(512, 125))
    with pytest.raises(VoiceError, match="NaN or infinite"):
        rt.open_stream(torch.full((1, 512, 125), float("inf")))
    with pytest.raises(ValueError, match="cfg"):
        rt.open_stream(random_voice(0), cfg=7.0)
    s = rt.open_stream(random_voice(0).requires_grad_())  # a tensor that needs grad used to fail at the step
    s.push("a")
    rt.step()
    assert not s.cancelled and s.slot is not None


# ---------------------------------------------------------------------------------------------------------------
# Parity with moshi's TTSModel.generate (greedy)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_q", "turns", "cfg"), [(8, [TEXT], 2.0), (32, DIALOGUE, 3.0)], ids=["mono", "dialogue"])
def test_greedy_parity_with_moshi(ckpt, moshi_tts, n_q, turns, cfg):
    s = speak(runtime(ckpt, n_q=n_q), turns, ckpt.config_path.parent / "voice.safetensors", cfg)
    res = moshi_generate(moshi_tts(n_q), ckpt, [turns], ["voice.safetensors"], cfg)
    assert any(sampled == 0 for sampled, _ in s.machine.log)  # the model requested words itself too
    if len(turns) > 1:
        firsts = [forced % 201 for _, forced in s.machine.log]
        assert 2 in firsts  # the other speaker's turn token reached the model
    assert_same_as_moshi(s, res, 0, n_q)


def test_batched_rows_join_and_leave(ckpt, moshi_tts):
    """Three streams on two slots, the second starting later and the third waiting for a free slot: every stream
    gets exactly moshi's batch-of-one result for its text and voice."""
    n_q = 4
    rt = runtime(ckpt, n_q=n_q, max_batch=2)
    d = ckpt.config_path.parent
    jobs = [(["one two three four five"], "voice.safetensors", 2.0),
            ([TEXT], "other.safetensors", 1.0),
            (["short one", "a reply"], "voice.safetensors", 3.0)]
    streams = []
    for i, (turns, voice, cfg) in enumerate(jobs):
        s = rt.open_stream(d / voice, cfg=cfg)
        streams.append(s)
        if i == 0:
            s.push(turns[0])
            s.end()
            for _ in range(7):
                rt.step()
            continue
        for j, t in enumerate(turns):
            if j:
                s.next_turn()
            s.push(t)
        s.end()
    assert streams[2].slot is None  # waits for a slot
    rt.run(streams)
    assert [s.slot for s in streams] == [None] * 3 and rt.slots == [None, None]  # finished rows free their slot
    tts = moshi_tts(n_q)
    res = moshi_generate(tts, ckpt, *([j[k] for j in jobs] for k in range(3)))  # one batch of three rows
    for b, s in enumerate(streams):
        assert_same_as_moshi(s, res, b, n_q)


def test_a_stream_waits_for_voice_pages_and_then_speaks_as_alone(ckpt):
    """A voice K/V pool with room for one voice page beside the shared padding: a stream with another voice waits
    (though slots are free) until the speaking one ends, then gives exactly its output alone; admission stays in
    order (the stream behind it waits too, though its voice is the speaker's); a stream that cannot fit even alone
    is refused clearly, by the runtime's constructor (a server's settings fail before its first client)."""
    d = ckpt.config_path.parent
    alone = {v: torch.stack(speak(runtime(ckpt, n_q=8), ["one two three"], d / v).frames)
             for v in ("voice.safetensors", "other.safetensors")}
    rt = runtime(ckpt, n_q=8, max_batch=3, condition_pages=1 + 4 + 1)
    first, other, same = (rt.open_stream(d / v) for v in ("voice.safetensors", "other.safetensors",
                                                           "voice.safetensors"))
    for s in (first, other, same):
        s.push("one two three")
        s.end()
    rt.step()
    assert first.slot is not None and other.slot is None and same.slot is None  # wait for a voice page, in order
    assert list(rt.waiting) == [other, same]
    rt.run([first, other, same])
    frames = {name: torch.stack(s.frames) for name, s in (("first", first), ("other", other), ("same", same))}
    assert torch.equal(frames["first"], alone["voice.safetensors"])
    assert torch.equal(frames["same"], alone["voice.safetensors"])
    assert torch.equal(frames["other"], alone["other.safetensors"])
    assert not torch.equal(alone["voice.safetensors"], alone["other.safetensors"])
    # a stream needs 5 pages (1 voice + 4 padding) and the pool holds the null page
    with pytest.raises(ValueError, match=r"condition_pages\) = 5 cannot hold one stream.*at least 6"):
        runtime(ckpt, n_q=8, max_batch=2, condition_pages=1 + 4)


def test_cancel_frees_the_slot_and_leaves_the_others_untouched(ckpt):
    """A stream cancelled mid-speech leaves its slot at once (the next waiting stream takes it); a waiting stream
    cancelled leaves the queue; the stream that keeps speaking gives exactly its output alone, and so does the one
    that took the freed slot."""
    d = ckpt.config_path.parent
    alone = [speak(runtime(ckpt, n_q=2), [t], d / "voice.safetensors").frames for t in (TEXT, "one two three")]
    rt = runtime(ckpt, n_q=2, max_batch=2)
    keep, doomed, queued, later = (rt.open_stream(d / "voice.safetensors") for _ in range(4))
    for s, text in ((keep, TEXT), (doomed, TEXT + " " + TEXT), (queued, "never spoken"), (later, "one two three")):
        s.push(text)
        s.end()
    for _ in range(25):
        rt.step()
    assert doomed.slot is not None and queued.slot is None and not doomed.done
    queued.cancel()
    doomed.cancel()
    doomed.cancel()  # twice: nothing more
    assert doomed.done and doomed.cancelled and doomed.slot is None and queued.done and queued.frames == []
    with pytest.raises(TTSInputError, match="cancelled"):
        doomed.push("more")
    n = len(doomed.frames)
    rt.run([keep, later])
    assert len(doomed.frames) == n and rt.slots == [None, None]
    assert torch.equal(torch.stack(keep.frames), torch.stack(alone[0]))
    assert torch.equal(torch.stack(later.frames), torch.stack(alone[1]))


def test_another_tokenizer_a_card_mimi_lacks_or_no_audio_delay_is_refused(ckpt, tmp_path):
    """Before any weight is read: a tokenizer larger or smaller than the text vocabulary (another model's: the
    smaller one loaded, and decoded through the wrong pieces), an audio card Mimi's codebooks do not have (a
    ValueError from Mimi after the whole LM had loaded, and an empty WAV left by `dsm speak`), a missing delay."""
    import json

    from dsm.checkpoint import CheckpointError, resolve_checkpoint
    from dsm.tokenizer import train_random_tokenizer

    src = ckpt.config_path.parent
    cfg = json.loads(ckpt.config_path.read_text())
    for f in src.iterdir():
        if f.name not in ("config.json", cfg["tokenizer_name"]):
            (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for size in (ckpt.config.lm.text_card + 50, ckpt.config.lm.text_card - 50):
        train_random_tokenizer(tmp_path / cfg["tokenizer_name"], size)
        with pytest.raises(CheckpointError, match=rf"tokenizer has {size} pieces but the model's text vocabulary is "
                                                  rf"{ckpt.config.lm.text_card} \(field 'text_card' of "):
            TTSRuntime.from_checkpoint(resolve_checkpoint(str(tmp_path)), dtype=torch.float32)
    train_random_tokenizer(tmp_path / cfg["tokenizer_name"], ckpt.config.lm.text_card)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "card": 4096}))
    with pytest.raises(CheckpointError, match=r"config.json: field 'card': 4096 audio tokens, but Mimi's codebooks"):
        TTSRuntime.from_checkpoint(resolve_checkpoint(str(tmp_path)), dtype=torch.float32)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # a tts_config without its delay (optional to the config parser) was a KeyError traceback in speak and serve-tts
    train_random_tokenizer(tmp_path / cfg["tokenizer_name"], ckpt.config.lm.text_card)
    del cfg["tts_config"]["audio_delay"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: field 'tts_config.audio_delay' is missing"):
        TTSRuntime.from_checkpoint(resolve_checkpoint(str(tmp_path)), dtype=torch.float32)


def test_the_default_dtype_follows_the_device(ckpt):
    """As STTRuntime.from_checkpoint and `dsm speak`: float32 on a CPU (it was bfloat16 everywhere)."""
    rt = TTSRuntime.from_checkpoint(ckpt, config=TTSConfig(n_q=2), audio=False)
    assert next(rt.model.parameters()).dtype == torch.float32


def test_config_refuses_bad_values():
    for bad in [{"temp": -1.0}, {"temp": float("nan")}, {"temp": float("inf")}, {"top_k": -1}, {"top_k_text": -5},
                {"max_break_s": float("nan")}, {"max_batch": 0}, {"max_gen_length": 0}, {"padding_between": -1},
                {"final_padding": 1.5}, {"interleaved_text_only": -1}, {"condition_pages": "6"},
                {"padding_bonus": float("nan")}, {"padding_bonus": float("-inf")}, {"padding_bonus": "1"},
                {"pcm_limit": 0}, {"pcm_limit": 1.5}, {"pcm_limit": float("nan")}]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            TTSConfig(**bad)


def test_pcm_is_clamped_to_the_configured_peak(ckpt):
    """moshi's TTSModel clips to [-1, 1], moshi-server clamps to [-0.99, 0.99] (DSM-SPEC §6.5): ``pcm_limit``, 0.99
    in dsm serve-tts (its clients got moshi's python peak)."""
    rt = runtime(ckpt, audio=True, n_q=2, pcm_limit=0.001)  # random weights peak near 0.004
    s = speak(rt, ["hello world"], ckpt.config_path.parent / "voice.safetensors")
    pcm = s.read()
    assert pcm.numel() and pcm.abs().max() == pytest.approx(0.001)


def test_break_cap(ckpt):
    """`<break time="Xs"/>` is honoured as asked by default (moshi's TTSModel); ``max_break_s`` caps it (the server
    uses moshi-server's 10 s, so one tag cannot hold a slot for hours)."""
    text = 'a <break time="99999s"/> b <break time="0.5s"/>'
    assert [e.padding for e in runtime(ckpt).open_stream(None).builder.add(text) if not e.tokens] == [1249988, 6]
    capped = runtime(ckpt, max_break_s=10.0).open_stream(None).builder.add(text)
    assert [e.padding for e in capped if not e.tokens] == [125, 6]


def test_server_text_rules(ckpt):
    """``text_rules="server"`` (dsm serve-tts) reads text as moshi-server's preprocessing (DSM-SPEC §6.2): en dashes
    dropped, only self-closing break tags, a break of X s is max(1, int(X * 12.5)) steps (none for 0 s), capped at
    10 s; words otherwise as moshi's python rules."""
    text = 'a \u2013 b <break time="0.6s"/> c <break time="0.6s"> d <break time="0s"/> e <break time="0.01s"/> ' \
           'f <break time="30s"/>'

    def entries(rules):
        rt = runtime(ckpt, max_break_s=10.0, text_rules=rules)
        return [(e.text, e.padding) if e.tokens else ("", e.padding) for e in rt.open_stream(None).builder.add(text)]

    python, server = entries("python"), entries("server")
    assert [w for w, _ in python if w] == ["a", "\u2013", "b", "c", "d", "e", "f"]
    assert [p for w, p in python if not w] == [8, 8, 0, 0, 125]  # round(7.5) = 8; round(0.125) = 0
    assert [w for w, _ in server if w] == ["a", "b", "c", '<break', 'time="0.6s">', "d", "e", "f"]
    assert [p for w, p in server if not w] == [7, 1, 125]  # int(7.5) = 7; 0 s: no break; max(1, int(0.125))
    words = ("a", "b", "c", "d", "e", "f")  # read alike by both
    assert [x for x in python if x[0] in words] == [x for x in server if x[0] in words]
    # moshi-server's Text messages name each break as a pseudo-word (DSM-SPEC §9.3): it ends the word before it
    rt = runtime(ckpt, max_break_s=10.0, text_rules="server")
    breaks = [e.text for e in rt.open_stream(None).builder.add(text) if not e.tokens]
    assert breaks == ['<break time="0.60s">', '<break time="0.01s">', '<break time="10.00s">']
    s = speak(runtime(ckpt, max_break_s=10.0, text_rules="server"), ['one <break time="0.5s"/> two'], None)
    assert [w for w, _ in s.transcript] == ["one", '<break time="0.50s">', "two"]
    assert [t for _, t in s.transcript] == sorted(t for _, t in s.transcript)
    assert speak(runtime(ckpt), ['one <break time="0.5s"/> two'], None).transcript[1][0] == "two"  # python: none
    with pytest.raises(ValueError, match="text_rules"):
        TTSConfig(text_rules="rust")


def test_warm_up_then_speak_equals_a_cold_runtime(ckpt, monkeypatch):
    """``warm_up`` (CUDA graphs stood in for by eager calls on a CPU) fills every bucket with throwaway streams under
    the default conditions and closes them; a stream spoken afterwards gets the frames of a fresh runtime."""

    class Eager:  # dsm.cuda_graphs.LazyGraph's interface, every call eager
        def __init__(self, fn, pool):
            self.fn = fn

        def replay(self):
            return self.fn()

    monkeypatch.setattr("dsm.engine.LazyGraph", Eager)

    def frames(warm: bool):
        rt = runtime(ckpt, n_q=4, max_batch=2)
        if warm:
            rt.stepper.engine.cuda_graphs = True
            rt.warm_up()
            assert rt.stepper.engine.num_open == 0 and rt.stepper.engine.pool.used == 0
        return torch.stack(speak(rt, ["one two three"], ckpt.config_path.parent / "voice.safetensors").frames)

    assert torch.equal(frames(True), frames(False))


@pytest.mark.parametrize("interleave", [0, 2])
def test_text_only_steps_interleave(ckpt, interleave):
    """While one stream produces audio and another is still text-only, up to `interleaved_text_only` steps run
    the text-only row alone (no depth transformer) between full steps; each stream's frames do not change."""
    d = ckpt.config_path.parent
    results = {}
    for mode in (interleave, 0):
        rt = runtime(ckpt, n_q=4, max_batch=2, interleaved_text_only=mode)
        calls = []
        step = rt.stepper.step

        def spy(active, text_only, *args, step=step, calls=calls):
            calls.append((tuple(active.nonzero()[:, 0].tolist()), text_only))
            return step(active, text_only, *args)

        rt.stepper.step = spy
        first = rt.open_stream(d / "voice.safetensors", cfg=2.0)
        first.push(TEXT)
        first.end()
        for _ in range(20):  # past delay_steps: `first` makes audio
            rt.step()
        second = rt.open_stream(d / "other.safetensors", cfg=1.0)
        second.push("one two three")
        second.end()
        rt.run([first, second])
        # `first` (slot 0) runs all along; steps of slot 1 alone are the interleaved text-only ones.
        results[mode] = ([torch.stack(s.frames) for s in (first, second)], [c == ((1,), True) for c in calls[20:]])
    frames, alone = results[interleave]
    assert all(torch.equal(a, b) for a, b in zip(frames, results[0][0], strict=True))
    streak = max((len(list(g)) for k, g in itertools.groupby(alone) if k), default=0)
    assert streak == interleave


def test_cli_speak_no_words(ckpt, tmp_path, monkeypatch, capsys):
    """Text with no word once normalised: a clear error, and no empty wav left behind."""
    from dsm.checkpoint import random_checkpoint_dir
    from dsm.cli import main

    monkeypatch.setenv("DSM_CACHE_DIR", str(tmp_path))
    cached = random_checkpoint_dir("tiny-tts")
    cached.parent.mkdir(parents=True)
    cached.symlink_to(ckpt.config_path.parent)
    assert main(["speak", "(:)", "-o", str(tmp_path / "y.wav"), "--preset", "tiny-tts", "--random-weights"]) == 1
    assert "no words to speak" in capsys.readouterr().err and not (tmp_path / "y.wav").exists()


def test_cli_speak_says_when_the_text_was_cut(ckpt, tmp_path, monkeypatch, capsys):
    """A text longer than max_gen_length steps: the audio so far is written, and the command says the rest was not
    spoken, exit 1, without -v (it said so only with -v, exit 0: a book's tail was lost silently)."""
    import functools

    import dsm.tts
    from dsm.checkpoint import random_checkpoint_dir
    from dsm.cli import main

    monkeypatch.setenv("DSM_CACHE_DIR", str(tmp_path))
    cached = random_checkpoint_dir("tiny-tts")
    cached.parent.mkdir(parents=True)
    cached.symlink_to(ckpt.config_path.parent)
    monkeypatch.setattr(dsm.tts, "TTSConfig", functools.partial(TTSConfig, max_gen_length=20))
    assert main(["speak", TEXT, "-o", str(tmp_path / "y.wav"), "--preset", "tiny-tts", "--random-weights",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err == ("dsm speak: error: stopped at max_gen_length=20 steps (2 s of audio): the rest of the text was not "
                   "spoken (split it)\n"), err
    assert (tmp_path / "y.wav").stat().st_size > 44


def test_word_by_word_equals_all_at_once(ckpt):
    voice = ckpt.config_path.parent / "voice.safetensors"
    ref = speak(runtime(ckpt, n_q=4), [TEXT], voice)
    rt = runtime(ckpt, n_q=4)
    s = rt.open_stream(voice)
    assert rt.pump() == 2 and s.offset == 2  # the two forced initial pads need no text
    words = TEXT.split()
    for i, w in enumerate(words):
        s.push(w)
        rt.pump()
        if i < 2:
            assert s.offset == 2  # lookahead 2: the first word may only be consumed once 3 words are known
        assert len(s.machine.consumption_times) <= i - 1 or i < 2
    s.end()
    rt.run([s])
    assert s.machine.log == ref.machine.log and s.machine.consumption_times == ref.machine.consumption_times
    assert torch.equal(torch.stack(s.frames), torch.stack(ref.frames))


# ---------------------------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------------------------


def test_pcm_matches_moshi_mimi(ckpt, moshi_tts):
    """Streaming Mimi per row: first PCM after 19 LM steps (handed over by the next call, once it has queued its own
    step), the first decoded frames equal moshi's Mimi decode of moshi's frames (frames 16...), clipped to
    [-1, 1]."""
    n_q, n_pcm = 8, 4
    rt = runtime(ckpt, audio=True, n_q=n_q)
    s = rt.open_stream(ckpt.config_path.parent / "voice.safetensors")
    s.push("hello world")
    s.end()
    chunks = []
    while len(chunks) < n_pcm:
        assert rt.step()
        pcm = s.read()
        if pcm.numel():
            assert pcm.numel() == 1920 and len(s.frames) == 17 + len(chunks)
            chunks.append(pcm)
    assert s.offset == 19 + n_pcm and s.time_to_first_audio is not None
    tts = moshi_tts(n_q)
    res = moshi_generate(tts, ckpt, [["hello world"]], ["voice.safetensors"])
    with torch.no_grad(), tts.mimi.streaming(1):
        ref = [tts.mimi.decode(f[:, 1:]).clamp(-1, 1)[0, 0] for f in res.frames[16 : 16 + n_pcm]]
    ours = torch.cat(chunks)
    assert ours.abs().max() <= 1
    torch.testing.assert_close(ours, torch.cat(ref), atol=2e-4, rtol=0)


def test_a_refused_push_changes_nothing(ckpt):
    """A push refused for one bad word (too long, or a malformed break tag) leaves the stream as it was: the next
    push still opens the turn with its speaker token, as on a fresh stream."""
    rt = runtime(ckpt, n_q=2)
    fresh, s = rt.open_stream(None), rt.open_stream(None)
    with pytest.raises(TTSInputError, match="max_word_tokens"):
        s.push("hello " + "abcdefghij" * 50)
    with pytest.raises(TTSInputError, match=r"bad break tag.*1x5s"):
        s.push('hello <break time="1x5s"/> world')
    assert s.push("hello world") == fresh.push("hello world") == 2
    assert s.machine.entries == fresh.machine.entries and s.machine.entries[0].tokens[0] == 1  # MAIN_SPEAKER


def test_bad_seeds_are_refused_at_open(ckpt):
    rt = runtime(ckpt, n_q=2, max_batch=2)
    for bad, err in ((2**63, ValueError), ("7", TypeError), (1.7, TypeError)):
        with pytest.raises(err, match="seed"):
            rt.open_stream(None, seed=bad)
        with pytest.raises(err, match="seed"):
            TTSConfig(seed=bad)
    assert not rt.waiting and rt.slots == [None, None]


def test_a_stream_callback_cannot_hurt_the_others(ckpt):
    """One stream's on_pcm cancels that stream, or raises: the step still gives every other stream its frame and its
    bookkeeping (the frame a raise used to cost them was already decoded, so it could not be recovered)."""
    voice = ckpt.config_path.parent / "voice.safetensors"
    rt = runtime(ckpt, audio=True, n_q=2)
    alone = rt.open_stream(voice)
    alone.push("hello world this is")
    alone.end()
    rt.run([alone])
    want = alone.read()
    def pair(mode):
        rt = runtime(ckpt, audio=True, n_q=2, max_batch=2)
        calls = []

        def on_pcm(pcm):
            calls.append(pcm.numel())
            if len(calls) == 2:
                if mode == "cancel":
                    a.cancel()
                else:
                    raise OSError("client went away")

        a, b = rt.open_stream(voice, on_pcm=on_pcm), rt.open_stream(voice)
        for s in (a, b):
            s.push("hello world this is")
            s.end()
        if mode == "raise":
            with pytest.raises(OSError, match="went away"):
                rt.run([a, b])
            a.cancel()
        rt.run([b])
        assert len(calls) == 2 and b.done and not b.cancelled
        return b

    for mode in ("cancel", "raise"):
        b = pair(mode)
        torch.testing.assert_close(b.read(), want)  # every frame (batch 2 vs 1 Mimi: float rounding only)


def test_a_call_from_another_thread_waits_for_the_step(ckpt):
    """The runtime's and its streams' calls hold the runtime's lock: a stream opened and fed from another thread
    while a step hands over its PCM joins after the step. It used to run inside it: two threads stepping at once lost
    a stream's audio, failed another's step (a slot of None) and took slots open from a step hook."""
    voice = ckpt.config_path.parent / "voice.safetensors"
    rt = runtime(ckpt, audio=True, n_q=2, max_batch=2)
    from another_thread import CallFromAnotherThread

    def open_and_push():
        late = rt.open_stream(voice)
        late.push("hello")
        late.end()
        return late

    other = CallFromAnotherThread(open_and_push)

    def on_pcm(pcm):
        if not other.started:
            other.start_inside_the_step()

    first = rt.open_stream(voice, on_pcm=on_pcm)
    first.push("hello world")
    first.end()
    rt.run([first])
    late = other.join()
    assert repr(late).startswith("TTSStream(") and "words=1, " in repr(late)
    rt.run([late])
    assert late.done and late.read().numel() and repr(rt) == (
        "TTSRuntime(streams 0/2 in slots, 0 waiting, n_q=2, device=cpu, audio=True)")


def test_pcm_with_fewer_streams_than_slots(ckpt):
    """One stream on a 4-slot runtime: the engine returns rows [0, bucket) while Mimi's state holds 4 rows; the
    PCM equals the 1-slot runtime's (it used to raise in Mimi's decode step, and `dsm serve-tts` hung)."""
    voice = ckpt.config_path.parent / "voice.safetensors"
    out = []
    for max_batch in (1, 4):
        rt = runtime(ckpt, audio=True, n_q=2, max_batch=max_batch)
        s = rt.open_stream(voice)
        s.push("hello world")
        s.end()
        rt.run([s])
        out.append(s.read())
    assert out[0].numel() > 0
    torch.testing.assert_close(out[1], out[0])


def test_frames_and_pcm_own_their_memory(ckpt):
    """A stream's frames and PCM chunks (kept by the stream, by a consumer's on_pcm, or read) hold their own bytes:
    as views of the step's batch, a long stream among 4 kept 4x its own bytes alive (256x among 256)."""
    voice = ckpt.config_path.parent / "voice.safetensors"
    rt = runtime(ckpt, audio=True, n_q=2, max_batch=4)
    chunks = []
    streams = [rt.open_stream(voice, on_pcm=chunks.append if i == 0 else None) for i in range(4)]
    for i, s in enumerate(streams):
        s.push("hello" + " a" * i)
        s.end()
    rt.run(streams)
    pcm = [c for s in streams[1:] for c in s.pending] + chunks
    owned = [t for s in streams for t in s.frames] + pcm
    assert len(chunks) > 1 and all(t.numel() for t in owned)
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in owned)
    assert all(t.shape == (1920,) and t.dtype == torch.float32 for t in pcm)
    frames = [t for s in streams for t in s.frames]
    assert len({t.shape for t in frames}) == 1 and frames[0].dim() == 1 and frames[0].dtype == torch.long


def test_mimi_decodes_the_rows_of_the_open_slots(ckpt, monkeypatch):
    """Mimi decodes the smallest bucket of rows that holds every slot with a stream, not every slot (buckets of 2
    and 4 rows here, as a large runtime's 128, 192, ...): one stream costs 2 rows, two more (slots 1 and 2) make it
    4, and 2 again as they end. The first stream's PCM equals its run alone throughout, bit for bit."""
    monkeypatch.setattr("dsm.tts.mimi_buckets", lambda n: mimi_buckets(n, smallest=2, step=2))
    voice = ckpt.config_path.parent / "voice.safetensors"
    text = "hello world this is a longer text that keeps going for a while yet"
    rt = runtime(ckpt, audio=True, n_q=2, max_batch=4)
    rows, step = [], rt._decode_step.step
    rt._decode_step.step = lambda codes, state: rows.append(codes.shape[0]) or step(codes, state)
    a = rt.open_stream(voice)
    a.push(text)
    a.end()
    while len(rows) < 3:
        assert rt.step()
    b, c = rt.open_stream(voice), rt.open_stream(voice)
    b.push("one")
    c.push("one two three four five")
    b.end()
    c.end()
    rt.run([a, b, c])
    assert b.read().numel() and c.read().numel()
    changes = [r for i, r in enumerate(rows) if i == 0 or rows[i - 1] != r]
    assert changes == [2, 4, 2], changes
    alone = runtime(ckpt, audio=True, n_q=2, max_batch=4)
    want = alone.open_stream(voice)
    want.push(text)
    want.end()
    alone.run([want])
    got, want = a.read(), want.read()
    assert want.numel() > 1920 * 10
    assert torch.equal(got, want)  # (on this CPU Mimi's rows give the same bits from 2 rows on)


def test_batch_invariant_pcm_is_the_same_bits_among_others(ckpt):
    """``TTSConfig.batch_invariant``: the LM and Mimi step every slot, so a stream's PCM is the same bits as alone
    while other streams join and end around it. (On this CPU the tiny model's PCM comes out the same without the
    flag too; the buckets' assertion is what fails without it. The STT test shows the flag's effect on the bits.)"""
    voice = ckpt.config_path.parent / "voice.safetensors"
    text = "hello world this is a longer text that keeps going"

    def make():
        return runtime(ckpt, audio=True, n_q=2, max_batch=3, batch_invariant=True)

    rt = make()
    assert rt.stepper.engine.buckets == (3,) and rt.mimi_buckets == (3,)
    a = rt.open_stream(voice)
    a.push(text)
    a.end()
    for _ in range(5):
        rt.step()
    b = rt.open_stream(voice)
    b.push("one two")
    b.end()
    rt.run([a, b])
    alone = make()
    want = alone.open_stream(voice)
    want.push(text)
    want.end()
    alone.run([want])
    got, want = a.read(), want.read()
    assert b.read().numel() and want.numel() > 1920 * 10 and torch.equal(got, want)


def test_a_frame_is_read_with_one_wait(ckpt, monkeypatch):
    """Mimi's decode is queued before the host reads the step's frame, so the frame and the PCM come back with one
    wait for the device (and the state machine's hook adds no wait of this kind: it reads the sampled tokens)."""
    from dsm.host_copies import HostReads

    voice = ckpt.config_path.parent / "voice.safetensors"
    waits, real = [], HostReads.wait
    monkeypatch.setattr(HostReads, "wait", lambda self: waits.append(len(self._copies)) or real(self))
    rt = runtime(ckpt, audio=True, n_q=2, max_batch=2)
    a, b = rt.open_stream(voice), rt.open_stream(voice, cfg=1.0)
    a.push("hello world")
    a.end()
    b.push("one two three four")
    b.end()
    steps = 0
    while rt.step():
        steps += 1
    assert len(waits) == steps
    assert set(waits) == {1, 2}  # the frame alone, or the frame and the PCM of the rows with audio
    assert waits.count(2) * 1920 >= max(a.read().numel(), b.read().numel()) > 0


@pytest.mark.gpu
def test_cuda_a_frame_waits_twice_at_most(ckpt):
    """On the GPU (engine graphs, real Mimi): a TTS frame with audio makes the host wait for the device at most
    twice: the state machine reads the sampled text tokens, and the runtime reads the frame and the PCM together
    (PyTorch may not count that explicit wait). It used to wait at about nine points: masks and forced tokens copied
    from pageable memory, the active rows found on the device, the range checks of both hooks' tokens, the frame and
    the PCM read apart."""
    from test_stt import cuda_syncs

    rt = TTSRuntime.from_checkpoint(ckpt, device="cuda", config=TTSConfig(n_q=2, max_batch=2, temp=0.0))
    rt.warm_up()
    s = rt.open_stream(ckpt.config_path.parent / "voice.safetensors")
    s.push("hello world one two three four five six seven eight nine ten")
    s.end()
    for _ in range(200):  # until audio comes (graphs captured on the way)
        rt.step()
        if s.read().numel():
            break
    rt.step()
    torch.cuda.synchronize()
    syncs = cuda_syncs(rt.step)
    assert s.read().numel() == 1920, "the timed step decoded no audio"
    assert len(syncs) <= 2, syncs


def test_a_steps_pcm_reaches_the_stream_at_the_next_call(ckpt):
    """A step's frame and PCM are handed over by the next call, after it has queued its own step (the host's work
    on them overlaps the device's); a call with nothing left to run hands the last ones over, and only then is the
    stream done. A cancel drops the PCM not handed over yet: no callback after it."""
    voice = ckpt.config_path.parent / "voice.safetensors"
    rt = runtime(ckpt, audio=True, n_q=2)
    s = rt.open_stream(voice)
    s.push("hello world")
    s.end()
    while not s.read().numel():
        assert rt.step()
    first_audio_at = s.offset  # the step that made it ran one call before
    assert len(s.frames) == s.offset - 1 - rt.model.cfg.max_delay
    assert rt.step() and s.read().numel() == 1920
    while rt.step():
        assert not s.done
        s.read()
    assert s.done and s.read().numel() == 1920  # the last step's PCM, handed over by the call that ran nothing
    assert first_audio_at == 1 + rt.delay_steps + rt.model.cfg.max_delay + 1

    calls = []
    c = rt.open_stream(voice, on_pcm=lambda pcm: calls.append(pcm.numel()))
    c.push("hello world")
    c.end()
    while not calls:
        assert rt.step()
    assert rt.step() and len(calls) == 2  # the step just queued has made PCM too
    c.cancel()
    assert rt.step() == 0 and len(calls) == 2 and c.done and c.cancelled


def test_cli_speak_random_weights(ckpt, tmp_path, monkeypatch, capsysbinary):
    """`dsm speak --preset tiny-tts --random-weights` reuses the cached checkpoint, streams raw float32 PCM."""
    import numpy as np

    from dsm.checkpoint import random_checkpoint_dir
    from dsm.cli import main

    monkeypatch.setenv("DSM_CACHE_DIR", str(tmp_path))
    cached = random_checkpoint_dir("tiny-tts")
    cached.parent.mkdir(parents=True)
    cached.symlink_to(ckpt.config_path.parent)
    assert main(["speak", "hi", "--raw", "--preset", "tiny-tts", "--random-weights", "--n-q", "2", "-v",
                 "--temp", "0"]) == 0
    out = capsysbinary.readouterr()
    pcm = np.frombuffer(out.out, dtype="<f4")
    assert len(pcm) > 0 and len(pcm) % 1920 == 0 and np.abs(pcm).max() <= 1
    assert b"time to first audio" in out.err
    assert main(["speak", "", "-o", str(tmp_path / "x.wav"), "--preset", "tiny-tts", "--random-weights"]) == 1
    assert b"no text" in capsysbinary.readouterr().err
    # flags: usage errors, exit 2 (they were 1, as a failed run)
    assert main(["speak", "hi", "-o", str(tmp_path / "x.mp3"), "--preset", "tiny-tts", "--random-weights"]) == 2
    assert b"writes WAV files" in capsysbinary.readouterr().err and not (tmp_path / "x.mp3").exists()
    with pytest.raises(SystemExit) as e:
        main(["speak", "hi", "-o", str(tmp_path / "x.wav"), "--temp", "nan", "--preset", "tiny-tts",
              "--random-weights"])
    assert e.value.code == 2
    assert b"argument --temp: expected a temperature >= 0 (0: greedy), got 'nan'" in capsysbinary.readouterr().err
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    assert main(["speak", str(binary), "-o", str(tmp_path / "x.wav"), "--preset", "tiny-tts", "--random-weights"]) == 1
    assert b"binary.txt: not UTF-8 text" in capsysbinary.readouterr().err


def test_speak_text_argument_or_file(tmp_path):
    from dsm.tts import _read_text

    long = "the quick brown fox jumps over the lazy dog " * 10  # longer than a file name may be (255 bytes)
    assert _read_text(long) == long
    f = tmp_path / "text.txt"
    f.write_text("h\u00e9llo w\u00f6rld", encoding="utf-8")
    assert _read_text(str(f)) == "h\u00e9llo w\u00f6rld"
    assert _read_text(str(tmp_path / "no-such-file.txt")).endswith("no-such-file.txt")  # spoken as it is
    if hasattr(os, "mkfifo"):  # `dsm speak <(cmd)`: a pipe's text, not its name /dev/fd/N
        import threading

        fifo = tmp_path / "pipe"
        os.mkfifo(fifo)
        writer = threading.Thread(target=fifo.write_text, args=("from a pipe",), daemon=True)
        writer.start()
        assert _read_text(str(fifo)) == "from a pipe"
        writer.join()


# ---------------------------------------------------------------------------------------------------------------
# Sampling and real CFG
# ---------------------------------------------------------------------------------------------------------------


def test_sampling_is_per_stream(ckpt):
    """temp 0.6 / top-k 250 / 25 (the defaults): a stream samples the same whatever its slot and neighbours."""
    voice = ckpt.config_path.parent / "voice.safetensors"
    alone = speak(runtime(ckpt, n_q=2, temp=0.6, max_batch=2), ["one two three four"], voice)
    rt = runtime(ckpt, n_q=2, temp=0.6, max_batch=2)
    other = rt.open_stream(voice, cfg=1.0, seed=3)
    other.push("something else entirely here")
    other.end()
    rt.step()
    s = speak(rt, ["one two three four"], voice)  # slot 1, next to `other`
    assert s.machine.log == alone.machine.log and torch.equal(torch.stack(s.frames), torch.stack(alone.frames))
    rt.run([other])
    assert other.machine.log[:20] != s.machine.log[:20]
    assert TTSConfig().temp == 0.6 and TTSConfig().top_k == 250 and TTSConfig().top_k_text == 25


def test_cli_speak_output_errors(ckpt, tmp_path, monkeypatch, capsys):
    from dsm.checkpoint import random_checkpoint_dir
    from dsm.cli import main

    monkeypatch.setenv("DSM_CACHE_DIR", str(tmp_path))
    cached = random_checkpoint_dir("tiny-tts")
    cached.parent.mkdir(parents=True)
    cached.symlink_to(ckpt.config_path.parent)
    model = ["--preset", "tiny-tts", "--random-weights"]
    assert main(["speak", "hi", "-o", str(tmp_path / "no" / "dir.wav"), *model]) == 1
    assert f"dir.wav: {tmp_path / 'no'} does not exist (a directory)" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["speak", "hi", "-o", str(tmp_path / "file" / "x.wav"), *model]) == 1  # said "does not exist"
    assert f"x.wav: {tmp_path / 'file'} is not a directory" in capsys.readouterr().err
    (tmp_path / "folder.wav").mkdir()
    assert main(["speak", "hi", "-o", str(tmp_path / "folder.wav"), *model]) == 1  # a directory
    assert "cannot write" in capsys.readouterr().err
    assert main(["speak", "hi", "--raw", "-o", str(tmp_path / "x.wav"), *model]) == 2  # a usage error
    assert "--raw writes to stdout" in capsys.readouterr().err
    assert main(["speak", "hi", *model]) == 2
    assert "give -o OUT.wav" in capsys.readouterr().err


def test_cli_speak_refuses_a_voice_the_checkpoint_cannot_take(ckpt, tmp_path, monkeypatch, capsys):
    """--voice with a checkpoint without voice conditioning was dropped without a word (the audio came out in no
    chosen voice)."""
    from dsm.checkpoint import random_checkpoint_dir
    from dsm.cli import main
    from dsm.tts import TTSRuntime

    monkeypatch.setenv("DSM_CACHE_DIR", str(tmp_path))
    cached = random_checkpoint_dir("tiny-tts")
    cached.parent.mkdir(parents=True)
    cached.symlink_to(ckpt.config_path.parent)
    build = TTSRuntime.from_checkpoint

    def no_voices(*args, **kwargs):  # as a checkpoint without a speaker_wavs conditioner loads
        rt = build(*args, **kwargs)
        rt.multi_speaker = False
        return rt

    monkeypatch.setattr(TTSRuntime, "from_checkpoint", no_voices)
    out = tmp_path / "x.wav"
    voice = str(ckpt.config_path.parent / "voice.safetensors")
    assert main(["speak", "hi", "-o", str(out), "--voice", voice, "--preset", "tiny-tts", "--random-weights"]) == 1
    assert f"--voice {voice}: this checkpoint takes no voice conditioning" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="session")
def ckpt_no_cfg(ckpt, tmp_path_factory):
    """The same weights without the distilled `cfg` conditioner: guidance by batch doubling."""
    import json

    d = tmp_path_factory.mktemp("tts_no_cfg")
    cfg = json.loads(ckpt.config_path.read_text())
    del cfg["conditioners"]["cfg"]
    cfg["fuser"]["sum"] = ["control"]
    (d / "config.json").write_text(json.dumps(cfg))
    sd = {k: v for k, v in load_file(ckpt.lm_weights).items() if ".conditioners.cfg." not in k}
    save_file(sd, str(d / cfg["moshi_name"]))
    for f in (ckpt.mimi_weights, ckpt.tokenizer, ckpt.config_path.parent / "voice.safetensors"):
        (d / f.name).symlink_to(f)
    return resolve_checkpoint(d)


def test_real_cfg_parity_with_moshi(ckpt, ckpt_no_cfg):
    from moshi.models import loaders
    from moshi.models.tts import TTSModel

    n_q, c = 4, ckpt_no_cfg
    voice = c.config_path.parent / "voice.safetensors"
    with pytest.raises(ValueError, match="CFG-distilled"):
        runtime(ckpt, cfg_coef=2.0)
    s = speak(runtime(c, n_q=n_q, cfg_coef=2.0), [TEXT], voice)
    info = loaders.CheckpointInfo.from_hf_repo("unused/x", moshi_weights=str(c.lm_weights),
                                               mimi_weights=str(c.mimi_weights), tokenizer=str(c.tokenizer),
                                               config_path=str(c.config_path))
    tts = TTSModel.from_checkpoint_info(info, n_q=n_q, temp=0, cfg_coef=2.0, device="cpu", dtype=torch.float32)
    attrs = tts.make_condition_attributes([voice], cfg_coef=None)
    del attrs.text["cfg"]
    res = tts.generate([tts.prepare_script([TEXT], padding_between=1)], [attrs])
    assert_same_as_moshi(s, res, 0, n_q)


# ---------------------------------------------------------------------------------------------------------------
# moshi-server compatible websocket (dsm serve-tts)
# ---------------------------------------------------------------------------------------------------------------


def _http_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def _tts_serve(rt, voice, client):
    import asyncio

    from dsm.server import TTS_PATH, TTSServer

    async def main():
        server = TTSServer(rt, voice=voice)
        async with await server.serve("127.0.0.1", 0) as ws_server:
            port = ws_server.sockets[0].getsockname()[1]
            return await client(f"ws://127.0.0.1:{port}{TTS_PATH}")

    return asyncio.run(main())


def test_websocket_audio_and_words_equal_the_python_api(ckpt):
    import msgpack
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    voice_file = ckpt.config_path.parent / "voice.safetensors"
    ref_rt = runtime(ckpt, audio=True, n_q=4)
    voice = ref_rt.voice_tensor(voice_file)
    ref = ref_rt.open_stream(voice)
    for w in TEXT.split():
        ref.push(w)
    ref.end()
    ref_rt.run([ref])
    ref_pcm = ref.read()

    async def client(url):
        hdr = {"kyutai-api-key": "public_token"}
        try:  # moshi-server's default format (Ogg/Opus) is refused clearly
            async with connect(url, additional_headers=hdr):
                pass
        except InvalidStatus as e:
            refused = (e.response.status_code, e.response.body.decode())
        msgs, raw = [], b""
        async with connect(url + "?format=PcmMessagePack", additional_headers=hdr) as ws:
            for w in TEXT.split():
                await ws.send(w)  # text frames, one word each, as the DSM client sends them
            await ws.send(msgpack.packb({"type": "Eos"}))
            async for m in ws:
                msgs.append(msgpack.unpackb(m))
        async with connect(url + "?format=Pcm&auth_id=public_token") as ws:
            await ws.send(msgpack.packb({"type": "Text", "text": TEXT}))
            # too late: ignored, as moshi-server does (it closed this raw-PCM connection, cutting the speech)
            await ws.send(msgpack.packb({"type": "Voice", "embeddings": [0.1] * 4, "shape": [1, 2, 2]}))
            await ws.send(b"\x00")
            async for m in ws:
                raw += m
        return refused, msgs, raw

    refused, msgs, raw = _tts_serve(runtime(ckpt, audio=True, n_q=4), voice, client)
    assert refused[0] == 400 and "PcmMessagePack" in refused[1]
    assert msgs[0] == {"type": "Ready"}
    audio = [m["pcm"] for m in msgs if m["type"] == "Audio"]
    assert audio and all(len(a) == 1920 for a in audio)
    assert torch.equal(torch.tensor(sum(audio, []), dtype=torch.float32), ref_pcm)
    # moshi-server's times: the steps done once the word's step is (its index + 1); a word stops where the next
    # starts, the last at the end of the stream
    words = [(m["text"], round(m["start_s"] * 12.5), round(m["stop_s"] * 12.5)) for m in msgs if m["type"] == "Text"]
    starts = [step + 1 for _, step in ref.transcript]
    assert len(words) == len(TEXT.split()) and len(starts) == len(words)
    assert words == [(w, a, b) for (w, _), a, b in zip(ref.transcript, starts, starts[1:] + [ref.offset], strict=True)]
    pcm = torch.frombuffer(bytearray(raw), dtype=torch.float32)
    assert torch.equal(pcm, ref_pcm)  # the whole text in one message: the same words, the same audio


def test_websocket_bad_voice_message_is_an_error_for_that_connection(ckpt):
    import msgpack
    from websockets.asyncio.client import connect

    async def client(url):
        async with connect(url + "?format=PcmMessagePack&auth_id=public_token") as ws:
            assert msgpack.unpackb(await ws.recv()) == {"type": "Ready"}
            await ws.send(msgpack.packb({"type": "Voice", "embeddings": [0.0] * 6, "shape": [1, 2, 3]}))
            err = msgpack.unpackb(await ws.recv())
            await ws.send(msgpack.packb({"type": "Eos"}))  # ended before any text: closes with no audio
            rest = [msgpack.unpackb(m) async for m in ws]
        return err, rest

    err, rest = _tts_serve(runtime(ckpt, audio=True, n_q=4), None, client)
    assert err["type"] == "Error" and "voice" in err["message"].lower(), err
    assert rest == []


def test_websocket_bounds_what_one_client_can_make_every_stream_wait_for(ckpt):
    """One client's input is bounded so that it cannot stall the others: a message over 1 MiB closes its connection
    (1009; 16 MiB Voice messages were each decoded on the model thread, ~0.65 s a message, while every stream
    waited). A refused text on a raw-PCM connection, which has no message to carry the error, closes it with 1008
    and the reason (the audio went on without the words); a text cut at max_gen_length says so (an Error, or the
    close's reason; it ended like a whole text)."""
    import asyncio
    import contextlib

    import msgpack
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    long_word = "".join(chr(97 + (i * 7) % 26) for i in range(900))

    async def client(url):
        url += "?auth_id=public_token&format="
        async with connect(url + "PcmMessagePack", max_size=None) as ws:
            await ws.recv()  # Ready
            await ws.send(msgpack.packb({"type": "Voice", "embeddings": [0.5] * 140000, "shape": [140000]}))
            try:
                await asyncio.wait_for(ws.recv(), 30)
            except ConnectionClosed:
                pass
            big = (ws.close_code, ws.close_reason)
        async with connect(url + "Pcm") as ws:
            await ws.send(msgpack.packb({"type": "Text", "text": f"hello {long_word} there"}))
            await ws.send(b"\x00")
            with contextlib.suppress(ConnectionClosed):  # not a normal close
                _ = [m async for m in ws]
            refused = (ws.close_code, ws.close_reason)
        closes = {}
        for fmt in ("PcmMessagePack", "Pcm"):
            async with connect(url + fmt) as ws:
                await ws.send(msgpack.packb({"type": "Text", "text": TEXT}))
                await ws.send(msgpack.packb({"type": "Eos"}))
                msgs = [m async for m in ws]
                errors = [msgpack.unpackb(m)["message"] for m in msgs if fmt == "PcmMessagePack"
                          and msgpack.unpackb(m)["type"] == "Error"]
                closes[fmt] = (ws.close_code, ws.close_reason, errors)
        return big, refused, closes

    big, refused, closes = _tts_serve(runtime(ckpt, audio=True, n_q=2, max_gen_length=20), None, client)
    assert big[0] == 1009, big
    assert refused[0] == 1008 and "TTSInputError: word 'ahovc" in refused[1] and "tokens long" in refused[1], refused
    why = "dsm: stopped at max_gen_length=20 steps; the rest of the text was not spoken"
    assert closes["PcmMessagePack"] == (1000, why, [why]), closes
    assert closes["Pcm"] == (1000, why, []), closes


def test_a_closing_connection_frees_its_slot_at_the_next_step(ckpt):
    """A client that stopped reading its audio and then closed: its close handshake waits behind the unsent audio
    (websockets' 10 s timeout), so the handler is not told yet; the model loop sees the connection closing and
    cancels its stream, freeing the slot, and builds no more audio for it."""
    import types

    from websockets.protocol import State

    from dsm.server import TTSServer, _TTSConnection

    rt = runtime(ckpt, n_q=2, max_batch=2)
    server = TTSServer.__new__(TTSServer)  # only the runtime and the connections are used
    server.rt, server.connections, server.cfg = rt, {}, 2.0
    socks = {}
    for name in ("leaving", "staying"):
        conn = _TTSConnection("PcmMessagePack", None)
        server._open(conn).push(TEXT)
        socks[name] = types.SimpleNamespace(state=State.OPEN)
        server.connections[conn] = types.SimpleNamespace(ws=socks[name])
    for _ in range(3):
        rt.step()
    assert all(s is not None for s in rt.slots)
    socks["leaving"].state = State.CLOSING
    server._outgoing()
    rt.step()  # the cancelled stream's slot is handed back at the next step
    assert sum(s is None for s in rt.slots) == 1 and len(server.connections) == 1
    assert next(iter(server.connections)).stream.slot is not None


def test_websocket_disconnect_frees_the_slot(ckpt):
    """A client that leaves mid-speech gives its slot back at once: the next client, on a one-slot runtime, gets
    the same audio as the python API, without waiting for the abandoned text (and its long break) to be spoken."""
    import asyncio

    import msgpack
    from websockets.asyncio.client import connect

    ref_rt = runtime(ckpt, audio=True, n_q=2)
    ref = ref_rt.open_stream(None)
    ref.push("one two three")
    ref.end()
    ref_rt.run([ref])
    rt = runtime(ckpt, audio=True, n_q=2, max_break_s=10.0)

    async def client(url):
        url += "?format=PcmMessagePack&auth_id=public_token"
        async with connect(url) as ws:
            await ws.recv()  # Ready
            await ws.send(msgpack.packb({"type": "Text", "text": (TEXT + ' <break time="10s"/> ') * 20}))  # 3k steps
            await ws.send(msgpack.packb({"type": "Eos"}))
            for _ in range(3):
                await ws.recv()  # speech has started
        for _ in range(100):  # the server notices the close
            if all(s is None for s in rt.slots):
                break
            await asyncio.sleep(0.01)
        freed = all(s is None for s in rt.slots)
        async with connect(url) as ws:
            await ws.send(msgpack.packb({"type": "Text", "text": "one two three"}))
            await ws.send(msgpack.packb({"type": "Eos"}))
            msgs = [msgpack.unpackb(m) async for m in ws]
        return freed, msgs

    freed, msgs = _tts_serve(rt, None, client)
    assert freed
    audio = [m["pcm"] for m in msgs if m["type"] == "Audio"]
    assert torch.equal(torch.tensor(sum(audio, []), dtype=torch.float32), ref.read())


def test_websocket_model_failure_closes_the_connection(ckpt):
    """A step that raises must not kill the serving loop silently (clients used to wait forever): the connection is
    closed with 1011, and the server serves the next client."""
    import msgpack
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosedError

    rt = runtime(ckpt, audio=True, n_q=2)
    real_step, calls = rt.step, []

    def failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_step()

    rt.step = failing_once

    async def client(url):
        url += "?format=PcmMessagePack&auth_id=public_token"
        codes = []
        for _ in range(2):
            try:
                async with connect(url) as ws:
                    await ws.send(msgpack.packb({"type": "Text", "text": "one two"}))
                    await ws.send(msgpack.packb({"type": "Eos"}))
                    msgs = [msgpack.unpackb(m) async for m in ws]
                codes.append(("closed", sum(m["type"] == "Audio" for m in msgs)))
            except ConnectionClosedError as e:
                codes.append((e.rcvd.code, e.rcvd.reason))
        return codes

    first, second = _tts_serve(rt, None, client)
    assert first[0] == 1011 and "model step failed" in first[1]
    assert second[0] == "closed" and second[1] > 0


def test_websocket_queued_stream_starts_when_a_holder_disconnects(ckpt):
    """One slot, held by a client that sent text without Eos; a second client's stream waits in the queue. When the
    holder leaves, the queued stream starts at once (the disconnect used to free the slot without waking the model
    loop, so it waited for some other client's message)."""
    import asyncio

    import msgpack
    from websockets.asyncio.client import connect

    rt = runtime(ckpt, audio=True, n_q=2)

    async def client(url):
        url += "?format=PcmMessagePack&auth_id=public_token"
        holder = await connect(url)
        await holder.recv()  # Ready
        await holder.send(msgpack.packb({"type": "Text", "text": "one"}))  # no Eos: it keeps its slot
        async with connect(url) as ws:
            await ws.recv()
            await ws.send(msgpack.packb({"type": "Text", "text": "one two"}))
            await ws.send(msgpack.packb({"type": "Eos"}))
            await asyncio.sleep(0.5)
            assert rt.waiting  # queued behind the holder
            base = url.split("/api/")[0].replace("ws://", "http://")
            info = await asyncio.to_thread(_http_get, base + "/api/modules_info")
            metrics = await asyncio.to_thread(_http_get, base + "/metrics")
            holder.transport.abort()
            return await asyncio.wait_for(ws.recv(), 10), info, metrics  # its first Text or Audio message

    first, info, metrics = _tts_serve(rt, None, client)
    assert msgpack.unpackb(first)["type"] in ("Text", "Audio")
    assert json.loads(info) == [{"type": "py", "path": "/api/tts_streaming", "used_slots": "1", "total_slots": "1",
                                 "queued": "1"}]  # fmt: skip
    assert "tts_open_channels 2.0" in metrics and "tts_connect_total 2.0" in metrics
    assert "tts_queued_streams 1.0" in metrics
    # the holder's voice (the learnt padding in all 5 slots: no voice) in 5 pages of a pool sized for 5 a slot
    assert "tts_voice_pages_used 5.0" in metrics and "tts_voice_pages_total 5.0" in metrics
    assert "tts_voice_pages_cached 0.0" in metrics


def test_websocket_input_checks_and_voice_names(ckpt, monkeypatch, capsys):
    """Message fields of the wrong type are an Error for that connection; ?voice= takes voice-repository names only
    (a client must not make the server open local files or other repositories); `dsm serve-tts` with random weights
    starts (its default voice is a tensor)."""
    import asyncio
    import types

    import msgpack
    from websockets.asyncio.client import connect

    import dsm.server as server_mod
    from dsm.server import TTSServer

    async def client(url):
        async with connect(url + "?format=PcmMessagePack&auth_id=public_token") as ws:
            await ws.recv()
            replies = []
            for msg in ({"type": "Text", "text": None}, {"type": "Voice", "embeddings": [0.0], "shape": [2**62, 2]},
                        {"type": "Voice", "embeddings": [0.0], "shape": [True]},  # a bool is no size
                        {"type": "Voice", "embeddings": ["a", "b"], "shape": [2]}, b"\xc1", b"hello"):
                await ws.send(msg if isinstance(msg, bytes) else msgpack.packb(msg))
                replies.append(msgpack.unpackb(await ws.recv()))
            return replies

    replies = _tts_serve(runtime(ckpt, n_q=2), None, client)
    assert [r["type"] for r in replies] == ["Error"] * 6
    messages = [r["message"] for r in replies]
    assert "Text.text must be a string" in messages[0] and "shape" in messages[1] and "shape" in messages[2]
    assert messages[3] == "Voice.embeddings must be a list of numbers, got <U1 values", messages
    assert messages[4] == "not a MessagePack message (FormatError)", messages  # as the ASR server says it
    assert messages[5].startswith("not a MessagePack message (ExtraData"), messages

    from dsm.tts import VoiceError, resolve_voice

    local = str(ckpt.config_path.parent / "voice.safetensors")  # exists: a local file a client must not get
    for name in (local, "/etc/passwd", "../../etc/passwd", "hf://someone/repo/v.safetensors", "a\\..\\b",
                 "v.safetensors"):
        with pytest.raises(VoiceError, match="only voice names"):
            resolve_voice(name, local_files=False)
    srv = TTSServer(runtime(ckpt, n_q=2), voice="default")
    assert srv._voice(local) is None and asyncio.run(srv._query_voice(local)) == "default"
    asked = []  # a repository name goes on to be resolved, with local files off
    srv.rt = types.SimpleNamespace(voice_tensor=lambda name, local_files=True: asked.append((name, local_files)) or 1)
    assert srv._voice("expresso/ex01") == 1 and asked == [("expresso/ex01", False)]

    import argparse

    started = []
    p = argparse.ArgumentParser()
    server_mod.setup_serve_tts_parser(p)
    args = p.parse_args(["--preset", "tiny-tts", "--random-weights", "--device", "cpu", "--batch-size", "1"])
    monkeypatch.setattr(server_mod, "_run", lambda endpoint, host, port, what: started.append(endpoint) or 0)
    assert args.func(args) == 0
    assert isinstance(started[0], TTSServer) and started[0].default_voice is not None
    # settings the clients would find out one by one are refused at startup, in one line (no traceback)
    for flags, expected in ((["--cfg", "7"], "supports cfg in"), (["--condition-pages", "1"], "pages"),
                            (["--voice", "nothere.safetensors"], "not found")):
        capsys.readouterr()
        args = p.parse_args(["--preset", "tiny-tts", "--random-weights", "--device", "cpu", *flags])
        assert args.func(args) == 1, flags
        err = capsys.readouterr().err
        assert err.startswith("dsm serve-tts: error:") and expected in err and "Traceback" not in err, (flags, err)
    assert len(started) == 1
    for flags in (["--batch-size", "0"], ["--port", "99999"], ["--temp", "-1"], ["--temp", "inf"]):
        with pytest.raises(SystemExit):
            p.parse_args(flags)


def test_cli_speak_stdout_and_write_failures(ckpt, tmp_path, monkeypatch, capsys):
    """Raw PCM to a closed pipe (`| head -c N`), to a closed stdout, or a WAV on a full disk: one line and exit 1,
    not a BrokenPipeError / AttributeError / OSError traceback."""
    import errno
    import io
    import sys

    from dsm.checkpoint import random_checkpoint_dir
    from dsm.cli import main

    monkeypatch.setenv("DSM_CACHE_DIR", str(tmp_path))
    cached = random_checkpoint_dir("tiny-tts")
    cached.parent.mkdir(parents=True)
    cached.symlink_to(ckpt.config_path.parent)
    model = ["--preset", "tiny-tts", "--random-weights", "--n-q", "2", "--no-progress"]

    class Failing(io.RawIOBase):
        def __init__(self, exc):
            self.exc = exc

        def writable(self):
            return True

        def write(self, b):
            raise self.exc

    for exc, msg in ((BrokenPipeError(errno.EPIPE, "Broken pipe"), "stdout was closed before all the audio"),
                     (OSError(errno.ENOSPC, "No space left on device"), "stdout: cannot write (No space left")):
        monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(Failing(exc)))
        assert main(["speak", "hello world", "--raw", *model]) == 1
        assert msg in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["speak", "hello world", "-o", "-", *model]) == 1
    assert "stdout, which is closed" in capsys.readouterr().err
    monkeypatch.undo()
    if Path("/dev/full").exists():
        (tmp_path / "full.wav").symlink_to("/dev/full")
        monkeypatch.setenv("DSM_CACHE_DIR", str(tmp_path))
        assert main(["speak", "hello world", "-o", str(tmp_path / "full.wav"), *model]) == 1
        assert f"{tmp_path / 'full.wav'}: cannot write (No space left on device)" in capsys.readouterr().err


def test_speak_text_from_stdin(monkeypatch):
    """`dsm speak -`: stdin bytes decoded strictly (undecodable bytes used to reach the tokenizer as surrogates and
    fail there with a RuntimeError traceback); a closed stdin is a clear error, not an AttributeError."""
    import io
    import sys

    from dsm.tts import TTSInputError, _read_text

    stdin = io.TextIOWrapper(io.BytesIO("h\u00e9llo\n".encode()), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert _read_text("-") == "h\u00e9llo\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ab\xff\xfe"), errors="surrogateescape"))
    with pytest.raises(TTSInputError, match="stdin: not UTF-8 text"):
        _read_text("-")
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(TTSInputError, match="stdin is closed"):
        _read_text("-")


def test_an_abandoned_speak_frees_its_slot(ckpt):
    """A caller that stops reading speak() (closes the generator after the first chunk) cancels its stream: the slot
    was left generating the whole text for no one, ahead of every stream waiting for it."""
    voice = ckpt.config_path.parent / "voice.safetensors"
    rt = runtime(ckpt, audio=True, n_q=2, max_batch=1)
    chunks = rt.speak("hello world " * 20, voice)
    assert next(chunks).numel()
    chunks.close()
    assert rt.slots == [None] and not rt.waiting


def test_unspeakable_text_is_an_input_error(ckpt):
    """A break too long for a float (`1e400s`: the tag's pattern, moshi's, lets any character follow the first digits)
    and text that is not valid Unicode (lone surrogates, which is what Python makes of non-UTF-8 bytes in argv) are
    TTSInputErrors, not an OverflowError or the tokenizer binding's RuntimeError; the refused push changes nothing."""
    s = runtime(ckpt, n_q=2).open_stream(None)
    with pytest.raises(TTSInputError, match="bad break tag"):
        s.push('a <break time="1e400s"/> b')
    with pytest.raises(TTSInputError, match="not valid Unicode"):
        s.push("a \udcff b")
    assert s.push("a b") == 2 and s.machine.entries[0].tokens[0] == 1  # the speaker token was not eaten
    capped = runtime(ckpt, max_break_s=10.0).open_stream(None).builder.add('<break time="1e400s"/>')
    assert [e.padding for e in capped] == [125]  # capped: as long as the server allows


def test_push_takes_text_only(ckpt):
    s = runtime(ckpt).open_stream(None)
    for bad in (None, 3, b"bytes"):
        with pytest.raises(TTSInputError, match="push takes text"):
            s.push(bad)


def test_websocket_text_limits_keep_the_model_thread_free(ckpt, monkeypatch):
    """Text is split and tokenized on the model thread, so a huge text would stall every stream's step: a message
    over MAX_TEXT_CHARS, or text while the stream holds MAX_PENDING_WORDS unspoken words, is an Error for that
    connection naming the limit; the words already taken are still spoken."""
    import msgpack
    from websockets.asyncio.client import connect

    import dsm.server as server_mod

    monkeypatch.setattr(server_mod, "MAX_PENDING_WORDS", 4)

    async def client(url):
        async with connect(url + "?format=PcmMessagePack&auth_id=public_token") as ws:
            await ws.recv()  # Ready
            await ws.send(msgpack.packb({"type": "Text", "text": "a" * (server_mod.MAX_TEXT_CHARS + 1)}))
            too_long = msgpack.unpackb(await ws.recv())
            await ws.send(msgpack.packb({"type": "Text", "text": "one two three four five"}))
            await ws.send(msgpack.packb({"type": "Text", "text": "six"}))
            await ws.send(msgpack.packb({"type": "Eos"}))
            msgs = [msgpack.unpackb(m) async for m in ws]
        return too_long, msgs

    too_long, msgs = _tts_serve(runtime(ckpt, audio=True, n_q=2), None, client)
    assert too_long["type"] == "Error" and "32769 characters" in too_long["message"], too_long
    assert str(server_mod.MAX_TEXT_CHARS) in too_long["message"]
    errors = [m["message"] for m in msgs if m["type"] == "Error"]
    assert len(errors) == 1 and "5 words not yet spoken" in errors[0] and "limit is 4" in errors[0], errors
    assert [m["text"] for m in msgs if m["type"] == "Text"] == ["one", "two", "three", "four", "five"]
    assert sum(m["type"] == "Audio" for m in msgs) > 0


def test_voice_lookups_are_bounded_and_never_delay_a_connection_without_one(ckpt, monkeypatch):
    """?voice= lookups may take ~20 s (a hub download; offline, its retries): at most VOICE_LOOKUPS run at once (the
    default executor's other threads stay free), a connection naming no voice never waits, and a name that failed
    is not looked up again for VOICE_RETRY_S."""
    import asyncio
    import time

    import dsm.server as server_mod
    from dsm.server import TTSServer

    srv = TTSServer(runtime(ckpt, n_q=2), voice="default")
    running, peak, looked_up, lock = [0], [0], [], threading.Lock()

    def slow_voice_tensor(name, local_files=True):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            looked_up.append(name)
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        if name.startswith("bad"):
            raise FileNotFoundError(name)
        return name.upper()

    srv.rt = type("Rt", (), {"voice_tensor": staticmethod(slow_voice_tensor)})()

    async def main():
        lookups = [asyncio.create_task(srv._query_voice(f"v{i}")) for i in range(5)]
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        none = await srv._query_voice("")
        waited = time.perf_counter() - t0
        got = await asyncio.gather(*lookups)
        bad = [await srv._query_voice("bad"), await srv._query_voice("bad")]
        return none, waited, got, bad

    none, waited, got, bad = asyncio.run(main())
    assert none == "default" and waited < 0.15, waited  # not behind the lookups (0.2 s), on a busy runner too
    assert got == ["V0", "V1", "V2", "V3", "V4"] and peak[0] == server_mod.VOICE_LOOKUPS
    assert bad == ["default", "default"] and looked_up.count("bad") == 1  # the failure is remembered
    monkeypatch.setattr(server_mod, "VOICE_RETRY_S", 0.0)
    assert asyncio.run(srv._query_voice("bad")) == "default" and looked_up.count("bad") == 2


def test_a_connection_whose_stream_failed_to_open_opens_no_other(ckpt):
    """Its first open failed, so it is being closed (1011): its later messages used to open a stream (and take a
    slot) whose output was dropped behind the close."""
    from dsm.server import TTSServer, _TTSConnection

    rt = runtime(ckpt, n_q=2)
    srv = TTSServer(rt)
    calls = []
    real = rt.open_stream

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected open failure")
        return real(*a, **kw)

    rt.open_stream = flaky
    conn = _TTSConnection("PcmMessagePack", None)
    with pytest.raises(RuntimeError, match="injected"):
        srv._open(conn)
    with pytest.raises(RuntimeError, match="no stream could be opened"):
        srv._open(conn)
    assert len(calls) == 1 and conn.stream is None and rt.slots == [None]
