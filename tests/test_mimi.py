"""Mimi parity with the moshi oracle (same random checkpoint file), streaming semantics and loading errors.

Codes must match moshi exactly (fp32 CPU, same mode) on these inputs; PCM within 1e-4 relative (in practice ~1e-8 or
exact). Exact equality holds away from fp32 near-ties only: where an RVQ level's two nearest entries are ~1e-6
apart relative (seen once, on the first 3 s of arctic_a0007 with another seed), any rounding flips the code, and
moshi's own streaming and offline encodes then disagree as well.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsm.checkpoint import resolve_checkpoint
from dsm.mimi import (
    FRAME_SIZE,
    FrameBuffer,
    Mimi,
    MimiCheckpointError,
    check_mimi_state_dict,
    mimi_tensor_shapes,
)

SPEECH = Path("/work/shared/testdata/speech/arctic_a0007.wav")
STREAM_FRAMES = 130  # 10.4 s: 260 encoder tokens, past the 250-slot ring wrap-around (DSM-SPEC §2.6)
PCM_RTOL = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def signals(n_frames: int, seed: int = 0) -> torch.Tensor:
    """Three varied rows ``[3, 1, n_frames * 1920]``: speech-like harmonics, noise bursts, silence + clipping."""
    g = torch.Generator().manual_seed(seed)
    n = n_frames * FRAME_SIZE
    t = torch.arange(n, dtype=torch.float64) / 24000
    f0 = 140 + 60 * torch.sin(2 * math.pi * 0.7 * t)  # gliding pitch
    phase = 2 * math.pi * torch.cumsum(f0, 0) / 24000
    voiced = sum(torch.sin(k * phase) / k for k in range(1, 12))
    syllables = (torch.sin(2 * math.pi * 3.3 * t).clamp_min(0)) ** 2
    speech = 0.25 * voiced * syllables + 0.003 * torch.randn(n, generator=g, dtype=torch.float64)
    bursts = (torch.rand(n // 4800 + 1, generator=g) > 0.5).repeat_interleave(4800)[:n]
    noise = 0.3 * torch.randn(n, generator=g, dtype=torch.float64) * bursts
    clipped = (1.8 * torch.sin(2 * math.pi * 440 * t)).clamp(-1, 1)
    third = clipped * (t > t[-1] / 3)  # silence, then a hard-clipped tone
    return torch.stack([speech, noise, third]).float()[:, None]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    """One intra-op thread by default: these steps are many small ops, and on a shared 2-core runner OpenMP
    spin-waits made 2 threads 2-7x slower than 1 (measured). ``DSM_MIMI_TEST_THREADS`` overrides."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("DSM_MIMI_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tiny_stt_ckpt) -> Path:
    """``save_random_mimi(seed=0)``'s file: the one in conftest's tiny-stt checkpoint (written once per session)."""
    return resolve_checkpoint(tiny_stt_ckpt).mimi_weights


@pytest.fixture(scope="module")
def ours(ckpt) -> Mimi:
    return Mimi.from_file(ckpt)


@pytest.fixture(scope="module")
def ref(ckpt):
    loaders = pytest.importorskip("moshi.models.loaders")
    return loaders.get_mimi(str(ckpt), device="cpu", num_codebooks=32)


@pytest.fixture(scope="module")
def long_pcm() -> torch.Tensor:
    """3 rows x 10.4 s: the 250-token context limit is reached (offline) and the ring wraps (streaming)."""
    return signals(STREAM_FRAMES, seed=1)


@pytest.fixture(scope="module")
def long_offline_codes(ours, long_pcm) -> torch.Tensor:
    """Our whole-file codes of ``long_pcm``: checked against moshi's by the offline parity test, against our own
    streaming codes by the streaming one (one encode of 130 frames x 3 rows for both)."""
    with torch.no_grad():
        return ours.encode(long_pcm)


