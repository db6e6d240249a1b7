"""Command-line arguments shared by the ``dsm`` subcommands (model source, dtype), kept apart from ``dsm.cli`` so
that the subcommand modules can use them without importing the command table that imports them."""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from .checkpoint import CheckpointFiles, check_device, resolve_checkpoint

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def add_checkpoint_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--checkpoint DIR`` (local directory, config.json path or ``hf://owner/repo``) or ``--hf-repo REPO``."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--checkpoint", metavar="DIR",
                       help="checkpoint directory holding config.json and the files it names, or hf://owner/repo")
    group.add_argument("--hf-repo", metavar="REPO",
                       help="Hugging Face repo (owner/name); honours HF_HUB_OFFLINE and HF_HUB_CACHE")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) for --hf-repo")


def add_batch_invariant_arg(parser: argparse.ArgumentParser) -> None:
    """``--batch-invariant`` of the runtimes' commands (``STTOptions`` / ``TTSConfig.batch_invariant``)."""
    parser.add_argument("--batch-invariant", action="store_true",
                        help="every step runs every slot: a stream's outputs are the same bits whatever the other "
                             "streams do (default: the steps run the streams' batch buckets, which can round "
                             "differently)")


class UsageError(Exception):
    """Command-line flags that do not go together: one line and exit status 2, as argparse's own errors."""


def checkpoint_from_args(args: argparse.Namespace) -> CheckpointFiles:
    """Resolve the checkpoint named by :func:`add_checkpoint_args` arguments."""
    return resolve_checkpoint(getattr(args, "checkpoint", None), getattr(args, "hf_repo", None),
                              revision=getattr(args, "revision", None))


def model_files_from_args(args: argparse.Namespace) -> CheckpointFiles:
    """The checkpoint of a command's model flags: exactly one of ``--checkpoint DIR``, ``--hf-repo REPO`` or
    ``--preset NAME --random-weights`` (a cached random checkpoint). UsageError for any other mix: a flag left over
    must not be ignored (``--checkpoint DIR --preset P --random-weights`` served random weights)."""
    from .checkpoint import ensure_random_checkpoint

    check_model_flags(args)
    if args.preset is not None:
        return resolve_checkpoint(ensure_random_checkpoint(args.preset))
    return checkpoint_from_args(args)


def check_model_flags(args: argparse.Namespace) -> None:
    """UsageError unless the model flags name one source (see :func:`model_files_from_args`); reads no file."""
    given = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--hf-repo", args.hf_repo),
                                      ("--preset", args.preset)) if value is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of --checkpoint DIR, --hf-repo REPO or --preset NAME --random-weights"
                         + (f" (got {' and '.join(given)})" if given else ""))
    if args.preset is not None and not args.random_weights:
        raise UsageError(f"--preset {args.preset} needs --random-weights (real weights come from --checkpoint or "
                         "--hf-repo)")
    if args.random_weights and args.preset is None:
        raise UsageError("--random-weights goes with --preset NAME")


def parse_device(name: str) -> torch.device:
    """``--device``: a torch device this process can use (a CUDA device needs a CUDA build of torch and a GPU)."""
    try:
        return check_device(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def select_device(device: torch.device | None) -> None:
    """Make ``--device cuda:N`` the current CUDA device: Triton launches and CUDA-graph captures go to the current
    device, not to their tensors' (``dsm.cuda_graphs.check_current_device`` refuses a mismatch)."""
    if device is not None and device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def device_or_default(device: torch.device | None) -> torch.device:
    """The parsed ``--device``, else the GPU when there is one, else the CPU; a ``cuda:N`` becomes the current CUDA
    device (:func:`select_device`: every command and benchmark script that takes ``--device`` comes here)."""
    select_device(device)
    return device if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def int_in_range(low: int, high: int | None, expected: str):
    """An argparse ``type``: an integer in ``[low, high]`` (no upper bound for None), else "expected <expected>"."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = None
        if n is None or n < low or (high is not None and n > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return n

    return parse


def finite_number(zero: bool, expected: str):
    """An argparse ``type``: a finite number > 0 (or >= 0 with ``zero``), else "expected <expected>"; NaN, inf and
    negatives are refused."""

    def parse(text: str) -> float:
        try:
            t = float(text)
        except ValueError:
            t = math.nan
        if not (0 <= t if zero else 0 < t) or not math.isfinite(t):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return t

    return parse


def seconds(zero: bool):
    """An argparse ``type``: a finite number of seconds, > 0 (or >= 0 with ``zero``)."""
    return finite_number(zero, f"a time in seconds {'>=' if zero else '>'} 0")


temperature = finite_number(True, "a temperature >= 0 (0: greedy)")  # a sampling temperature


positive_int = int_in_range(1, None, "a positive integer")
nonnegative_int = int_in_range(0, None, "an integer >= 0")
port_number = int_in_range(0, 65535, "a TCP port in 0..65535")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}") from None


def read_stdin_bytes() -> bytes:
    """All of stdin as bytes, for a ``-`` file argument; OSError when the process was started with stdin closed."""
    import sys

    if sys.stdin is None:  # started with stdin closed (<&-)
        raise OSError("stdin is closed")
    buffer = getattr(sys.stdin, "buffer", None)  # a replaced stdin (tests, embedding apps) may have none
    data = buffer.read() if buffer is not None else sys.stdin.read()
    return data if isinstance(data, bytes) else data.encode("utf-8")


def stdout_to_devnull() -> None:
    """After a broken pipe (``dsm ... | head``): Python would report it again when it flushes stdout at exit."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (a captured stdout)
        pass
