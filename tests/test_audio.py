"""Audio loading, resampling and the bad-input policy of dsm.audio."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from dsm.audio import AudioError, ClippedAudioWarning, TruncatedAudioWarning, load_audio, resample, validate_pcm


def tone(freq: float, sr: int, seconds: float = 0.5, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def test_validate_accepts_and_downmixes():
    x = torch.stack([torch.full((100,), 0.2), torch.full((100,), 0.4)])
    y = validate_pcm(x, 24000)
    assert y.shape == (100,) and y.dtype == torch.float32
    assert torch.allclose(y, torch.full((100,), 0.3))
    assert validate_pcm(x, 24000, mono="keep").shape == (2, 100)
    assert validate_pcm(np.zeros(10, dtype=np.float64), 24000).dtype == torch.float32
    assert validate_pcm(torch.zeros(1, 10), 24000, mono="error").shape == (10,)


@pytest.mark.parametrize(
    ("x", "kwargs", "pattern"),
    [
        (torch.zeros(2, 50), {"mono": "error"}, "2 channels"),
        (torch.tensor([0.0, float("nan"), 0.1]), {}, "NaN or infinite"),
        (torch.tensor([0.0, float("inf")]), {}, "NaN or infinite"),
        (torch.zeros(0), {}, "empty"),
        (torch.zeros(2, 0), {}, "empty"),
        (torch.zeros(10, dtype=torch.int16), {}, "dtype torch.int16"),
        (np.zeros(10, dtype=np.int32), {}, "dtype torch.int32"),
        (torch.zeros(1, 2, 3), {}, "shape"),
        (torch.zeros(1000, 2), {}, r"\[T, C\]"),
        (torch.zeros(10, 2), {}, r"\[T, C\]"),
        (torch.zeros(7, 2), {}, r"looks like \[T, C\] \(as \[C, T\] it is 7 channels of 2 sample\(s\)\)"),
        (torch.zeros(2, 2), {}, r"\[T, C\].*channels_first=False"),
        (torch.zeros(5, 1), {}, r"\[T, C\]"),
        (torch.tensor([0.5, 1.5]), {"clip": "error"}, "outside"),
    ],
)
def test_validate_rejects(x, kwargs, pattern):
    with pytest.raises(AudioError, match=pattern) as info:
        validate_pcm(x, 24000, name="clip.wav", **kwargs)
    assert "clip.wav" in str(info.value)


def test_arrays_in_network_byte_order_are_read():
    """Big-endian samples (``np.frombuffer(data, ">f4")``) failed in torch with a byte-order ValueError naming
    neither the input nor the fix."""
    x = np.linspace(-0.5, 0.5, 100, dtype=np.float32)
    for dtype in (">f4", ">f8"):
        assert torch.equal(validate_pcm(x.astype(dtype), 24000, name="net"), torch.from_numpy(x))
        assert torch.equal(resample(x.astype(dtype), 24000, 24000), torch.from_numpy(x))
    stereo = np.stack([x, -x])
    assert torch.equal(validate_pcm(stereo.astype(">f4"), 24000, mono="keep"), torch.from_numpy(stereo))


def test_validate_accepts_reversed_arrays_and_tensors_with_grad():
    x = np.linspace(-0.5, 0.5, 100, dtype=np.float32)
    assert torch.equal(validate_pcm(x[::-1], 24000), torch.from_numpy(x[::-1].copy()))
    y = validate_pcm(torch.from_numpy(x).requires_grad_(), 24000)
    assert not y.requires_grad and np.array_equal(y.numpy(), x)


@pytest.mark.parametrize("sr", [0, -24000, 24000.0, 1, 999])
def test_validate_rejects_bad_sample_rate(sr):
    with pytest.raises(AudioError, match="sample rate"):
        validate_pcm(torch.zeros(10), sr)


def test_out_of_range_is_clipped_with_warning():
    with pytest.warns(ClippedAudioWarning, match="clipped 2 sample"):
        y = validate_pcm(torch.tensor([0.5, 1.5, -3.0]), 24000)
    assert torch.equal(y, torch.tensor([0.5, 1.0, -1.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_pcm(torch.tensor([1.0, -1.0]), 24000)  # the boundary itself is valid
        assert torch.equal(validate_pcm(torch.tensor([1.5]), 24000, clip="keep"), torch.tensor([1.5]))


def test_a_short_t_c_chunk_is_not_read_as_channels():
    """A 2-D array is [C, T] unless said otherwise; a short [T, C] one ([7, 2]: 7 samples of stereo) was read as 7
    channels of 2 samples, 2 wrong samples in place of 7. Such shapes are refused unless the layout is stated."""
    x = torch.stack([torch.linspace(-0.5, 0.5, 7), torch.full((7,), 0.25)], dim=1)  # [T=7, C=2]
    with pytest.raises(AudioError, match=r"\[T, C\]"):
        validate_pcm(x, 24000)
    assert torch.allclose(validate_pcm(x, 24000, channels_first=False), x.mean(dim=1))
    assert torch.equal(validate_pcm(x, 24000, mono="keep", channels_first=False), x.T)
    assert validate_pcm(torch.zeros(8, 2), 24000, mono="keep", channels_first=True).shape == (8, 2)  # 7.1 audio
    assert validate_pcm(torch.zeros(2, 3), 24000).shape == (3,)  # more samples than channels: [C, T]
    assert validate_pcm(torch.zeros(1, 1), 24000).shape == (1,)  # [1, T] is mono
    with pytest.raises(ValueError, match="channels_first must be True, False or None, got 0"):
        validate_pcm(x, 24000, channels_first=0)


def test_resample_keeps_frequency_and_length():
    x = tone(440, 16000, 1.0)
    y = resample(x, 16000, 24000)
    assert y.dtype == torch.float32 and abs(y.shape[0] - 24000) <= 1
    spectrum = np.abs(np.fft.rfft(y.numpy()))
    assert abs(int(spectrum.argmax()) - 440) <= 1  # 1 s long: bin = Hz
    stereo = resample(np.stack([x, 0.5 * x]), 16000, 24000)
    assert stereo.shape[0] == 2 and torch.allclose(stereo[1], 0.5 * stereo[0], atol=1e-6)
    assert torch.equal(resample(x, 16000, 16000), torch.from_numpy(x))
    with pytest.raises(AudioError, match="to_sr"):
        resample(x, 16000, 0)


@pytest.mark.parametrize(("fmt", "ext", "tol"), [("WAV", "wav", 1e-4), ("FLAC", "flac", 1e-4), ("OGG", "ogg", 0.1)])
def test_load_formats(tmp_path, fmt, ext, tol):
    x = tone(300, 16000)
    path = tmp_path / f"a.{ext}"
    sf.write(str(path), np.stack([x, x], axis=1), 16000, format=fmt)
    pcm, sr = load_audio(path, target_sr=24000)
    assert sr == 24000 and pcm.dim() == 1 and abs(pcm.shape[0] - 12000) <= 1
    ref = resample(x, 16000, 24000)
    n = min(ref.shape[0], pcm.shape[0])
    assert float((pcm[:n] - ref[:n]).norm() / ref[:n].norm()) < tol
    keep, _ = load_audio(path, target_sr=24000, mono="keep")
    assert keep.shape[0] == 2
    with pytest.raises(AudioError, match="mono"):
        load_audio(path, mono="error")


def test_load_errors(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "absent.wav")
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wav file")
    with pytest.raises(AudioError, match="bad.wav.*cannot decode"):
        load_audio(bad)


def test_resample_accepts_any_float_layout_and_refuses_bad_samples():
    """resample is public: reversed arrays and tensors that need grad used to fail in torch.as_tensor/.numpy(), int16
    was resampled as +-32768 floats and NaN passed through silently."""
    x = tone(440, 16000, 0.1)
    want = resample(x[::-1].copy(), 16000, 24000)
    assert torch.equal(resample(x[::-1], 16000, 24000), want)
    assert torch.equal(resample(torch.from_numpy(x).requires_grad_(), 16000, 24000), resample(x, 16000, 24000))
    with pytest.raises(AudioError, match=r"resample: dtype torch\.int16"):
        resample((x * 32767).astype(np.int16), 16000, 24000)
    bad = x.copy()
    bad[3] = np.nan
    with pytest.raises(AudioError, match="resample: 1 sample.*NaN or infinite"):
        resample(bad, 16000, 24000)


def test_huge_float64_samples_are_out_of_range_not_infinite():
    """A finite float64 beyond fp32's range was cast first and then reported as "NaN or infinite"."""
    x = np.array([0.1, 1e300, -1e300])
    with pytest.warns(ClippedAudioWarning, match="clipped 2 sample"):
        assert torch.equal(validate_pcm(x, 24000), torch.tensor([0.1, 1.0, -1.0]))
    with pytest.raises(AudioError, match="2 sample.*outside"):
        validate_pcm(x, 24000, clip="error")
    assert bool(torch.isfinite(validate_pcm(x, 24000, clip="keep")).all())