def ref_stream(ref, pcm: torch.Tensor, codes_in: torch.Tensor | None = None):
    """moshi streaming, one 1920-sample frame per call; decodes ``codes_in`` (default: its own codes)."""
    b, n = pcm.shape[0], pcm.shape[-1] // FRAME_SIZE
    codes, out = [], []
    with torch.no_grad(), ref.streaming(b):
        for i in range(n):
            codes.append(ref.encode(pcm[..., i * FRAME_SIZE : (i + 1) * FRAME_SIZE]))
            c = codes[-1] if codes_in is None else codes_in[..., i : i + 1]
            out.append(ref.decode(c))
    return torch.cat(codes, -1), torch.cat(out, -1)


def our_stream(mimi: Mimi, pcm: torch.Tensor, codes_in: torch.Tensor, frames_per_call: int = 1):
    state = mimi.init_state(pcm.shape[0])
    codes, out = [], []
    step = frames_per_call * FRAME_SIZE
    with torch.no_grad():
        for i in range(0, pcm.shape[-1], step):
            codes.append(mimi.encode_step(pcm[..., i : i + step], state))
            k = i // FRAME_SIZE
            out.append(mimi.decode_step(codes_in[..., k : k + frames_per_call], state))
    return torch.cat(codes, -1), torch.cat(out, -1)


def test_random_checkpoint_layout_and_varied_codes(ckpt, ours, mimi_sd):
    sd = mimi_sd  # conftest's random_mimi_state_dict(0): built apart from the file's, so this checks determinism
    shapes = mimi_tensor_shapes()
    assert len(sd) == len(shapes) == 318
    assert all(tuple(sd[k].shape) == s and sd[k].dtype == torch.float32 for k, s in shapes.items())
    assert all(bool((v > 0).all()) for k, v in sd.items() if k.endswith("cluster_usage"))
    saved = load_file(str(ckpt))  # same seed, written by save_random_mimi: deterministic and round-trips
    assert all(torch.equal(saved[k], v) for k, v in sd.items())
    codes = ours.encode(signals(25))
    for level in range(32):  # every level uses many entries on 3 x 25 frames
        assert codes[:, level].unique().numel() > 20, level


def test_offline_parity_with_moshi(ours, ref, long_pcm, long_offline_codes):
    pcm, got = long_pcm, long_offline_codes
    with torch.no_grad():
        want = ref.encode(pcm)
        assert got.shape == want.shape == (3, 32, STREAM_FRAMES)
        assert torch.equal(got, want), f"{int((got != want).sum())} codes differ"
        pcm_ref = ref.decode(want)
        pcm_ours = ours.decode(want)
    assert pcm_ours.shape == pcm_ref.shape == pcm.shape
    assert rel(pcm_ours, pcm_ref) < PCM_RTOL


def test_streaming_parity_with_moshi(ours, ref, long_pcm, long_offline_codes):
    pcm = long_pcm
    want_codes, want_pcm = ref_stream(ref, pcm)
    got_codes, got_pcm = our_stream(ours, pcm, want_codes)
    assert torch.equal(got_codes, want_codes), f"{int((got_codes != want_codes).sum())} codes differ"
    assert rel(got_pcm, want_pcm) < PCM_RTOL
    # The last frames see the ring wrap-around: streaming differs from whole-file there (§7.8), so this test
    # would catch an implementation that ignored the 2-tokens-per-call quirk.
    offline = long_offline_codes
    assert torch.equal(offline[..., :125], got_codes[..., :125])
    assert not torch.equal(offline[..., 125:], got_codes[..., 125:])


def test_streaming_parity_with_moshi_after_days(ours, ref):
    """A stream 15.5 days in (2**25 - 7 transformer tokens at 25 Hz): RoPE positions past 2**24 are not exact in
    fp32, and moshi rounds the stream's offset to fp32 before adding each token's index (in fp32). Rounding the
    exact offset + index once instead moved the second token of both frames here by 2 positions (of 16 frames from
    2**25 - 1, 70% of the codes then differed)."""
    from moshi.modules.transformer import StreamingMultiheadAttention

    start, frames = 2**25 - 7, 2
    pcm = signals(frames, seed=3)[:1]
    want_codes, want_pcm, got_codes, got_pcm = [], [], [], []
    state = ours.init_state(1)
    with torch.no_grad(), ref.streaming(1):
        for m in ref.modules():  # both transformers' offsets; their (zero) rings count as written
            if isinstance(m, StreamingMultiheadAttention):
                m._streaming_state.offset.fill_(start)
                m._streaming_state.kv_cache.end_offset.fill_(start)
        state.enc_kv.pos.fill_(start)
        state.dec_kv.pos.fill_(start)
        for i in range(frames):
            x = pcm[..., i * FRAME_SIZE : (i + 1) * FRAME_SIZE]
            want_codes.append(ref.encode(x))
            want_pcm.append(ref.decode(want_codes[-1]))
            got_codes.append(ours.encode_step(x, state))
            got_pcm.append(ours.decode_step(want_codes[-1], state))
    want, got = torch.cat(want_codes, -1), torch.cat(got_codes, -1)
    assert torch.equal(got, want), f"{int((got != want).sum())} codes differ"
    assert rel(torch.cat(got_pcm, -1), torch.cat(want_pcm, -1)) < PCM_RTOL


