"""Mimi, Kyutai's 12.5 Hz neural audio codec, written from DSM-SPEC §7 (moshi is only a test oracle).

``Mimi`` holds fp32 weights loaded from the released safetensors (318 tensors, §8.4) and is stateless: every
stream's history lives in a :class:`MimiState` (tensors, batch first) created by :meth:`Mimi.init_state`.
Steps update the state in place, take an ``exec_mask`` (inactive rows are frozen, §4.5) and never synchronise
with the host, so one step can be captured in a CUDA graph per batch size.

Example::

    mimi = Mimi.from_file("tokenizer-e351c8d8-checkpoint125.safetensors")
    state = mimi.init_state(batch_size=2)
    codes = mimi.encode_step(pcm_1920, state)  # [2, 1, 1920] -> [2, 32, 1]
    pcm = mimi.decode_step(codes, state)  # -> [2, 1, 1920]
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import dsm_kernels
from dsm.cuda_graphs import capture_cuda_graph, cuda_graphed  # noqa: F401  (re-exported: the old home)
from dsm.mimi_checkpoint import (  # noqa: F401  (re-exported: the public Mimi API lives in dsm.mimi)
    CARDINALITY,
    CODE_DIM,
    CONTEXT,
    DECODER_OPS,
    DIM,
    ENCODER_OPS,
    FRAME_SIZE,
    MAX_CODEBOOKS,
    MAX_PERIOD,
    NUM_HEADS,
    NUM_LAYERS,
    SAMPLE_RATE,
    MimiCheckpointError,
    check_mimi_state_dict,
    load_mimi_state_dict,
    mimi_tensor_shapes,
    seanet_convs,
)
from dsm.mimi_modules import (
    KVState,
    LayerWeights,
    StepConstants,
    causal_conv1d,
    conv1d,
    conv_transpose1d,
    gemv_path,
    init_kv_state,
    rope_freqs,
    transformer_forward,
    uses_kernels,
)
from dsm_kernels.reference import convtr_phase_weight

TOKENS_PER_FRAME = 2  # transformer steps (25 Hz) per 1920-sample code frame (12.5 Hz)


@dataclass
class MimiState:
    """Streaming state of ``B`` independent Mimi streams; every tensor has the batch dimension first, but the
    double-buffered conv contexts (``[2, B, ...]``, see :meth:`current`) and the two phases.

    ``exec_mask[b] = False`` makes steps leave row ``b`` untouched (its outputs are then garbage).
    """

    exec_mask: torch.Tensor  # [B] bool
    # SEANet encoder conv inputs kept for the next call, double-buffered: [2, B, C_in, Ke - S], half enc_phase current
    enc_conv: list[torch.Tensor]
    enc_kv: KVState
    down_prev: torch.Tensor  # [2, B, 512, 2], half enc_phase current
    down_first: torch.Tensor  # [B] bool: the next call pads down_prev with its first frame (replicate pad)
    up_partial: torch.Tensor  # [B, 512, 2]
    dec_kv: KVState
    # decoder conv inputs [2, B, C_in, Ke - S] (half dec_phase current) and convtr tails [B, C_out, K - S]
    dec_conv: list[torch.Tensor]
    enc_phase: torch.Tensor  # [1] int32: which half of the encoder's conv contexts holds the current one
    dec_phase: torch.Tensor  # [1] int32: the same for the decoder's

    @property
    def batch_size(self) -> int:
        return self.exec_mask.shape[0]

    def __repr__(self) -> str:  # the dataclass's printed every tensor: 150 kB for 2 streams
        return (f"MimiState(batch_size={self.batch_size}, encoder={self.enc_kv.cache.shape[4] > 0}, "
                f"decoder={self.dec_kv.cache.shape[4] > 0}, device={self.exec_mask.device})")

    def tensors(self) -> list[torch.Tensor]:
        """Every state tensor (for copying/comparing whole states)."""
        out: list[torch.Tensor] = []
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, KVState):
                out += v.tensors()
            elif isinstance(v, list):
                out += v
            else:
                out.append(v)
        return out

    def current(self) -> list[torch.Tensor]:
        """The state as the next call reads it, batch dimension first: the current half of each double-buffered conv
        context (the other half holds what an earlier call left), every other tensor but the two phases as it is.
        Two states that agree here give the same outputs from here on."""
        contexts = [(t, self.enc_phase) for t in (*self.enc_conv, self.down_prev)] + [
            (t, self.dec_phase) for t in self.dec_conv if t.dim() == 4]  # not the transposed convs' tails
        phase_of = {id(t): phase for t, phase in contexts}
        out = []
        for t in self.tensors():
            if t is self.enc_phase or t is self.dec_phase:
                continue
            phase = phase_of.get(id(t))
            out.append(t if phase is None else t.index_select(0, phase.long())[0])
        return out

    def rows(self, n: int) -> MimiState:
        """Rows ``[0, n)`` as a state of ``n`` streams: views sharing this state's memory (and its two phases), so a
        step on it updates these rows in place and costs ``n`` rows, not :attr:`batch_size`. A server steps the
        smallest such prefix that holds every open stream.

        Rows from ``n`` on must hold no stream while it steps: they are not updated (their conv contexts fall out of
        phase) and row ``n`` takes the inactive rows' scratch writes. A stream opened there later is reset first
        (:meth:`reset` clears both halves of every context and restarts the ring), which makes them fresh again."""
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"rows: n must be in [1, {self.batch_size}], got {n}")
        if n == self.batch_size:
            return self

        def ctx(t: torch.Tensor) -> torch.Tensor:  # [2, B, ...] double-buffered contexts, else batch first
            return t[:, :n] if t.dim() == 4 else t[:n]

        return MimiState(
            exec_mask=self.exec_mask[:n], enc_conv=[ctx(t) for t in self.enc_conv], enc_kv=self.enc_kv.rows(n),
            down_prev=self.down_prev[:, :n], down_first=self.down_first[:n], up_partial=self.up_partial[:n],
            dec_kv=self.dec_kv.rows(n), dec_conv=[ctx(t) for t in self.dec_conv], enc_phase=self.enc_phase,
            dec_phase=self.dec_phase)

    def reset(self, mask: torch.Tensor) -> None:
        """Reset rows where ``mask`` is true to a fresh stream (and make them active); other rows are untouched.

        KV slots are not cleared: the counters going to zero invalidates them (§2.6). No host sync.
        """
        mask = self._check_mask(mask, "reset")
        for t in self.enc_conv + self.dec_conv + [self.down_prev, self.up_partial]:  # both halves of a context
            t.masked_fill_(mask.view(-1, 1, 1) if t.dim() == 3 else mask.view(1, -1, 1, 1), 0.0)
        for kv in (self.enc_kv, self.dec_kv):
            kv.pos.copy_(torch.where(mask, torch.zeros_like(kv.pos), kv.pos))
        self.down_first.copy_(self.down_first | mask)
        self.exec_mask.copy_(self.exec_mask | mask)

    def set_exec_mask(self, mask: torch.Tensor) -> None:
        self.exec_mask.copy_(self._check_mask(mask, "set_exec_mask"))

    def _check_mask(self, mask: torch.Tensor, what: str) -> torch.Tensor:
        # Shape and dtype only (no host sync). Without this a [1] mask broadcast to every row (resetting or pausing
        # all streams) and an int mask failed deep inside torch.where.
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (self.batch_size,):
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{what}: mask must be a bool tensor of shape ({self.batch_size},), got {got}")
        return mask.to(self.exec_mask.device)


class Mimi:
    """Mimi encoder/decoder over explicit fp32 weights; see the module docstring for the streaming contract.

    ``backend`` picks the ``dsm_kernels`` backend of the residual VQ ops (None: the default for ``device``, i.e.
    the reference on a CPU and Triton on a GPU). The reference backend reproduces moshi's codes bit for bit; the
    Triton one may differ where two codebook distances tie within fp32 rounding.

    At load, constant work leaves the step: codebooks (with their norms) are stacked for one encode op (with the
    groups' level ranges it reads on the device), the output projections are folded into the decode tables, the
    LayerScales into the transformers' weights (the encoder's codes still equal moshi's on the parity tests: the
    fold moves activations by ~1 ulp, far from flipping a code), the RoPE frequencies are computed once.
    """

    def __init__(self, sd: dict[str, torch.Tensor], n_q: int = MAX_CODEBOOKS, device: str | torch.device = "cpu",
                 backend: str | None = None):
        if not isinstance(n_q, int) or isinstance(n_q, bool) or not 1 <= n_q <= MAX_CODEBOOKS:  # 8.0: range() failed
            raise ValueError(f"n_q must be an integer in [1, {MAX_CODEBOOKS}], got {n_q!r}")
        sd = check_mimi_state_dict(sd)
        self.device = torch.device(device)
        self.n_q = n_q
        self.backend = backend
        w = {k: v.to(device=self.device, dtype=torch.float32) for k, v in sd.items()}
        self._w = w
        self.enc_convs = seanet_convs("encoder", ENCODER_OPS)
        self.dec_convs = seanet_convs("decoder", DECODER_OPS)
        self.enc_layers = [lw.fold_layer_scales() for lw in self._layers(w, "encoder_transformer")]
        self.dec_layers = [lw.fold_layer_scales() for lw in self._layers(w, "decoder_transformer")]
        self.rope_freqs = rope_freqs(DIM // NUM_HEADS, MAX_PERIOD, self.device)
        # the same layers as the few-token streaming step's kernels take them (unused on the reference backend)
        self.enc_step, self.dec_step = (LayerWeights.step_weights(layers, NUM_HEADS, self.rope_freqs)
                                        for layers in (self.enc_layers, self.dec_layers))  # fmt: skip
        self.consts = StepConstants(self.device)
        self.down_w = w["downsample.conv.conv.conv.weight"]
        self.up_w = w["upsample.convtr.convtr.convtr.weight"]
        # Off the reference backend, transposed convs that see at most CONV_GEMV_MAX_COLUMNS input columns per frame
        # at one stream (the first two decoder blocks': 2 and 16) also keep their weights as [C_out, K, C_in] rows,
        # for the GEMV path (40 MB the reference ops never read).
        # More columns (more streams) take the implicit-GEMM kernel, which reads every transposed conv's weights
        # phase-major (another 45 MB).
        self.convtr_rows, self.convtr_phases, cols = {}, {}, 2
        for op in DECODER_OPS if uses_kernels(backend, self.device) else ():
            if op[0] == "convtr":
                name = f"decoder.model.{op[1]}.convtr.convtr.weight"
                if cols <= dsm_kernels.CONV_GEMV_MAX_COLUMNS:
                    self.convtr_rows[name] = w[name].permute(1, 2, 0).contiguous()
                self.convtr_phases[name] = convtr_phase_weight(w[name], op[5])
                cols *= op[5]
        self._rvq(w)

    def __repr__(self) -> str:
        return f"Mimi(n_q={self.n_q}, device={self.device}, backend={self.backend!r})"

    @classmethod
    def from_file(cls, path: str | Path, n_q: int = MAX_CODEBOOKS, device: str | torch.device = "cpu",
                  backend: str | None = None) -> Mimi:
        from .checkpoint import check_device

        check_device(device)  # before the file is read, not as torch's AssertionError after
        return cls(load_mimi_state_dict(path), n_q=n_q, device=device, backend=backend)

    @staticmethod
    def _layers(w: dict[str, torch.Tensor], side: str) -> list[LayerWeights]:
        out = []
        for i in range(NUM_LAYERS):
            p = f"{side}.transformer.layers.{i}."
            out.append(
                LayerWeights(
                    norm1_w=w[p + "norm1.weight"],
                    norm1_b=w[p + "norm1.bias"],
                    in_proj=w[p + "self_attn.in_proj_weight"],
                    out_proj=w[p + "self_attn.out_proj.weight"],
                    ls1=w[p + "layer_scale_1.scale"],
                    norm2_w=w[p + "norm2.weight"],
                    norm2_b=w[p + "norm2.bias"],
                    linear1=w[p + "linear1.weight"],
                    linear2=w[p + "linear2.weight"],
                    ls2=w[p + "layer_scale_2.scale"],
                )
            )
        return out

    def _rvq(self, w: dict[str, torch.Tensor]) -> None:
        """Split RVQ (§7.6): group ``rvq_first`` (1 level) and ``rvq_rest`` (31), each with its own projections
        into the 256-d code space and back; residuals live in the projected space (pitfall 18)."""
        self.group_levels = (1, self.n_q - 1) if self.n_q > 1 else (1,)
        in_proj, books, tables = [], [], []
        for group, n in zip(("rvq_first", "rvq_rest"), self.group_levels, strict=False):
            p = f"quantizer.{group}."
            in_proj.append(w[p + "input_proj.weight"])
            out_proj = w[p + "output_proj.weight"][:, :, 0]  # [512, 256]
            for level in range(n):
                c = f"{p}vq.layers.{level}._codebook."
                # Codebook = EMA sum / usage, clamped like training did (pitfall 18); computed once in fp32.
                book = w[c + "embedding_sum"] / w[c + "cluster_usage"].clamp(min=1e-5)[:, None]
                books.append(dsm_kernels.reference.augment_codebook(book))
                tables.append(book @ out_proj.T)  # the output projection folded in: [2048, 512]
        self.rvq_in_proj = torch.cat(in_proj).contiguous()  # [G * 256, 512, 1]: both groups in one conv
        self.rvq_books = torch.stack(books).contiguous()  # [n_q, 2048, 258] rows [c, 1, |c|^2]
        # [G, 2] int32 (first level, count) per group, read by the encode kernel: made here, never in a step
        self.rvq_level_ranges = dsm_kernels.reference.rvq_level_ranges(self.group_levels, self.device)
        self.rvq_tables = torch.stack(tables).contiguous()  # [n_q, 2048, 512]

    # ----------------------------------------------------------------------------------------------- state
    def init_state(self, batch_size: int, encoder: bool = True, decoder: bool = True) -> MimiState:
        """Fresh state for ``batch_size`` streams, all active. ``encoder=False`` / ``decoder=False``: a state for
        the other side only (STT only encodes, TTS only decodes), without the unused transformer's KV ring: 8.2 MB
        a stream, ~6 GB at 700 STT streams that the LM's KV cache can use instead."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 0:
            raise ValueError(f"init_state: batch_size must be an integer >= 0, got {batch_size!r}")
        dev, f32 = self.device, torch.float32

        def conv_states(convs) -> list[torch.Tensor]:
            out = []
            for _, cin, cout, k, s, transposed in convs:
                if k > s:  # a transposed conv's tail, or a conv's double-buffered context
                    shape = (batch_size, cout, k - s) if transposed else (2, batch_size, cin, k - s)
                    out.append(torch.zeros(shape, device=dev, dtype=f32))
            return out

        head_dim = DIM // NUM_HEADS
        return MimiState(
            exec_mask=torch.ones(batch_size, dtype=torch.bool, device=dev),
            enc_conv=conv_states(self.enc_convs),
            enc_kv=init_kv_state(batch_size, NUM_LAYERS, NUM_HEADS, head_dim, CONTEXT if encoder else 0, dev),
            down_prev=torch.zeros(2, batch_size, DIM, 2, device=dev, dtype=f32),
            down_first=torch.ones(batch_size, dtype=torch.bool, device=dev),
            up_partial=torch.zeros(batch_size, DIM, 2, device=dev, dtype=f32),
            dec_kv=init_kv_state(batch_size, NUM_LAYERS, NUM_HEADS, head_dim, CONTEXT if decoder else 0, dev),
            dec_conv=conv_states(self.dec_convs),
            enc_phase=torch.zeros(1, dtype=torch.int32, device=dev),
            dec_phase=torch.zeros(1, dtype=torch.int32, device=dev),
        )

    def stream_state_bytes(self, encoder: bool = True, decoder: bool = True) -> int:
        """Bytes of one stream's row of ``init_state(..., encoder, decoder)`` (every conv context, the transformer
        KV rings of the sides asked for)."""
        kv = NUM_LAYERS * 2 * NUM_HEADS * CONTEXT * (DIM // NUM_HEADS)
        convs = sum((cout if transposed else 2 * cin) * (k - s)
                    for _, cin, cout, k, s, transposed in (*self.enc_convs, *self.dec_convs) if k > s)
        return 4 * (kv * (encoder + decoder) + convs + 2 * DIM * 2 + DIM * 2) + 2 * 1 + 2 * 8  # + masks, positions

    @staticmethod
    def reset(state: MimiState, mask: torch.Tensor) -> None:
        """Reset the rows of ``state`` selected by ``mask`` ``[B]`` bool (see :meth:`MimiState.reset`)."""
        state.reset(mask)

    # ----------------------------------------------------------------------------------------------- seanet
    def _seanet(self, x: torch.Tensor, ops: tuple[tuple, ...], prefix: str, states: list[torch.Tensor],
                exec_mask: torch.Tensor, phase: torch.Tensor, time_major: bool = False) -> torch.Tensor:
        """The SEANet encoder or decoder; its convs read half ``phase`` of their contexts and write the other (the
        caller flips ``phase`` once the step's last conv has run). ``time_major``: the last conv writes a new
        [B, T, C] buffer (returned as its [B, C, T] view), the layout the transformer reads and updates in place."""
        w = self._w
        it = iter(states)

        # Off the reference backend the kernels apply the ELUs as they load a conv's input (the conv inputs with
        # stored context, the implicit-GEMM convs; at a few streams the residual units' ends). On a GPU theirs is
        # libdevice's expm1f, the function torch's CUDA ELU calls: the encoder's codes depend on those bits.
        def conv(x: torch.Tensor, name: str, k: int, s: int, elu: bool = False, residual=None,
                 time_major: bool = False) -> torch.Tensor:
            ctx = next(it) if k > s else None
            weight = w[name + ".weight"]
            out = None
            if time_major:  # a causal conv's output has T / s columns
                out = x.new_empty(x.shape[0], x.shape[-1] // s, weight.shape[0]).transpose(1, 2)
            return causal_conv1d(x, ctx, weight, w[name + ".bias"], s, exec_mask, phase, elu=elu,
                                 backend=self.backend, residual=residual, out=out)

        elu = False  # an ELU op waiting to be fused into the next conv's input
        for op in ops:
            if op[0] == "elu":
                elu = True
                continue
            if elu and op[0] == "res":  # (not in Mimi's layouts: an ELU always feeds a conv)
                x = F.elu(x)
            if op[0] == "conv":
                x = conv(x, f"{prefix}.model.{op[1]}.conv.conv", op[4], op[5], elu=elu,
                         time_major=time_major and op is ops[-1])
            elif op[0] == "convtr":
                name = f"{prefix}.model.{op[1]}.convtr.convtr"
                x = conv_transpose1d(x, next(it), w[name + ".weight"], w[name + ".bias"], op[5], exec_mask,
                                     backend=self.backend, w_rows=self.convtr_rows.get(name + ".weight"),
                                     w_phases=self.convtr_phases.get(name + ".weight"), elu=elu)  # fmt: skip
            else:  # residual unit: x + conv1x1(elu(conv3(elu(x))))
                p = f"{prefix}.model.{op[1]}.block"
                y = conv(x, f"{p}.1.conv.conv", 3, 1, elu=True)
                out = f"{p}.3.conv.conv"
                if gemv_path(x.shape[0], self.backend, x.device):  # its end in one kernel
                    x = dsm_kernels.mimi_residual_out(y, w[out + ".weight"], w[out + ".bias"], x, backend=self.backend)
                else:  # the residual added in the conv's epilogue where a kernel runs it
                    x = conv(y, out, 1, 1, elu=True, residual=x)
            elu = False
        return F.elu(x) if elu else x

    def _transformer(self, x: torch.Tensor, side: str, kv: KVState | None, exec_mask: torch.Tensor,
                     owned: bool = False) -> torch.Tensor:
        """Encoder/decoder transformer on ``[B, 512, T]``. Streaming runs it one frame (2 tokens) at a time: a call
        writes all its keys into the 250-slot ring before attending, so one call of n frames would overwrite keys
        that its first queries still see once the ring wraps, and its codes would depend on the chunking (from
        frame ~120 on with 8 frames a call). Frame by frame, any chunking equals one-frame calls (§7.8) bit for bit;
        the convolutions and the quantizer still see the whole call. ``owned``: ``x`` is a buffer no one else reads,
        which a one-frame step may update in place."""
        layers, step = (self.enc_layers, self.enc_step) if side == "encoder" else (self.dec_layers, self.dec_step)
        run = functools.partial(transformer_forward, layers=layers, num_heads=NUM_HEADS, context=CONTEXT,
                                freqs=self.rope_freqs, kv=kv, exec_mask=exec_mask, consts=self.consts,
                                backend=self.backend, step_weights=step)
        t = x.shape[-1]
        if kv is None or t <= TOKENS_PER_FRAME:
            return run(x, owned=owned)
        return torch.cat([run(x[..., i : i + TOKENS_PER_FRAME]) for i in range(0, t, TOKENS_PER_FRAME)], dim=-1)

    # ----------------------------------------------------------------------------------------------- encode
    def _encode(self, pcm: torch.Tensor, state: MimiState, streaming: bool) -> torch.Tensor:
        if state.enc_kv.cache.shape[4] == 0:
            raise ValueError("this MimiState has no encoder side (made by init_state(..., encoder=False))")
        m = state.exec_mask
        emb = self._seanet(pcm, ENCODER_OPS, "encoder", state.enc_conv, m, state.enc_phase, time_major=True)
        emb = self._transformer(emb, "encoder", state.enc_kv if streaming else None, m, owned=True)
        # Downsample conv with replicate left padding: a stream's first call pads with its own first frame.
        latent = causal_conv1d(emb, state.down_prev, self.down_w, None, 2, m, state.enc_phase, backend=self.backend,
                               first=state.down_first)  # fmt: skip
        state.down_first.masked_fill_(m, False)
        state.enc_phase.bitwise_xor_(1)  # every conv has read its context: next call, the halves they wrote
        return self._quantize(latent, state.enc_kv.counters)

    def _quantize(self, latent: torch.Tensor, counters: torch.Tensor | None) -> torch.Tensor:
        """``[B, 512, T]`` -> codes ``[B, n_q, T]`` int64 (``counters``: the persistent kernel's barrier words)."""
        x = conv1d(latent, self.rvq_in_proj, None, 1, backend=self.backend)  # [B, G * 256, T]
        return dsm_kernels.rvq_encode(x, self.rvq_books, self.group_levels, self.rvq_level_ranges, counters=counters,
                                      backend=self.backend)

    @torch.no_grad()  # inference only: a pcm that requires grad failed in the in-place state updates
    def encode_step(self, pcm: torch.Tensor, state: MimiState) -> torch.Tensor:
        """Streaming encode: pcm ``[B, 1, 1920 * n]`` (n >= 1) -> codes ``[B, n_q, n]`` int64; updates ``state``.

        On a CPU NaN/inf samples of active rows (or samples beyond ``MAX_ABS_SAMPLE``) are refused before any state
        changes; on a GPU they are not checked (a host sync) and turn that row's codes and state to garbage until it
        is reset (other rows are unaffected)."""
        _check_pcm_chunk(pcm, state.batch_size)
        if pcm.device.type == "cpu" and state.exec_mask.device.type == "cpu":
            _check_finite(pcm, state.exec_mask)
        return self._encode(pcm, state, streaming=True)

    @torch.no_grad()
    def encode(self, pcm: torch.Tensor) -> torch.Tensor:
        """Whole-file encode: pcm ``[B, 1, T]`` -> codes ``[B, n_q, ceil(T / 1920)]`` (right zero padding).

        Equals streaming for the first 10 s only (§7.8): here every query sees the last 250 positions. Like the
        reference, the attention mask is ``[T, T]`` at 25 Hz, so use streaming for files longer than a few minutes.
        """
        _check_tensor(pcm, "pcm")
        if pcm.dim() != 3 or pcm.shape[1] != 1 or pcm.shape[-1] == 0:
            raise ValueError(f"pcm must be [B, 1, T] with T >= 1, got {tuple(pcm.shape)}")
        if pcm.dtype != torch.float32:  # int16 pcm would otherwise be encoded as huge floats
            raise ValueError(f"pcm must be float32, got {pcm.dtype}")
        _check_finite(pcm)  # NaN/inf would be encoded silently to meaningless codes
        n = math.ceil(pcm.shape[-1] / FRAME_SIZE)
        pcm = F.pad(pcm, (0, n * FRAME_SIZE - pcm.shape[-1]))
        return self._encode(pcm, self.init_state(pcm.shape[0]), streaming=False)

    # ----------------------------------------------------------------------------------------------- decode
    def _decode(self, codes: torch.Tensor, state: MimiState, streaming: bool) -> torch.Tensor:
        if state.dec_kv.cache.shape[4] == 0:
            raise ValueError("this MimiState has no decoder side (made by init_state(..., decoder=False))")
        m = state.exec_mask
        # the codebook lookups and the upsampling to 25 Hz in one kernel, written in the transformer's layout: a
        # [B, 512, 2T] view of a [B, 2T, 512] buffer of our own, which the transformer may update in place
        emb = dsm_kernels.rvq_decode_upsample(codes, self.rvq_tables, self.up_w, state.up_partial, m,
                                              backend=self.backend)  # fmt: skip
        emb = self._transformer(emb, "decoder", state.dec_kv if streaming else None, m, owned=True)
        pcm = self._seanet(emb, DECODER_OPS, "decoder", state.dec_conv, m, state.dec_phase)
        state.dec_phase.bitwise_xor_(1)  # every conv has read its context: next call, the halves they wrote
        return pcm

    @torch.no_grad()
    def decode_step(self, codes: torch.Tensor, state: MimiState) -> torch.Tensor:
        """Streaming decode: codes ``[B, n, T]`` (1 <= n <= 32, values in [0, 2048)) -> pcm ``[B, 1, 1920 * T]``.

        Codes on a GPU are not range-checked here (that would sync with the host); never pass -1/-2 (pitfall 19).
        Codes on the CPU are, at no sync cost (else -1 indexed the table from its end or failed in F.embedding).
        """
        _check_codes(codes, state.batch_size, self.n_q)
        if codes.device.type == "cpu":
            _check_code_range(codes)
        return self._decode(codes, state, streaming=True)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Whole-file decode: codes ``[B, n, T]`` -> pcm ``[B, 1, 1920 * T]`` (checks the code range: host sync)."""
        _check_codes(codes, None, self.n_q)
        _check_code_range(codes)
        return self._decode(codes, self.init_state(codes.shape[0]), streaming=False)


def _check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):  # a numpy array failed with "'numpy.ndarray' object has no attribute 'dim'"
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


MAX_ABS_SAMPLE = 1e6  # beyond it the convolutions overflow: codes all 0, and from ~1e25 a row's state non-finite


def _check_finite(pcm: torch.Tensor, active: torch.Tensor | None = None) -> None:
    """NaN/inf samples of ``pcm`` [B, 1, T] (of the ``active`` rows only), or samples beyond ``MAX_ABS_SAMPLE``,
    are a ValueError naming the rows."""
    if pcm.device.type == "cpu" and (active is None or active.device.type == "cpu"):
        # numpy, not torch: no op is dispatched, so the count of a streaming step's kernels (what a GPU launches, as
        # benchmarks/count_mimi_ops.py counts them on the CPU) stays the same
        bad = ~(np.abs(pcm.detach().numpy()) <= MAX_ABS_SAMPLE)  # NaN compares false
        if active is not None:  # inactive rows' inputs are ignored
            bad &= active.numpy().reshape(-1, 1, 1)
    else:
        bad = ~(pcm.abs() <= MAX_ABS_SAMPLE)
        if active is not None:
            bad &= active.view(-1, 1, 1)
    if bool(bad.any()):
        rows = [i for i in range(bad.shape[0]) if bool(bad[i].any())]
        raise ValueError(f"pcm has {int(bad.sum())} NaN or infinite sample(s), or beyond +-{MAX_ABS_SAMPLE:g} "
                         f"(batch rows {rows}; Mimi reads samples in [-1, 1])")


def _check_code_range(codes: torch.Tensor) -> None:
    if not codes.numel():
        return
    # on the CPU in numpy: no op dispatched, so a streaming step's kernel count stays what a GPU launches
    c = codes.numpy() if codes.device.type == "cpu" else codes
    lo, hi = int(c.min()), int(c.max())
    if lo < 0 or hi >= CARDINALITY:
        raise ValueError(f"codes must be in [0, {CARDINALITY}), got range [{lo}, {hi}]")


def _check_pcm_chunk(pcm: torch.Tensor, batch_size: int) -> None:
    _check_tensor(pcm, "pcm")
    if pcm.dim() != 3 or pcm.shape[0] != batch_size or pcm.shape[1] != 1:
        raise ValueError(f"pcm must be [{batch_size}, 1, 1920*n], got {tuple(pcm.shape)}")
    if pcm.shape[-1] == 0 or pcm.shape[-1] % FRAME_SIZE:
        raise ValueError(f"streaming pcm length must be a positive multiple of {FRAME_SIZE}, got {pcm.shape[-1]} "
                         "(use FrameBuffer to re-chunk)")
    if pcm.dtype != torch.float32:
        raise ValueError(f"pcm must be float32, got {pcm.dtype}")


def _check_codes(codes: torch.Tensor, batch_size: int | None, n_q: int) -> None:
    """``batch_size`` None takes any batch (whole-file decode)."""
    _check_tensor(codes, "codes")
    if batch_size is None and codes.dim():
        batch_size = codes.shape[0]
    # Only this Mimi's n_q codebooks have decode tables: more would index past them (an IndexError on the CPU, a
    # bare assert in the Triton kernel).
    if codes.dim() != 3 or codes.shape[0] != batch_size or not 1 <= codes.shape[1] <= n_q or codes.shape[2] == 0:
        raise ValueError(f"codes must be [{batch_size or 'B'}, 1..{n_q}, T >= 1] (this Mimi has n_q = {n_q}), got "
                         f"{tuple(codes.shape)}")
    if codes.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"codes must be int64 or int32, got {codes.dtype}")


class FrameBuffer:
    """Re-chunks arbitrary-length pcm ``[B, 1, T]`` into whole 1920-sample frames (host-side, per batch).

    ``push`` returns ``[B, 1, 1920 * k]`` (``k`` may be 0) and keeps the remainder for the next push.
    """

    def __init__(self, frame_size: int = FRAME_SIZE):
        if not isinstance(frame_size, int) or frame_size < 1:  # 0 was a ZeroDivisionError at the first push
            raise ValueError(f"FrameBuffer: frame_size must be a positive integer, got {frame_size!r}")
        self.frame_size = frame_size
        self._pending: torch.Tensor | None = None

    def push(self, pcm: torch.Tensor) -> torch.Tensor:
        # a numpy chunk failed in .clone(), a chunk of other streams in torch.cat with a message naming neither
        _check_tensor(pcm, "FrameBuffer.push: pcm")
        if self._pending is not None and pcm.shape[:-1] != self._pending.shape[:-1]:
            raise ValueError(f"FrameBuffer.push: pcm {tuple(pcm.shape)} does not continue the pending "
                             f"{tuple(self._pending.shape)}: every push must hold the same streams")
        x = pcm if self._pending is None else torch.cat([self._pending, pcm], dim=-1)
        n = x.shape[-1] // self.frame_size * self.frame_size
        self._pending = x[..., n:].clone()  # not a view: callers may refill the chunk they passed
        return x[..., :n]

    @property
    def pending(self) -> int:
        return 0 if self._pending is None else self._pending.shape[-1]

    def flush(self) -> torch.Tensor:
        """Zero-pad the remainder to one full frame (empty if nothing is pending)."""
        if self._pending is None or self._pending.shape[-1] == 0:
            return torch.zeros(0, 1, 0) if self._pending is None else self._pending
        x = F.pad(self._pending, (0, self.frame_size - self._pending.shape[-1]))
        self._pending = None
        return x


# --------------------------------------------------------------------------------------------- random checkpoints
def random_mimi_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random fp32 checkpoint with the released names, shapes and dtypes, for tests and benchmarks.

    Weights follow a variance-preserving init (so activations neither vanish nor explode through 14 convs) and
    larger LayerScales than training's 0.01, so the transformers and their ring-buffer quirk visibly matter.
    Codebooks are calibrated level by level on a fixed synthetic probe so that codes are varied, not degenerate.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    sd: dict[str, torch.Tensor] = {}
    for name, shape in mimi_tensor_shapes().items():
        if name.endswith("_codebook.embedding_sum") or name.endswith("cluster_usage") or name.endswith("_initialized"):
            continue
        if name.endswith("conv.weight") or name.endswith("convtr.weight"):
            transposed = "convtr" in name.rsplit(".", 2)[0]
            if transposed:  # [in, out, K]; each output sums in*K/stride taps
                fan_in = shape[0] * shape[2] / 2 if shape[1] > 1 else shape[2] / 2
            else:
                fan_in = shape[1] * shape[2]
            sd[name] = randn(*shape, std=1.2 / math.sqrt(fan_in))
        elif name.endswith(".bias"):
            sd[name] = randn(*shape, std=0.02)
        elif "norm" in name:
            sd[name] = 1.0 + randn(*shape, std=0.1) if name.endswith("weight") else randn(*shape, std=0.05)
        elif "layer_scale" in name:
            sd[name] = 0.3 + randn(*shape, std=0.05)
        elif name.endswith("in_proj_weight"):
            sd[name] = randn(*shape, std=2.0 / math.sqrt(shape[1]))
        else:  # linears and 1x1 projections
            sd[name] = randn(*shape, std=1.0 / math.sqrt(shape[1] * (shape[2] if len(shape) == 3 else 1)))
    # Placeholder codebooks so a model can be built to compute the latent of the probe.
    for name, shape in mimi_tensor_shapes().items():
        if name.endswith("embedding_sum"):
            sd[name] = torch.zeros(shape)
        elif name.endswith("cluster_usage"):
            sd[name] = torch.ones(shape)
        elif name.endswith("_initialized"):
            sd[name] = torch.ones(shape)
    model = Mimi(sd, n_q=1)
    t = torch.arange(3 * SAMPLE_RATE, dtype=torch.float32) / SAMPLE_RATE
    probe = 0.3 * torch.sin(2 * math.pi * 180 * t) * torch.sin(2 * math.pi * 1.5 * t) + 0.1 * torch.randn(
        t.shape, generator=g)
    state = model.init_state(1)
    emb = model._seanet(probe.view(1, 1, -1), ENCODER_OPS, "encoder", state.enc_conv, state.exec_mask,
                        state.enc_phase)  # fmt: skip
    emb = transformer_forward(emb, model.enc_layers, NUM_HEADS, CONTEXT, model.rope_freqs, None, state.exec_mask,
                              model.consts)
    latent = causal_conv1d(emb, state.down_prev, model.down_w, None, 2, state.exec_mask, state.enc_phase,
                           first=state.down_first)  # replicate left padding, as a stream's first call
    for group, n in (("rvq_first", 1), ("rvq_rest", MAX_CODEBOOKS - 1)):
        p = f"quantizer.{group}."
        r = F.conv1d(latent, sd[p + "input_proj.weight"])[0].T  # [frames, 256]
        for level in range(n):
            c = f"{p}vq.layers.{level}._codebook."
            book = r.mean(0) + randn(CARDINALITY, CODE_DIM, std=1.0) * r.std(0)
            usage = 0.5 + 4.5 * torch.rand(CARDINALITY, generator=g)
            sd[c + "embedding_sum"] = book * usage[:, None]
            sd[c + "cluster_usage"] = usage
            book = sd[c + "embedding_sum"] / usage[:, None]
            dist = torch.cdist(r[None], book[None])[0]
            r = r - book[dist.argmin(-1)]
    # Scale the last decoder conv so decoded probe audio has a speech-like level (std ~0.1), not ~100.
    model = Mimi(sd)
    out = model.decode(model.encode(probe.view(1, 1, -1)))
    gain = 0.1 / float(out.std())
    sd["decoder.model.14.conv.conv.weight"] = sd["decoder.model.14.conv.conv.weight"] * gain
    sd["decoder.model.14.conv.conv.bias"] = sd["decoder.model.14.conv.conv.bias"] * gain
    return {k: v.contiguous().float() for k, v in sd.items()}


def save_random_mimi(path: str | Path, seed: int = 0) -> Path:
    """Write :func:`random_mimi_state_dict` as a safetensors file loadable by moshi's ``get_mimi`` and ours."""
    from .checkpoint import write_safetensors_streaming

    sd = random_mimi_state_dict(seed)
    # written as the LM's are: a failed write is an OSError naming the file, and leaves no partial file
    return write_safetensors_streaming(path, {k: (tuple(v.shape), v.dtype) for k, v in sd.items()},
                                       lambda name, shape, dtype: sd[name])