def test_files_keep_their_float64_samples_and_their_channel_layout(tmp_path):
    """A float64 file's finite 1e300 is out of range (clipped), not "NaN or infinite" (it was read as float32 first);
    a file's layout is known, so 100 channels are averaged, not refused as a likely [T, C] array."""
    x = np.full(2400, 0.25)
    x[7] = 1e300
    sf.write(tmp_path / "huge.wav", x, 24000, subtype="DOUBLE")
    with pytest.warns(ClippedAudioWarning, match="huge.wav: clipped 1 sample"):
        pcm, _ = load_audio(tmp_path / "huge.wav")
    assert pcm[7] == 1.0 and pcm[6] == 0.25
    many = np.tile(np.linspace(-0.5, 0.5, 100, dtype=np.float32), (50, 1))  # [T=50, C=100]: mean 0
    sf.write(tmp_path / "many.wav", many, 24000, subtype="FLOAT")
    pcm, _ = load_audio(tmp_path / "many.wav")
    assert pcm.shape == (50,) and float(pcm.abs().max()) < 1e-6
    with pytest.raises(AudioError, match=r"looks like \[T, C\]"):  # an array's layout is still guessed
        validate_pcm(np.zeros((1000, 2), dtype=np.float32), 24000)


def test_empty_stdin_says_so(monkeypatch):
    monkeypatch.setattr("dsm.cli_args.read_stdin_bytes", lambda: b"")
    with pytest.raises(AudioError, match=r"^stdin: no audio \(the input is empty\)$"):
        load_audio("-")


