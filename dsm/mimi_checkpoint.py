"""Mimi architecture constants and the released checkpoint layout (DSM-SPEC §7, §8.4): names, shapes, loading.

Kept apart from the model so that tools can validate a checkpoint without building anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

SAMPLE_RATE = 24000
FRAME_SIZE = 1920  # samples per 80 ms code frame
CARDINALITY = 2048
MAX_CODEBOOKS = 32
DIM = 512
CODE_DIM = 256
NUM_HEADS = 8
NUM_LAYERS = 8
CONTEXT = 250
MAX_PERIOD = 10000.0

# SEANet op lists (§7.3/7.4): ("conv", key index, c_in, c_out, kernel, stride) / ("convtr", ...) / ("res", idx, ch)
# / ("elu",). The key index is the position in the reference nn.Sequential, hence the tensor names.
ENCODER_OPS: tuple[tuple, ...] = (
    ("conv", 0, 1, 64, 7, 1),
    ("res", 1, 64),
    ("elu",),
    ("conv", 3, 64, 128, 8, 4),
    ("res", 4, 128),
    ("elu",),
    ("conv", 6, 128, 256, 10, 5),
    ("res", 7, 256),
    ("elu",),
    ("conv", 9, 256, 512, 12, 6),
    ("res", 10, 512),
    ("elu",),
    ("conv", 12, 512, 1024, 16, 8),
    ("elu",),
    ("conv", 14, 1024, 512, 3, 1),
)
DECODER_OPS: tuple[tuple, ...] = (
    ("conv", 0, 512, 1024, 7, 1),
    ("elu",),
    ("convtr", 2, 1024, 512, 16, 8),
    ("res", 3, 512),
    ("elu",),
    ("convtr", 5, 512, 256, 12, 6),
    ("res", 6, 256),
    ("elu",),
    ("convtr", 8, 256, 128, 10, 5),
    ("res", 9, 128),
    ("elu",),
    ("convtr", 11, 128, 64, 8, 4),
    ("res", 12, 64),
    ("elu",),
    ("conv", 14, 64, 1, 3, 1),
)
_OLD_CODEBOOK_NAMES = {"embed_avg": "embedding_sum", "embed_sum": "embedding_sum", "cluster_size": "cluster_usage",
                       "inited": "_initialized"}


class MimiCheckpointError(ValueError):
    """A Mimi checkpoint cannot be read, misses tensors, has extra ones or has a wrong shape/dtype."""


def seanet_convs(prefix: str, ops: tuple[tuple, ...]) -> list[tuple[str, int, int, int, int, bool]]:
    """Flatten an op list to (tensor prefix, c_in, c_out, kernel, stride, transposed) for every conv."""
    out = []
    for op in ops:
        if op[0] == "conv":
            out.append((f"{prefix}.model.{op[1]}.conv.conv", op[2], op[3], op[4], op[5], False))
        elif op[0] == "convtr":
            out.append((f"{prefix}.model.{op[1]}.convtr.convtr", op[2], op[3], op[4], op[5], True))
        elif op[0] == "res":
            ch = op[2]
            out.append((f"{prefix}.model.{op[1]}.block.1.conv.conv", ch, ch // 2, 3, 1, False))
            out.append((f"{prefix}.model.{op[1]}.block.3.conv.conv", ch // 2, ch, 1, 1, False))
    return out


def mimi_tensor_shapes() -> dict[str, tuple[int, ...]]:
    """Name -> shape of all 318 tensors of a released Mimi checkpoint (DSM-SPEC §8.4)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, cin, cout, k, _, transposed in seanet_convs("encoder", ENCODER_OPS) + seanet_convs(
        "decoder", DECODER_OPS
    ):
        shapes[f"{name}.weight"] = (cin, cout, k) if transposed else (cout, cin, k)
        shapes[f"{name}.bias"] = (cout,)
    for side in ("encoder", "decoder"):
        for i in range(NUM_LAYERS):
            p = f"{side}_transformer.transformer.layers.{i}."
            shapes[p + "self_attn.in_proj_weight"] = (3 * DIM, DIM)
            shapes[p + "self_attn.out_proj.weight"] = (DIM, DIM)
            for n in ("norm1", "norm2"):
                shapes[p + f"{n}.weight"] = (DIM,)
                shapes[p + f"{n}.bias"] = (DIM,)
            shapes[p + "linear1.weight"] = (4 * DIM, DIM)
            shapes[p + "linear2.weight"] = (DIM, 4 * DIM)
            shapes[p + "layer_scale_1.scale"] = (DIM,)
            shapes[p + "layer_scale_2.scale"] = (DIM,)
    shapes["downsample.conv.conv.conv.weight"] = (DIM, DIM, 4)
    shapes["upsample.convtr.convtr.convtr.weight"] = (DIM, 1, 4)
    for group, n in (("rvq_first", 1), ("rvq_rest", MAX_CODEBOOKS - 1)):
        p = f"quantizer.{group}."
        shapes[p + "input_proj.weight"] = (CODE_DIM, DIM, 1)
        shapes[p + "output_proj.weight"] = (DIM, CODE_DIM, 1)
        for level in range(n):
            c = f"{p}vq.layers.{level}._codebook."
            shapes[c + "embedding_sum"] = (CARDINALITY, CODE_DIM)
            shapes[c + "cluster_usage"] = (CARDINALITY,)
            shapes[c + "_initialized"] = (1,)
    return shapes


