"""Audio input for the codec: file reading, resampling and validation with errors that say what is wrong.

Policy (one place, so every entry point behaves the same):

* channels: ``mono="mean"`` averages channels (the usual downmix), ``mono="error"`` refuses multi-channel input,
  ``mono="keep"`` returns ``[C, T]`` untouched;
* NaN/inf, empty input, non-float dtypes and sample rates <= 0 are errors;
* samples with ``|x| > 1``: ``clip="warn"`` (default) clips to [-1, 1] and emits a :class:`ClippedAudioWarning`
  with the count, ``clip="error"`` raises, ``clip="keep"`` leaves them for the caller (a stream clips and counts them
  itself, and warns once rather than once per chunk). Clipping rather than rescaling keeps the level of valid audio
  unchanged;
* a file that holds less audio than its header says (cut short) is read as far as it goes, with a
  :class:`TruncatedAudioWarning`;
* a 2-D array is ``[C, T]`` (channels first, as torchaudio). ``channels_first=True`` states it, ``False`` says the
  array is ``[T, C]`` (soundfile's layout). Unstated, a shape that may well be ``[T, C]`` is refused rather than
  guessed: more than 64 rows, or at least as many rows as columns (``[7, 2]``: 7 samples of stereo, not 7 channels
  of 2 samples). ``[1, T]`` is mono.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch

MONO_MODES = ("mean", "error", "keep")
CLIP_MODES = ("warn", "error", "keep")
# Lower rates hold no speech, and 100 samples at 1 Hz would become 100 s of audio to encode.
MIN_SAMPLE_RATE = 1000


class AudioError(ValueError):
    """The audio cannot be used as given (the message names the input and the problem)."""


class AudioInputWarning(UserWarning):
    """Something in the user's audio was repaired or may be missing; the message names the input."""


class ClippedAudioWarning(AudioInputWarning):
    """Samples outside [-1, 1] were clipped."""


class TruncatedAudioWarning(AudioInputWarning):
    """A file holds less audio than its header says (an interrupted copy or download); what is there is read."""


# Data sizes that writers put in a WAV header when they cannot seek back to fill it in (ffmpeg and sox writing to a
# pipe): the file then holds less than its header says by design, and libsndfile reads to its end.
_UNKNOWN_LENGTH_MIN = 0x7FFF0000


def validate_pcm(
    x: torch.Tensor | np.ndarray,
    sample_rate: int,
    name: str = "pcm",
    mono: str = "mean",
    clip: str = "warn",
    channels_first: bool | None = None,
) -> torch.Tensor:
    """Check and normalise pcm to float32: ``[T]`` (mono modes) or ``[C, T]`` (``mono="keep"``).

    ``x`` is ``[T]`` or 2-D: ``[C, T]`` with ``channels_first=True`` (a decoded file: many channels are not refused),
    ``[T, C]`` with ``False``, and unstated (``None``) ``[C, T]`` unless the shape may well be ``[T, C]`` (refused).
    See the module docstring for the policy.
    """
    if mono not in MONO_MODES:
        raise ValueError(f"mono must be one of {MONO_MODES}, got {mono!r}")
    if clip not in CLIP_MODES:
        raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")
    if channels_first is not None and not isinstance(channels_first, bool):  # 0 would have read as [C, T]
        raise ValueError(f"channels_first must be True, False or None, got {channels_first!r}")
    if not isinstance(sample_rate, int | np.integer) or sample_rate < MIN_SAMPLE_RATE:
        raise AudioError(f"{name}: sample rate must be an integer >= {MIN_SAMPLE_RATE} Hz, got {sample_rate!r}")
    t = x
    if isinstance(x, np.ndarray):
        t = _from_numpy(x)
    if not isinstance(t, torch.Tensor):
        raise AudioError(f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}")
    _check_samples(t, name)
    if t.dim() not in (1, 2):
        raise AudioError(f"{name}: expected [T] or [C, T] samples, got shape {tuple(t.shape)}")
    if t.shape[-1] == 0 or t.numel() == 0:
        raise AudioError(f"{name}: audio is empty (shape {tuple(t.shape)})")
    t = t.detach()  # samples, not a graph: callers may call .numpy()
    fmax = torch.finfo(torch.float32).max  # exact for in-range samples; a huge float64 must not become inf
    t = t.clamp(-fmax, fmax).to(torch.float32) if t.dtype == torch.float64 else t.to(torch.float32)
    if t.dim() == 2:
        if channels_first is False:
            t = t.T
        elif channels_first is None and (t.shape[0] > 64 or 1 < t.shape[0] >= t.shape[1]):
            # a short [T, C] chunk read as [C, T] would silently become fewer samples of the wrong values
            rows, cols = t.shape
            raise AudioError(f"{name}: shape {(rows, cols)} looks like [T, C] (as [C, T] it is {rows} channels of "
                             f"{cols} sample(s)); pass channels_first=False for [T, C] or channels_first=True for "
                             "[C, T]")
        if mono == "mean":
            t = t.mean(dim=0)
        elif mono == "error" and t.shape[0] != 1:
            raise AudioError(f"{name}: {t.shape[0]} channels given but mono audio is required (mono='error')")
        elif mono == "error":
            t = t[0]
    elif mono == "keep":
        t = t[None]
    low, high = (float(v) for v in torch.aminmax(t)) if clip != "keep" else (0.0, 0.0)
    if low < -1 or high > 1:  # masks only then: a long file in range costs no full-size temporaries here
        n = int((t > 1).sum() + (t < -1).sum())
        peak = max(-low, high)
        if clip == "error":
            raise AudioError(f"{name}: {n} sample(s) outside [-1, 1] (peak {peak:.3f}); normalise the audio")
        warnings.warn(f"{name}: clipped {n} sample(s) outside [-1, 1] (peak {peak:.3f})", ClippedAudioWarning,
                      stacklevel=2)
        t = t.clamp(-1.0, 1.0)
    return t.contiguous()