def test_a_multichannel_file_is_downmixed_a_block_at_a_time(tmp_path):
    """A multichannel file is averaged block by block as it is read (it was read whole, transposed, then averaged):
    the same samples, non-finite ones still found, and a 120 s 48 kHz stereo file grows the process's peak memory by
    ~60 MB, not the ~165 MB it took (a 1 h file took ~5 GB)."""
    import subprocess
    import sys

    x = np.random.default_rng(1).uniform(-0.3, 0.3, (300_000, 3)).astype(np.float32)  # over one block
    sf.write(tmp_path / "three.wav", x, 24000, subtype="FLOAT")
    pcm, _ = load_audio(tmp_path / "three.wav")
    assert torch.allclose(pcm, torch.from_numpy(x).mean(dim=1), atol=1e-7, rtol=0)
    x[280_000, 2] = np.inf
    sf.write(tmp_path / "three.wav", x, 24000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"three.wav: 1 sample\(s\) are NaN or infinite \(first at flat index 280000"):
        load_audio(tmp_path / "three.wav")
    long = (np.random.default_rng(0).standard_normal((48000 * 120, 2)) * 3000).astype(np.int16)
    sf.write(tmp_path / "long.wav", long, 48000)
    sf.write(tmp_path / "short.wav", long[:4800], 48000)
    code = ("import resource, sys; from dsm.audio import load_audio; load_audio(sys.argv[2]); "
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; load_audio(sys.argv[1]); "
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)")  # Linux: KiB
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "long.wav"), str(tmp_path / "short.wav")],
                         capture_output=True, text=True, timeout=300)
    grown_mib = float(out.stdout.strip().splitlines()[-1])
    assert grown_mib < 100, f"peak memory grew by {grown_mib:.0f} MiB reading 22 MiB of 48 kHz mono samples"


