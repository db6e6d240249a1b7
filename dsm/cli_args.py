"""Command-line arguments shared by the ``dsm`` subcommands (model source, dtype), kept apart from ``dsm.cli`` so
that the subcommand modules can use them without importing the command table that imports them."""

from __future__ import annotations

import argparse

import torch

from .checkpoint import CheckpointFiles, resolve_checkpoint

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


def checkpoint_from_args(args: argparse.Namespace) -> CheckpointFiles:
    """Resolve the checkpoint named by :func:`add_checkpoint_args` arguments."""
    return resolve_checkpoint(getattr(args, "checkpoint", None), getattr(args, "hf_repo", None),
                              revision=getattr(args, "revision", None))


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}") from None