def test_real_speech_parity(ours, ref):
    if not SPEECH.is_file():
        pytest.skip(f"{SPEECH} not present")
    from dsm.audio import load_audio

    pcm, sr = load_audio(SPEECH, target_sr=24000)  # 16 kHz -> 24 kHz
    assert sr == 24000
    n = pcm.shape[-1] // FRAME_SIZE
    pcm = pcm[: n * FRAME_SIZE].view(1, 1, -1)
    with torch.no_grad():
        want = ref.encode(pcm)
        assert torch.equal(ours.encode(pcm), want)
        assert rel(ours.decode(want), ref.decode(want)) < PCM_RTOL
    want_codes, want_pcm = ref_stream(ref, pcm)
    got_codes, got_pcm = our_stream(ours, pcm, want_codes)
    assert torch.equal(got_codes, want_codes)
    assert rel(got_pcm, want_pcm) < PCM_RTOL


def test_fewer_codebooks_parity(ckpt):
    loaders = pytest.importorskip("moshi.models.loaders")
    ref8 = loaders.get_mimi(str(ckpt), device="cpu", num_codebooks=8)
    ours8 = Mimi.from_file(ckpt, n_q=8)
    pcm = signals(20, seed=3)
    with torch.no_grad():
        want = ref8.encode(pcm)
        got = ours8.encode(pcm)
        assert got.shape == (3, 8, 20) and torch.equal(got, want)
        assert rel(ours8.decode(want), ref8.decode(want)) < PCM_RTOL
    want_codes, want_pcm = ref_stream(ref8, pcm[..., : 12 * FRAME_SIZE])
    got_codes, got_pcm = our_stream(ours8, pcm[..., : 12 * FRAME_SIZE], want_codes)
    assert torch.equal(got_codes, want_codes)
    assert rel(got_pcm, want_pcm) < PCM_RTOL


@pytest.mark.parametrize("frames_per_call", [2, 5])
def test_streaming_matches_offline_within_10s(ours, frames_per_call):
    """Calls of several frames carry the state across calls: 10 frames are 5 calls of 2, 2 of 5 (20 tokens, far below
    the 250-token ring, where streaming must equal offline; the wrap is the parity and multi-frame tests' business)."""
    pcm = signals(10, seed=4)
    with torch.no_grad():
        offline = ours.encode(pcm)
        offline_pcm = ours.decode(offline)
    codes, out = our_stream(ours, pcm, offline, frames_per_call)
    assert torch.equal(codes, offline)
    assert rel(out, offline_pcm) < 1e-5


def test_frame_buffer_arbitrary_chunks(ours):
    pcm = signals(12, seed=5)
    with torch.no_grad():
        offline = ours.encode(pcm)
    buf, state, codes = FrameBuffer(), ours.init_state(3), []
    for start in range(0, pcm.shape[-1], 1000):  # 1000-sample chunks do not align with frames
        frames = buf.push(pcm[..., start : start + 1000])
        if frames.shape[-1]:
            with torch.no_grad():
                codes.append(ours.encode_step(frames, state))
    assert buf.pending == 0
    assert torch.equal(torch.cat(codes, -1), offline)


