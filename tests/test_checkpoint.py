"""Checkpoint layer: expected tensors vs moshi's LMModel, validated loading, resolution, random checkpoints."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dsm.checkpoint import (
    CheckpointError,
    CheckpointFiles,
    count_params,
    expected_lm_tensors,
    load_lm_state_dict,
    read_safetensors_header,
    resolve_checkpoint,
    stack_projections,
    write_random_checkpoint,
)
from dsm.config import parse_config
from dsm.presets import PRESETS, REAL_PRESETS, preset_config
from dsm.tokenizer import Tokenizer, TokenizerError, train_random_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from moshi_oracle import moshi_lm_assets  # noqa: E402

# The tiny LMModel of moshi's own test suite (moshi/tests/assets, see shared/testdata/moshi-lm-vectors/README.md).
MOSHI_TEST_LM = {
    "delays": [0, 1, 2, 4], "n_q": 3, "dep_q": 3, "card": 32, "text_card": 48, "dim": 16, "num_layers": 2,
    "num_heads": 1, "hidden_scale": 1, "depformer_dim": 16, "depformer_multi_linear": True,
    "depformer_weights_per_step": True, "depformer_weights_per_step_schedule": [0, 1, 1],
    "depformer_low_rank_embeddings": 8, "depformer_num_heads": 1, "depformer_gating": "silu", "context": 4,
}
LOADER_META = {"moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name", "model_type",
               "lm_gen_config", "tts_config", "stt_config", "model_id"}
ALL_CONFIGS = {**{n: preset_config(n) for n in PRESETS}, "moshi-test-lm": MOSHI_TEST_LM}


def moshi_meta_state(data: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from moshi.models.loaders import get_moshi_lm

    kwargs = {k: v for k, v in json.loads(json.dumps(data)).items() if k not in LOADER_META}
    model = get_moshi_lm(None, lm_kwargs=kwargs, device="meta", dtype=torch.bfloat16)
    return {k: (tuple(v.shape), v.dtype) for k, v in stack_projections(model.state_dict()).items()}


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_expected_tensors_match_moshi(name):
    data = ALL_CONFIGS[name]
    expected = expected_lm_tensors(parse_config(data, name))
    assert expected == moshi_meta_state(data)


def test_param_counts_match_spec():
    counts = {n: expected_lm_tensors(parse_config(preset_config(n))) for n in REAL_PRESETS}
    stt1, stt2, tts = (counts[n] for n in REAL_PRESETS)
    # DSM-SPEC §10.2: stt-1b 989 204 480 + the 4 VAD heads (4·6·2048 = 49 152) of the -candle checkpoint.
    vad = sum(math.prod(s) for k, (s, _) in stt1.items() if k.startswith("extra_heads."))
    assert vad == 49_152
    assert count_params(stt1) - vad == 989_204_480
    assert count_params(stt2) == 2_617_118_720
    assert count_params(tts) == 1_836_550_272
    # Tensor counts (DSM-SPEC §8.1/§8.3): 131 (+4 VAD), 323, 418 = 410 bf16 + 8 fp32.
    assert (len(stt1), len(stt2), len(tts)) == (135, 323, 418)
    assert sum(dt == torch.float32 for _, dt in tts.values()) == 8
    assert sum(dt == torch.bfloat16 for _, dt in tts.values()) == 410
    # File sizes: stt-2.6b 5 234 275 128 B, tts 3 683 719 712 B, each with its header (37 688 / 47 136 B).
    nbytes = {n: sum(math.prod(s) * (4 if dt == torch.float32 else 2) for s, dt in c.values())
              for n, c in counts.items()}
    assert nbytes["stt-2.6b-en"] + 37_688 == 5_234_275_128
    assert nbytes["tts-1.6b-en_fr"] + 47_136 == 3_683_719_712


def test_expected_tts_names():
    t = expected_lm_tensors(parse_config(preset_config("tts-1.6b-en_fr")))
    assert t["depformer.layers.0.self_attn.in_proj_weight"][0] == (11 * 3072, 1024)
    assert t["depformer.layers.3.self_attn.out_proj.weight"][0] == (11 * 1024, 1024)
    assert t["depformer.layers.0.gating.10.linear_in.weight"][0] == (4096, 1024)
    assert t["depformer_text_emb.low_rank.weight"][0] == (1024, 128)
    assert t["depformer_text_emb.weight"][0] == (8001, 128)
    assert t["transformer.layers.0.norm1.alpha"][0] == (1, 1, 2048)
    assert t["condition_provider.conditioners.cfg.embed.weight"] == ((8, 16), torch.float32)
    assert t["condition_provider.conditioners.control.learnt_padding"] == ((1, 1, 2048), torch.float32)
    assert "depformer_in.10.weight" in t and "depformer_in.11.weight" not in t
    assert "depformer_emb.30.weight" in t and "depformer_emb.31.weight" not in t


# ---------------------------------------------------------------------------------------------------------------
# Random checkpoints, loaded by moshi and by dsm
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    # Random Mimi weights are 384 MB and take seconds: written once, for tiny-stt.
    return {n: write_random_checkpoint(n, root / n, seed=1, mimi=n == "tiny-stt") for n in ("tiny-stt", "tiny-tts")}


@pytest.mark.parametrize("name", ["tiny-stt", "tiny-tts"])
def test_random_checkpoint_loads_in_moshi(tiny_dirs, name):
    from moshi.models.loaders import CheckpointInfo

    d = tiny_dirs[name]
    cfg = parse_config(json.loads((d / "config.json").read_text()))
    info = CheckpointInfo.from_hf_repo("x/y", moshi_weights=d / cfg.moshi_name, mimi_weights=d / cfg.mimi_name,
                                       tokenizer=d / cfg.tokenizer_name, config_path=d / "config.json")
    model = info.get_moshi(device="cpu", dtype=torch.float32)  # load_state_dict is strict
    ours = load_lm_state_dict(d / cfg.moshi_name, cfg, dtype=torch.float32)
    theirs = stack_projections(model.state_dict())
    assert set(ours) == set(theirs)
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k
    # Sensible values: norms at 1, linears small and non-degenerate.
    assert torch.all(ours["out_norm.alpha"] == 1)
    w = ours["transformer.layers.0.self_attn.in_proj_weight"]
    assert 0.01 < w.std().item() < 0.03
    assert info.get_text_tokenizer().vocab_size() == cfg.lm.text_card


def test_random_checkpoint_dtypes_and_determinism(tiny_dirs, tmp_path):
    d = tiny_dirs["tiny-tts"]
    cfg = parse_config(json.loads((d / "config.json").read_text()))
    header = read_safetensors_header(d / cfg.moshi_name)
    for name, info in header.items():
        assert info["dtype"] == ("F32" if name.startswith("condition_provider.") else "BF16"), name
    state = load_lm_state_dict(d / cfg.moshi_name, cfg)
    assert state["text_emb.weight"].dtype == torch.bfloat16
    assert state["condition_provider.conditioners.speaker_wavs.output_proj.weight"].dtype == torch.float32
    again = write_random_checkpoint("tiny-tts", tmp_path / "again", seed=1, mimi=False, tokenizer=False)
    assert (again / cfg.moshi_name).read_bytes() == (d / cfg.moshi_name).read_bytes()
    other = write_random_checkpoint("tiny-tts", tmp_path / "other", seed=2, mimi=False, tokenizer=False)
    assert (other / cfg.moshi_name).read_bytes() != (d / cfg.moshi_name).read_bytes()
    tok = Tokenizer(d / cfg.tokenizer_name)
    assert tok.vocab_size == 200 and (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_random_checkpoint_mimi_loads_in_moshi(tiny_dirs):
    from moshi.models.loaders import get_mimi

    d = tiny_dirs["tiny-stt"]
    cfg = parse_config(json.loads((d / "config.json").read_text()))
    assert resolve_checkpoint(d).mimi_weights == d / cfg.mimi_name
    get_mimi(d / cfg.mimi_name, device="cpu")  # strict load_state_dict


def test_tokenizer_sizes_and_errors(tmp_path):
    tok = Tokenizer(train_random_tokenizer(tmp_path / "t.model", 4000, seed=5))
    assert tok.vocab_size == len(tok) == 4000
    assert repr(tok) == f"Tokenizer({str(tmp_path / 't.model')!r}, vocab_size=4000)"
    assert [tok.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    ids = tok.encode("le chat mange")
    assert all(4 <= i < 4000 for i in ids) and tok.decode(ids) == "le chat mange"
    with pytest.raises(IndexError, match="token id 4000 out of range"):
        tok.id_to_piece(4000)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match=rf"{bad}: not a valid SentencePiece model"):
        Tokenizer(bad)
    with pytest.raises(TokenizerError, match="tokenizer file not found"):
        Tokenizer(tmp_path / "missing.model")
    huge = tmp_path / "model.safetensors"  # a weights file named as the tokenizer: refused unread (it was read whole)
    with huge.open("wb") as f:
        f.truncate(65 << 20)
    with pytest.raises(TokenizerError, match=rf"{huge}: 65 MiB is not a SentencePiece model"):
        Tokenizer(huge)


def test_moshi_test_asset_loads():
    path = moshi_lm_assets() / "test_lm_model.safetensors"
    state = load_lm_state_dict(path, parse_config(MOSHI_TEST_LM), dtype=torch.float32)
    assert len(state) == 54
    assert state["depformer.layers.0.self_attn.in_proj_weight"].shape == (2 * 3 * 16, 16)


# ---------------------------------------------------------------------------------------------------------------
# Loader errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tts_state(tiny_dirs):
    d = tiny_dirs["tiny-tts"]
    cfg = parse_config(json.loads((d / "config.json").read_text()))
    return cfg, load_lm_state_dict(d / cfg.moshi_name, cfg)


def _save(tmp_path, state, name="model.safetensors") -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_load_error_missing_tensor(tmp_path, tiny_tts_state):
    cfg, state = tiny_tts_state
    state = dict(state)
    del state["linears.5.weight"]
    path = _save(tmp_path, state)
    with pytest.raises(CheckpointError, match=rf"{path}: missing tensor 'linears.5.weight'"):
        load_lm_state_dict(path, cfg)


def test_load_error_unexpected_tensor(tmp_path, tiny_tts_state):
    cfg, state = tiny_tts_state
    path = _save(tmp_path, {**state, "linears.32.weight": torch.zeros(2048, 32)})
    with pytest.raises(CheckpointError, match=rf"{path}: unexpected tensor 'linears.32.weight'"):
        load_lm_state_dict(path, cfg)


def test_load_error_wrong_shape(tmp_path, tiny_tts_state):
    cfg, state = tiny_tts_state
    path = _save(tmp_path, {**state, "text_emb.weight": torch.zeros(200, 64)})
    with pytest.raises(CheckpointError, match=r"tensor 'text_emb.weight' has shape \[200, 64\], expected \[201, 64\]"):
        load_lm_state_dict(path, cfg)


def test_load_error_wrong_dtype(tmp_path, tiny_tts_state):
    cfg, state = tiny_tts_state
    path = _save(tmp_path, {**state, "out_norm.alpha": torch.ones(1, 1, 64, dtype=torch.int32)})
    with pytest.raises(CheckpointError, match=r"tensor 'out_norm.alpha' has dtype I32, expected a float dtype"):
        load_lm_state_dict(path, cfg)


def test_load_error_truncated(tmp_path, tiny_dirs):
    d = tiny_dirs["tiny-stt"]
    cfg = parse_config(json.loads((d / "config.json").read_text()))
    data = (d / cfg.moshi_name).read_bytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=rf"{path}: truncated file: tensor '.*' needs bytes up to"):
        load_lm_state_dict(path, cfg)
    path.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=rf"{path}: truncated or not a safetensors file"):
        load_lm_state_dict(path, cfg)
    path.write_bytes(data + b"\0" * 16)
    with pytest.raises(CheckpointError, match=rf"{path}: corrupt file: tensor data ends at byte"):
        load_lm_state_dict(path, cfg)


def test_load_error_not_safetensors(tmp_path, tiny_tts_state):
    cfg, _ = tiny_tts_state
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"PK\x03\x04" + b"x" * 200)
    with pytest.raises(CheckpointError, match=rf"{path}: not a safetensors file"):
        load_lm_state_dict(path, cfg)
    header = b"{not json}    "
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match=rf"{path}: not a safetensors file \(header is not valid JSON"):
        load_lm_state_dict(path, cfg)
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_lm_state_dict(path, cfg)
    with pytest.raises(CheckpointError, match="weights file not found"):
        load_lm_state_dict(tmp_path / "nope.safetensors", cfg)


def test_load_error_bad_offsets(tmp_path, tiny_tts_state):
    cfg, state = tiny_tts_state
    path = _save(tmp_path, {"a": torch.zeros(4)})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["a"]["shape"] = [3]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    with pytest.raises(CheckpointError, match=r"tensor 'a': data offsets \[0, 16\] do not match shape \[3\]"):
        load_lm_state_dict(path, cfg)


def test_load_unstacked_and_flat_alpha_forms(tmp_path, tiny_tts_state):
    cfg, state = tiny_tts_state
    sets = cfg.lm.dep_weight_sets
    alt = {}
    for k, v in state.items():
        if k.endswith("self_attn.in_proj_weight"):
            for i, part in enumerate(v.chunk(sets if k.startswith("depformer.") else 1)):
                alt[k.replace("in_proj_weight", f"in_projs.{i}.weight")] = part
        elif k.endswith("self_attn.out_proj.weight"):
            for i, part in enumerate(v.chunk(sets if k.startswith("depformer.") else 1)):
                alt[k.replace("out_proj.weight", f"out_projs.{i}.weight")] = part
        elif k.endswith(".alpha"):
            alt[k] = v.reshape(-1)
        else:
            alt[k] = v
    path = _save(tmp_path, alt)
    loaded = load_lm_state_dict(path, cfg)
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert loaded[k].shape == v.shape and torch.equal(loaded[k], v), k


def test_load_refuses_a_tensor_given_twice_and_non_finite_weights(tmp_path, tiny_tts_state):
    """A file holding a projection both stacked and unstacked (or as in_proj.weight too): refused, not one copy
    silently winning. NaN or infinity in an LM or Mimi tensor: refused naming the tensor (it loaded, and the model
    emitted only padding)."""
    from dsm.mimi import random_mimi_state_dict
    from dsm.mimi_checkpoint import MimiCheckpointError, load_mimi_state_dict

    cfg, state = tiny_tts_state
    key = next(k for k in state if k.startswith("depformer.") and k.endswith("self_attn.in_proj_weight"))
    for twin in (key.replace("in_proj_weight", "in_projs.0.weight"), key.replace("in_proj_weight", "in_proj.weight")):
        extra = {twin: (state[key].chunk(cfg.lm.dep_weight_sets)[0] if "in_projs" in twin else state[key]).clone()}
        path = _save(tmp_path, {**state, **extra})
        with pytest.raises(CheckpointError, match=rf"{path}: tensor '{re.escape(key)}' is given twice"):
            load_lm_state_dict(path, cfg)
    for value in (float("nan"), float("inf")):
        broken = dict(state)
        broken["text_linear.weight"] = state["text_linear.weight"].clone()
        broken["text_linear.weight"][3, 1] = value
        path = _save(tmp_path, broken)
        with pytest.raises(CheckpointError, match=rf"{path}: tensor 'text_linear.weight' holds NaN or infinite"):
            load_lm_state_dict(path, cfg)
    sd = random_mimi_state_dict(0)
    name = next(iter(sd))
    sd[name] = sd[name].clone()
    sd[name].view(-1)[0] = float("nan")
    save_file(sd, str(tmp_path / "mimi.safetensors"))
    with pytest.raises(MimiCheckpointError, match=rf"mimi.safetensors: tensor '{re.escape(name)}' holds NaN"):
        load_mimi_state_dict(tmp_path / "mimi.safetensors")


def test_load_casts_but_keeps_conditioners_fp32(tmp_path, tiny_tts_state):
    cfg, state = tiny_tts_state
    path = _save(tmp_path, {k: v.float() for k, v in state.items()})
    loaded = load_lm_state_dict(path, cfg, dtype=torch.float16)
    assert loaded["emb.0.weight"].dtype == torch.float16
    assert loaded["condition_provider.conditioners.cfg.embed.weight"].dtype == torch.float32


def test_unusable_device_is_refused_before_any_file_is_read(tmp_path):
    """--device-less API calls (LMModel.from_checkpoint, Mimi.from_file) onto cuda on a CPU machine (or meta/mps)
    failed only after the whole file was read, with torch's AssertionError "Torch not compiled with CUDA enabled"
    (or "Cannot copy out of meta tensor"). Here the files are garbage: the device is refused before they are read."""
    from dsm.mimi import Mimi

    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    cfg = parse_config(preset_config("tiny-stt"))
    bad = [("meta", "dsm runs on cpu or cuda"), ("cpu:1", "one CPU device"), ("foo", "unknown device")]
    if not torch.cuda.is_available():
        bad.append(("cuda", "CUDA is not available here"))
    for device, msg in bad:
        with pytest.raises(ValueError, match=msg):
            load_lm_state_dict(tmp_path / "bad.safetensors", cfg, device=device)
        with pytest.raises(ValueError, match=msg):
            Mimi.from_file(tmp_path / "bad.safetensors", device=device)


# ---------------------------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------------------------


def _check_files(files: CheckpointFiles, root: Path):
    cfg = files.config
    assert files.config_path.read_bytes() == (root / "config.json").read_bytes()
    assert files.lm_weights.name == cfg.moshi_name and files.lm_weights.is_file()
    assert files.mimi_weights.name == cfg.mimi_name and files.mimi_weights.is_file()
    assert files.tokenizer.name == cfg.tokenizer_name and files.tokenizer.is_file()


def _fake_dir(tmp_path) -> Path:
    """A checkpoint directory with small stand-in files (resolution only looks at names)."""
    d = tmp_path / "ckpt"
    d.mkdir()
    cfg = preset_config("tiny-stt")
    (d / "config.json").write_text(json.dumps(cfg))
    for key in ("moshi_name", "mimi_name", "tokenizer_name"):
        (d / cfg[key]).write_bytes(key.encode())
    return d


def test_resolve_local_dir(tmp_path):
    d = _fake_dir(tmp_path)
    files = resolve_checkpoint(d)
    _check_files(files, d)
    assert files.config.lm.text_card == 200
    assert resolve_checkpoint(str(d / "config.json")).lm_weights == files.lm_weights
    (d / "tokenizer_tiny_200.model").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer_tiny_200.model: tokenizer file named by .*config.json"):
        resolve_checkpoint(d)
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        resolve_checkpoint(tmp_path / "nope")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        resolve_checkpoint(d)
    with pytest.raises(CheckpointError, match="exactly one"):
        resolve_checkpoint(d, hf_repo="a/b")
    with pytest.raises(CheckpointError, match="exactly one"):
        resolve_checkpoint()


def test_resolve_local_bad_config(tmp_path):
    d = _fake_dir(tmp_path)
    data = json.loads((d / "config.json").read_text())
    data["bogus"] = 1
    (d / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"config.json: unknown field 'bogus'"):
        resolve_checkpoint(d)


def _fake_hub_cache(tmp_path, repo: str, src: Path) -> Path:
    """The huggingface_hub cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(src, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    return cache


def test_resolve_fake_hub_cache(tmp_path, monkeypatch):
    src = _fake_dir(tmp_path)
    cache = _fake_hub_cache(tmp_path, "kyutai/tiny-stt", src)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for files in (resolve_checkpoint(hf_repo="kyutai/tiny-stt"), resolve_checkpoint("hf://kyutai/tiny-stt"),
                  resolve_checkpoint("hf://kyutai/tiny-stt/config.json"),
                  resolve_checkpoint(hf_repo="kyutai/tiny-stt", cache_dir=cache)):
        _check_files(files, src)
        assert str(files.lm_weights).startswith(str(cache))
        assert files.source == "hf://kyutai/tiny-stt"
    with pytest.raises(CheckpointError, match=r"hf://kyutai/other/config.json: cannot get file"):
        resolve_checkpoint(hf_repo="kyutai/other")
    for bad in ("kyutai", "kyutai/a/b", "/x"):
        with pytest.raises(CheckpointError, match="expected owner/name"):
            resolve_checkpoint(hf_repo=bad)
    # a file named in another repo comes at that repo's default revision: this repo's commit means nothing there
    other = _fake_hub_cache(tmp_path / "other", "kyutai/mimi-only", src)
    for f in (other / "models--kyutai--mimi-only").rglob("*"):
        dest = cache / f.relative_to(other)
        if f.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        elif not dest.exists():
            shutil.copy(f, dest)
    other_repo = cache / "models--kyutai--mimi-only"
    other_commit = "f" * 40  # another commit than this repo's
    next((other_repo / "snapshots").iterdir()).rename(other_repo / "snapshots" / other_commit)
    (other_repo / "refs" / "main").write_text(other_commit)
    snap = next((cache / "models--kyutai--tiny-stt" / "snapshots").iterdir())
    original = (snap / "config.json").read_text()
    data = json.loads(original)
    data["mimi_name"] = "hf://kyutai/mimi-only/" + data["mimi_name"]
    (snap / "config.json").write_text(json.dumps(data))
    files = resolve_checkpoint(hf_repo="kyutai/tiny-stt", revision=snap.name)
    assert "models--kyutai--mimi-only" in str(files.mimi_weights) and files.source.endswith("@" + snap.name)
    (snap / "config.json").write_text(original)
    snap = next((cache / "models--kyutai--tiny-stt" / "snapshots").iterdir())
    (snap / "mimi-pytorch-e351c8d8@125.safetensors").unlink()
    with pytest.raises(CheckpointError,
                       match=r"hf://kyutai/tiny-stt/mimi-pytorch-e351c8d8@125.safetensors@0123456789abcdef"
                             r"0123456789abcdef01234567: cannot get file.*HF_HUB_OFFLINE is set"):
        resolve_checkpoint(hf_repo="kyutai/tiny-stt")


def test_local_checkpoint_hub_files_use_the_given_cache_dir(tmp_path, monkeypatch):
    """A local config.json naming hf://owner/repo/file: resolve_checkpoint(dir, cache_dir=...) searched the default
    cache for it (cache_dir was dropped for local checkpoints)."""
    d = _fake_dir(tmp_path)
    cache = _fake_hub_cache(tmp_path, "kyutai/mimi-only", d)
    data = json.loads((d / "config.json").read_text())
    (d / data["mimi_name"]).unlink()
    data["mimi_name"] = "hf://kyutai/mimi-only/" + data["mimi_name"]
    (d / "config.json").write_text(json.dumps(data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    files = resolve_checkpoint(d, cache_dir=cache)
    assert files.mimi_weights.is_file() and str(files.mimi_weights).startswith(str(cache))


def test_hub_files_come_from_the_configs_commit(tmp_path, monkeypatch):
    """After config.json, the files are asked at the commit of its snapshot: the files of one commit, and a cached
    file at a commit is used without a request (an unreachable hub cost five retries per file, 92 s for a cached
    checkpoint). A --revision beside a local checkpoint is refused (it was ignored)."""
    import huggingface_hub

    src = _fake_dir(tmp_path)
    cache = _fake_hub_cache(tmp_path, "kyutai/tiny-stt", src)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    asked, download = [], huggingface_hub.hf_hub_download

    def recording(repo, filename, revision=None, **kw):
        asked.append((filename, revision))
        return download(repo, filename, revision=revision, **kw)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording)
    _check_files(resolve_checkpoint(hf_repo="kyutai/tiny-stt"), src)
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert asked[0] == ("config.json", None) and len(asked) == 4 and all(r == commit for _, r in asked[1:]), asked
    with pytest.raises(CheckpointError, match=r"a local checkpoint has no revisions \(--revision v2 names"):
        resolve_checkpoint(src, revision="v2")


def _raw_safetensors(path: Path, header: dict, nbytes: int) -> Path:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * nbytes)
    return path


@pytest.mark.parametrize("header,nbytes,pattern", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}}, 16, "malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 16]}}, 16, "malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": None}}, 16, "malformed header entry"),
    ({"a": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, 16, "malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [-4, -1], "data_offsets": [0, 16]}}, 16, "malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, 16, "malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 16, "overlaps the previous tensor"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, 24, "a gap before it"),
    ({"__metadata__": 5, "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 16, "__metadata__"),
])
def test_header_malformed_entries_are_checkpoint_errors(tmp_path, header, nbytes, pattern):
    """Wrong-typed header entries used to raise TypeError/ValueError tracebacks; overlapping or gapped tensor data
    (which the safetensors library refuses) passed the header check."""
    path = _raw_safetensors(tmp_path / "model.safetensors", header, nbytes)
    with pytest.raises(CheckpointError, match=rf"{path}: .*{pattern}"):
        read_safetensors_header(path)


def test_header_packed_tensors_accepted(tmp_path):
    path = _raw_safetensors(tmp_path / "m.safetensors", {
        "__metadata__": {"format": "pt"}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
        "a": {"dtype": "BF16", "shape": [2, 4], "data_offsets": [0, 16]},
        "e": {"dtype": "F32", "shape": [0], "data_offsets": [32, 32]}}, 32)
    assert set(read_safetensors_header(path)) == {"a", "b", "e"}


def test_resolve_refuses_a_config_without_context(tmp_path):
    """moshi's default context (None, unbounded) cannot stream on dsm's KV rings: was a TypeError in the engine."""
    d = _fake_dir(tmp_path)
    data = json.loads((d / "config.json").read_text())
    del data["context"]
    (d / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"config.json: field 'context' is missing or null"):
        resolve_checkpoint(d)


def test_resolve_names_what_a_wrong_path_is(tmp_path, monkeypatch):
    """The weights file given as --checkpoint: not 'checkpoint directory not found' (the file is right there)."""
    d = _fake_dir(tmp_path)
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a checkpoint directory or config.json"):
        resolve_checkpoint(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        resolve_checkpoint(d / "nope")
    # --hf-repo hf://owner/repo/dir means the same as --checkpoint hf://owner/repo/dir (the dir was dropped)
    nested = tmp_path / "nested"
    shutil.copytree(d, nested / "sub")
    cache = _fake_hub_cache(tmp_path, "kyutai/nested", nested)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for files in (resolve_checkpoint(hf_repo="hf://kyutai/nested/sub"), resolve_checkpoint("hf://kyutai/nested/sub")):
        _check_files(files, nested / "sub")
