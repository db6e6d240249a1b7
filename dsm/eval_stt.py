"""``dsm eval-stt MANIFEST``: word error rate and speed over (audio, reference text) pairs.

Manifest: JSON lines with ``audio`` (or ``audio_filepath`` / ``path``) and ``text`` (or ``reference`` /
``transcript``) keys (a NeMo ``duration`` must be the whole file's: segments, by ``offset`` or a shorter duration, are
refused), or TSV lines ``audio<TAB>text`` (a header line ``audio\\ttext`` is skipped). Relative audio
paths are relative to the manifest. Texts are normalised with whisper's English normaliser (as the Open ASR
leaderboard does; typographic apostrophes are first made ASCII, so "don’t" is "do not" as "don't" is, and
invisible format characters such as a zero-width space are then removed) and scored with jiwer
over the whole corpus; pairs whose normalised reference is empty are skipped, as the leaderboard does, and pairs
whose audio failed are counted apart. RTFx = seconds of audio / seconds of wall time.

Needs the ``eval`` extra (``pip install dsm[eval]``: jiwer, whisper-normalizer).
"""

from __future__ import annotations

import json
import sys
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

AUDIO_KEYS = ("audio", "audio_filepath", "path")
TEXT_KEYS = ("text", "reference", "transcript")


class ManifestError(ValueError):
    """The manifest cannot be read (the message names the file and line)."""


@dataclass
class EvalResult:
    wer: float
    n_utterances: int
    n_skipped: int  # empty normalised reference
    audio_seconds: float
    wall_seconds: float
    errors: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)  # per utterance: audio, reference, hypothesis (normalised)
    n_failed: int = 0  # pairs whose audio could not be transcribed (``errors`` says why)

    @property
    def rtfx(self) -> float:
        return self.audio_seconds / max(self.wall_seconds, 1e-9)