def test_frame_buffer_owns_its_remainder():
    """Audio callbacks reuse one input buffer: the remainder kept by push must not be a view of the caller's chunk
    (found: the first push kept a view, so refilling the buffer rewrote the pending samples)."""
    pcm = torch.randn(2, 1, 4 * FRAME_SIZE)
    buf, scratch, out = FrameBuffer(), torch.empty(2, 1, 1000), []
    for start in range(0, pcm.shape[-1], 1000):
        chunk = pcm[..., start : start + 1000]
        scratch[..., : chunk.shape[-1]] = chunk
        out.append(buf.push(scratch[..., : chunk.shape[-1]]).clone())
    assert torch.equal(torch.cat(out, -1), pcm[..., : 4 * FRAME_SIZE])


def test_inactive_row_frozen_and_others_unchanged(ours):
    pcm = signals(8, seed=6)
    garbage = torch.randn(3, 1, FRAME_SIZE)

    def run(skip_row_1_at: int | None):
        state, codes, outs, frozen = ours.init_state(3), [], [], None
        with torch.no_grad():
            for i in range(8):
                x = pcm[..., i * FRAME_SIZE : (i + 1) * FRAME_SIZE]
                if i == skip_row_1_at:
                    before = [t[1].clone() for t in state.current()[1:]]  # all but exec_mask
                    state.set_exec_mask(torch.tensor([True, False, True]))
                    x = x.clone()
                    x[1] = garbage[1]
                c = ours.encode_step(x, state)
                outs.append(ours.decode_step(c, state))
                codes.append(c)
                if i == skip_row_1_at:
                    frozen = all(torch.equal(b, t[1]) for b, t in zip(before, state.current()[1:], strict=True))
                    state.set_exec_mask(torch.ones(3, dtype=torch.bool))
        return torch.cat(codes, -1), torch.cat(outs, -1), frozen

    codes_a, pcm_a, _ = run(None)
    codes_b, pcm_b, frozen = run(4)
    assert frozen, "an inactive row's state changed"
    for row in (0, 2):  # other rows bitwise unaffected
        assert torch.equal(codes_a[row], codes_b[row]) and torch.equal(pcm_a[row], pcm_b[row])
    # Row 1 skipped frame 4 entirely; afterwards it continues as if frame 4 were frame 5's predecessor.
    assert not torch.equal(codes_a[1, :, 5:], codes_b[1, :, 5:])


def test_random_pauses_and_resets_equal_solo_runs(ours):
    """Three streams on one state under a random schedule of pauses and resets (the double-buffered conv contexts
    flip every call, paused rows carry theirs over): each stream's codes equal, bit for bit, and its PCM within 1e-5
    of a stream alone fed only its own active frames (a reset starts a fresh one)."""
    rng, B, steps = random.Random(5), 3, 8
    pcm = signals(steps, seed=9).view(B, 1, steps, FRAME_SIZE).permute(2, 0, 1, 3)  # [step, B, 1, 1920]
    state, runs = ours.init_state(B), [[[]] for _ in range(B)]  # per stream: runs since a reset of (step, codes, pcm)
    with torch.no_grad():
        for t in range(steps):
            active = torch.tensor([rng.random() < 0.7 for _ in range(B)])
            reset = torch.tensor([rng.random() < 0.2 for _ in range(B)])
            state.reset(reset)
            for b in reset.nonzero()[:, 0].tolist():
                runs[b].append([])
            state.set_exec_mask(active)
            codes = ours.encode_step(pcm[t], state)
            out = ours.decode_step(codes, state)
            for b in active.nonzero()[:, 0].tolist():
                runs[b][-1].append((t, codes[b], out[b]))
        assert sum(len(r) for rs in runs for r in rs) >= steps and sum(len(rs) for rs in runs) > B  # both happened
        for b, rs in enumerate(runs):
            for run in rs:
                alone = ours.init_state(1)
                for t, codes, out in run:
                    got = ours.encode_step(pcm[t][b : b + 1], alone)
                    assert torch.equal(got[0], codes), (b, t)
                    assert rel(ours.decode_step(got, alone)[0], out) < 1e-5, (b, t)