def _set_le32(b: bytearray, at: int, value: int) -> None:
    b[at:at + 4] = value.to_bytes(4, "little")


@pytest.mark.parametrize("fmt", ["WAV", "AIFF"])
def test_load_audio_warns_when_a_file_is_cut_short(tmp_path, fmt):
    """libsndfile reads a WAV/AIFF that ends before its header's data size without an error: an interrupted copy
    was transcribed as if whole. It is still read as far as it goes, with a warning naming the file."""
    x = tone(440, 24000, seconds=1.0)
    whole = tmp_path / f"whole.{fmt.lower()}"
    sf.write(whole, x, 24000, format=fmt, subtype="PCM_16")
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(whole.read_bytes()[:24000])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the whole file: no warning
        assert load_audio(whole)[0].shape == (24000,)
    with pytest.warns(TruncatedAudioWarning, match=f"{cut}: truncated: the header says 4800. bytes of audio"):
        pcm, _ = load_audio(cut)
    assert 11900 < pcm.shape[0] < 12000
    assert torch.allclose(pcm, load_audio(whole)[0][: pcm.shape[0]])


@pytest.mark.parametrize("placeholder", [0xFFFFFFFF, 0x7FFFF000])
def test_load_audio_reads_a_piped_wav_of_unknown_length_without_warning(tmp_path, placeholder):
    """ffmpeg and sox writing WAV to a pipe cannot fill in the sizes: they leave 0xFFFFFFFF / 0x7FFFF000, and the
    file is read to its end. That is not a cut-short file."""
    path = tmp_path / "piped.wav"
    sf.write(path, tone(440, 24000), 24000, subtype="PCM_16")
    raw = bytearray(path.read_bytes())
    _set_le32(raw, 4, 0xFFFFFFFF)
    _set_le32(raw, raw.find(b"data") + 4, placeholder)
    path.write_bytes(bytes(raw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_audio(path)[0].shape == (12000,)


def test_one_frame_of_several_channels_resamples(tmp_path):
    """A [C, 1] input (a one-frame multichannel file read with mono="keep") failed in soxr: "Data not contiguous"."""
    x = np.array([[0.5], [-0.5]], dtype=np.float32)
    assert resample(x, 48000, 24000).shape[0] == 2
    sf.write(tmp_path / "one.wav", x.T, 48000, subtype="FLOAT")
    pcm, _ = load_audio(tmp_path / "one.wav", mono="keep")
    assert pcm.shape[0] == 2


@pytest.mark.parametrize("target_sr", [0, -1, 24000.0, True])
def test_load_audio_refuses_a_target_rate_that_is_not_a_positive_integer(tmp_path, target_sr):
    """target_sr=0 failed in soxr ("Sample rate should be over 0"), and 24000.0 came back as the float it was."""
    sf.write(tmp_path / "a.wav", tone(440, 16000), 16000)
    with pytest.raises(AudioError, match=f"load_audio: target_sr must be a positive integer, got {target_sr!r}"):
        load_audio(tmp_path / "a.wav", target_sr=target_sr)
