"""The thin DSM model: temporal transformer, text/extra heads and depth transformer (DSM-SPEC §2-3).

Two entry points share every weight:

* :meth:`LMModel.forward` — teacher-forced pass over a whole code sequence (moshi ``LMModel.forward``), used to
  check parity and streaming equivalence;
* :meth:`LMModel.step_text` / :meth:`LMModel.depformer_step` — one streaming step for a batch of stream slots, with
  explicit state (paged KV cache, positions, write mask). Hot ops go through ``dsm_kernels``.

Parameter names equal the released checkpoints' tensor names, so ``load_state_dict`` takes them as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import dsm_kernels
from dsm_kernels.decoder import condition_attention, rope_append

from .conditioning import ConditionProvider
from .config import LMConfig
from .kv_cache import CrossKVCache, PagedKVCache
from .layers import (
    LayerScale,
    Norm,
    ScaledEmbedding,
    TransformerLayer,
    Weight,
    apply_rope,
    rope_frequencies,
    sin_embedding,
)


class Transformer(nn.Module):
    def __init__(self, *, dim: int, num_heads: int, num_layers: int, dim_feedforward: int, norm: str, gating: str,
                 layer_scale: float | None, pos_emb: str, max_period: float, positional_scale: float = 1.0,
                 context: int | None, sets: int = 1, schedule: tuple[int, ...] | None = None,
                 cross_attention: bool = False, kv_repeat: int = 1):
        super().__init__()
        self.dim, self.num_heads, self.context = dim, num_heads, context
        self.pos_emb, self.max_period, self.positional_scale = pos_emb, max_period, positional_scale
        self.schedule = schedule
        self.layers = nn.ModuleList([
            TransformerLayer(dim, num_heads, dim_feedforward, norm=norm, gating=gating, layer_scale=layer_scale,
                             sets=sets, cross_attention=cross_attention, kv_repeat=kv_repeat)
            for _ in range(num_layers)
        ])

    @property
    def rope(self) -> bool:
        return self.pos_emb in ("rope", "sin_rope")

    def add_sin(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.pos_emb in ("sin", "sin_rope"):
            x = x + self.positional_scale * sin_embedding(positions, x.shape[-1], self.max_period, x.dtype)
        return x

    def weight_set(self, step: int) -> int:
        return self.schedule[step] if self.schedule is not None else step

    def forward(self, x: torch.Tensor, cross_kv: list | None = None, per_step_weights: bool = False) -> torch.Tensor:
        """Whole-sequence pass. ``x`` [B, T, d]; positions 0..T-1; moshi's mask ``0 <= q - k < context``."""
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device)
        x = self.add_sin(x, pos[None].expand(B, T))
        delta = pos[:, None] - pos[None, :]
        mask = delta >= 0
        if self.context is not None:
            mask &= delta < self.context
        for i, layer in enumerate(self.layers):
            h = layer.norm1(x)
            if per_step_weights:  # depformer: position t uses weight set schedule[t]
                parts = [layer.self_attn.qkv(h[:, t], self.weight_set(t)) for t in range(T)]
                q, k, v = (torch.stack(p, dim=1) for p in zip(*parts, strict=True))
            else:
                q, k, v = layer.self_attn.qkv(h)
            if self.rope:
                q, k = apply_rope(q, pos, self.max_period), apply_rope(k, pos, self.max_period)
            k, v = _repeat_kv(k, layer), _repeat_kv(v, layer)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
            a = a.transpose(1, 2).reshape(B, T, -1)
            if per_step_weights:
                a = torch.stack([layer.self_attn.out(a[:, t], self.weight_set(t)) for t in range(T)], dim=1)
            else:
                a = layer.self_attn.out(a)
            x = x + layer.layer_scale_1(a)
            if layer.cross_attention is not None:
                x = x + layer.layer_scale_cross(_cross_attend(layer, x, *cross_kv[i]))
            h = layer.norm2(x)
            if per_step_weights:
                f = torch.stack([layer.ffn(h[:, t], self.weight_set(t)) for t in range(T)], dim=1)
            else:
                f = layer.ffn(h)
            x = x + layer.layer_scale_2(f)
        return x


def _repeat_kv(x: torch.Tensor, layer: TransformerLayer) -> torch.Tensor:
    rep = layer.self_attn.num_heads // layer.self_attn.kv_heads
    return x if rep == 1 else x.repeat_interleave(rep, dim=-2)


