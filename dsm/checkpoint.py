"""Checkpoint files: expected LM tensors, validated loading, resolution (local dir / Hugging Face) and random
checkpoints with the released layout (DSM-SPEC §8).

Tensor names follow the released PyTorch checkpoints: attention projections of a multi-weight-set depformer are
stored stacked (``self_attn.in_proj_weight`` ``[sets·3d, d]``, ``self_attn.out_proj.weight`` ``[sets·d, d]``); the
unstacked ``in_projs.{i}.weight`` / ``out_projs.{i}.weight`` forms are accepted at load and stacked.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import CheckpointConfig, ConfigError, LMConfig, config_to_dict, parse_config


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match its config."""


TensorSpec = tuple[tuple[int, ...], torch.dtype]

FP32_PREFIXES = ("condition_provider.", "fuser.")

_ST_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_UNSTACKED = re.compile(r"^(?P<prefix>.*)\.(?P<kind>in_projs|out_projs)\.(?P<idx>\d+)\.weight$")


def is_fp32_key(name: str) -> bool:
    """Keys kept in float32 whatever the LM dtype (conditioners and fuser, as moshi does)."""
    return name.startswith(FP32_PREFIXES)


# ---------------------------------------------------------------------------------------------------------------
# Expected tensors
# ---------------------------------------------------------------------------------------------------------------


def _norm(out: dict, prefix: str, norm: str, d: int) -> None:
    if norm.startswith("layer_norm"):
        out[f"{prefix}.weight"] = (d,)
        out[f"{prefix}.bias"] = (d,)
    else:
        out[f"{prefix}.alpha"] = (1, 1, d)


def _embedding(out: dict, prefix: str, num: int, dim: int, *, norm: bool, low_rank: int | None = None,
               demux: bool = False) -> None:
    inner = low_rank or dim
    out[f"{prefix}.weight"] = (num, inner)
    if norm and not demux:
        out[f"{prefix}.norm.weight"] = (inner,)
        out[f"{prefix}.norm.bias"] = (inner,)
    if low_rank:
        out[f"{prefix}.low_rank.weight"] = (dim, low_rank)
    if demux:
        out[f"{prefix}.out1.weight"] = (dim, inner)
        out[f"{prefix}.out2.weight"] = (dim, inner)


def gating_hidden(d: int, dim_feedforward: int) -> int:
    """Hidden width of moshi's ``ActivationGating`` for a model width ``d`` and a nominal FFN width."""
    return (21 * d) // 8 if dim_feedforward == 4 * d else (2 * dim_feedforward) // 3


