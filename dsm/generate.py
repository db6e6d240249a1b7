"""Streaming generation with explicit per-stream state, equivalent to moshi's ``LMGen`` (DSM-SPEC §4).

One :class:`GenState` holds everything a batch of stream slots carries between steps: the delayed token cache,
offsets, the paged KV cache and positions, the exec mask, the conditioning. :meth:`Generator.step` runs one 80 ms
frame for all slots; hooks may edit the text logits, replace the text token and edit the audio tokens.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

import dsm_kernels

from .conditioning import condition_tensors, null_condition_values
from .kv_cache import CrossKVCache, PagedKVCache, cross_page_size
from .model import LMModel

ZERO_TOKEN = -1  # embeds to an exact zero vector
UNGENERATED_TOKEN = -2  # fill value of the token cache; never reaches an embedding


def check_temperature(value, name: str) -> None:
    """A sampling temperature: a finite number >= 0 (0: greedy). A NaN or negative one would reach the sampler of
    every stream, which has no per-step host check."""
    if not (isinstance(value, numbers.Real) and 0 <= value < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0 (0: greedy), got {value!r}")


def check_token_range(tokens: torch.Tensor, name: str, hi: int, *, lo: int = -1, on_device: bool = False) -> None:
    """Token ids the embeddings can gather: integers in [lo, hi] (-1 gives a zero embedding; for audio ``hi`` is
    ``card``, the initial token, the tables' last row). A float tensor or an id past a table would read outside it
    on the GPU, faulting the device for every stream. Device tokens are checked only ``on_device`` (a host sync)."""
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"{name}: expected integer token ids, got {tokens.dtype}")
    if not tokens.numel() or (tokens.device.type != "cpu" and not on_device):
        return
    if tokens.device.type == "cpu":
        t = tokens.numpy()  # numpy: no op is dispatched, so a step's counted kernels stay what a GPU launches
        low, top = int(t.min()), int(t.max())
    else:
        low, top = (int(v) for v in torch.stack(torch.aminmax(tokens)).tolist())
    if low < lo or top > hi:
        why = " (-1 gives a zero embedding)" if lo == -1 else ""
        raise ValueError(f"{name}: token ids must be in [{lo}, {hi}]{why}, got range [{low}, {top}]")


@dataclass
class GenState:
    cache: torch.Tensor  # [B, K, CT] delayed token cache
    offsets: torch.Tensor  # [B] frames processed since reset
    exec_mask: torch.Tensor  # [B] bool
    seeds: torch.Tensor  # [B] int64 sampling seeds
    kv: PagedKVCache  # rows = B, or 2B with CFG (conditional rows first)
    positions: torch.Tensor  # [rows] tokens in the KV cache since reset
    cond_sum: torch.Tensor | None = None  # [rows, d]
    cross: CrossKVCache | None = None  # the condition's cross-attention K/V, in pages
    masked_until: torch.Tensor | None = None  # [B] CFG prefix masking
    offset_cpu: int = 0  # host step counter (moshi's global ``offset_cpu``)

    @property
    def batch_size(self) -> int:
        return self.offsets.shape[0]

    def __repr__(self) -> str:  # the dataclass's printed every tensor
        return (f"GenState(batch_size={self.batch_size}, kv_rows={self.positions.shape[0]}, "
                f"conditioned={self.cond_sum is not None}, device={self.offsets.device})")

    def rows(self, n: int) -> GenState:
        """A view of the first ``n`` slots: every tensor is a slice of this state's, so steps on the view update
        this state in place (how the engine runs a batch-size bucket). Not available with CFG row doubling."""
        if self.positions.shape[0] != self.batch_size:
            raise ValueError("row views are not supported with CFG (rows are [conditional | null])")
        kv = PagedKVCache(self.kv.k, self.kv.v, self.kv.block_table[:n], self.kv.context, self.kv.counters)
        return GenState(
            cache=self.cache[:n], offsets=self.offsets[:n], exec_mask=self.exec_mask[:n], seeds=self.seeds[:n],
            kv=kv, positions=self.positions[:n],
            cond_sum=self.cond_sum[:n] if self.cond_sum is not None else None,
            cross=self.cross.rows(n) if self.cross is not None else None,
            masked_until=self.masked_until[:n] if self.masked_until is not None else None,
            offset_cpu=self.offset_cpu)


@dataclass
class StepOutput:
    tokens: torch.Tensor | None  # [B, 1 + dep_q] un-delayed frame, or None during the first max_delay steps
    text_token: torch.Tensor  # [B] text token sampled (after the hook) at this step
    z: torch.Tensor  # [B, d] temporal transformer output (after out_norm), conditional rows
    text_logits: torch.Tensor  # [B, text_out] (after CFG)
    extra_probs: torch.Tensor | None = None  # [B, heads] fp32 P(class 0) of each extra head (semantic VAD), or None


class Generator:
    """moshi ``LMGen`` over an :class:`LMModel`, with state passed explicitly."""

    def __init__(self, model: LMModel, *, use_sampling: bool = True, temp: float = 0.8, temp_text: float = 0.7,
                 top_k: int = 250, top_k_text: int = 25, cfg_coef: float = 1.0, cfg_is_no_text: bool = False,
                 cfg_is_masked_until: list[int] | None = None, support_out_of_sync: bool = False,
                 page_size: int = 16, backend: str | None = None, depformer_steps: int | None = None,
                 audio_delay_steps: int | None = None):
        self.model = model
        cfg = model.cfg
        # Generate only the first ``depformer_steps`` codebooks (moshi's ``lm.dep_q = n_q``); the others are -1.
        self.depformer_steps = cfg.dep_q if depformer_steps is None else depformer_steps
        if not 0 <= self.depformer_steps <= cfg.dep_q:
            raise ValueError(f"depformer_steps must be in [0, dep_q={cfg.dep_q}], got {depformer_steps}")
        # TTS (moshi TTSModel's audio hook): a row's codebook q stays -1 until its offset reaches its delay plus
        # ``audio_delay_steps``, the text stream's lead; applied in the step, on the device (no host hook)
        if audio_delay_steps is not None and (isinstance(audio_delay_steps, bool) or audio_delay_steps < 0):
            raise ValueError(f"audio_delay_steps must be an int >= 0 or None, got {audio_delay_steps!r}")
        # a NaN temperature or a negative top-k would reach the sampler of every stream (no per-step host checks)
        check_temperature(temp, "temp")
        check_temperature(temp_text, "temp_text")
        for name, k in (("top_k", top_k), ("top_k_text", top_k_text)):
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
                raise ValueError(f"{name} must be an int >= 0 (0: no top-k), got {k!r}")
        if not (isinstance(cfg_coef, numbers.Real) and math.isfinite(cfg_coef)):
            raise ValueError(f"cfg_coef must be a finite number, got {cfg_coef!r}")
        self.use_sampling, self.temp, self.temp_text = use_sampling, temp, temp_text
        self.top_k, self.top_k_text = top_k, top_k_text
        self.cfg_coef, self.cfg_is_no_text, self.cfg_is_masked_until = cfg_coef, cfg_is_no_text, cfg_is_masked_until
        self.support_out_of_sync = support_out_of_sync
        self.page_size, self.backend = page_size, backend
        self.max_delay = cfg.max_delay
        device = next(model.parameters()).device
        self.device = device
        self.delays = torch.tensor(cfg.delays, dtype=torch.long, device=device)
        self._audio_start = (None if audio_delay_steps is None or not cfg.dep_q else
                             self.delays[1 : 1 + cfg.dep_q] + audio_delay_steps)  # fmt: skip
        self.initial = model.initial_tokens(1, device)[0]
        self.tables = model.fused_embedding_tables()
        self._consts: dict = {}  # small per-shape constants of a step (made eagerly, before any graph capture)
        # the extra heads (stt-1b's semantic VAD) as one GEMM, computed in the step (its CUDA graph on a GPU)
        heads = model.extra_heads
        self._extra_weight = torch.cat([h.weight for h in heads]).detach() if len(heads) else None
        if cfg_coef != 1.0 and not cfg_is_no_text and cfg_is_masked_until is None and model.condition_provider is None:
            raise ValueError("cfg_coef != 1 needs conditions, cfg_is_no_text or cfg_is_masked_until")

    @property
    def cfg_rows(self) -> int:
        return 2 if self.cfg_coef != 1.0 else 1

    def init_state(self, batch_size: int, conditions: dict | None = None, seed: int = 0,
                   kv: PagedKVCache | None = None, require_conditions: bool = True) -> GenState:
        """A fresh state for ``batch_size`` slots; ``conditions`` maps condition name -> per-slot values. ``kv``
        replaces the default cache (each slot statically owning its ring of pages). ``require_conditions=False``
        leaves a conditioned model's slots unconditioned, to be set per slot later."""
        m, cfg, dev = self.model, self.model.cfg, self.device
        rows = batch_size * self.cfg_rows
        dtype = next(m.transformer.parameters()).dtype
        if kv is None:
            kv = PagedKVCache.allocate(num_layers=cfg.num_layers, batch_size=rows,
                                       heads=cfg.num_heads // cfg.kv_repeat, head_dim=cfg.head_dim,
                                       context=cfg.context, page_size=self.page_size, dtype=dtype, device=dev)
        state = GenState(
            cache=torch.full((batch_size, cfg.num_codebooks, self.max_delay + 2), UNGENERATED_TOKEN, device=dev),
            offsets=torch.zeros(batch_size, dtype=torch.long, device=dev),
            exec_mask=torch.ones(batch_size, dtype=torch.bool, device=dev),
            seeds=seed + torch.arange(batch_size, dtype=torch.long, device=dev),
            kv=kv, positions=torch.zeros(rows, dtype=torch.long, device=dev))
        if self.cfg_is_masked_until is not None:
            state.masked_until = torch.tensor(self.cfg_is_masked_until, dtype=torch.long, device=dev)
        if m.condition_provider is not None and (conditions is not None or require_conditions):
            if conditions is None:
                raise ValueError("this model is conditioned: pass `conditions` (e.g. speaker_wavs, cfg, control)")
            self.set_conditions(state, conditions)
        elif conditions:
            raise ValueError("this model has no conditioners, but conditions were given")
        return state

    def condition_tensors(self, conditions: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The sum vectors [rows, d] and cross sources [rows, S, d] (model dtype; or None) of condition values for
        ``B`` slots; with CFG the null rows follow (rows = 2B)."""
        m = self.model
        dtype = next(m.transformer.parameters()).dtype
        with torch.no_grad():
            total, cross = condition_tensors(m.condition_provider, m.cfg.fuser, conditions)
            if self.cfg_rows == 2:
                null_total, null_cross = condition_tensors(
                    m.condition_provider, m.cfg.fuser, null_condition_values(m.condition_provider, conditions))
                total = torch.cat([total, null_total]) if total is not None else None
                cross = torch.cat([cross, null_cross]) if cross is not None else None
        return (total[:, 0].to(dtype) if total is not None else None,
                cross.to(dtype) if cross is not None else None)

    def set_conditions(self, state: GenState, conditions: dict, rows: list[int] | None = None) -> None:
        """Compute the sum vector and cross-attention K/V of every slot (CFG: the null half is derived).

        With ``rows`` (slot indices, one per conditioned value) only those slots are (re)conditioned, in place; the
        first such call allocates the per-slot buffers (zeros for slots not conditioned yet). Each row owns its
        cross-attention pages here; :class:`dsm.engine.Engine` shares equal pages between its streams."""
        if rows is not None and self.cfg_rows != 1:
            raise ValueError("per-slot conditioning with CFG row doubling is not supported")
        total, src = self.condition_tensors(conditions)
        n_rows = state.positions.shape[0]
        rows = list(range(n_rows)) if rows is None else rows
        if total is not None:
            if state.cond_sum is None:
                state.cond_sum = total.new_zeros((n_rows, total.shape[1]))
            state.cond_sum[torch.tensor(rows, device=total.device)] = total
        if src is not None:
            if state.cross is None:
                state.cross = self.allocate_cross(src.shape[1], n_rows, n_rows * (src.shape[1] // cross_page_size(
                    src.shape[1])) + 1)
                n = state.cross.block_table.shape[1]
                state.cross.block_table.copy_(torch.arange(1, n_rows * n + 1, dtype=torch.int32).view(n_rows, n))
            cross, n = state.cross, state.cross.block_table.shape[1]
            if src.shape[1] != cross.length:
                raise ValueError(f"cross-attention source of {src.shape[1]} positions; this state holds {cross.length}")
            with torch.no_grad():
                kv = self.model.cross_kv(src)
            for r, row in enumerate(rows):  # row ``row`` owns pages 1 + row * n ... (page 0: the null page)
                cross.write([1 + row * n + j for j in range(n)], [(k[r], v[r]) for k, v in kv])

    def allocate_cross(self, length: int, rows: int, num_pages: int) -> CrossKVCache:
        """A zeroed cross-attention page pool for sources of ``length`` positions (page 0: the null page)."""
        cfg = self.model.cfg
        return CrossKVCache.allocate(num_layers=cfg.num_layers, num_pages=num_pages, batch_size=rows,
                                     heads=cfg.num_heads, head_dim=cfg.head_dim, length=length,
                                     dtype=next(self.model.transformer.parameters()).dtype, device=self.device)

    def reset(self, state: GenState, mask: torch.Tensor) -> None:
        """Restart the selected slots (``mask`` [B] bool): offsets and KV positions to 0, exec mask on."""
        mask = mask.to(state.offsets.device)
        state.offsets.masked_fill_(mask, 0)
        state.positions.masked_fill_(mask.repeat(self.cfg_rows), 0)
        state.exec_mask |= mask
        state.offset_cpu = 0  # as moshi: the host counter is global

    def _sample(self, state: GenState, logits: torch.Tensor, temp: float, top_k: int, stream: int) -> torch.Tensor:
        B = state.batch_size
        null = None
        if logits.shape[0] == 2 * B:
            logits, null = logits[:B], logits[B:]
        return dsm_kernels.sample_tokens(logits, self._temperature(state, temp), top_k, state.seeds, state.offsets,
                                         step_scale=self.model.cfg.dep_q + 1, step_offset=stream, null_logits=null,
                                         cfg_coef=self.cfg_coef, backend=self.backend)  # fmt: skip

    @torch.no_grad()
    def step(self, state: GenState, input_tokens: torch.Tensor | None = None, *,
             depformer_replace_tokens: torch.Tensor | None = None,
             on_text_logits: Callable[[torch.Tensor], None] | None = None,
             on_text: Callable[[torch.Tensor], None] | None = None,
             on_audio: Callable[[torch.Tensor], None] | None = None,
             check_hooks: bool = True) -> StepOutput:
        """One frame for every slot. ``input_tokens``: [B, n_in] (or [B, n_in, 1]) tokens of the input-only
        streams (the audio codes for STT). ``tokens`` of the output is None while ``offset_cpu <= max_delay``
        (synchronous mode), as moshi returns nothing then.

        The step is three device-only phases (:meth:`forward`, :meth:`depformer`, :meth:`commit`, each capturable in
        a CUDA graph) with the host hooks between them. ``check_hooks``: range-check what the hooks wrote
        (:meth:`check_hook_tokens`, a host wait for the device each); a caller whose hooks write only ids it knows
        valid (the TTS runtime's state machine) turns it off."""
        # A hook that raises leaves the frame uncommitted, but the forward pass has appended K/V and advanced the KV
        # positions: putting them back makes the step never have happened (the next one overwrites that K/V), as
        # the engine does. Only hooks (and replacement tokens of a wrong shape) fail between the forward pass and
        # the commit.
        hooked = any(h is not None for h in (on_text_logits, on_text, on_audio, depformer_replace_tokens))
        positions = state.positions.clone() if hooked else None
        z, text_logits = self.forward(state, self.check_inputs(state, input_tokens))
        try:
            return self._finish_step(state, z, text_logits, depformer_replace_tokens, on_text_logits, on_text,
                                     on_audio, check_hooks)
        except BaseException:
            if positions is not None:
                state.positions.copy_(positions)
            raise

    def _finish_step(self, state, z, text_logits, depformer_replace_tokens, on_text_logits, on_text, on_audio,
                     check_hooks) -> StepOutput:
        """:meth:`step` after the forward pass: the hooks, sampling, the depth transformer and the commit."""
        B, dq = state.batch_size, self.model.cfg.dep_q
        extra = self.extra_probs(z[:B])
        if on_text_logits is not None:
            text_logits = text_logits.clone()
            on_text_logits(text_logits)
        text_token = self.sample_text(state, text_logits)
        if on_text is not None:
            on_text(text_token)
            if check_hooks:
                self.check_hook_tokens(text_token, "on_text")
        audio = None
        if dq:
            if depformer_replace_tokens is not None:
                audio = depformer_replace_tokens.reshape(B, dq).long().clone()
            else:
                audio = self.depformer(state, text_token, z)
            if on_audio is not None:
                on_audio(audio)
                if check_hooks:
                    self.check_hook_tokens(audio, "on_audio")
        tokens = self.commit(state, text_token, audio)
        state.offset_cpu += 1
        if not self.support_out_of_sync and state.offset_cpu <= self.max_delay:
            tokens = None
        return StepOutput(tokens, text_token, z[:B], text_logits, extra)

    def extra_probs(self, z: torch.Tensor) -> torch.Tensor | None:
        """P(class 0) of each extra head for ``z`` [B, d]: [B, heads] fp32 (None without extra heads). The heads as
        one GEMM in the model dtype, the softmax in fp32, as moshi-server does (PyTorch moshi's ``extra_head_probs``
        softmaxes the low-precision logits)."""
        w = self._extra_weight
        if w is None:
            return None
        return dsm_kernels.head_probs(z, w, len(self.model.extra_heads), backend=self.backend)  # one kernel

    def check_hook_tokens(self, tokens: torch.Tensor, hook: str) -> None:
        """:func:`check_token_range` of what a hook left, on the device too (one small reduction and a host sync,
        only when a hook ran; the runtimes' hooks read the tokens on the host anyway): text ids in [-1, text_card]
        or, with a demultiplexed second text stream, the packed ids below (text_card + 1) * (text_card + 2); audio
        ids in [-1, card]. Raising here undoes the step."""
        cfg = self.model.cfg
        if hook == "on_text":
            vt = cfg.text_card + 1
            hi = vt * (vt + 1) - 1 if cfg.demux_second_text_stream else cfg.text_card
        else:
            hi = cfg.card
        check_token_range(tokens, hook, hi, on_device=True)

    def check_inputs(self, state: GenState, input_tokens: torch.Tensor | None) -> torch.Tensor | None:
        cfg, B = self.model.cfg, state.batch_size
        n_in = cfg.num_codebooks - cfg.dep_q - 1
        if not n_in:
            return None
        if input_tokens is None:
            raise ValueError(f"input_tokens: expected [B={B}, {n_in}] tokens of the input streams, got None")
        if input_tokens.dim() == 3:
            input_tokens = input_tokens[..., 0]
        if input_tokens.dim() != 2 or input_tokens.shape[0] != B or input_tokens.shape[1] < n_in:
            raise ValueError(f"input_tokens: expected shape [{B}, {n_in}], got {tuple(input_tokens.shape)}")
        # a frame of [B, n_in, T] codes has a row stride of T, which the fused embedding kernel does not take (no copy,
        # and no launch, when the rows are contiguous: the engine's inputs)
        return input_tokens[:, :n_in].contiguous()

    def forward(self, state: GenState, input_tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the input-stream tokens into the delay cache, build this step's input column (initial tokens,
        CFG null rows), run the temporal transformer. Returns ``z`` [rows, d] and CFG-mixed text logits [B, V]."""
        m, cfg = self.model, self.model.cfg
        B, dq = state.batch_size, cfg.dep_q
        ex = state.exec_mask
        if self.cfg_rows == 1 and m.transformer.pos_emb not in ("sin", "sin_rope"):
            # the input column, its embedding and the K/V slots in one launch (three otherwise)
            text, audio, text2 = self.tables
            kv = state.kv
            x, _, slot, seq_lens, positions = dsm_kernels.frame_embed(
                state.cache, state.offsets, ex, self.delays, self.initial, input_tokens, dq + 1, text, audio,
                kv.block_table, state.positions, kv.page_size, text_table2=text2, cond=state.cond_sum,
                out_dtype=text.dtype, backend=self.backend)  # fmt: skip
            return m.step_layers(x, kv, positions, slot, seq_lens, cross=state.cross, backend=self.backend)
        inp = dsm_kernels.frame_inputs(state.cache, state.offsets, ex, self.delays, self.initial, input_tokens,
                                       dq + 1, backend=self.backend)
        if self.cfg_rows == 2:  # null rows: the same column with the conditioning removed
            is_init = (state.offsets[:, None] <= self.delays[None]) | ~ex[:, None]
            null = inp
            if state.masked_until is not None:
                zeroed = state.offsets[:, None] <= self.delays[None] + state.masked_until[:, None]
                null = torch.where(zeroed & ~is_init, ZERO_TOKEN, inp)
            if self.cfg_is_no_text:
                null = null.clone()
                null[:, 0] = torch.where(~is_init[:, 0], ZERO_TOKEN, null[:, 0])
            inp = torch.cat([inp, null])
        write = ex if self.cfg_rows == 1 else ex.repeat(self.cfg_rows)
        z, text_logits = m.step_text(inp, state.kv, state.positions, write, tables=self.tables,
                                     cond_sum=state.cond_sum, cross=state.cross, backend=self.backend)  # fmt: skip
        if self.cfg_rows == 2:
            cond, null = text_logits[:B], text_logits[B:]
            text_logits = cond if self.cfg_is_no_text else null + (cond - null) * self.cfg_coef
        return z, text_logits

    def _temperature(self, state: GenState, temp: float) -> torch.Tensor:
        """The sampler's per-row temperature [B], a cached constant (a step launches nothing for it). Its noise
        counters are ``offsets * (dep_q + 1) + stream``, which the sampling kernels compute from the offsets."""
        B, t = state.batch_size, temp if self.use_sampling else 0.0
        key = (B, t)
        if key not in self._consts:
            self._consts[key] = torch.full((B,), t, dtype=torch.float32, device=state.offsets.device)
        return self._consts[key]

    def sample_text(self, state: GenState, text_logits: torch.Tensor) -> torch.Tensor:
        return self._sample(state, text_logits, self.temp_text, self.top_k_text, 0)

    def depformer(self, state: GenState, text_token: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The frame's audio tokens [B, dep_q], sampled codebook by codebook (one fused op without CFG rows);
        codebooks past ``depformer_steps`` are -1, and so are those still before their delay with
        ``audio_delay_steps``."""
        dq, steps = self.model.cfg.dep_q, self.depformer_steps
        if self.cfg_rows == 1:
            # codebook k's noise counters are those `_sample` uses for stream k + 1
            out = self.model.depformer_step(text_token, z, steps=steps, temperature=self._temperature(state, self.temp),
                                            top_k=self.top_k, seeds=state.seeds, step_base=state.offsets,
                                            step_scale=dq + 1, step_offset=1, counters=state.kv.counters,
                                            backend=self.backend)  # fmt: skip
        else:
            def sample(k: int, logits: torch.Tensor) -> torch.Tensor:
                return self._sample(state, logits, self.temp, self.top_k, k + 1)

            out = self.model.depformer_step(text_token, z, sample, steps=steps)
        if steps < dq:
            out = torch.cat([out, out.new_full((out.shape[0], dq - steps), ZERO_TOKEN)], dim=1)
        if self._audio_start is not None:
            out = out.masked_fill(state.offsets[:, None] < self._audio_start[None], ZERO_TOKEN)
        return out

    def commit(self, state: GenState, text_token: torch.Tensor, audio: torch.Tensor | None) -> torch.Tensor:
        """Advance executing slots and cache the generated tokens; returns the un-delayed frame [B, 1 + dep_q]
        (``-2`` for slots still inside the delay or not executing)."""
        return dsm_kernels.frame_commit(state.cache, state.offsets, state.exec_mask, self.delays, text_token, audio,
                                        self.max_delay, backend=self.backend)