def test_row_reset_equals_fresh_stream(ours):
    pcm = signals(10, seed=7)
    other = signals(10, seed=8)

    def step_all(state, x):
        c = ours.encode_step(x, state)
        return c, ours.decode_step(c, state)

    with torch.no_grad():
        state = ours.init_state(3)
        for i in range(6):
            step_all(state, pcm[..., i * FRAME_SIZE : (i + 1) * FRAME_SIZE])
        keep = ours.init_state(3)
        for a, b in zip(keep.tensors(), state.tensors(), strict=True):
            a.copy_(b)
        state.reset(torch.tensor([False, True, False]))
        fresh = ours.init_state(3)
        for i in range(4):
            x = pcm[..., (6 + i) * FRAME_SIZE : (7 + i) * FRAME_SIZE].clone()
            x[1] = other[1, :, i * FRAME_SIZE : (i + 1) * FRAME_SIZE]
            c_reset, y_reset = step_all(state, x)
            c_keep, y_keep = step_all(keep, x)
            c_fresh, y_fresh = step_all(fresh, x)
            assert torch.equal(c_reset[1], c_fresh[1]) and torch.equal(y_reset[1], y_fresh[1])
            for row in (0, 2):
                assert torch.equal(c_reset[row], c_keep[row]) and torch.equal(y_reset[row], y_keep[row])


def test_row_prefix_steps_like_the_whole_state(ours):
    """A server steps rows [0, n) of its state (``MimiState.rows``) while the rows from n on hold no stream. Against
    the whole state stepped with those rows paused: the same codes bit for bit and PCM within 1e-5 (another batch
    size); the rows past n untouched; and a stream opened in row n afterwards (its reset clears the scratch row's
    writes and the contexts the prefix steps left out of phase) runs like a fresh stream."""
    N, n, steps = 5, 2, 8
    pcm = signals(steps, seed=11)[:n].view(n, 1, steps, FRAME_SIZE).permute(2, 0, 1, 3)  # [step, n, 1, 1920]
    late = signals(steps, seed=12)[2:].view(1, 1, steps, FRAME_SIZE).permute(2, 0, 1, 3)
    whole, prefix = ours.init_state(N), ours.init_state(N)
    rows = prefix.rows(n)
    assert rows.batch_size == n and prefix.rows(N) is prefix
    for t in prefix.tensors():  # rows from n on hold garbage (a closed stream's leftovers): it must not matter
        if t.dtype == torch.float32:
            (t[n:] if t.shape[0] == N else t[:, n:]).normal_()
    past = [t.clone() for t in prefix.tensors()]
    with torch.no_grad():
        for t in range(steps):
            if t == 5:  # a stream opens in row n: both states reset it; from now on both step every row
                opened = torch.arange(N) == n
                whole.reset(opened)
                prefix.reset(opened)
            active = torch.tensor([True, t % 3 != 1] + [t >= 5] + [False] * (N - n - 1))
            x = torch.zeros(N, 1, FRAME_SIZE)
            x[:n] = pcm[t]
            x[n] = late[t]
            whole.set_exec_mask(active)
            prefix.set_exec_mask(active)
            want = ours.encode_step(x, whole)
            want_pcm = ours.decode_step(want, whole)
            state, k = (rows, n) if t < 5 else (prefix, N)
            got = ours.encode_step(x[:k], state)
            got_pcm = ours.decode_step(got, state)
            on = active[:k].nonzero()[:, 0]
            assert torch.equal(got[on], want[on]), t
            assert rel(got_pcm[on], want_pcm[on]) < 1e-5, t
            if t < 5:  # nothing past row n was written (row n: the transformer's scratch writes)
                for a, b in zip(prefix.tensors(), past, strict=True):
                    if a is prefix.exec_mask:  # (set by the test)
                        continue
                    if a.dim() and a.shape[0] == N:
                        assert torch.equal(a[n + 1 :], b[n + 1 :]), t
                    elif a.dim() > 1 and a.shape[1] == N:
                        assert torch.equal(a[:, n + 1 :], b[:, n + 1 :]), t
    with pytest.raises(ValueError, match=r"rows: n must be in \[1, 5\]"):
        prefix.rows(0)