def _transformer(out: dict, prefix: str, *, d: int, num_heads: int, num_layers: int, ffn: int, norm: str,
                 gating: str, layer_scale: float | None, kv_repeat: int, weight_sets: int, per_step: bool,
                 cross_attention: bool) -> None:
    head_dim = d // num_heads
    qkv = d + 2 * head_dim * (num_heads // kv_repeat)
    for layer in range(num_layers):
        p = f"{prefix}.layers.{layer}"
        out[f"{p}.self_attn.in_proj_weight"] = (weight_sets * qkv, d)
        out[f"{p}.self_attn.out_proj.weight"] = (weight_sets * d, d)
        _norm(out, f"{p}.norm1", norm, d)
        _norm(out, f"{p}.norm2", norm, d)
        if gating == "none":
            out[f"{p}.linear1.weight"] = (ffn, d)
            out[f"{p}.linear2.weight"] = (d, ffn)
        else:
            h = gating_hidden(d, ffn)
            gates = [f"{p}.gating.{j}" for j in range(weight_sets)] if per_step else [f"{p}.gating"]
            for g in gates:
                out[f"{g}.linear_in.weight"] = (2 * h, d)
                out[f"{g}.linear_out.weight"] = (d, h)
        if cross_attention:
            out[f"{p}.cross_attention.in_proj_weight"] = (qkv, d)
            out[f"{p}.cross_attention.out_proj.weight"] = (d, d)
            out[f"{p}.norm_cross.weight"] = (d,)
            out[f"{p}.norm_cross.bias"] = (d,)
        if layer_scale is not None:
            out[f"{p}.layer_scale_1.scale"] = (d,)
            out[f"{p}.layer_scale_2.scale"] = (d,)
            if cross_attention:
                out[f"{p}.layer_scale_cross.scale"] = (d,)


def expected_lm_tensors(cfg: LMConfig | CheckpointConfig, dtype: torch.dtype = torch.bfloat16
                        ) -> dict[str, TensorSpec]:
    """Released tensor names -> (shape, dtype) of the LM described by ``cfg`` (stacked attention projections).

    ``dtype`` is the LM dtype (bf16 on disk); ``condition_provider.*`` / ``fuser.*`` tensors are float32.
    """
    if isinstance(cfg, CheckpointConfig):
        cfg = cfg.lm
    shapes: dict[str, tuple[int, ...]] = {}
    d = cfg.dim
    for k in range(cfg.n_q):
        _embedding(shapes, f"emb.{k}", cfg.card + 1, d, norm=cfg.norm_emb)
    _embedding(shapes, "text_emb", cfg.text_card + 1, d, norm=cfg.norm_emb, demux=cfg.demux_second_text_stream)
    shapes["text_linear.weight"] = (cfg.text_out, d)
    if cfg.bias_proj:
        shapes["text_linear.bias"] = (cfg.text_out,)
    _transformer(shapes, "transformer", d=d, num_heads=cfg.num_heads, num_layers=cfg.num_layers, ffn=cfg.ffn_dim,
                 norm=cfg.norm, gating=cfg.gating, layer_scale=cfg.layer_scale, kv_repeat=cfg.kv_repeat,
                 weight_sets=1, per_step=False, cross_attention=cfg.cross_attention)
    _norm(shapes, "out_norm", cfg.norm, d)
    dd = cfg.depformer_dim
    for i in range(cfg.dep_num_in):
        shapes[f"depformer_in.{i}.weight"] = (dd, d)
    if cfg.dep_q > 0:
        low_rank = cfg.depformer_low_rank_embeddings
        for k in range(cfg.dep_q - 1):
            _embedding(shapes, f"depformer_emb.{k}", cfg.card + 1, dd, norm=cfg.norm_emb, low_rank=low_rank)
        _embedding(shapes, "depformer_text_emb", cfg.text_card + 1, dd, norm=cfg.norm_emb, low_rank=low_rank,
                   demux=cfg.demux_second_text_stream)
        if cfg.depformer_norm is not None:
            for k in range(cfg.dep_q):
                _norm(shapes, f"depformer_norms.{k}", cfg.depformer_norm, dd)
        _transformer(shapes, "depformer", d=dd, num_heads=cfg.dep_num_heads, num_layers=cfg.dep_num_layers,
                     ffn=cfg.dep_ffn_dim, norm=cfg.norm, gating=cfg.dep_gating, layer_scale=cfg.depformer_layer_scale,
                     kv_repeat=cfg.kv_repeat, weight_sets=cfg.dep_weight_sets,
                     per_step=cfg.depformer_weights_per_step, cross_attention=False)
    for i in range(cfg.extra_heads_num_heads):
        shapes[f"extra_heads.{i}.weight"] = (cfg.extra_heads_dim, d)
    for k in range(cfg.dep_q):
        shapes[f"linears.{k}.weight"] = (cfg.card, dd)
        if cfg.bias_proj:
            shapes[f"linears.{k}.bias"] = (cfg.card,)
    for c in cfg.conditioners:
        p = f"condition_provider.conditioners.{c.name}"
        out_dim = c.output_dim or d
        if c.type == "lut":
            shapes[f"{p}.embed.weight"] = (c.n_bins + 1, c.dim)
        if c.force_linear or c.dim != out_dim:
            shapes[f"{p}.output_proj.weight"] = (out_dim, c.dim)
            if c.output_bias:
                shapes[f"{p}.output_proj.bias"] = (out_dim,)
        if c.learn_padding:
            shapes[f"{p}.learnt_padding"] = (1, 1, out_dim)
    return {k: (v, torch.float32 if is_fp32_key(k) else dtype) for k, v in shapes.items()}


def count_params(tensors: Mapping[str, TensorSpec]) -> int:
    return sum(math.prod(shape) for shape, _ in tensors.values())


def stack_projections(state: Mapping[str, Any], source: str = "state dict") -> dict[str, Any]:
    """Map the unstacked ``*.in_projs.{i}.weight`` / ``*.out_projs.{i}.weight`` forms (moshi's module names) to the
    released stacked ``*.in_proj_weight`` / ``*.out_proj.weight``; ``*.in_proj.weight`` is renamed too. A tensor
    given in two of these forms is refused (one would silently win).

    Values may be tensors (stacked with ``torch.cat``, meta tensors included) or shapes (tuples).
    """
    out: dict[str, Any] = {}
    given: dict[str, str] = {}  # released name -> the name it came from

    def put(name: str, value: Any, key: str) -> None:
        if name in given:
            raise CheckpointError(f"{source}: tensor {name!r} is given twice, as {given[name]!r} and as {key!r}")
        out[name], given[name] = value, key

    groups: dict[tuple[str, str], dict[int, Any]] = {}
    for key, value in state.items():
        m = _UNSTACKED.match(key)
        if m:
            groups.setdefault((m["prefix"], m["kind"]), {})[int(m["idx"])] = value
        elif key.endswith(".in_proj.weight"):
            put(key[: -len(".in_proj.weight")] + ".in_proj_weight", value, key)
        else:
            put(key, value, key)
    for (prefix, kind), parts in groups.items():
        name = f"{prefix}.in_proj_weight" if kind == "in_projs" else f"{prefix}.out_proj.weight"
        if sorted(parts) != list(range(len(parts))):
            raise CheckpointError(f"{source}: tensor {prefix}.{kind}.*: weight sets {sorted(parts)} are not "
                                  f"0..{len(parts) - 1}")
        seq = [parts[i] for i in range(len(parts))]
        if isinstance(seq[0], torch.Tensor):
            value = seq[0] if len(seq) == 1 else torch.cat(seq, dim=0)
        else:
            first = tuple(seq[0])
            if any(tuple(s)[1:] != first[1:] for s in seq):
                raise CheckpointError(f"{source}: tensor {prefix}.{kind}.*: weight sets have different shapes")
            value = (sum(tuple(s)[0] for s in seq), *first[1:])
        put(name, value, f"{prefix}.{kind}.*")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Safetensors reading with validation
# ---------------------------------------------------------------------------------------------------------------


def read_safetensors_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """Parse and validate a safetensors header: name -> {dtype, shape, data_offsets}. Raises CheckpointError for
    a missing, truncated or non-safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > 100_000_000:
            raise CheckpointError(f"{path}: not a safetensors file (implausible header length {n})")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {n} bytes, file has "
                                  f"{size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (header is not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    if not isinstance(header.pop("__metadata__", None), dict | None):
        raise CheckpointError(f"{path}: not a safetensors file (__metadata__ is not a JSON object)")
    data_size = size - 8 - n

    def ints(v: Any, n: int | None = None) -> bool:
        return (isinstance(v, list) and (n is None or len(v) == n)
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v))

    for name, info in header.items():
        # Types checked before use: a malformed entry is a corrupt file, not a TypeError traceback.
        if (not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info)
                or not isinstance(info["dtype"], str) or not ints(info["shape"]) or not ints(info["data_offsets"], 2)):
            raise CheckpointError(f"{path}: tensor {name!r}: malformed header entry {info!r}")
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r}: unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        itemsize = torch.empty((), dtype=_ST_DTYPES[info["dtype"]]).element_size()
        if end - begin != math.prod(info["shape"]) * itemsize:
            raise CheckpointError(f"{path}: tensor {name!r}: data offsets {info['data_offsets']} do not match "
                                  f"shape {info['shape']} of {info['dtype']}")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated file: tensor {name!r} needs bytes up to {8 + n + end}, file "
                                  f"has {size}")
    # As the safetensors library requires: tensor data packed back to back, no overlap and no gap.
    pos = 0
    for name, info in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        begin, end = info["data_offsets"]
        if begin != pos:
            raise CheckpointError(f"{path}: corrupt file: tensor {name!r} data starts at offset {begin}, expected "
                                  f"{pos} ({'it overlaps the previous tensor' if begin < pos else 'a gap before it'})")
        pos = end
    if pos != data_size:
        raise CheckpointError(f"{path}: corrupt file: tensor data ends at byte {8 + n + pos} but the file has "
                              f"{size} bytes")
    return header


def check_lm_header(path: str | Path, cfg: LMConfig | CheckpointConfig) -> dict[str, dict[str, Any]]:
    """Validate names, shapes and dtypes of the LM file at ``path`` against ``cfg``; returns the header."""
    path = Path(path)
    header = read_safetensors_header(path)
    expected = expected_lm_tensors(cfg)
    shapes = {name: tuple(info["shape"]) for name, info in header.items()}
    canon = stack_projections(shapes, str(path))
    for name, info in header.items():
        dt = _ST_DTYPES[info["dtype"]]
        if not dt.is_floating_point:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']}, expected a float dtype")
    missing = [k for k in expected if k not in canon]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}{more}")
    unexpected = [k for k in canon if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r}{more} (not in the config's model)")
    for name, (shape, _) in expected.items():
        got = canon[name]
        if got != shape and not _alpha_compatible(name, got, shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")
    return header


def _alpha_compatible(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """RMS norm scales are ``[1,1,d]``; converted copies store ``[d]``: accepted."""
    return name.endswith(".alpha") and len(want) == 3 and got == (want[-1],)


def load_lm_state_dict(path: str | Path, cfg: LMConfig | CheckpointConfig, dtype: torch.dtype = torch.bfloat16,
                       device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load and validate an LM safetensors file; released (stacked) names, float tensors cast to ``dtype`` except
    the fp32 conditioner / fuser tensors. Every check runs before any tensor is read."""
    from safetensors import safe_open

    path = Path(path)
    device = check_device(device)
    check_lm_header(path, cfg)
    expected = expected_lm_tensors(cfg, dtype)
    raw: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                # Each tensor goes to the device as it is read: the host never holds the whole model (GBs).
                t = f.get_tensor(name)
                raw[name] = t.to(device=device, dtype=torch.float32 if is_fp32_key(name) else dtype)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot read tensors ({e})") from None
    state = stack_projections(raw, str(path))
    out = {}
    for name, (shape, _) in expected.items():
        t = state[name]
        out[name] = t if tuple(t.shape) == shape else t.reshape(shape)
    check_finite(out, path)
    return out


def check_device(device: str | torch.device) -> torch.device:
    """A device this process can use (cpu, or cuda with a CUDA build and a GPU), else ValueError. Loaders call it
    before reading any file: torch's own error (an AssertionError "Torch not compiled with CUDA enabled") came only
    once the whole file had been read."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(device)!r}; e.g. cpu, cuda, cuda:1") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
            raise ValueError(f"{dev}: CUDA is not available here ({build})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{dev}: there are {torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise ValueError(f"device {str(dev)!r}: dsm runs on cpu or cuda")
    elif dev.index not in (None, 0):  # torch takes any index and runs on the one CPU device
        raise ValueError(f"{dev}: there is one CPU device: use cpu")
    return dev


def check_finite(tensors: Mapping[str, torch.Tensor], path: str | Path, error: type[Exception] = CheckpointError
                 ) -> None:
    """Refuse weights holding NaN or infinity (a damaged or badly converted file): the model would run and emit
    nothing but padding or noise. One host sync for all the tensors, on their device."""
    names = [n for n, t in tensors.items() if t.dtype.is_floating_point and t.numel()]
    if not names:
        return
    ok = torch.stack([torch.isfinite(tensors[n]).all() for n in names]).tolist()
    bad = [n for n, good in zip(names, ok, strict=True) if not good]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise error(f"{path}: tensor {bad[0]!r}{more} holds NaN or infinite values")


# ---------------------------------------------------------------------------------------------------------------
# Resolution: local directory, hf://owner/repo[/path], --hf-repo
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointFiles:
    config: CheckpointConfig
    config_path: Path
    lm_weights: Path
    mimi_weights: Path | None  # None only when resolved without it (resolve_checkpoint(mimi=False))
    tokenizer: Path | None  # likewise (tokenizer=False)
    source: str = ""


def check_model_files(files: CheckpointFiles, vocab_size: int | None, n_q: int | None = None) -> None:
    """What the runtimes need of a checkpoint beyond its own consistency, checked before any weight is read (a
    mismatch fails otherwise after the whole LM has loaded, or mid-stream): the LM's audio tokens are Mimi's codes
    (``card`` = Mimi's 2048 entries, ``n_q`` of its 32 codebooks, or ``n_q`` codebooks decoded), and the tokenizer
    has exactly the model's text vocabulary (a smaller one fails at the first missing id; a larger one is another
    model's, and decodes the wrong pieces)."""
    from .mimi_checkpoint import CARDINALITY, MAX_CODEBOOKS

    lm, where = files.config.lm, files.config_path
    if lm.card != CARDINALITY:
        raise CheckpointError(f"{where}: field 'card': {lm.card} audio tokens, but Mimi's codebooks have "
                              f"{CARDINALITY} entries")
    for name, value in (("field 'n_q'", lm.n_q), ("the asked number of codebooks", n_q)):
        if value is not None and not 1 <= value <= MAX_CODEBOOKS:
            raise CheckpointError(f"{where}: {name} is {value}; Mimi has 1 to {MAX_CODEBOOKS} codebooks")
    if n_q is not None and n_q > lm.dep_q:
        raise CheckpointError(f"{where}: {n_q} codebooks asked, but the model generates {lm.dep_q} (field 'dep_q')")
    if vocab_size is not None and (vocab_size != lm.text_card or vocab_size < lm.text_out):
        raise CheckpointError(f"{files.tokenizer}: tokenizer has {vocab_size} pieces but the model's text vocabulary "
                              f"is {lm.text_card} (field 'text_card' of {where}): not this model's tokenizer")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_file(repo: str, filename: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Path of ``filename`` of the Hugging Face repo ``repo`` (downloaded, or from the cache when offline)."""
    from huggingface_hub import hf_hub_download

    cache_dir = cache_dir or os.environ.get("HF_HUB_CACHE") or None
    offline = _offline()
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir,
                                    local_files_only=offline))
    except Exception as e:  # huggingface_hub has many error classes across versions
        where = f"hf://{repo}/{filename}" + (f"@{revision}" if revision else "")
        hint = " (HF_HUB_OFFLINE is set: only the local cache"
        hint += f" {cache_dir} was searched)" if cache_dir else " was searched)"
        raise CheckpointError(f"{where}: cannot get file: {type(e).__name__}: {e}"
                              + (hint if offline else "")) from None


def _split_hf(url: str) -> tuple[str, str]:
    parts = [p for p in url.removeprefix("hf://").split("/") if p]
    if len(parts) < 2:
        raise CheckpointError(f"{url}: expected hf://owner/repo[/path/to/config.json]")
    return f"{parts[0]}/{parts[1]}", "/".join(parts[2:])


def resolve_checkpoint(checkpoint: str | Path | None = None, hf_repo: str | None = None,
                       revision: str | None = None, cache_dir: str | Path | None = None, mimi: bool = True,
                       tokenizer: bool = True) -> CheckpointFiles:
    """Find config.json, LM weights, Mimi weights and tokenizer of a checkpoint.

    ``checkpoint``: a local directory holding ``config.json`` and the files it names, a path to such a
    ``config.json``, or ``hf://owner/repo[/dir/config.json]``. ``hf_repo``: ``owner/name`` on the Hugging Face hub
    (honours ``HF_HUB_OFFLINE`` / ``HF_HUB_CACHE``). Exactly one of the two must be given. ``mimi=False`` /
    ``tokenizer=False``: a caller that does not use that file (``dsm bench --no-mimi``) neither needs nor fetches it
    (its field is None).
    """
    if (checkpoint is None) == (hf_repo is None):
        raise CheckpointError("give exactly one of a checkpoint directory (--checkpoint) or a hub repo (--hf-repo)")
    if checkpoint is not None and str(checkpoint).startswith("hf://"):
        hf_repo, inner = _split_hf(str(checkpoint))
        if inner and not inner.endswith(".json"):
            inner = f"{inner}/config.json"
        config_name = inner or "config.json"
    elif hf_repo is not None and hf_repo.startswith("hf://"):  # --hf-repo hf://owner/repo[/dir]: as --checkpoint
        return resolve_checkpoint(hf_repo, revision=revision, cache_dir=cache_dir, mimi=mimi, tokenizer=tokenizer)
    elif hf_repo is not None:
        config_name = "config.json"
    elif revision is not None:  # it would be ignored: the files read might not be the ones the user meant
        raise CheckpointError(f"{checkpoint}: a local checkpoint has no revisions (--revision {revision} names a "
                              "commit, branch or tag of a hub repo)")
    else:
        return _resolve_local(Path(checkpoint), mimi, tokenizer, cache_dir)

    assert hf_repo is not None
    if hf_repo.count("/") != 1 or not all(hf_repo.split("/")):
        raise CheckpointError(f"hub repo {hf_repo!r}: expected owner/name (e.g. kyutai/stt-1b-en_fr)")
    folder = config_name.rpartition("/")[0]
    config_path = hub_file(hf_repo, config_name, revision, cache_dir)
    cfg = _load_config(config_path)
    # The other files at the config's commit: the files of one commit (a branch may move meanwhile), and a cached
    # file at a commit is used without asking the hub (which, unreachable, costs retries for every file).
    pinned = _snapshot_commit(config_path) or revision

    def get(name: str) -> Path:
        if name.startswith("hf://"):  # another repo: its default revision (``revision`` names this repo's)
            repo, fname = _split_hf(name)
            return hub_file(repo, fname, pinned if repo == hf_repo else None, cache_dir)
        return hub_file(hf_repo, f"{folder}/{name}" if folder else name, pinned, cache_dir)

    return CheckpointFiles(config=cfg, config_path=config_path, lm_weights=get(cfg.moshi_name),
                           mimi_weights=get(cfg.mimi_name) if mimi else None,
                           tokenizer=get(cfg.tokenizer_name) if tokenizer else None,
                           source=f"hf://{hf_repo}" + (f"@{revision}" if revision else ""))


def _snapshot_commit(path: Path) -> str | None:
    """The commit of a file in the hub cache's layout (``.../snapshots/<commit>/[dir/]file``), else None."""
    for p in path.parents:
        if p.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", p.name):
            return p.name
    return None


def _load_config(path: Path) -> CheckpointConfig:
    try:
        cfg = CheckpointConfig.from_file(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if cfg.lm.context is None:  # moshi's default (unbounded attention) is valid config, but every dsm KV cache is a
        # bounded ring: refused here, before any weight is read, not as a TypeError deep in the engine.
        raise CheckpointError(f"{path}: field 'context' is missing or null; dsm needs the attention window (the "
                              "released configs set it, e.g. 750 for stt-1b-en_fr)")
    return cfg


def _resolve_local(path: Path, mimi: bool = True, tokenizer: bool = True,
                   cache_dir: str | Path | None = None) -> CheckpointFiles:
    if path.is_file() and path.suffix == ".json":
        config_path, root = path, path.parent
    elif path.is_dir():
        config_path, root = path / "config.json", path
        if not config_path.is_file():
            raise CheckpointError(f"{path}: checkpoint directory has no config.json")
    elif path.exists():  # e.g. the weights file itself: "not found" would send the user looking elsewhere
        raise CheckpointError(f"{path}: not a checkpoint directory or config.json (give the directory holding "
                              "config.json and the files it names)")
    else:
        raise CheckpointError(f"{path}: checkpoint directory not found")
    cfg = _load_config(config_path)

    def get(name: str, what: str) -> Path:
        if name.startswith("hf://"):
            repo, fname = _split_hf(name)
            return hub_file(repo, fname, cache_dir=cache_dir)
        p = Path(name.removeprefix("file://"))
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise CheckpointError(f"{p}: {what} file named by {config_path} not found")
        return p

    return CheckpointFiles(config=cfg, config_path=config_path, lm_weights=get(cfg.moshi_name, "LM weights"),
                           mimi_weights=get(cfg.mimi_name, "Mimi weights") if mimi else None,
                           tokenizer=get(cfg.tokenizer_name, "tokenizer") if tokenizer else None, source=str(root))


# ---------------------------------------------------------------------------------------------------------------
# Random checkpoints
# ---------------------------------------------------------------------------------------------------------------


def random_init_value(name: str, shape: tuple[int, ...], gen: torch.Generator, layer_scale: float) -> torch.Tensor:
    """The random value of one LM tensor (fp32, on ``gen``'s device): norm scales 1, biases 0, layer scales
    ``layer_scale``, everything else N(0, 0.02²)."""
    dev = gen.device
    if name.endswith(".alpha") or (name.endswith(".weight") and len(shape) == 1):  # norm scales (1-D weights)
        return torch.ones(shape, device=dev)
    if name.endswith(".bias"):
        return torch.zeros(shape, device=dev)
    if name.endswith(".scale"):
        return torch.full(shape, layer_scale, device=dev)
    return torch.randn(shape, generator=gen, device=dev) * 0.02


def write_safetensors_streaming(path: str | Path, specs: Mapping[str, TensorSpec],
                                make: Any, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file tensor by tensor (memory bounded by the largest tensor).

    ``make(name, shape, dtype) -> Tensor`` is called once per tensor, in sorted name order.
    """
    path = Path(path)
    names = sorted(specs)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name in names:
        shape, dtype = specs[name]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".partial")
    try:
        with tmp.open("wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in names:
                shape, dtype = specs[name]
                t = make(name, shape, dtype).to(dtype).contiguous()
                if tuple(t.shape) != tuple(shape):
                    raise ValueError(f"tensor {name}: made shape {tuple(t.shape)}, expected {shape}")
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        tmp.replace(path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # no partial file left beside the checkpoint
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file: this one
            e.filename = str(path)
        raise
    return path


def _as_config_dict(preset_or_config: str | Mapping[str, Any] | CheckpointConfig) -> dict[str, Any]:
    if isinstance(preset_or_config, str):
        from .presets import preset_config

        return preset_config(preset_or_config)
    if isinstance(preset_or_config, CheckpointConfig):
        return dict(preset_or_config.raw) if preset_or_config.raw else config_to_dict(preset_or_config)
    return json.loads(json.dumps(dict(preset_or_config)))


def write_random_checkpoint(preset_or_config: str | Mapping[str, Any] | CheckpointConfig, out_dir: str | Path,
                            seed: int = 0, dtype: torch.dtype = torch.bfloat16, mimi: bool = True,
                            tokenizer: bool = True) -> Path:
    """Write a complete random checkpoint directory (config.json, LM weights, Mimi weights, tokenizer).

    LM tensors have the released names/shapes (``expected_lm_tensors``), ``dtype`` for the LM and float32 for the
    conditioners; linears/embeddings ~ N(0, 0.02²), norm scales 1, biases 0. Deterministic for a given seed.
    """
    data = _as_config_dict(preset_or_config)
    out_dir = Path(out_dir)
    where = f"{out_dir / 'config.json'}"
    cfg = parse_config(data, where)
    out_dir.mkdir(parents=True, exist_ok=True)

    specs = expected_lm_tensors(cfg, dtype)
    gen = torch.Generator().manual_seed(seed)
    layer_scale = cfg.lm.layer_scale if cfg.lm.layer_scale is not None else 0.1

    def make(name: str, shape: tuple[int, ...], dt: torch.dtype) -> torch.Tensor:
        return random_init_value(name, shape, gen, layer_scale)

    write_safetensors_streaming(out_dir / cfg.moshi_name, specs, make)
    if mimi:
        try:
            from .mimi import save_random_mimi
        except ImportError as e:
            raise CheckpointError(f"cannot write random Mimi weights: dsm.mimi.save_random_mimi missing ({e})") from e
        save_random_mimi(out_dir / cfg.mimi_name, seed)
    if tokenizer:
        from .tokenizer import train_random_tokenizer

        train_random_tokenizer(out_dir / cfg.tokenizer_name, cfg.lm.text_card, seed)
    # last: a directory whose writing failed half-way has no config.json, so nothing takes it for a checkpoint
    (out_dir / "config.json").write_text(json.dumps(data, indent=2) + "\n")
    return out_dir



def cache_dir() -> Path:
    """dsm's cache: ``$DSM_CACHE_DIR``, else ``$XDG_CACHE_HOME/dsm``, else ``~/.cache/dsm``."""
    if os.environ.get("DSM_CACHE_DIR"):
        return Path(os.environ["DSM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsm"


def random_checkpoint_dir(preset: str, seed: int = 0) -> Path:
    """Where the random checkpoint of ``preset`` lives in the cache: ``<cache>/random/<preset>-seed<seed>``."""
    return cache_dir() / "random" / f"{preset}-seed{seed}"


def ensure_random_checkpoint(preset: str, seed: int = 0) -> Path:
    """Write (once; reused afterwards) a random checkpoint of ``preset`` into the cache and return its directory."""
    import shutil
    import tempfile

    out = random_checkpoint_dir(preset, seed)
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write_random_checkpoint(preset, tmp, seed=seed)
        if out.exists() and not (out / "config.json").is_file():  # left incomplete by an older dsm or a crash
            shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)  # atomic: a concurrent writer's complete copy wins
    except OSError:
        if not (out / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