def _scale_of(layer_scale: nn.Module) -> torch.Tensor | None:
    return layer_scale.scale if isinstance(layer_scale, LayerScale) else None


def _cross_attend(layer: TransformerLayer, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Cross-attention of ``x`` [B, T, d] over cached K/V [B, H, S, D]; no mask (DSM-SPEC §2.8)."""
    B, T, _ = x.shape
    q = layer.cross_attention.cross_q(layer.norm_cross(x)).transpose(1, 2)
    a = F.scaled_dot_product_attention(q, k, v)
    return layer.cross_attention.out(a.transpose(1, 2).reshape(B, T, -1))


def _cross_attend_step(layer: TransformerLayer, x: torch.Tensor, cross: CrossKVCache, i: int, counters, backend):
    """:func:`_cross_attend` of one token per row [B, d] over layer ``i``'s paged condition K/V."""
    q = layer.cross_attention.cross_q(layer.norm_cross(x))
    a = condition_attention(q, cross, i, counters=counters, backend=backend)
    return layer.cross_attention.out(a.flatten(1))


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The LM's dtype when none is asked: bfloat16 on CUDA (the released weights'), float32 elsewhere (bfloat16
    matmuls are slow on a CPU)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class LMModel(nn.Module):
    """moshi's ``LMModel`` family. Build with a config, then ``load_state_dict`` a released checkpoint."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.dim
        self.emb = nn.ModuleList([ScaledEmbedding(cfg.card + 1, d, norm=cfg.norm_emb) for _ in range(cfg.n_q)])
        self.text_emb = ScaledEmbedding(cfg.text_card + 1, d, demux=cfg.demux_second_text_stream, norm=cfg.norm_emb)
        self.transformer = Transformer(
            dim=d, num_heads=cfg.num_heads, num_layers=cfg.num_layers, dim_feedforward=cfg.ffn_dim, norm=cfg.norm,
            gating=cfg.gating, layer_scale=cfg.layer_scale, pos_emb=cfg.positional_embedding,
            max_period=cfg.max_period, positional_scale=cfg.positional_scale, context=cfg.context,
            cross_attention=cfg.cross_attention, kv_repeat=cfg.kv_repeat)
        self.out_norm = Norm(cfg.norm, d)
        self.text_linear = Weight(cfg.text_out, d)
        self.extra_heads = nn.ModuleList([Weight(cfg.extra_heads_dim, d) for _ in range(cfg.extra_heads_num_heads)])
        dd, lr = cfg.depformer_dim, cfg.depformer_low_rank_embeddings
        # moshi creates the input projections even without a depformer (STT checkpoints hold none or one).
        self.depformer_in = nn.ModuleList([Weight(dd, d) for _ in range(cfg.dep_num_in)])
        if cfg.dep_q > 0:
            self.depformer_emb = nn.ModuleList(
                [ScaledEmbedding(cfg.card + 1, dd, low_rank=lr, norm=cfg.norm_emb) for _ in range(cfg.dep_q - 1)])
            self.depformer_text_emb = ScaledEmbedding(cfg.text_card + 1, dd, low_rank=lr,
                                                      demux=cfg.demux_second_text_stream, norm=cfg.norm_emb)
            self.depformer = Transformer(
                dim=dd, num_heads=cfg.dep_num_heads, num_layers=cfg.dep_num_layers, dim_feedforward=cfg.dep_ffn_dim,
                norm=cfg.norm, gating=cfg.dep_gating, layer_scale=cfg.depformer_layer_scale,
                pos_emb=cfg.depformer_pos_emb, max_period=cfg.dep_max_period, positional_scale=cfg.positional_scale,
                context=None, sets=cfg.dep_weight_sets,
                schedule=cfg.dep_schedule if cfg.depformer_weights_per_step else None, kv_repeat=cfg.kv_repeat)
            norms = [Norm(cfg.depformer_norm, dd) if cfg.depformer_norm else nn.Identity() for _ in range(cfg.dep_q)]
            self.depformer_norms = nn.ModuleList(norms)
            self.linears = nn.ModuleList([Weight(cfg.card, dd) for _ in range(cfg.dep_q)])
        self.condition_provider = ConditionProvider(cfg.conditioners) if cfg.conditioners else None

    @classmethod
    def from_checkpoint(cls, files, *, device="cpu", dtype: torch.dtype = torch.bfloat16) -> LMModel:
        """Build and load an LM from resolved checkpoint files (``dsm.checkpoint.resolve_checkpoint``).

        Every tensor is validated (names, shapes, dtypes, file integrity) before any is used; the conditioners stay
        fp32 as in the reference.
        """
        from .checkpoint import load_lm_state_dict

        state = load_lm_state_dict(files.lm_weights, files.config, dtype=dtype, device=device)
        with torch.device("meta"):
            model = cls(files.config.lm)
        model.load_state_dict(state, strict=True, assign=True)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()

    # ---- teacher forcing -----------------------------------------------------------------------------------------
    def initial_tokens(self, batch: int, device) -> torch.Tensor:
        """[B, K] initial token column: text ``text_card``, audio ``card``."""
        init = torch.full((batch, self.cfg.num_codebooks), self.cfg.card, dtype=torch.long, device=device)
        init[:, 0] = self.cfg.text_card
        return init

    def embed_sequence(self, seq: torch.Tensor) -> torch.Tensor:
        """moshi ``forward_text`` input: sum of audio embeddings (codebook order) then text. ``seq`` [B, K, S]."""
        x = None
        for k in range(self.cfg.n_q):
            e = self.emb[k](seq[:, k + 1])
            x = e if x is None else x + e
        t = self.text_emb(seq[:, 0])
        return t if x is None else x + t

    def cross_kv(self, cross_src: torch.Tensor | None) -> list | None:
        """Per-layer cross-attention K/V of a cross source [B, S, d] (model dtype), or None."""
        if cross_src is None or not self.cfg.cross_attention:
            return None
        return [layer.cross_attention.cross_kv(cross_src) for layer in self.transformer.layers]

    def forward_text(self, seq: torch.Tensor, cond_sum: torch.Tensor | None = None,
                     cross_src: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed_sequence(seq)
        if cond_sum is not None:
            x = x + cond_sum.to(x)
        cross = self.cross_kv(cross_src.to(x) if cross_src is not None else None)
        z = self.out_norm(self.transformer(x, cross))
        return z, self.text_linear(z)[:, None]

    def forward(self, codes: torch.Tensor, cond_sum=None, cross_src=None):
        """Teacher-forced pass, as moshi ``LMModel.forward``: (logits, mask, text_logits, text_mask)."""
        cfg = self.cfg
        B, K, T = codes.shape
        if K != cfg.num_codebooks:
            raise ValueError(f"codes: expected {cfg.num_codebooks} streams, got shape {tuple(codes.shape)}")
        init = self.initial_tokens(B, codes.device)[:, :, None]
        delayed = torch.cat([init, _delay(codes, cfg.delays, init)], dim=2)
        z, text_logits = self.forward_text(delayed[:, :, :-1], cond_sum, cross_src)
        logits = self.depformer_teacher_forced(delayed[:, :, 1:], z) if cfg.dep_q else None
        text_logits, text_mask = _undelay(text_logits, cfg.delays[:1])
        text_mask &= codes[:, :1] != -1
        mask = None
        if logits is not None:
            logits, mask = _undelay(logits, cfg.delays[1 : 1 + cfg.dep_q])
            mask &= codes[:, 1 : 1 + cfg.dep_q] != -1
        return logits, mask, text_logits, text_mask

    def depformer_input(self, k: int, z: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        idx = (self.cfg.dep_schedule[k] if self.cfg.depformer_weights_per_step_schedule else k)
        proj = self.depformer_in[idx if self.cfg.depformer_multi_linear else 0](z)
        emb = self.depformer_text_emb(prev) if k == 0 else self.depformer_emb[k - 1](prev)
        return proj + emb

    def depformer_teacher_forced(self, seq: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        B, _, T = seq.shape
        inputs = [self.depformer_input(k, z, seq[:, k]) for k in range(self.cfg.dep_q)]
        x = torch.stack(inputs, dim=2).view(B * T, self.cfg.dep_q, -1)
        out = self.depformer(x, per_step_weights=self.cfg.depformer_weights_per_step)
        logits = [self.linears[k](self.depformer_norms[k](out[:, k])).view(B, T, -1) for k in range(self.cfg.dep_q)]
        return torch.stack(logits, dim=1)

    # ---- streaming -----------------------------------------------------------------------------------------------
    def fused_embedding_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(text table, stacked audio tables [n_q, card+1, d], second text table) for ``multistream_embed``.

        The audio tables are stacked once and each ``emb.k.weight`` is re-pointed at its slice, so no memory is
        duplicated. Call again after moving or reloading the model.
        """
        if self.cfg.n_q:
            stacked = torch.stack([e.weight.data for e in self.emb])
            for k, e in enumerate(self.emb):
                e.weight.data = stacked[k]
        else:
            stacked = self.text_emb.weight.new_zeros(0, self.cfg.card + 1, self.cfg.dim)
        with torch.no_grad():
            text, text2 = self.text_emb.fused_tables()
        return text, stacked, text2

    def step_text(self, tokens: torch.Tensor, kv: PagedKVCache, positions: torch.Tensor, write: torch.Tensor, *,
                  tables, cond_sum: torch.Tensor | None = None, cross: CrossKVCache | None = None,
                  backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One temporal step for every slot. ``tokens`` [B, K]; ``positions`` [B] (tokens written since reset; the
        written rows' move on by one, in place, in the same kernel that finds their K/V slots); ``write`` [B] bool
        (False: the slot's step is discarded, its cache is not written). Returns ``z`` [B, d] (after ``out_norm``)
        and text logits [B, text_out]."""
        tr = self.transformer
        text, audio, text2 = tables
        x = dsm_kernels.multistream_embed(tokens, text, audio, text_table2=text2, cond=cond_sum,
                                          out_dtype=text.dtype, backend=backend)
        x = tr.add_sin(x, positions)
        slot, seq_lens, positions = dsm_kernels.kv_slots(kv.block_table, positions, write, kv.page_size, advance=True,
                                                         backend=backend)  # fmt: skip
        return self.step_layers(x, kv, positions, slot, seq_lens, cross=cross, backend=backend)

    def step_layers(self, x: torch.Tensor, kv: PagedKVCache, positions: torch.Tensor, slot: torch.Tensor,
                    seq_lens: torch.Tensor, *, cross: CrossKVCache | None = None,
                    backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layers, output norm and text head of :meth:`step_text` on the embedded input ``x`` [B, d], at RoPE
        ``positions`` with the K/V ``slot`` and ``seq_lens`` of ``dsm_kernels.kv_slots``."""
        tr = self.transformer
        if self._fusable_step():
            kernels = backend or dsm_kernels.default_backend(x.device)
            few = x.shape[0] <= dsm_kernels.gemv_max_rows() and kernels != "reference"
            step = self._step_layers_gemv if few else self._step_layers_fused
            return step(x, kv, positions, slot, seq_lens, cross, backend)
        for i, layer in enumerate(tr.layers):
            q, k, v = layer.self_attn.qkv(layer.norm1(x))
            if tr.rope:
                q, k = apply_rope(q[:, None], positions[:, None], tr.max_period)[:, 0], apply_rope(
                    k[:, None], positions[:, None], tr.max_period)[:, 0]
            dsm_kernels.append_kv(kv.k[i], kv.v[i], k, v, slot, backend=backend)
            a = dsm_kernels.paged_decode_attention(q, kv.k[i], kv.v[i], kv.block_table, seq_lens, context=kv.context,
                                                   counters=kv.counters, backend=backend)
            x = x + layer.layer_scale_1(layer.self_attn.out(a.flatten(1)))
            if layer.cross_attention is not None:
                x = x + layer.layer_scale_cross(_cross_attend_step(layer, x, cross, i, kv.counters, backend))
            x = x + layer.layer_scale_2(layer.ffn(layer.norm2(x)))
        z = self.out_norm(x)
        return z, self.text_linear(z)

    def _fusable_step(self) -> bool:
        """The released layouts (fp32 RMSNorm, SiLU-gated FFN) take the fused step; others the module path."""
        return self.cfg.norm == "rms_norm_f32" and self.cfg.gating == "silu"

    def _rope_inv_freq(self, device: torch.device) -> torch.Tensor:
        cached = getattr(self, "_inv_freq", None)
        if cached is None or cached.device != device:
            tr = self.transformer
            cached = self._inv_freq = rope_frequencies(tr.dim // tr.num_heads, tr.max_period, device)
        return cached

    def _step_layers_fused(self, x, kv, positions, slot, seq_lens, cross, backend):
        """The layers of :meth:`step_text` with the elementwise glue fused (``dsm_kernels.add_rms_norm``,
        ``rope_append_kv``, ``silu_mul``): each residual branch is added inside the next norm's kernel. The reference
        backend computes exactly what the module path does."""
        tr = self.transformer
        H = tr.num_heads
        inv_freq = self._rope_inv_freq(x.device) if tr.rope else None
        delta = scale = None  # the residual branch not yet added to x
        for i, layer in enumerate(tr.layers):
            attn = layer.self_attn
            Hkv = attn.kv_heads
            x, h = dsm_kernels.add_rms_norm(x, layer.norm1.alpha, layer.norm1.eps, delta=delta, scale=scale,
                                            backend=backend)
            qkv = F.linear(h, attn.in_proj_weight)
            q = rope_append(qkv, positions, inv_freq, kv.k[i], kv.v[i], slot, H, Hkv, backend=backend)
            a = dsm_kernels.paged_decode_attention(q, kv.k[i], kv.v[i], kv.block_table, seq_lens, context=kv.context,
                                                   counters=kv.counters, backend=backend)
            delta, scale = attn.out(a.flatten(1)), _scale_of(layer.layer_scale_1)
            if layer.cross_attention is not None:
                x = x + (scale.to(delta) * delta if scale is not None else delta)
                delta = _cross_attend_step(layer, x, cross, i, kv.counters, backend)
                scale = _scale_of(layer.layer_scale_cross)
            x, h = dsm_kernels.add_rms_norm(x, layer.norm2.alpha, layer.norm2.eps, delta=delta, scale=scale,
                                            backend=backend)
            g = layer.gating
            delta = g.linear_out(dsm_kernels.silu_mul(g.linear_in(h), backend=backend))
            scale = _scale_of(layer.layer_scale_2)
        x, z = dsm_kernels.add_rms_norm(x, self.out_norm.alpha, self.out_norm.eps, delta=delta, scale=scale,
                                        backend=backend)
        return z, self.text_linear(z)

    def _step_layers_gemv(self, x, kv, positions, slot, seq_lens, cross, backend):
        """The layers of :meth:`step_text` for a few rows: ``dsm_kernels.decoder_step`` (on the Triton backend each
        linear layer is a GEMV carrying its neighbours, the RMSNorm before it and the residual add or SiLU gate after
        it, and the QKV GEMV also rotates q and k and writes the pages: 6 launches a layer where the fused step
        launches 10; the CUDA backend runs the whole step as one persistent kernel where it can). The rounding
        points are the module path's."""
        return dsm_kernels.decoder_step(self.decoder_weights(), x, positions, slot, seq_lens, kv.k, kv.v,
                                        kv.block_table, context=kv.context, counters=kv.counters, cross=cross,
                                        backend=backend)  # fmt: skip

    def decoder_weights(self):
        """The temporal transformer's tensors packed for ``dsm_kernels.decoder_step`` (views, no copies; cached, and
        re-packed when the weights move or change dtype)."""
        from dsm_kernels.decoder import DecoderCrossWeights, DecoderLayerWeights, DecoderWeights

        tr = self.transformer
        w0 = tr.layers[0].self_attn.in_proj_weight
        key = (w0.device, w0.dtype, w0.data_ptr())
        cached = self.__dict__.get("_decoder_packed")
        if cached is not None and cached[0] == key:
            return cached[1]
        layers = []
        for layer in tr.layers:
            attn, g = layer.self_attn, layer.gating
            cross = None
            if layer.cross_attention is not None:
                ca, ln = layer.cross_attention, layer.norm_cross
                cross = DecoderCrossWeights(norm_weight=ln.weight, norm_bias=ln.bias, norm_eps=ln.eps,
                                            q_proj=ca.in_proj_weight[: ca.dim], out_proj=ca.out_proj.weight,
                                            scale=_scale_of(layer.layer_scale_cross))  # fmt: skip
            layers.append(DecoderLayerWeights(
                norm1=layer.norm1.alpha.view(-1), in_proj=attn.in_proj_weight, out_proj=attn.out_proj.weight,
                norm2=layer.norm2.alpha.view(-1), linear_in=g.linear_in.weight, linear_out=g.linear_out.weight,
                scale1=_scale_of(layer.layer_scale_1), scale2=_scale_of(layer.layer_scale_2), cross=cross))  # fmt: skip
        packed = DecoderWeights(
            num_heads=tr.num_heads, num_kv_heads=tr.layers[0].self_attn.kv_heads,
            inv_freq=self._rope_inv_freq(w0.device) if tr.rope else None, norm_eps=tr.layers[0].norm1.eps,
            layers=tuple(layers), out_norm=self.out_norm.alpha.view(-1), out_norm_eps=self.out_norm.eps,
            text_linear=self.text_linear.weight)  # fmt: skip
        self.__dict__["_decoder_packed"] = (key, packed)
        return packed

    def extra_head_probs(self, z: torch.Tensor) -> list[torch.Tensor]:
        return [F.softmax(head(z), dim=-1) for head in self.extra_heads]

    def depformer_weights(self):
        """The depformer's tensors packed for ``dsm_kernels.depformer_frame`` (cached; re-packed when the weights
        move or change dtype), or None for a layout the fused op does not cover (positional embedding, plain FFN,
        LayerNorm, grouped K/V), which keeps the module loop."""
        from dsm_kernels.reference import DepformerLayerWeights, DepformerWeights

        cfg, dep = self.cfg, self.depformer
        key = (self.depformer_in[0].weight.device, self.depformer_in[0].weight.dtype,
               self.depformer_in[0].weight.data_ptr())  # fmt: skip
        cached = self.__dict__.get("_dep_packed")
        if cached is not None and cached[0] == key:
            return cached[1]
        norms = {cfg.norm} | ({cfg.depformer_norm} if cfg.depformer_norm else set())
        if (cfg.dep_q == 0 or dep.pos_emb != "none" or cfg.dep_gating == "none" or cfg.kv_repeat != 1
                or len(norms) != 1 or not cfg.norm.startswith("rms_norm")):  # fmt: skip
            packed = None
        else:
            with torch.no_grad():
                # Stack the input projections once and re-point each module at its slice (no copy kept).
                stacked = torch.stack([m.weight.data for m in self.depformer_in])
                for i, m in enumerate(self.depformer_in):
                    m.weight.data = stacked[i]
                key = (stacked.device, stacked.dtype, stacked.data_ptr())
                te = self.depformer_text_emb
                text, text2 = te.fused_tables() if te.demux else (te(torch.arange(te.num, device=stacked.device)),
                                                                  None)  # fmt: skip
                full = [e(torch.arange(e.num, device=stacked.device)) for e in self.depformer_emb]  # low rank folded
                emb = torch.stack(full) if full else text.new_zeros(1, cfg.card + 1, cfg.depformer_dim)
                dd, S = cfg.depformer_dim, cfg.dep_weight_sets
                layers = []
                for layer in dep.layers:
                    g = layer.gating if isinstance(layer.gating, nn.ModuleList) else [layer.gating]
                    sc1 = getattr(layer.layer_scale_1, "scale", None)
                    sc2 = getattr(layer.layer_scale_2, "scale", None)
                    layers.append(DepformerLayerWeights(
                        norm1=layer.norm1.alpha.view(-1), norm2=layer.norm2.alpha.view(-1),
                        in_proj=layer.self_attn.in_proj_weight.view(S, 3 * dd, dd),
                        out_proj=layer.self_attn.out_proj.weight.view(S, dd, dd),
                        linear_in=tuple(b.linear_in.weight for b in g),
                        linear_out=tuple(b.linear_out.weight for b in g),
                        scale1=sc1, scale2=sc2))  # fmt: skip
                schedule = tuple(dep.weight_set(k) if cfg.depformer_weights_per_step else 0 for k in range(cfg.dep_q))
                in_index = tuple((cfg.dep_schedule[k] if cfg.depformer_weights_per_step_schedule else k)
                                 if cfg.depformer_multi_linear else 0 for k in range(cfg.dep_q))  # fmt: skip
                packed = DepformerWeights(
                    num_heads=cfg.dep_num_heads, schedule=schedule, in_index=in_index, in_proj=stacked,
                    text_emb=text.contiguous(), text_emb2=text2.contiguous() if text2 is not None else None,
                    emb=emb.contiguous(), heads=tuple(h.weight for h in self.linears),
                    head_norms=tuple(n.alpha.view(-1) if isinstance(n, Norm) else None for n in self.depformer_norms),
                    layers=tuple(layers), norm_eps=dep.layers[0].norm1.eps, norm_f32=cfg.norm == "rms_norm_f32",
                    activation=cfg.dep_gating)  # fmt: skip
        self.__dict__["_dep_packed"] = (key, packed)
        return packed

    def depformer_step(self, text_token: torch.Tensor, z: torch.Tensor,
                       sample: Callable[[int, torch.Tensor], torch.Tensor] | None = None, steps: int | None = None, *,
                       temperature: torch.Tensor | None = None, top_k: int = 0, seeds: torch.Tensor | None = None,
                       step_base: torch.Tensor | None = None, step_scale: int = 1, step_offset: int = 0,
                       counters: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
        """Generate the audio tokens of one frame along the codebook axis (DSM-SPEC §3).

        ``sample(k, logits [B, card]) -> [B]`` picks codebook ``k``'s token (CFG mixing and sampling live there).
        Rows of ``z`` may be 2B (CFG), the token fed back is then repeated. Returns [B, steps] int64.
        Without ``sample`` the whole frame is one ``dsm_kernels.depformer_frame`` op sampling with ``temperature``
        [B], ``top_k``, ``seeds`` [B] and noise counters ``step_base * step_scale + step_offset + k`` (no CFG rows);
        ``counters``: its barrier words (:func:`dsm_kernels.decoder_step`'s).
        """
        cfg, dep = self.cfg, self.depformer
        steps = cfg.dep_q if steps is None else steps
        packed = self.depformer_weights() if sample is None else None
        if sample is None and packed is not None and steps == cfg.dep_q:
            return dsm_kernels.depformer_frame(packed, z, text_token, temperature, top_k, seeds, step_base,
                                               step_scale=step_scale, step_offset=step_offset, counters=counters,
                                               backend=backend)  # fmt: skip
        if sample is None:  # layouts the fused op does not cover: the same sampling through the module loop
            def sample(k: int, logits: torch.Tensor) -> torch.Tensor:
                return dsm_kernels.sample_tokens(logits, temperature, top_k, seeds, step_base, step_scale=step_scale,
                                                 step_offset=step_offset + k, backend=backend)  # fmt: skip
        rows = z.shape[0]
        caches: list[list[torch.Tensor]] = [[] for _ in dep.layers]
        prev, out = text_token, []
        for k in range(steps):
            fed = prev.repeat(rows // prev.shape[0])
            x = self.depformer_input(k, z, fed)
            pos = torch.full((rows,), k, device=z.device, dtype=torch.long)
            x = dep.add_sin(x, pos)
            ws = dep.weight_set(k) if cfg.depformer_weights_per_step else 0
            for i, layer in enumerate(dep.layers):
                q, kk, v = layer.self_attn.qkv(layer.norm1(x), ws)
                if dep.rope:
                    q = apply_rope(q[:, None], pos[:, None], dep.max_period)[:, 0]
                    kk = apply_rope(kk[:, None], pos[:, None], dep.max_period)[:, 0]
                caches[i].append((_repeat_kv(kk, layer), _repeat_kv(v, layer)))
                keys = torch.stack([c[0] for c in caches[i]], dim=2)  # [B, H, k+1, D]
                vals = torch.stack([c[1] for c in caches[i]], dim=2)
                a = F.scaled_dot_product_attention(q[:, :, None], keys, vals)[:, :, 0]
                x = x + layer.layer_scale_1(layer.self_attn.out(a.flatten(1), ws))
                x = x + layer.layer_scale_2(layer.ffn(layer.norm2(x), ws))
            logits = self.linears[k](self.depformer_norms[k](x))
            prev = sample(k, logits)
            out.append(prev)
        return torch.stack(out, dim=1)


def _delay(codes: torch.Tensor, delays, init: torch.Tensor) -> torch.Tensor:
    """Shift stream k right by delays[k], filling with the initial token (moshi ``_delay_sequence``)."""
    out = codes.clone()
    for k, d in enumerate(delays):
        if d:
            out[:, k, d:] = codes[:, k, :-d]
            out[:, k, :d] = init[:, k]
    return out


def _undelay(logits: torch.Tensor, delays) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift stream k left by delays[k]; invalid tail positions are NaN and masked (moshi ``_undelay_sequence``)."""
    B, K, T = logits.shape[:3]
    out = torch.full_like(logits, float("nan"))
    mask = torch.zeros(B, K, T, dtype=torch.bool, device=logits.device)
    for k, d in enumerate(delays):
        out[:, k, : T - d] = logits[:, k, d:]
        mask[:, k, : T - d] = True
    return out, mask