def test_one_side_states(ours):
    """A state made for one side (STT encodes, TTS decodes) gives that side's outputs of a full state, holds the
    bytes ``stream_state_bytes`` says, and refuses the other side by name."""
    pcm = signals(4, seed=9)
    with torch.no_grad():
        full, enc, dec = ours.init_state(2), ours.init_state(2, decoder=False), ours.init_state(2, encoder=False)
        for i in range(3):
            x = pcm[:2, :, i * FRAME_SIZE : (i + 1) * FRAME_SIZE]
            codes = ours.encode_step(x, full)
            assert torch.equal(ours.encode_step(x, enc), codes)
            assert torch.equal(ours.decode_step(codes, dec), ours.decode_step(codes, full))
        with pytest.raises(ValueError, match="no decoder side"):
            ours.decode_step(codes, enc)
        with pytest.raises(ValueError, match="no encoder side"):
            ours.encode_step(pcm[:2, :, :FRAME_SIZE], dec)
    for state, sides in ((full, (True, True)), (enc, (True, False)), (dec, (False, True))):
        per_row = sum(t.numel() * t.element_size() for t in state.tensors() if t.dim()) / 2
        assert abs(ours.stream_state_bytes(*sides) - per_row) <= 4, sides  # the two [1] phases, shared
    assert ours.stream_state_bytes(True, False) < 0.51 * ours.stream_state_bytes()


def _copy_state(mimi: Mimi, state):
    out = mimi.init_state(state.batch_size)
    for a, b in zip(out.tensors(), state.tensors(), strict=True):
        a.copy_(b)
    return out


@pytest.mark.parametrize("frames_per_call", [3, 8])
def test_multi_frame_calls_equal_frame_by_frame_across_the_ring_wrap(ours, frames_per_call):
    """A call of n frames gives what n one-frame calls give (the reference pipelines' mode, §7.8), also where it
    crosses the 250-token ring wrap: writing all 2n keys before attending would overwrite keys its first queries
    still see (found: 8-frame calls changed codes from frame 120 on, inside the first 10 s)."""
    g = torch.Generator().manual_seed(21)
    pcm = signals(frames_per_call + 1, seed=21)[:2]
    with torch.no_grad():
        state = ours.init_state(2)
        codes0 = ours.encode_step(pcm[..., :FRAME_SIZE], state)
        ours.decode_step(codes0, state)
        for kv in (state.enc_kv, state.dec_kv):  # a history of 236 tokens: the next 8 frames wrap the ring
            for c in kv.cache:
                c.copy_(torch.randn(c.shape, generator=g))
            kv.pos.fill_(236)
        whole, single = state, _copy_state(ours, state)
        x = pcm[..., FRAME_SIZE:]
        codes = ours.encode_step(x, whole)
        out = ours.decode_step(codes, whole)
        codes1 = torch.cat([ours.encode_step(x[..., i * FRAME_SIZE : (i + 1) * FRAME_SIZE], single)
                            for i in range(frames_per_call)], -1)
        out1 = torch.cat([ours.decode_step(codes[..., i : i + 1], single) for i in range(frames_per_call)], -1)
    assert torch.equal(codes, codes1), f"{int((codes != codes1).sum())} codes differ"
    assert rel(out, out1) < 1e-6  # the decoder's convolutions over n frames round differently from 1 frame
    def encoder_state(st):  # as the next call reads it: n one-frame calls flip the contexts' halves n times
        return [c[st.enc_phase.long()] for c in (*st.enc_conv, st.down_prev)] + st.enc_kv.tensors()

    assert all(torch.equal(a, b) for a, b in zip(encoder_state(whole), encoder_state(single), strict=True))


def test_bad_masks_refused_without_touching_streams(ours):
    """A mask for one row must name every row: a [1] mask used to broadcast and reset (or pause) all streams."""
    with torch.no_grad():
        state = ours.init_state(3)
        ours.decode_step(ours.encode_step(signals(1, seed=22), state), state)
        before = [t.clone() for t in state.tensors()]
        for bad in (torch.tensor([True]), torch.tensor([True, False]), torch.tensor([0, 1, 0]), [False, True, False]):
            with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(3,\)"):
                state.reset(bad)
            with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(3,\)"):
                state.set_exec_mask(bad)
    assert all(torch.equal(a, b) for a, b in zip(before, state.tensors(), strict=True))