def _from_numpy(x: np.ndarray) -> torch.Tensor:
    """``x`` as a contiguous tensor; torch refuses negative strides (a reversed or flipped array) and a non-native
    byte order (``np.frombuffer(data, ">f4")``: network order)."""
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    return torch.as_tensor(np.ascontiguousarray(x))


def _check_samples(t: torch.Tensor, name: str) -> None:
    """float32/float64 samples without NaN/inf (checked before any cast: a finite float64 beyond fp32's range is out
    of range, not NaN/inf)."""
    if not t.dtype.is_floating_point or t.dtype == torch.float16 or t.dtype == torch.bfloat16:
        raise AudioError(f"{name}: dtype {t.dtype} is not supported; pass float32/float64 samples in [-1, 1] "
                         "(divide int16 pcm by 32768)")
    bad = ~torch.isfinite(t.detach())
    if bool(bad.any()):
        raise AudioError(f"{name}: {int(bad.sum())} sample(s) are NaN or infinite (first at flat index "
                         f"{int(bad.flatten().nonzero()[0])})")


def _check_rate(sr: object, what: str) -> None:
    if not isinstance(sr, int | np.integer) or isinstance(sr, bool) or sr <= 0:
        raise AudioError(f"{what} must be a positive integer, got {sr!r}")


def resample(x: torch.Tensor | np.ndarray, from_sr: int, to_sr: int) -> torch.Tensor:
    """Resample ``[T]`` or ``[C, T]`` float pcm with soxr (high quality); identity when the rates are equal."""
    for label, sr in (("from_sr", from_sr), ("to_sr", to_sr)):
        _check_rate(sr, f"resample: {label}")
    # The same dtype and NaN/inf policy as validate_pcm; tensors that need grad, live on a GPU, and numpy arrays
    # reversed or in another byte order are accepted instead of failing in .numpy() / torch.as_tensor.
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
    t = _from_numpy(x) if isinstance(x, np.ndarray) else torch.as_tensor(x)
    _check_samples(t, "resample")
    return _resample(t.to(torch.float32), from_sr, to_sr)


def _resample(t: torch.Tensor, from_sr: int, to_sr: int) -> torch.Tensor:
    """:func:`resample` of checked float32 samples."""
    if from_sr == to_sr:
        return t.clone()
    import soxr

    a = t.numpy()
    if a.ndim == 1:
        return torch.from_numpy(np.ascontiguousarray(soxr.resample(a, from_sr, to_sr), dtype=np.float32))
    if a.ndim != 2:
        raise AudioError(f"resample: expected [T] or [C, T], got shape {a.shape}")
    # soxr wants [T, C] with row-major strides: ascontiguousarray keeps a one-frame [1, C]'s transposed strides
    # (numpy counts it contiguous), which soxr refused as "Data not contiguous"
    y = soxr.resample(a.T.copy(order="C"), from_sr, to_sr)
    return torch.from_numpy(np.ascontiguousarray(y.T, dtype=np.float32))


