"""``dsm`` command line.

Subcommands are registered in :func:`subcommands` (name -> setup function). A setup function receives its
argparse sub-parser, adds its arguments and sets ``func`` (``func(args) -> int`` exit status). Commands that take a
model use ``dsm.cli_args`` (``add_checkpoint_args``, ``checkpoint_from_args``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import __version__
from .checkpoint import CheckpointError
from .cli_args import (
    UsageError,
    device_or_default,
    int_in_range,
    parse_device,
    parse_dtype,
    select_device,
    stdout_to_devnull,
)
from .config import ConfigError
from .memory import first_line, out_of_memory
from .mimi_checkpoint import MimiCheckpointError
from .tokenizer import TokenizerError

# ---------------------------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------------------------


def _setup_random_checkpoint(p: argparse.ArgumentParser) -> None:
    from .presets import PRESETS

    p.add_argument("--preset", required=True, choices=PRESETS, help="model preset")
    p.add_argument("out_dir", metavar="OUT_DIR", type=_out_dir, help="directory to write (created if needed)")
    p.add_argument("--seed", type=int_in_range(-(2**63), 2**63 - 1, "an integer that fits int64"), default=0)
    p.add_argument("--dtype", type=parse_dtype, default=torch.bfloat16, help="LM dtype (default bfloat16)")
    p.add_argument("--no-mimi", dest="mimi", action="store_false", help="do not write Mimi weights")
    p.add_argument("--no-tokenizer", dest="tokenizer", action="store_false", help="do not train a tokenizer")
    p.set_defaults(func=_cmd_random_checkpoint)


def _out_dir(text: str) -> str:
    if not text:  # an unset shell variable: Path("") is the current directory, which would get the checkpoint
        raise argparse.ArgumentTypeError("expected a directory, got an empty name")
    return text


def _cmd_random_checkpoint(args: argparse.Namespace) -> int:
    from .checkpoint import write_random_checkpoint
    from .config import parse_config
    from .presets import preset_config

    try:
        out = write_random_checkpoint(args.preset, args.out_dir, seed=args.seed, dtype=args.dtype, mimi=args.mimi,
                                      tokenizer=args.tokenizer)
    except OSError as e:  # OUT_DIR is a file, under a file, read-only, the disk is full...
        print(f"dsm random-checkpoint: error: {e.filename or args.out_dir}: cannot write ({e.strerror or e})",
              file=sys.stderr)
        return 1
    cfg = parse_config(preset_config(args.preset))
    written = ["config.json", cfg.moshi_name] + [cfg.mimi_name] * args.mimi + [cfg.tokenizer_name] * args.tokenizer
    for f in sorted(out / name for name in written):  # not the directory's other files
        print(f"{f}  {f.stat().st_size} bytes")
    return 0


def _setup_info(p: argparse.ArgumentParser) -> None:
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    import dsm_kernels

    print(f"dsm {__version__}")
    cuda = (f"cuda {torch.version.cuda}, available: {torch.cuda.is_available()}" if torch.version.cuda
            else "a CPU-only build")  # not "cuda None"
    print(f"torch {torch.__version__} ({cuda})")
    print(f"python {sys.version.split()[0]}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        backends = dsm_kernels.available_backends(dev)
        hint = ""
        if dev == "cpu" and "triton" not in backends and dsm_kernels.has_triton():
            hint = " (TRITON_INTERPRET=1 adds triton: its kernels in Triton's interpreter, for tests, slow)"
        print(f"kernel backends on {dev}: {', '.join(backends)}{hint}")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        print(f"gpu: {torch.cuda.get_device_name()} (sm_{major}{minor})")
        why = dsm_kernels.cuda_ext_unavailable("cuda")
        print(f"cuda kernels: {why or 'built for sm_%s, run on this GPU' % (dsm_kernels.cuda_ext_arch() or '?')}")
    if not dsm_kernels.has_triton():  # the kernel switches below are Triton's
        print("triton: not installed (pip install 'dsm[triton]' for the Triton kernels, or their CPU interpreter)")
        return 0
    from dsm_kernels.pdl import use_pdl

    rows = dsm_kernels.gemv_max_rows()
    print(f"small-batch GEMV kernels: {f'up to {rows} rows' if rows else 'off'} (DSM_GEMV=0 turns them off)")
    pdl = torch.cuda.is_available() and use_pdl("cuda")
    print(f"programmatic dependent launch: {'on' if pdl else 'off'} (sm_90+; DSM_NO_PDL=1 turns it off)")
    return 0


def _setup_validate_kernels(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=parse_device, default=None,
                   help="device to validate on (default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="also write the rows, with the device and versions, as JSON (for a CI)")
    p.set_defaults(func=_cmd_validate_kernels)


def _cmd_validate_kernels(args: argparse.Namespace) -> int:
    import dsm_kernels
    from dsm_kernels.validate import print_table, validate_kernels

    device = device_or_default(args.device)
    if args.json is not None:
        from .bench import check_output

        if (why := check_output(args.json, "--json")) is not None:  # before the run, not a traceback after it
            print(f"dsm validate-kernels: error: {why}", file=sys.stderr)
            return 2
    rows = validate_kernels(device, quick=args.quick)
    if not rows:
        found = ", ".join(dsm_kernels.available_backends(device))
        hint = ("on a CPU, set TRITON_INTERPRET=1" if dsm_kernels.has_triton() else
                "Triton is not installed: pip install 'dsm[triton]'")
        print(f"dsm validate-kernels: no fast kernel backend on {device} (only {found}); {hint}", file=sys.stderr)
        return 1
    print_table(rows)
    if args.json is not None:
        import dataclasses
        import json

        from .bench import environment, strict_json, write_replacing

        # an error row's inf error is null in strict JSON
        doc = strict_json({**environment(device), "validated_on": str(device),
                           "rows": [dataclasses.asdict(r) for r in rows]})
        try:
            write_replacing(args.json, json.dumps(doc, indent=1, allow_nan=False) + "\n")
        except OSError as e:
            print(f"dsm validate-kernels: error: cannot write --json {str(args.json)!r}: {e.strerror or e}",
                  file=sys.stderr)
            return 1
    return 0 if all(r.ok for r in rows) else 1


def _setup_bench(p: argparse.ArgumentParser) -> None:
    from .bench import setup_parser

    setup_parser(p)


def _setup_speak(p: argparse.ArgumentParser) -> None:
    from .tts import setup_speak_parser

    setup_speak_parser(p)


def subcommands() -> dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]]:
    """Name -> (help, setup). Add ``transcribe``, ``speak``, ``bench``… here."""
    from .eval_stt import setup_eval_cli
    from .stt import setup_transcribe_cli

    return {
        "transcribe": ("speech to text for audio files (txt, json, srt, vtt, tsv outputs)", setup_transcribe_cli),
        "eval-stt": ("word error rate and RTFx of STT over a manifest of (audio, reference text)", setup_eval_cli),
        "random-checkpoint": ("write a checkpoint with random weights in the released layout",
                              _setup_random_checkpoint),
        "info": ("versions and available kernel backends", _setup_info),
        "validate-kernels": ("check every kernel backend against the reference ops", _setup_validate_kernels),
        "speak": ("text to speech (streaming); writes a wav or raw float32 PCM", _setup_speak),
        "bench": ("step latency, rtf/rtfx and capacity of the engine, moshi timed beside", _setup_bench),
        "serve-stt": ("moshi-server compatible streaming ASR websocket (/api/asr-streaming)", _setup_serve_stt),
        "serve-tts": ("moshi-server compatible streaming TTS websocket (/api/tts_streaming)", _setup_serve_tts),
    }


def _setup_serve_stt(p: argparse.ArgumentParser) -> None:
    from .server import setup_serve_stt_parser

    setup_serve_stt_parser(p)


def _setup_serve_tts(p: argparse.ArgumentParser) -> None:
    from .server import setup_serve_tts_parser

    setup_serve_tts_parser(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsm", description="Fast inference for Kyutai DSM speech models.")
    parser.add_argument("--version", action="version", version=f"dsm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, setup) in subcommands().items():
        setup(sub.add_parser(name, help=help_, description=help_))
    return parser


def _user_warning_printer(command: str, default):
    """``showwarning`` that prints dsm's warnings about the user's input (clipped or truncated audio) as one line, as
    errors are, rather than Python's format with our source line; other warnings keep ``default``."""
    from .audio import AudioInputWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, AudioInputWarning):
            print(f"dsm {command}: warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    select_device(getattr(args, "device", None))
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _user_warning_printer(args.command, warnings.showwarning)
            return int(args.func(args) or 0)
    except UsageError as e:  # flags that do not go together, as argparse's errors
        print(f"dsm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, ConfigError, MimiCheckpointError, TokenizerError) as e:  # bad model files: no traceback
        print(f"dsm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:  # a batch, context or config size past this machine
        if not out_of_memory(e):
            raise
        print(f"dsm {args.command}: error: out of memory ({first_line(e)}); use a smaller batch, or check the sizes "
              "in the model's config", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader of stdout went away (`dsm info | head -1`): one line, not a traceback
        stdout_to_devnull()
        print(f"dsm {args.command}: error: stdout was closed before all the output was written (broken pipe)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: what was written so far stays (a wav keeps a valid header)
        print(f"dsm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