def test_bad_inputs_are_refused_before_any_state_changes(ours):
    """NaN/inf pcm (CPU), out-of-range codes in a streaming decode (CPU), non-tensors: clear errors naming the input,
    and the streams' state untouched (found: NaN was encoded silently to codes and poisoned the row's state, -1 failed
    as a bare IndexError, a numpy array as an AttributeError, a pcm requiring grad inside torch.where)."""
    with torch.no_grad():
        state = ours.init_state(2)
        ours.decode_step(ours.encode_step(signals(1, seed=23)[:2], state), state)
    before = [t.clone() for t in state.tensors()]
    pcm = signals(1, seed=24)[:2]
    for value in (float("nan"), float("inf"), float("-inf"), 1e7, -1e25):  # huge: codes 0, then a non-finite state
        bad = pcm.clone()
        bad[1, 0, 100] = value
        with pytest.raises(ValueError, match=r"1 NaN or infinite sample\(s\), or beyond \+-1e\+06 \(batch rows \[1\]"):
            ours.encode_step(bad, state)
        with pytest.raises(ValueError, match="NaN or infinite"):
            ours.encode(bad)
    for value in (-1, 2048, 5000):
        codes = torch.zeros(2, 32, 1, dtype=torch.long)
        codes[0, 3, 0] = value
        with pytest.raises(ValueError, match=r"codes must be in \[0, 2048\)"):
            ours.decode_step(codes, state)
    with pytest.raises(TypeError, match="pcm must be a torch.Tensor, got ndarray"):
        ours.encode_step(pcm.numpy(), state)
    with pytest.raises(TypeError, match="codes must be a torch.Tensor, got list"):
        ours.decode([[[0]]])
    assert all(torch.equal(a, b) for a, b in zip(before, state.tensors(), strict=True))
    assert torch.equal(ours.encode(pcm.clone().requires_grad_()), ours.encode(pcm))
    state.set_exec_mask(torch.tensor([True, False]))  # an inactive row's input is ignored, NaN included
    ours.encode_step(bad, state)


def test_old_codebook_names_accepted(ckpt, tmp_path, ours):
    sd = load_file(str(ckpt))
    renames = {"embedding_sum": "embed_avg", "cluster_usage": "cluster_size", "_initialized": "inited"}
    old = {}
    for k, v in sd.items():
        head, _, last = k.rpartition(".")
        old[f"{head}.{renames.get(last, last)}" if "_codebook" in head else k] = v
    path = tmp_path / "old.safetensors"
    save_file(old, str(path))
    pcm = signals(4, seed=9)
    with torch.no_grad():
        assert torch.equal(Mimi.from_file(path).encode(pcm), ours.encode(pcm))


def test_loading_errors_are_clear(ckpt, tmp_path):
    sd = load_file(str(ckpt))
    name = "decoder_transformer.transformer.layers.3.linear1.weight"

    missing = dict(sd)
    del missing[name]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(MimiCheckpointError, match=r"missing\.safetensors.*missing.*layers\.3\.linear1\.weight"):
        Mimi.from_file(tmp_path / "missing.safetensors")

    wrong = dict(sd)
    wrong[name] = torch.zeros(2048, 511)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(MimiCheckpointError, match=r"wrong\.safetensors.*linear1\.weight.*\(2048, 511\).*\(2048, 512\)"):
        Mimi.from_file(tmp_path / "wrong.safetensors")

    extra = dict(sd)
    extra["quantizer.rvq_rest.vq.layers.31._codebook.embedding_sum"] = torch.zeros(2048, 256)
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(MimiCheckpointError, match=r"unexpected.*layers\.31"):
        Mimi.from_file(tmp_path / "extra.safetensors")

    data = Path(ckpt).read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MimiCheckpointError, match=r"trunc\.safetensors.*cannot read"):
        Mimi.from_file(tmp_path / "trunc.safetensors")

    with pytest.raises(MimiCheckpointError, match="not found"):
        Mimi.from_file(tmp_path / "absent.safetensors")


