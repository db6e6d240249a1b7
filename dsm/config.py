"""Typed configuration parsed from a released checkpoint's ``config.json`` (DSM-SPEC §8.2).

Every key the moshi ``LMModel`` family can declare maps to a field here. Unknown keys and contradictory values are
refused with a :class:`ConfigError` naming the file and the field, before any weight is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json field is unknown, missing, of the wrong type or contradicts another field."""


NORMS = ("layer_norm", "layer_norm_f32", "rms_norm", "rms_norm_f32")
POS_EMBS = ("rope", "sin", "none", "sin_rope")
GATINGS = ("none", "silu", "gelu", "sigmoid", "relu")


@dataclass(frozen=True)
class ConditionerConfig:
    """One conditioner: ``lut`` (text value -> vector) or ``tensor`` (e.g. speaker latents)."""

    name: str
    type: str  # "lut" | "tensor"
    dim: int  # lut embedding dim, or tensor input dim
    output_dim: int = 0  # filled from the LM dim
    n_bins: int = 0
    possible_values: tuple[str, ...] | None = None
    tokenizer: str = "noop"
    force_linear: bool = True
    output_bias: bool = False
    learn_padding: bool = True


@dataclass(frozen=True)
class FuserConfig:
    sum: tuple[str, ...] = ()
    cross: tuple[str, ...] = ()
    prepend: tuple[str, ...] = ()
    cross_attention_pos_emb: bool = False
    cross_attention_pos_emb_scale: float = 1.0