def read_manifest(path: str | Path) -> list[tuple[Path, str]]:
    """(audio path, reference) pairs of a jsonl or tsv manifest."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a leading byte-order mark (some editors write one) is not the first path
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ManifestError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); save the manifest as UTF-8"
                            ) from None
    pairs = []
    jsonl = path.suffix in (".jsonl", ".json")
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = None
        if jsonl or (line.lstrip().startswith("{") and path.suffix != ".tsv"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}:{n}: not valid JSON ({e})") from None
            audio = next((row[k] for k in AUDIO_KEYS if k in row), None) if isinstance(row, dict) else None
            text = next((row[k] for k in TEXT_KEYS if k in row), None) if isinstance(row, dict) else None
            if not isinstance(audio, str) or not isinstance(text, str):
                raise ManifestError(f"{path}:{n}: expected an object with one of {AUDIO_KEYS} and one of {TEXT_KEYS}")
        else:
            parts = line.split("\t")
            if len(parts) != 2:  # a third column (a duration) was scored as words of the reference
                raise ManifestError(f"{path}:{n}: expected 'audio<TAB>text', found {len(parts)} tab-separated "
                                    "columns")
            audio, text = parts
            if not pairs and audio.strip().lower() in AUDIO_KEYS and text.strip().lower() in TEXT_KEYS:
                continue  # a header, on the first line with an entry
        p = Path(audio)  # relative to the manifest, and absolute: "-" names a file there, never stdin
        p = p if p.is_absolute() else path.parent.absolute() / p
        if row is not None:
            _check_whole_file(row, path, n, audio, p)
        pairs.append((p, text))
    if not pairs:
        raise ManifestError(f"{path}: manifest has no entries")
    return pairs


def _check_whole_file(row: dict, manifest: Path, n: int, audio: str, file: Path) -> None:
    """NeMo-style ``offset`` / ``duration`` naming a segment of a longer file: refused (each utterance is a whole
    file here; the segments were scored against the whole file's transcript). A ``duration`` equal to the file's
    (within 0.1 s: NeMo writes it for whole files too) is fine."""
    offset, duration = row.get("offset", 0), row.get("duration")
    if offset not in (0, 0.0, None):
        raise ManifestError(f"{manifest}:{n}: offset {offset!r}: segments of a file are not supported (cut each "
                            "utterance into a file of its own)")
    if duration is None:
        return
    try:
        import soundfile as sf

        seconds = sf.info(str(file)).duration
    except Exception:  # a missing or unreadable file fails as that file's error when it is transcribed
        return
    if not isinstance(duration, int | float) or abs(seconds - duration) > 0.1:
        raise ManifestError(f"{manifest}:{n}: duration {duration!r} but {audio} is {seconds:.2f} s long: segments of "
                            "a file are not supported (cut each utterance into a file of its own)")


def english_normalizer() -> Callable[[str], str]:
    try:
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError as e:
        raise ImportError("dsm eval-stt needs whisper-normalizer: pip install 'dsm[eval]'") from e
    return EnglishTextNormalizer()


# Typographic apostrophes: whisper's normaliser expands only the ASCII one ("don't" -> "do not", "don’t" -> "don t"),
# so a reference typeset with U+2019 scored two errors a contraction against a hypothesis with "'".
APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def normalized(normalize: Callable[[str], str], text: str) -> str:
    """``text`` as scored: apostrophes made ASCII, then ``normalize``, then only its visible characters."""
    return visible(normalize(text.translate(APOSTROPHES)))


def visible(text: str) -> str:
    """``text`` without format characters (Unicode Cf: zero-width spaces and joiners, byte-order marks): whisper's
    normaliser keeps them, and a reference holding only one would be scored as a word no transcript can match."""
    return "".join(c for c in text if unicodedata.category(c) != "Cf")


def evaluate(rt, pairs: list[tuple[Path, str]], normalize: Callable[[str], str] | None = None,
             progress: bool = False) -> EvalResult:
    """Transcribe every pair's audio through the runtime and score it (see the module docstring)."""
    try:
        import jiwer
    except ImportError as e:
        raise ImportError("dsm eval-stt needs jiwer: pip install 'dsm[eval]'") from e
    from .stt import transcribe_files

    normalize = normalize or english_normalizer()
    refs = {}
    for audio, text in pairs:
        refs.setdefault(audio, []).append(text)
    t0 = time.perf_counter()
    hyps: dict[Path, str] = {}
    errors, secs = [], 0.0
    for r in transcribe_files(rt, list(refs), progress=progress):
        if r.error is not None:
            errors.append(r.error)
            continue
        hyps[r.path] = r.transcript.text
        secs += r.audio_seconds
    wall = time.perf_counter() - t0
    rows, skipped, failed = [], 0, 0
    for audio, text in pairs:
        ref = normalized(normalize, text)
        if audio not in hyps:
            failed += 1
        elif not ref.split():
            skipped += 1
        else:
            rows.append({"audio": str(audio), "reference": ref, "hypothesis": normalized(normalize, hyps[audio])})
    if not rows:  # say why: the per-file errors are printed only for a result, which this is not
        why = f"; {len(errors)} failed, the first: {errors[0]}" if errors else ""
        raise ManifestError(f"no utterance could be scored (all failed or had empty references){why}")
    wer = jiwer.wer([r["reference"] for r in rows], [r["hypothesis"] for r in rows])
    return EvalResult(wer=float(wer), n_utterances=len(rows), n_skipped=skipped, audio_seconds=secs,
                      wall_seconds=wall, errors=errors, rows=rows, n_failed=failed)


def setup_eval_cli(p) -> None:
    from .stt import add_model_args

    p.add_argument("manifest", metavar="MANIFEST", help="jsonl ({audio, text}) or tsv (audio<TAB>text)")
    add_model_args(p)
    p.add_argument("--output", default=None, help="write per-utterance results and totals as JSON here")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from .bench import check_output, write_replacing
    from .stt import runtime_from_args

    try:
        pairs = read_manifest(args.manifest)
        normalize = english_normalizer()
    except (ManifestError, ImportError) as e:
        print(f"dsm eval-stt: error: {e}", file=sys.stderr)
        return 2
    if args.output and Path(args.output).resolve() in {Path(args.manifest).resolve(), *(p.resolve() for p, _ in pairs)}:
        print(f"dsm eval-stt: error: --output {args.output!r} is the manifest or one of its audio files",
              file=sys.stderr)
        return 2
    if args.output and (why := check_output(args.output)) is not None:  # before the run, not a traceback after it
        print(f"dsm eval-stt: error: {why}", file=sys.stderr)
        return 2
    rt = runtime_from_args(args)
    try:
        res = evaluate(rt, pairs, normalize, progress=args.progress)
    except (ManifestError, ImportError) as e:
        print(f"dsm eval-stt: error: {e}", file=sys.stderr)
        return 1
    for e in res.errors:
        print(f"dsm eval-stt: {e}", file=sys.stderr)
    failed = f", {res.n_failed} failed" if res.n_failed else ""
    print(f"WER {100 * res.wer:.2f} %  ({res.n_utterances} utterances, {res.n_skipped} skipped for an empty "
          f"reference{failed})")
    print(f"RTFx {res.rtfx:.1f}  ({res.audio_seconds:.1f} s of audio in {res.wall_seconds:.1f} s)")
    if args.output:
        out = {"wer": res.wer, "rtfx": res.rtfx, "n_utterances": res.n_utterances, "n_skipped": res.n_skipped,
               "n_failed": res.n_failed, "audio_seconds": res.audio_seconds, "wall_seconds": res.wall_seconds,
               "errors": res.errors, "rows": res.rows}
        try:
            write_replacing(args.output, json.dumps(out, indent=2) + "\n")
        except OSError as e:
            print(f"dsm eval-stt: error: cannot write --output {args.output!r}: {e.strerror or e}", file=sys.stderr)
            return 1
    return 1 if res.errors else 0