def _channel_mean(f, dtype: str) -> np.ndarray:
    """The mean of an open soundfile's channels ``[T]``, read a block at a time: a long multichannel file is never
    held whole with its channels (a 20 min 48 kHz stereo file took 1.9 GB to read, for 230 MB of mono samples).
    Non-finite samples stay non-finite in the mean, so validation still finds them."""
    out = np.empty(f.frames, dtype) if f.seekable() and f.frames > 0 else None
    parts, n = [], 0
    for block in f.blocks(blocksize=1 << 18, dtype=dtype, always_2d=True):
        mean = block.mean(axis=1, dtype=dtype)
        if out is not None and n + len(mean) > len(out):  # more frames than the header said: gather instead
            parts, out = [out[:n]], None
        if out is None:
            parts.append(mean)
        else:
            out[n : n + len(mean)] = mean
        n += len(mean)
    return out[:n] if out is not None else np.concatenate(parts) if parts else np.empty(0, dtype)


def _warn_if_truncated(f, name: str) -> None:
    """libsndfile reads a cut-short WAV/AIFF to its end without an error; its log alone says the data chunk is shorter
    than the header's size ("data : 48000 (should be 23978)")."""
    m = re.search(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", f.extra_info, re.MULTILINE)
    if m is None:
        return
    declared, present = int(m[1]), int(m[2])
    if present < declared < _UNKNOWN_LENGTH_MIN:
        warnings.warn(f"{name}: truncated: the header says {declared} bytes of audio, the file holds {present} "
                      f"({f.frames / f.samplerate:.2f} s read); was the copy or download interrupted?",
                      TruncatedAudioWarning, stacklevel=3)


def load_audio(
    path: str | Path, target_sr: int = 24000, mono: str = "mean", clip: str = "warn"
) -> tuple[torch.Tensor, int]:
    """Read wav/flac/ogg/mp3 with soundfile, validate, resample to ``target_sr``. ``"-"`` reads a whole file from
    stdin (``ffmpeg ... -f wav - | dsm transcribe -``).

    Returns ``(pcm, target_sr)`` with pcm float32 ``[T]`` (or ``[C, T]`` with ``mono="keep"``).
    """
    import io

    import soundfile as sf

    from .cli_args import read_stdin_bytes

    _check_rate(target_sr, "load_audio: target_sr")  # soxr's error named neither (and 24000.0 came back a float)
    if str(path) == "-":
        name = "stdin"
        try:
            raw = read_stdin_bytes()
        except OSError as e:
            raise AudioError(f"stdin: cannot read ({e})") from None
        if not raw:
            raise AudioError("stdin: no audio (the input is empty)")
        src = io.BytesIO(raw)
    else:
        path = Path(path)
        name, src = str(path), str(path)
        if path.is_dir():
            raise AudioError(f"{path}: is a directory, not an audio file")
        if not path.is_file():
            raise AudioError(f"{path}: audio file not found")
    try:
        with sf.SoundFile(src) as f:  # float64 files are read as such: a finite sample past fp32's range is not inf
            dtype, sr = "float64" if f.subtype == "DOUBLE" else "float32", f.samplerate
            _warn_if_truncated(f, name)
            if mono == "mean" and f.channels > 1:
                data = _channel_mean(f, dtype)  # [T]
            else:
                data = np.ascontiguousarray(f.read(dtype=dtype, always_2d=True).T)  # [C, T] (no copy for C = 1)
                data = data[0] if data.shape[0] == 1 and mono != "keep" else data  # [T]: no copy to downmix
    except MemoryError:
        raise
    except Exception as e:  # libsndfile errors are RuntimeError/LibsndfileError with terse messages
        raise AudioError(f"{name}: cannot decode audio ({type(e).__name__}: {e})") from e
    # Validate at the source rate first, so errors refer to what is in the file.
    pcm = validate_pcm(data, int(sr), name=name, mono=mono, clip=clip, channels_first=True)
    pcm = _resample(pcm, int(sr), target_sr)  # validate_pcm checked the samples
    if target_sr != sr:  # soxr can overshoot slightly near full scale
        pcm = pcm.clamp(-1.0, 1.0)
    return pcm, target_sr