@dataclass(frozen=True)
class LMConfig:
    """Hyperparameters of the temporal transformer, the depth transformer and the heads."""

    # Streams.
    card: int = 1024
    n_q: int = 8
    dep_q: int = 8
    delays: tuple[int, ...] = (0,)
    text_card: int = 32000
    text_card_out: int | None = None
    demux_second_text_stream: bool = False
    existing_text_padding_id: int = 3
    existing_text_end_padding_id: int = 0
    # Temporal transformer.
    dim: int = 128
    num_heads: int = 8
    num_layers: int = 8
    hidden_scale: float = 4.0
    norm: str = "layer_norm"
    norm_emb: bool = False
    bias_proj: bool = False
    causal: bool = True
    context: int | None = None
    max_period: float = 10000.0
    positional_embedding: str = "sin"
    positional_scale: float = 1.0
    gating: str = "none"
    layer_scale: float | None = None
    kv_repeat: int = 1
    cross_attention: bool = False
    extra_heads_num_heads: int = 0
    extra_heads_dim: int = 6
    # Depth transformer.
    depformer_dim: int = 256
    depformer_dim_feedforward: int | None = None
    depformer_num_heads: int | None = None  # None: same as num_heads
    depformer_num_layers: int | None = None  # None: same as num_layers
    depformer_multi_linear: bool = False
    depformer_weights_per_step: bool = False
    depformer_weights_per_step_schedule: tuple[int, ...] | None = None
    depformer_low_rank_embeddings: int | None = None
    depformer_pos_emb: str = "sin"
    depformer_norm: str | None = None
    depformer_gating: str | None = None  # None: same as gating
    depformer_max_period: float | None = None  # None: same as max_period
    depformer_layer_scale: float | None = None  # a config.json without it inherits layer_scale (parse_config)
    depformer_context: int | None = None  # forced to None by moshi; kept for completeness
    # Conditioning (TTS).
    conditioners: tuple[ConditionerConfig, ...] = ()
    fuser: FuserConfig | None = None

    # ---- derived -------------------------------------------------------------------------------------------------
    @property
    def num_codebooks(self) -> int:
        return self.n_q + 1

    @property
    def text_out(self) -> int:
        return self.text_card if self.text_card_out is None else self.text_card_out

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        """``dim_feedforward`` as moshi computes it: ``int(hidden_scale * dim)``."""
        return int(self.hidden_scale * self.dim)

    @property
    def dep_num_heads(self) -> int:
        return self.depformer_num_heads if self.depformer_num_heads is not None else self.num_heads

    @property
    def dep_num_layers(self) -> int:
        return self.depformer_num_layers if self.depformer_num_layers is not None else self.num_layers

    @property
    def dep_gating(self) -> str:
        return self.depformer_gating if self.depformer_gating is not None else self.gating

    @property
    def dep_max_period(self) -> float:
        return self.depformer_max_period if self.depformer_max_period is not None else self.max_period

    @property
    def dep_ffn_dim(self) -> int:
        if self.depformer_dim_feedforward is not None:
            return self.depformer_dim_feedforward
        return int(self.hidden_scale * self.depformer_dim)

    @property
    def dep_weight_sets(self) -> int:
        """Number of per-step weight sets of the depformer (1 when weights are shared)."""
        if not self.depformer_weights_per_step:
            return 1
        if self.depformer_weights_per_step_schedule:
            return max(self.depformer_weights_per_step_schedule) + 1
        return self.dep_q

    @property
    def dep_schedule(self) -> tuple[int, ...]:
        """Weight set used at each depformer step."""
        if not self.depformer_weights_per_step:
            return (0,) * self.dep_q
        return self.depformer_weights_per_step_schedule or tuple(range(self.dep_q))

    @property
    def dep_num_in(self) -> int:
        """Number of ``depformer_in`` projections."""
        if not self.depformer_multi_linear:
            return 1
        if self.depformer_weights_per_step_schedule:
            return max(self.depformer_weights_per_step_schedule) + 1
        return self.dep_q

    def validate(self, where: str = "config") -> None:
        def bad(fld: str, msg: str) -> ConfigError:
            return ConfigError(f"{where}: field {fld!r}: {msg}")

        # Sizes and periods: a zero or negative one would fail later as a ZeroDivisionError or a bad tensor shape.
        for name in ("card", "text_card", "dim", "num_heads", "kv_repeat"):
            if getattr(self, name) <= 0:
                raise bad(name, f"must be positive, got {getattr(self, name)}")
        for name in ("n_q", "num_layers", "existing_text_padding_id", "existing_text_end_padding_id"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be non-negative, got {getattr(self, name)}")
        for name in ("hidden_scale", "max_period"):
            if name == "max_period" and self.positional_embedding == "none":
                continue
            if not 0 < getattr(self, name) < math.inf:
                raise bad(name, f"must be a positive finite number, got {getattr(self, name)}")
        if self.text_card_out is not None and self.text_card_out <= 0:
            raise bad("text_card_out", f"must be positive, got {self.text_card_out}")
        if self.existing_text_padding_id >= self.text_out:
            raise bad("existing_text_padding_id", f"{self.existing_text_padding_id} is not a text id (text vocabulary "
                      f"of {self.text_out})")
        if len(self.delays) != self.n_q + 1:
            raise bad("delays", f"has {len(self.delays)} entries, expected n_q + 1 = {self.n_q + 1}")
        if any(d < 0 for d in self.delays):
            raise bad("delays", "must be non-negative")
        if not 0 <= self.dep_q <= self.n_q:
            raise bad("dep_q", f"{self.dep_q} must be in [0, n_q={self.n_q}]")
        if self.dim % self.num_heads:
            raise bad("num_heads", f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.kv_repeat != 1 and self.num_heads % self.kv_repeat:
            raise bad("kv_repeat", f"num_heads {self.num_heads} not divisible by kv_repeat {self.kv_repeat}")
        for name in ("norm",):
            if getattr(self, name) not in NORMS:
                raise bad(name, f"unknown norm {getattr(self, name)!r}; known: {NORMS}")
        if self.depformer_norm is not None and self.depformer_norm not in NORMS:
            raise bad("depformer_norm", f"unknown norm {self.depformer_norm!r}; known: {NORMS}")
        for name, value in (("positional_embedding", self.positional_embedding), ("depformer_pos_emb",
                                                                                    self.depformer_pos_emb)):
            if value not in POS_EMBS:
                raise bad(name, f"unknown positional embedding {value!r}; known: {POS_EMBS}")
        for name, value in (("gating", self.gating), ("depformer_gating", self.dep_gating)):
            if value not in GATINGS:
                raise bad(name, f"unknown gating {value!r}; known: {GATINGS}")
        if self.positional_embedding in ("rope", "sin_rope") and self.head_dim % 2:
            raise bad("num_heads", f"RoPE rotates pairs of channels: head dim {self.head_dim} (dim {self.dim} / "
                      f"{self.num_heads} heads) must be even")
        if self.context is not None and self.context <= 0:
            raise bad("context", "must be positive")
        if self.dep_q > 0:
            for name, value in (("depformer_dim", self.depformer_dim), ("depformer_num_heads", self.dep_num_heads),
                                ("depformer_dim_feedforward", self.dep_ffn_dim),
                                ("depformer_low_rank_embeddings", self.depformer_low_rank_embeddings or 1)):
                if value <= 0:
                    raise bad(name, f"must be positive, got {value}")
            if self.dep_num_layers < 0:
                raise bad("depformer_num_layers", f"must be non-negative, got {self.dep_num_layers}")
            if self.depformer_pos_emb != "none" and not 0 < self.dep_max_period < math.inf:
                raise bad("depformer_max_period", f"must be a positive finite number, got {self.dep_max_period}")
            if self.depformer_dim % self.dep_num_heads:
                raise bad("depformer_num_heads", f"depformer_dim {self.depformer_dim} not divisible by "
                          f"{self.dep_num_heads} heads")
            if self.depformer_pos_emb in ("rope", "sin_rope") and self.depformer_dim // self.dep_num_heads % 2:
                raise bad("depformer_num_heads", f"RoPE rotates pairs of channels: head dim "
                          f"{self.depformer_dim // self.dep_num_heads} must be even")
            sched = self.depformer_weights_per_step_schedule
            if sched is not None:
                if not self.depformer_weights_per_step:
                    raise bad("depformer_weights_per_step_schedule", "given but depformer_weights_per_step is false")
                if len(sched) != self.dep_q:
                    raise bad("depformer_weights_per_step_schedule", f"has {len(sched)} entries, expected dep_q = "
                              f"{self.dep_q}")
                if sorted(set(sched)) != list(range(max(sched) + 1)):
                    raise bad("depformer_weights_per_step_schedule", "must use every weight set 0..max")
            if self.depformer_weights_per_step and self.dep_gating == "none":
                raise bad("depformer_weights_per_step", "per-step weights need a gated FFN (moshi restriction)")
        if self.cross_attention and (self.fuser is None or not self.fuser.cross):
            raise bad("cross_attention", "true but the fuser declares no 'cross' condition")
        names = {c.name for c in self.conditioners}
        if self.fuser is not None:
            if self.fuser.prepend:
                raise bad("fuser.prepend", "prepend conditioning is not supported")
            for used in self.fuser.sum + self.fuser.cross:
                if used not in names:
                    raise bad("fuser", f"uses condition {used!r} that 'conditioners' does not define")
            if self.fuser.cross and not self.cross_attention:
                raise bad("fuser.cross", "cross conditions need cross_attention: true")
        if self.extra_heads_num_heads < 0:
            raise bad("extra_heads_num_heads", "must be >= 0")
        if self.extra_heads_num_heads and self.extra_heads_dim <= 0:
            raise bad("extra_heads_dim", f"must be positive, got {self.extra_heads_dim}")


@dataclass(frozen=True)
class CheckpointConfig:
    """A whole ``config.json``: the LM hyperparameters plus the loader metadata and runtime sub-configs."""

    lm: LMConfig
    model_type: str = "moshi"
    model_id: dict = field(default_factory=dict)
    moshi_name: str = "model.safetensors"
    mimi_name: str = "tokenizer-e351c8d8-checkpoint125.safetensors"
    tokenizer_name: str = "tokenizer_spm_32k_3.model"
    mimi_config_name: str | None = None
    lm_gen_config: dict = field(default_factory=dict)
    stt_config: dict = field(default_factory=dict)
    tts_config: dict = field(default_factory=dict)
    lora: bool = False
    lora_name: str | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> CheckpointConfig:
        return parse_config(data, where)

    @classmethod
    def from_file(cls, path: str | Path) -> CheckpointConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a JSON object")
        return parse_config(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


_META_FIELDS = {f.name: f for f in dataclasses.fields(CheckpointConfig) if f.name not in ("lm", "raw")}
_LM_FIELDS = {f.name: f for f in dataclasses.fields(LMConfig)} 
# Keys moshi's loader accepts and drops, or renames.
_DROPPED = {"depformer_causal", "lora_rank", "lora_scaling", "quantize", "gradient_checkpointing"}
_RENAMED = {"demux_second_stream": "demux_second_text_stream"}
_ALWAYS_WRITTEN = {"card", "n_q", "dep_q", "delays", "text_card", "dim", "num_heads", "num_layers", "hidden_scale",
                   "norm", "context", "max_period", "positional_embedding", "gating", "causal"}
_STT_KEYS = {"audio_delay_seconds": "float", "audio_silence_prefix_seconds": "float"}
_TTS_KEYS = {"audio_delay": "float", "second_stream_ahead": "int", "multistream": "bool"}


def _coerce(where: str, key: str, value: Any, annotation: str) -> Any:
    def err(expected: str) -> ConfigError:
        return ConfigError(f"{where}: field {key!r}: expected {expected}, got {value!r}")

    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise err(annotation)
    base = annotation.replace(" | None", "")
    if base == "bool":
        if not isinstance(value, bool):
            raise err("a boolean")
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise err("an integer")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise err("a finite number")  # JSON's NaN and Infinity parse, and then fail far from here
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise err("a string")
        return value
    if base == "dict":
        if not isinstance(value, dict):
            raise err("an object")
        return value
    if base == "tuple[str, ...]":
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise err("a list of strings")
        return tuple(value)
    if base == "tuple[int, ...]":
        if not isinstance(value, list | tuple) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in value):
            raise err("a list of integers")
        return tuple(value)
    raise err(annotation)  # pragma: no cover


_CONDITIONER_ARGS = {"dim": "int", "n_bins": "int", "possible_values": "tuple[str, ...] | None", "tokenizer": "str",
                     "force_linear": "bool", "output_bias": "bool", "learn_padding": "bool", "pad_empty": "bool",
                     "init_scale": "float | None"}


def _parse_conditioners(where: str, data: Any, out_dim: int) -> tuple[ConditionerConfig, ...]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: field 'conditioners': expected an object, got {data!r}")
    out = []
    for name, cfg in data.items():
        fld = f"conditioners.{name}"
        if not isinstance(cfg, dict) or "type" not in cfg:
            raise ConfigError(f"{where}: field {fld!r}: expected an object with a 'type'")
        kind = cfg["type"]
        if kind not in ("lut", "tensor"):
            raise ConfigError(f"{where}: field {fld}.type: unknown conditioner type {kind!r} (lut, tensor)")
        kw = cfg.get(kind)
        if not isinstance(kw, dict):
            raise ConfigError(f"{where}: field {fld}.{kind}: expected an object of conditioner arguments")
        unknown = set(kw) - set(_CONDITIONER_ARGS)
        if unknown:
            raise ConfigError(f"{where}: field {fld}.{kind}: unknown argument(s) {sorted(unknown)}")
        if "dim" not in kw:
            raise ConfigError(f"{where}: field {fld}.{kind}.dim: missing")
        for arg, value in kw.items():  # typed here: a string "dim" or n_bins would fail later as a traceback
            _coerce(where, f"{fld}.{kind}.{arg}", value, _CONDITIONER_ARGS[arg])
        if kw["dim"] <= 0:
            raise ConfigError(f"{where}: field {fld}.{kind}.dim: must be positive, got {kw['dim']}")
        pv = kw.get("possible_values")
        if kind == "lut":
            if "n_bins" not in kw:
                raise ConfigError(f"{where}: field {fld}.lut.n_bins: missing")
            if kw["n_bins"] <= 0:
                raise ConfigError(f"{where}: field {fld}.lut.n_bins: must be positive, got {kw['n_bins']}")
            if kw.get("tokenizer", "noop") != "noop":
                raise ConfigError(f"{where}: field {fld}.lut.tokenizer: only 'noop' is supported")
            if pv is not None and len(pv) > kw["n_bins"]:
                raise ConfigError(f"{where}: field {fld}.lut.possible_values: more values than n_bins")
        out.append(ConditionerConfig(
            name=name, type=kind, dim=int(kw["dim"]), output_dim=out_dim, n_bins=int(kw.get("n_bins", 0)),
            possible_values=tuple(pv) if pv is not None else None, tokenizer=kw.get("tokenizer", "noop"),
            force_linear=bool(kw.get("force_linear", True)), output_bias=bool(kw.get("output_bias", False)),
            learn_padding=bool(kw.get("learn_padding", True)),
        ))
    return tuple(out)


def _parse_fuser(where: str, data: Any) -> FuserConfig | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: field 'fuser': expected an object, got {data!r}")
    known = {"sum", "cross", "prepend", "cross_attention_pos_emb", "cross_attention_pos_emb_scale"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{where}: field 'fuser': unknown key(s) {sorted(unknown)}")
    for k in ("sum", "cross", "prepend"):
        value = data.get(k, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: field 'fuser.{k}': expected a list of condition names")
    _coerce(where, "fuser.cross_attention_pos_emb", data.get("cross_attention_pos_emb", False), "bool")
    _coerce(where, "fuser.cross_attention_pos_emb_scale", data.get("cross_attention_pos_emb_scale", 1.0), "float")
    return FuserConfig(
        sum=tuple(data.get("sum", [])), cross=tuple(data.get("cross", [])), prepend=tuple(data.get("prepend", [])),
        cross_attention_pos_emb=bool(data.get("cross_attention_pos_emb", False)),
        cross_attention_pos_emb_scale=float(data.get("cross_attention_pos_emb_scale", 1.0)),
    )


def parse_config(data: dict[str, Any], where: str = "config") -> CheckpointConfig:
    """Parse a ``config.json`` dict (moshi ``CheckpointInfo`` layout) into a validated :class:`CheckpointConfig`."""
    data = dict(data)
    meta: dict[str, Any] = {}
    lm: dict[str, Any] = {}
    for key, value in data.items():
        key = _RENAMED.get(key, key)
        if key in _DROPPED:
            continue
        if key in _META_FIELDS:  # typed too: a numeric moshi_name or a string stt_config fails later otherwise
            meta[key] = _coerce(where, key, value, str(_META_FIELDS[key].type))
        elif key in ("conditioners", "fuser"):
            continue
        elif key in _LM_FIELDS:
            lm[key] = _coerce(where, key, value, str(_LM_FIELDS[key].type))
        else:
            raise ConfigError(f"{where}: unknown field {key!r}")
    for key, sub_known in (("stt_config", _STT_KEYS), ("tts_config", _TTS_KEYS)):
        sub = meta.get(key, {})
        if not isinstance(sub, dict):
            raise ConfigError(f"{where}: field {key!r}: expected an object")
        unknown = set(sub) - set(sub_known)
        if unknown:
            raise ConfigError(f"{where}: field {key!r}: unknown key(s) {sorted(unknown)}")
        for name, value in sub.items():
            if _coerce(where, f"{key}.{name}", value, sub_known[name]) < 0:
                raise ConfigError(f"{where}: field '{key}.{name}': must be non-negative, got {value!r}")
    if "depformer_layer_scale" not in data:  # moshi: absent inherits the main one, null is no LayerScale
        lm["depformer_layer_scale"] = lm.get("layer_scale")
    # Fields moshi acts on that dsm does not implement: refused, rather than running another model than moshi builds.
    unsupported = {"lora": "LoRA adapters (field 'lora' is true)",
                   "mimi_config_name": "a custom Mimi config (field 'mimi_config_name')"}
    for key, what in unsupported.items():
        if meta.get(key):
            raise ConfigError(f"{where}: {what} are not supported by dsm")
    if meta.get("tts_config", {}).get("multistream"):
        raise ConfigError(f"{where}: field 'tts_config.multistream': multistream TTS models are not supported by dsm")
    model_id = meta.get("model_id", {})
    if model_id and not (isinstance(model_id.get("sig"), str) and isinstance(model_id.get("epoch"), int | str)
                         and not isinstance(model_id.get("epoch"), bool)):
        raise ConfigError(f"{where}: field 'model_id': expected {{\"sig\": str, \"epoch\": int}} (it names the voice "
                          f"files), got {model_id!r}")
    dim = lm.get("dim", LMConfig.dim)
    if "conditioners" in data and data["conditioners"]:
        lm["conditioners"] = _parse_conditioners(where, data["conditioners"], dim)
    lm["fuser"] = _parse_fuser(where, data.get("fuser"))
    lm_cfg = LMConfig(**lm)
    lm_cfg.validate(where)
    if lm_cfg.fuser is None and lm_cfg.conditioners:
        raise ConfigError(f"{where}: field 'conditioners': conditioners given but no 'fuser'")
    return CheckpointConfig(lm=lm_cfg, raw=data, **meta)


def config_to_dict(cfg: CheckpointConfig) -> dict[str, Any]:
    """Inverse of :func:`parse_config`: the released ``config.json`` layout."""
    out = lm_to_dict(cfg.lm)
    for name in sorted(_META_FIELDS):
        value = getattr(cfg, name)
        if value not in (None, {}, False) or name in ("model_type",):
            out[name] = value
    return out


def lm_to_dict(lm: LMConfig) -> dict[str, Any]:
    """The LM hyperparameters only, in ``config.json`` spelling (moshi ``LMModel`` keyword arguments)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(LMConfig):
        if f.name in ("conditioners", "fuser"):
            continue
        value = getattr(lm, f.name)
        if f.name == "depformer_layer_scale":  # absent inherits layer_scale: written (null too) where it differs
            if value != lm.layer_scale:
                out[f.name] = value
            continue
        if value == f.default and f.name not in _ALWAYS_WRITTEN:
            continue
        if isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    if lm.conditioners:
        conds = {}
        for c in lm.conditioners:
            kw: dict[str, Any] = {"dim": c.dim}
            if c.type == "lut":
                kw.update(n_bins=c.n_bins, tokenizer=c.tokenizer,
                          possible_values=list(c.possible_values) if c.possible_values is not None else None)
            conds[c.name] = {"type": c.type, c.type: kw}
        out["conditioners"] = conds
    if lm.fuser is not None:
        out["fuser"] = {"sum": list(lm.fuser.sum), "cross": list(lm.fuser.cross), "prepend": list(lm.fuser.prepend),
                        "cross_attention_pos_emb": lm.fuser.cross_attention_pos_emb,
                        "cross_attention_pos_emb_scale": lm.fuser.cross_attention_pos_emb_scale}
    return out