def _rename_old(name: str) -> str:
    head, _, last = name.rpartition(".")
    if "_codebook" in head and last in _OLD_CODEBOOK_NAMES:
        return f"{head}.{_OLD_CODEBOOK_NAMES[last]}"
    return name


def check_mimi_state_dict(sd: dict[str, torch.Tensor], source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Map old codebook names, then require exactly the released names and shapes; errors name file and tensor."""
    if not isinstance(sd, Mapping):  # Mimi("file.safetensors") failed with "'str' object has no attribute 'items'"
        hint = " (use Mimi.from_file for a path)" if isinstance(sd, str | Path) else ""
        raise TypeError(f"{source}: a Mimi state dict must be a mapping of names to tensors, got "
                        f"{type(sd).__name__}{hint}")
    renamed: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        new = _rename_old(k)
        if new in renamed:  # two names of one tensor (old and new): which one holds the weights is unknown
            first = next(old for old in sd if _rename_old(old) == new)
            raise MimiCheckpointError(f"{source}: tensors {first} and {k} are two names of {new}; keep one")
        renamed[new] = v
    sd = renamed
    expected = mimi_tensor_shapes()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        raise MimiCheckpointError(f"{source}: {len(missing)} missing Mimi tensor(s), first: {missing[:5]}")
    if unexpected:
        raise MimiCheckpointError(f"{source}: {len(unexpected)} unexpected tensor(s), first: {unexpected[:5]}")
    for name, shape in expected.items():
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            raise MimiCheckpointError(f"{source}: tensor {name} is a {type(t).__name__}, expected a torch.Tensor")
        if tuple(t.shape) != shape:
            raise MimiCheckpointError(f"{source}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        if not t.dtype.is_floating_point:
            raise MimiCheckpointError(f"{source}: tensor {name} has dtype {t.dtype}, expected a float dtype")
    return sd


def load_mimi_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read and validate a Mimi safetensors file (fp32 on CPU)."""
    from safetensors.torch import load_file

    from .checkpoint import check_finite

    path = Path(path)
    if not path.is_file():
        raise MimiCheckpointError(f"{path}: Mimi checkpoint file not found")
    try:
        sd = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise MimiCheckpointError(f"{path}: cannot read Mimi safetensors ({type(e).__name__}: {e})") from e
    sd = check_mimi_state_dict(sd, str(path))
    check_finite(sd, path, MimiCheckpointError)
    return sd