def test_bad_step_inputs(ours, ckpt):
    state = ours.init_state(2)
    with pytest.raises(ValueError, match="multiple of 1920"):
        ours.encode_step(torch.zeros(2, 1, 1000), state)
    with pytest.raises(ValueError, match=r"\[2, 1, 1920\*n\]"):
        ours.encode_step(torch.zeros(3, 1, 1920), state)
    with pytest.raises(ValueError, match="codes must be in"):
        ours.decode(torch.full((1, 8, 2), -1))
    with pytest.raises(ValueError, match="T >= 1"):
        ours.decode_step(torch.zeros(2, 8, 0, dtype=torch.long), state)
    with pytest.raises(ValueError, match="float32"):
        ours.encode(torch.zeros(1, 1, 1920, dtype=torch.int16))
    with pytest.raises(ValueError, match="T >= 1"):
        ours.encode(torch.zeros(1, 1, 0))
    ours8 = Mimi.from_file(ckpt, n_q=8)  # 32 codes would index past its 8 decode tables
    with pytest.raises(ValueError, match=r"1\.\.8, T >= 1\] \(this Mimi has n_q = 8\)"):
        ours8.decode_step(torch.zeros(1, 32, 1, dtype=torch.long), ours8.init_state(1))
    with pytest.raises(ValueError, match="n_q = 8"):
        ours8.decode(torch.zeros(1, 9, 1, dtype=torch.long))


def test_state_dict_type_and_name_clashes_are_refused(mimi_sd):
    """A tensor under both its old and its new codebook name was silently dropped (the last one in the dict won;
    moshi keeps the old one); a path or a numpy array was an AttributeError."""
    old = "quantizer.rvq_rest.vq.layers.3._codebook.embed_avg"
    with pytest.raises(MimiCheckpointError, match=r"layers\.3\._codebook\.embedding_sum and .*embed_avg are two names"):
        check_mimi_state_dict({**mimi_sd, old: torch.zeros(2048, 256)})
    with pytest.raises(TypeError, match=r"mapping of names to tensors, got str \(use Mimi\.from_file for a path\)"):
        Mimi("mimi.safetensors")
    name = "encoder.model.0.conv.conv.weight"
    with pytest.raises(MimiCheckpointError, match=rf"tensor {name} is a ndarray, expected a torch\.Tensor"):
        check_mimi_state_dict({**mimi_sd, name: mimi_sd[name].numpy()})


@pytest.mark.parametrize("n_q", [0, 33, 8.0, True])
def test_mimi_refuses_a_codebook_count_that_is_not_an_integer_in_range(n_q):
    """8.0 failed in range() with a TypeError, True built a 1-codebook Mimi."""
    with pytest.raises(ValueError, match=rf"n_q must be an integer in \[1, 32\], got {n_q!r}"):
        Mimi({}, n_q=n_q)


def test_reprs_are_short(ours):
    """A state's repr names its shape: the dataclass's printed every tensor (150 kB for 2 streams)."""
    assert repr(ours) == "Mimi(n_q=32, device=cpu, backend=None)"
    assert repr(ours.init_state(2, encoder=False)) == (
        "MimiState(batch_size=2, encoder=False, decoder=True, device=cpu)")


def test_init_state_refuses_a_negative_batch(ours):
    with pytest.raises(ValueError, match=r"init_state: batch_size must be an integer >= 0, got -1"):
        ours.init_state(-1)
    assert ours.init_state(0).batch_size == 0


def test_frame_buffer_refuses_what_it_cannot_buffer():
    """A numpy chunk failed in .clone(), a chunk of other streams inside torch.cat, a frame size of 0 at the first
    push (ZeroDivisionError); the pending samples survive a refused push."""
    with pytest.raises(ValueError, match="frame_size must be a positive integer, got 0"):
        FrameBuffer(0)
    buf = FrameBuffer()
    with pytest.raises(TypeError, match="FrameBuffer.push: pcm must be a torch.Tensor, got ndarray"):
        buf.push(torch.zeros(2, 1, 5).numpy())
    pcm = torch.randn(2, 1, FRAME_SIZE)
    buf.push(pcm[..., :100])
    with pytest.raises(ValueError, match=r"pcm \(3, 1, 100\) does not continue the pending \(2, 1, 100\)"):
        buf.push(torch.zeros(3, 1, 100))
    assert torch.equal(buf.push(pcm[..., 100:]), pcm) and buf.pending == 0
