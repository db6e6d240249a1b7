"""The serving engine: many stream slots over one model, KV pages on demand, CUDA-graph-captured steps.

* **Slots.** ``open()`` gives a new stream the lowest free slot (keeping the active rows packed at the front, so the
  step runs on the smallest batch bucket that covers them); ``close()`` returns the slot and its pages. Joining
  and leaving never recaptures a graph: graphs are per bucket, over the engine's static state tensors.
* **Pages.** Each slot owns a ring of at most ``pages_per_slot`` KV pages (``dsm.kv_cache``), taken from a shared
  pool only when the stream's position first reaches them: a 5 s stream holds 5 s of pages, a 2 h stream holds
  one context window. Page 0 is a never-written null page that unassigned ring entries point at.
* **Condition pages.** A conditioned stream's cross-attention K/V (the TTS voice slots) lives in pages of a shared
  pool, keyed by content (``dsm.conditioning.cross_page_keys``): streams whose condition rows are equal (the learnt
  padding of unused voice slots; a voice many streams use) share one page, stored once and read once per step. A
  page nobody uses stays cached under its key until the pool needs it, so reopening a voice computes nothing.
* **Steps.** :meth:`Engine.step` runs one 80 ms frame for every open slot (slots without input this step are
  frozen by the exec mask). On CUDA, a step without hooks (STT) is one graph per bucket; with hooks, the device
  phases of :class:`dsm.generate.Generator` are captured once per bucket (input column + temporal transformer + text
  sampling; depth transformer; commit; the last two as one graph when no hook runs between them, as in the TTS
  runtime's steps) and the host hooks (e.g. the TTS state machine) run between them on small tensors.
  ``DSM_NO_CUDA_GRAPH=1`` or ``cuda_graphs=False`` runs eagerly (always the case on CPU).

Isolation: a slot's computation reads only its own rows, pages and seeds, so its outputs do not depend on what
other slots hold. With one fixed bucket they are bit-identical to running it alone. With several buckets, the batch
size of the GEMMs changes with the number of slots, and so can rounding: some BLAS kernels round differently, and
buckets of up to ``dsm_kernels.GEMV_MAX_B`` rows use the GEMV kernels instead of cuBLAS.
"""

from __future__ import annotations

import functools
import operator
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

import dsm_kernels

from .conditioning import cross_page_keys
from .cuda_graphs import LazyGraph, check_current_device
from .generate import Generator, GenState, StepOutput, check_token_range
from .host_copies import copy_from_host
from .kv_cache import PagedKVCache, cross_page_size, pages_per_slot, zeros_kv
from .model import LMModel

# KV cache dtypes every backend stores and reads. Other fp8 formats are not: e4m3fnuz failed inside the Triton
# kernels at the first step, and e5m2 would store an overflow as inf (e4m3 saturates at 448).
KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)


class EngineFull(RuntimeError):
    """No free stream slot, or no free KV page."""


class PagePool:
    """Host-side free list of KV pages; page 0 is reserved as the null page."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (one is the null page), got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))

    @property
    def available(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_pages - 1 - len(self._free)

    def alloc(self) -> int:
        if not self._free:
            raise EngineFull(f"KV page pool exhausted ({self.num_pages - 1} pages in use)")
        return self._free.pop()

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


class SharedPagePool(PagePool):
    """A :class:`PagePool` of content-keyed pages with reference counts (the condition's cross-attention pages). A
    page whose last user leaves stays cached under its key, and is reused for a new key only when no page is free
    (least recently released first)."""

    def __init__(self, num_pages: int):
        super().__init__(num_pages)
        self._page_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._refs: dict[int, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached pages nobody references, oldest first

    @property
    def used(self) -> int:
        """Pages referenced by at least one stream."""
        return len(self._refs) - len(self._idle)

    @property
    def cached(self) -> int:
        """Pages kept under their key with no stream referencing them."""
        return len(self._idle)

    def acquire(self, keys: list[bytes | None]) -> tuple[list[int], list[bool]]:
        """Pages for one stream's parts (a None key: a page of its own); returns the pages and which of them are new
        and must be written. All or nothing: raises :class:`EngineFull` and takes no page if they do not fit. The keys
        of one stream are distinct (:func:`dsm.conditioning.cross_page_keys` digests the page index into each)."""
        named = [k for k in keys if k is not None]
        if len(set(named)) != len(named):
            raise ValueError("a stream's condition page keys must be distinct")
        hits = {self._page_of[k] for k in named if k in self._page_of}
        new = len(keys) - len(hits)
        room = len(self._free) + len(self._idle) - len(hits & self._idle.keys())
        if new > room:
            raise EngineFull(f"condition page pool exhausted: this stream needs {new} new pages, {room} can be "
                             f"freed ({self.used} of {self.num_pages - 1} in use); close a stream or raise cross_pages")
        pages = [self._page_of.get(k) if k is not None else None for k in keys]
        fresh = [p is None for p in pages]
        for page in pages:  # hits first, so that no new page evicts one of them
            if page is not None:
                self._idle.pop(page, None)
                self._refs[page] = self._refs.get(page, 0) + 1
        for j, key in enumerate(keys):
            if pages[j] is None:
                pages[j] = page = self._take()
                self._refs[page] = 1
                if key is not None:
                    self._page_of[key], self._key_of[page] = page, key
        return pages, fresh

    def _take(self) -> int:
        if self._free:
            return self.alloc()
        page, _ = self._idle.popitem(last=False)  # evict the least recently released cached page
        del self._page_of[self._key_of.pop(page)], self._refs[page]
        return page

    def release(self, pages: list[int], forget: list[bool] | None = None) -> None:
        """Drop one reference to each page; ``forget[i]``: also drop page ``i``'s key (its content was never
        written, so it must not be found again)."""
        for i, page in enumerate(pages):
            if forget is not None and forget[i] and page in self._key_of:
                del self._page_of[self._key_of.pop(page)]
            self._refs[page] -= 1
            if self._refs[page]:
                continue
            del self._refs[page]
            if page in self._key_of:
                self._refs[page] = 0
                self._idle[page] = None
            else:
                self._free.append(page)


@dataclass
class _Slot:
    pages: list[int] = field(default_factory=list)  # ring entry i -> pool page
    cross_pages: list[int] = field(default_factory=list)  # part j of the condition -> shared pool page
    position: int = 0  # tokens in this slot's KV since it opened (host mirror of GenState.positions)


def int64_value(value) -> int | None:
    """``value`` as an int when it is an integer (not a bool) that fits int64, as seeds and the wire's marker ids
    are; else None (floats and strings are refused rather than truncated)."""
    if isinstance(value, bool):
        return None
    try:
        value = operator.index(value)
    except TypeError:
        return None
    return value if -(2**63) <= value < 2**63 else None


def check_seed(seed, name: str = "seed") -> int:
    """A sampling seed as the samplers take it: an integer that fits int64 (floats and strings are refused rather
    than truncated or failing inside a later step)."""
    if (value := int64_value(seed)) is not None:
        return value
    if isinstance(seed, bool) or hasattr(type(seed), "__index__"):
        raise ValueError(f"{name} must be an integer in [-2**63, 2**63), got {seed!r}")
    raise TypeError(f"{name} must be an integer, got {type(seed).__name__} {seed!r}")


def serialized(method):
    """Runs ``method`` holding its object's ``_lock`` (a ``threading.RLock``), so that calls from several threads run
    one at a time: a step interleaved with another thread's open, close, push or step corrupted both streams' state
    and leaked slots. Re-entrant: a hook or callback run inside a step may call the object again from its thread."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


def bucket_for(buckets: tuple[int, ...], slots: Iterable[int]) -> int:
    """The smallest of ``buckets`` (ascending) whose rows ``[0, bucket)`` hold every slot of ``slots`` (none: the
    smallest bucket)."""
    need = max(slots, default=0) + 1
    return next(b for b in buckets if b >= need)


def default_buckets(max_slots: int) -> tuple[int, ...]:
    out, b = [], 1
    while b < max_slots:
        out.append(b)
        b *= 2
    return (*out, max_slots)


class Engine:
    """N stream slots sharing one :class:`LMModel`, a paged KV pool and per-bucket CUDA graphs.

    ``num_pages``: KV pages of the self-attention pool (default: every slot's full ring, plus the null page).
    ``cross_pages``: pages of the shared condition pool (default: every slot's whole condition unshared, plus the
    null page, so an open never fails for it; fewer bound the memory, see :class:`SharedPagePool`).
    ``gen_kwargs`` go to :class:`Generator` (temperatures, top-k, greedy...). CFG row doubling is not supported by
    the engine (the released TTS is CFG-distilled); use :class:`Generator` directly for it.

    Threads: :meth:`open`, :meth:`close`, :meth:`step` and :meth:`warm_up` hold the engine's lock, so calls from
    several threads run one at a time (hooks run holding it).
    """

    def __init__(self, model: LMModel, *, max_slots: int = 64, page_size: int = 16, num_pages: int | None = None,
                 kv_dtype: torch.dtype | None = None, buckets: tuple[int, ...] | None = None,
                 cuda_graphs: bool | None = None, backend: str | None = None, seed: int = 0,
                 cross_pages: int | None = None, **gen_kwargs):
        if gen_kwargs.get("cfg_coef", 1.0) != 1.0:
            raise ValueError("the engine does not support CFG row doubling; use dsm.generate.Generator")
        for name, value, least in (("max_slots", max_slots, 1), ("page_size", page_size, 1),
                                   ("num_pages", 2 if num_pages is None else num_pages, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"Engine: {name} must be an integer >= {least}, got {value!r}")
        if kv_dtype is not None and kv_dtype not in KV_DTYPES:
            raise ValueError(f"Engine: kv_dtype must be a floating-point torch dtype the kernels store: "
                             f"{', '.join(map(str, KV_DTYPES))}; got {kv_dtype!r}")
        cfg = model.cfg
        self.model = model
        self.gen = Generator(model, page_size=page_size, backend=backend, support_out_of_sync=True, **gen_kwargs)
        self.device = self.gen.device
        check_current_device(self.device, "Engine's model")
        self.max_slots = max_slots
        self.pages_per_slot = pages_per_slot(cfg.context, page_size)
        num_pages = max_slots * self.pages_per_slot + 1 if num_pages is None else num_pages
        self.pool = PagePool(num_pages)
        dtype = kv_dtype or next(model.transformer.parameters()).dtype
        shape = (cfg.num_layers, num_pages, page_size, cfg.num_heads // cfg.kv_repeat, cfg.head_dim)
        words = dsm_kernels.counter_words(max_slots, cfg.num_heads)
        k, v = zeros_kv(shape, dtype, self.device,
                        f"Engine's KV cache ({max_slots} slots x context {cfg.context}, {cfg.num_layers} layers)")
        kv = PagedKVCache(k, v,
                          torch.zeros(max_slots, self.pages_per_slot, dtype=torch.int32, device=self.device),
                          cfg.context, torch.zeros(words, dtype=torch.int32, device=self.device))
        self.seed = check_seed(seed)
        self.state = self.gen.init_state(max_slots, seed=seed, kv=kv, require_conditions=False)
        self.state.exec_mask.fill_(False)
        self.buckets = tuple(sorted(set(buckets or default_buckets(max_slots))))
        # A bucket past max_slots would be picked for the top slots, yet its row view holds only max_slots rows: every
        # step there would then refuse its inputs (they cannot have more rows than max_slots) or mis-shape its tokens.
        if self.buckets[0] < 1 or self.buckets[-1] != max_slots:
            raise ValueError(f"buckets {self.buckets} must lie in [1, max_slots={max_slots}] and include max_slots")
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and os.environ.get("DSM_NO_CUDA_GRAPH", "0") != "1"
        # Reference kernels synchronise with the host (they are loops), so they cannot be captured.
        uses_reference = (backend or dsm_kernels.default_backend(self.device)) == "reference"
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda" and not uses_reference
        self._graphs: dict[tuple[int, str], object] = {}  # (bucket, phase) -> LazyGraph, or "buf:" static inputs
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        # Host work a step may skip (it stands before the step's first launch, so the device waits for it): the
        # active set the device's exec mask holds (None: unknown, e.g. after open() or close() wrote it), and each
        # bucket's row view of the state (a graph replays the view it captured; the eager path reads the same slices).
        self._mask_active: tuple[int, ...] | None = None
        self._views: dict[int, GenState] = {}
        self.slots: dict[int, _Slot] = {}
        if cross_pages is not None and cross_pages < 2:
            raise ValueError(f"cross_pages must be >= 2 (one is the null page), got {cross_pages}")
        self._cross_pages = cross_pages
        self.cross_pool: SharedPagePool | None = None  # made with the pages, by the first conditioned stream
        self._in_step = False  # hooks run inside a step: a slot opened or closed there would desync the bookkeeping
        n_in = cfg.num_codebooks - cfg.dep_q - 1
        self._inputs = torch.zeros(max_slots, n_in, dtype=torch.long, device=self.device)
        self._lock = threading.RLock()  # see serialized

    def __repr__(self) -> str:
        return (f"Engine(slots {self.num_open}/{self.max_slots} open, KV pages {self.pool.used}/"
                f"{self.pool.num_pages - 1} used, buckets={self.buckets}, device={self.device}, "
                f"cuda_graphs={self.cuda_graphs})")

    # ---- stream lifecycle ----------------------------------------------------------------------------------------
    @property
    def num_open(self) -> int:
        return len(self.slots)

    @serialized
    def open(self, conditions: dict | None = None, seed: int | None = None, slot: int | None = None) -> int:
        """Start a stream; returns its slot (the lowest free one unless ``slot`` asks for a given free slot).
        ``conditions``: this stream's condition values (TTS voices...). ``seed``: its sampling seed (default: the
        engine's ``seed + slot``, as a fresh engine gives that slot, whatever the slot's previous stream used)."""
        self._check_not_in_step("open")
        seed = None if seed is None else check_seed(seed)  # before any state changes
        free = [s for s in range(self.max_slots) if s not in self.slots]
        if not free:
            raise EngineFull(f"all {self.max_slots} stream slots are in use")
        if slot is not None:  # an integer of any kind (numpy, 0-d tensor), as step() takes slots; not a bool/float
            if isinstance(slot, bool) or not hasattr(slot, "__index__"):
                raise TypeError(f"slot must be an int, got {slot!r}")
            slot = operator.index(slot)
        if slot is not None and slot not in free:
            raise ValueError(f"slot {slot} is not free (free: {free})")
        slot = free[0] if slot is None else slot
        if (conditions is None) != (self.model.condition_provider is None):
            raise ValueError("conditions must be given exactly when the model is conditioned")
        mask = torch.zeros(self.max_slots, dtype=torch.bool, device=self.device)
        mask[slot] = True
        offset_cpu = self.state.offset_cpu
        self._mask_active = None  # the reset turns the slot's row on
        self.gen.reset(self.state, mask)
        self.state.offset_cpu = offset_cpu  # out-of-sync mode: the host counter is irrelevant per slot
        self.state.kv.block_table[slot] = 0
        # seed + slot wraps to int64 as the fresh engine's seeds tensor does (else a seed near 2**63 overflows here)
        self.state.seeds[slot] = (self.seed + slot + 2**63) % 2**64 - 2**63 if seed is None else seed
        cross_pages = self._set_conditions(slot, conditions) if conditions is not None else []
        self.slots[slot] = _Slot(cross_pages=cross_pages)
        return slot

    @serialized
    def close(self, slot: int) -> None:
        """End a stream: its pages return to the pools and its row stops executing."""
        self._check_not_in_step("close")
        s = self.slots.pop(slot, None)
        if s is None:
            raise KeyError(f"slot {slot} is not open")
        self.pool.release(s.pages)
        self._mask_active = None
        self.state.exec_mask[slot] = False
        self.state.kv.block_table[slot] = 0
        if s.cross_pages:
            self.cross_pool.release(s.cross_pages)
            self.state.cross.block_table[slot] = 0

    def _new_state_buffers(self) -> None:
        """The state gained a buffer: the graphs and row views made before it do not see it."""
        self._graphs.clear()
        self._views.clear()

    def _check_not_in_step(self, what: str) -> None:
        if self._in_step:  # the step would advance (or roll back) a slot that changed under it
            raise RuntimeError(f"Engine.{what}() from a step hook: open and close streams between steps")

    def _cross_pool_size(self, length: int) -> int:
        """Pages of the shared cross-attention pool for sources of ``length`` positions: ``cross_pages``, or every
        slot's own pages and the null page. A bound too small for one stream is refused here, not by every open."""
        n = length // cross_page_size(length)
        if self._cross_pages is not None and self._cross_pages < n + 1:
            raise ValueError(f"cross_pages (TTS: condition_pages) = {self._cross_pages} cannot hold one stream: its "
                             f"condition takes {n} pages, plus the null page (give at least {n + 1})")
        return self._cross_pages or self.max_slots * n + 1

    def check_conditions(self, conditions: dict) -> None:
        """Raise ``ValueError`` now if streams with these condition values could never open (a ``cross_pages``
        bound below one stream's pages), as a server checks its settings before its first client."""
        _, src = self.gen.condition_tensors(conditions)
        if src is not None:
            self._cross_pool_size(src.shape[1])

    def _set_conditions(self, slot: int, conditions: dict) -> list[int]:
        """Write ``slot``'s sum vector, and point its cross-attention table at the pages of its condition (computing
        only pages the pool does not hold yet). Returns the pages it took."""
        st, gen = self.state, self.gen
        total, src = gen.condition_tensors(conditions)
        if total is not None and total.shape[0] != 1:
            raise ValueError(f"conditions: expected the values of one stream, got {total.shape[0]}")
        if total is not None and st.cond_sum is None:
            st.cond_sum = total.new_zeros((self.max_slots, total.shape[1]))
            self._new_state_buffers()  # the first conditioned stream creates the per-slot buffers
        pages: list[int] = []
        if src is not None:
            if src.shape[0] != 1:
                raise ValueError(f"conditions: expected the values of one stream, got {src.shape[0]}")
            if st.cross is None:
                num = self._cross_pool_size(src.shape[1])
                st.cross, self.cross_pool = gen.allocate_cross(src.shape[1], self.max_slots, num), SharedPagePool(num)
                self._new_state_buffers()
            elif src.shape[1] != st.cross.length:
                raise ValueError(f"conditions: a cross-attention source of {src.shape[1]} positions, but this "
                                 f"engine's streams have {st.cross.length}")
            keys = cross_page_keys(self.model.condition_provider, self.model.cfg.fuser, conditions,
                                   st.cross.page_size)
            pages, fresh = self.cross_pool.acquire(keys or [None] * st.cross.block_table.shape[1])
            try:
                if any(fresh):
                    with torch.no_grad():
                        kv = self.model.cross_kv(src)
                    st.cross.write([p if f else None for p, f in zip(pages, fresh, strict=True)],
                                   [(k[0], v[0]) for k, v in kv])
                st.cross.block_table[slot] = torch.tensor(pages, dtype=torch.int32).to(self.device, non_blocking=True)
            except BaseException:
                self.cross_pool.release(pages, forget=fresh)
                raise
        if total is not None:
            st.cond_sum[slot] = total[0]
        return pages

    @serialized
    @torch.no_grad()
    def warm_up(self, conditions: dict | None = None, *, plain: bool = True, hooked: bool = True) -> None:
        """Capture every bucket's step graphs now, as a server does before its first client, so that no stream pays
        for the eager first call and the capture. Each bucket is filled with throwaway streams (``conditions``: a
        conditioned model's per-stream values) that take two plain steps (``plain``: one graph a step, what steps
        without hooks replay), two steps with a text hook (``hooked``: the phases between which hooks run, as the
        TTS runtime steps), plus two text-only steps (``depformer_replace_tokens``) for a model with a depth
        transformer, and are then closed; a runtime that never takes one of the two paths skips its capture. Their
        pages go back to the pool and a later stream starts from a reset row, so outputs are those of an engine never
        warmed up. Steps with hooks that split a phase (``on_text_logits``) still capture on first use. A no-op
        without CUDA graphs."""
        if not self.cuda_graphs:
            return
        if self.slots:
            raise RuntimeError(f"warm_up() needs an idle engine; slots {sorted(self.slots)} are open")
        dq = self.model.cfg.dep_q
        for bucket in self.buckets:
            slots = [self.open(conditions=conditions) for _ in range(bucket)]
            silent = torch.full((bucket, dq), -1, dtype=torch.long, device=self.device) if dq else None
            inputs = self._inputs if self._inputs.shape[1] else None  # throwaway streams: any input tokens
            for _ in range(2):  # the eager first call, then the capture
                if plain:
                    self.step(inputs)
                if hooked:
                    self.step(inputs, on_text=lambda tokens: None)  # the phases hooks run between
                if dq:
                    self.step(inputs, depformer_replace_tokens=silent)
            for slot in slots:
                self.close(slot)

    # ---- stepping --------------------------------------------------------------------------------------------------
    def _assign_pages(self, active: list[int]) -> None:
        page_size = self.state.kv.page_size
        need = [slot for slot in active  # first visit of a ring entry: the slot takes a page
                if (self.slots[slot].position // page_size) % self.pages_per_slot == len(self.slots[slot].pages)]
        # All or nothing: a page taken before a later slot's alloc() fails would never reach the block table, so its
        # ring entry would stay on the null page, shared with every other slot in the same case.
        if len(need) > self.pool.available:
            raise EngineFull(f"KV page pool exhausted: slots {need} each need a new page, {self.pool.available} free "
                             f"({self.pool.used} in use); close a stream or give the engine more pages")
        updates = []
        for slot in need:
            s = self.slots[slot]
            s.pages.append(self.pool.alloc())
            updates.append((slot, len(s.pages) - 1, s.pages[-1]))
        if updates:
            idx = torch.tensor(updates, dtype=torch.long).to(self.device, non_blocking=True)
            self.state.kv.block_table[idx[:, 0], idx[:, 1]] = idx[:, 2].to(torch.int32)

    def bucket_for(self, active: list[int]) -> int:
        return bucket_for(self.buckets, active)

    @serialized
    @torch.no_grad()
    def step(self, inputs: torch.Tensor | None = None, active: list[int] | None = None, *,
             on_text_logits: Callable[[torch.Tensor], None] | None = None,
             on_text: Callable[[torch.Tensor], None] | None = None,
             depformer_replace_tokens: torch.Tensor | None = None,
             on_audio: Callable[[torch.Tensor], None] | None = None,
             check_hooks: bool = True) -> StepOutput | None:
        """One frame for the ``active`` slots (default: every open slot); other open slots are frozen.

        ``inputs``: [rows, n_in] input-stream tokens (audio codes for STT), rows by slot, covering every active slot
        (rows past them and below the bucket are inactive: they keep earlier tokens, which only they read). Returns the
        step output for rows ``[0, bucket)`` (rows of inactive slots hold ``-2`` tokens), or None if no slot runs.
        Hooks see rows ``[0, bucket)`` and edit their tensor in place; ``check_hooks`` as
        :meth:`dsm.generate.Generator.step`.
        """
        # a repeat would count twice; slot numbers may come as numpy or 0-d tensor ints (not as floats)
        active = sorted(self.slots) if active is None else sorted({operator.index(s) for s in active})
        unknown = [s for s in active if s not in self.slots]
        if unknown:
            raise KeyError(f"slots {unknown} are not open")
        if not active:
            return None
        bucket = self.bucket_for(active)
        n_in = self._inputs.shape[1]
        # Checked before any state changes; an active slot the inputs do not cover would run on a previous step's
        # tokens.
        if inputs is not None and not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs must be a torch.Tensor of token ids, got {type(inputs).__name__}")
        if n_in and inputs is None:
            raise ValueError(f"this model has {n_in} input streams: pass inputs [rows, {n_in}] (rows by slot)")
        if inputs is not None and (inputs.dim() != 2 or inputs.shape[1] != n_in
                                   or not active[-1] < inputs.shape[0] <= self.max_slots):
            raise ValueError(f"inputs: expected shape [rows, {n_in}] with {active[-1] + 1} <= rows <= "
                             f"{self.max_slots} (rows by slot, covering active slot {active[-1]}), got "
                             f"{tuple(inputs.shape)}")
        if inputs is not None:
            check_token_range(inputs, "inputs", self.model.cfg.card)
        dq = self.model.cfg.dep_q
        if dq and depformer_replace_tokens is not None:
            check_token_range(depformer_replace_tokens, "depformer_replace_tokens", self.model.cfg.card)
            # Checked here too: the generator would refuse a wrong shape only after this step's pages are taken.
            if depformer_replace_tokens.numel() != bucket * dq:
                raise ValueError(f"depformer_replace_tokens: expected [{bucket}, {dq}] tokens (rows [0, bucket) by "
                                 f"slot), got {tuple(depformer_replace_tokens.shape)}")
            depformer_replace_tokens = depformer_replace_tokens.reshape(bucket, dq).to(self.device, torch.long)
        self._assign_pages(active)
        if self._mask_active != tuple(active):
            # From a fresh pinned copy: the device reads it only when it gets there, possibly after the host has
            # prepared later steps (a step does not sync), and the host allocator keeps it until the copy is done.
            mask = torch.zeros(self.max_slots, dtype=torch.bool)
            mask[active] = True
            copy_from_host(self.state.exec_mask, mask)
            self._mask_active = tuple(active)
        view = self._views.get(bucket)
        if view is None:
            view = self._views[bucket] = self.state.rows(bucket)
        if inputs is not None:
            self._inputs[: inputs.shape[0]].copy_(inputs, non_blocking=True)
        inp = self._inputs[:bucket] if self._inputs.shape[1] else None
        self._in_step = True
        try:
            out = self._run(view, bucket, inp, on_text_logits, on_text, depformer_replace_tokens, on_audio,
                            check_hooks)
        except BaseException:
            # A hook raised before the commit: the frame was not committed, but the forward pass appended K/V and
            # advanced the KV positions. Putting the positions back makes the step never have happened (the next
            # step overwrites that K/V), so host and device agree on which pages each slot needs.
            idx = torch.tensor(active, dtype=torch.long)
            host = torch.tensor([self.slots[s].position for s in active], dtype=torch.long)
            self.state.positions[idx.to(self.device)] = host.to(self.device)
            raise
        finally:
            self._in_step = False
        for slot in active:
            self.slots[slot].position += 1
        return out

    def _run(self, view, bucket, inp, on_text_logits, on_text, replace, on_audio, check_hooks) -> StepOutput:
        gen, dq = self.gen, self.model.cfg.dep_q
        if not self.cuda_graphs:
            return gen.step(view, inp, on_text_logits=on_text_logits, on_text=on_text,
                            depformer_replace_tokens=replace, on_audio=on_audio, check_hooks=check_hooks)
        if on_text_logits is None and on_text is None and replace is None and on_audio is None:
            # no host work between the phases: the whole step is one graph (one launch, no buffers between phases)
            return StepOutput(*self._graph(bucket, "step", lambda: _whole_step(gen, view, inp)).replay())
        # Each graph reads what the previous one wrote through a static buffer: a graph replays the addresses its
        # closure saw at creation, while the producing graph's outputs move once (eager first call -> capture).
        if on_text_logits is None:
            text = self._graph(bucket, "text", lambda: _text_phase(gen, view, inp))
            z, text_logits, extra, text_token = text.replay()
        else:  # the logits hook splits graph A in two
            z, text_logits, extra = self._graph(bucket, "forward", lambda: _forward_phase(gen, view, inp)).replay()
            on_text_logits(text_logits)
            logits_in = self._static(bucket, "text_logits", text_logits)
            text_token = self._graph(bucket, "sample", lambda: gen.sample_text(view, logits_in)).replay()
        if on_text is not None:
            on_text(text_token)
            if check_hooks:
                gen.check_hook_tokens(text_token, "on_text")
        token_in = self._static(bucket, "text_token", text_token)
        if dq and replace is None and on_audio is None:  # no host work after the text hook: the rest is one graph
            z_in = self._static(bucket, "z", z)
            tokens = self._graph(bucket, "depth_commit",
                                 lambda: gen.commit(view, token_in, gen.depformer(view, token_in, z_in))).replay()
            return StepOutput(tokens, text_token, z, text_logits, extra)
        audio = None
        if dq:
            if replace is not None:  # into a buffer of ours: on_audio edits it, never the caller's tensor (as eager)
                audio = self._static(bucket, "audio", replace)
            else:
                z_in = self._static(bucket, "z", z)
                audio = self._graph(bucket, "depth", lambda: gen.depformer(view, token_in, z_in)).replay()
            if on_audio is not None:
                on_audio(audio)
                if check_hooks:
                    gen.check_hook_tokens(audio, "on_audio")
        if audio is None:
            tokens = self._graph(bucket, "commit", lambda: gen.commit(view, token_in, None)).replay()
        else:
            audio_in = self._static(bucket, "audio", audio)
            tokens = self._graph(bucket, "commit_audio", lambda: gen.commit(view, token_in, audio_in)).replay()
        return StepOutput(tokens, text_token, z, text_logits, extra)

    def _static(self, bucket: int, name: str, value: torch.Tensor) -> torch.Tensor:
        """A persistent buffer fed to a graph, refreshed with ``value`` (hooks may have replaced the tensor)."""
        key = (bucket, "buf:" + name)
        buf = self._graphs.get(key)
        if buf is None:
            buf = self._graphs[key] = value.clone()
        elif buf.data_ptr() != value.data_ptr():
            buf.copy_(value)
        return buf

    def _graph(self, bucket: int, name: str, fn: Callable[[], object]) -> LazyGraph:
        """The graph of phase ``name`` at ``bucket``: eager on its first call (a real step), captured into the
        engine's shared pool on its second, replayed after (:class:`dsm.cuda_graphs.LazyGraph`)."""
        key = (bucket, name)
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = LazyGraph(fn, self._pool)
        return g


def _forward_phase(gen: Generator, view, inp):
    z, text_logits = gen.forward(view, inp)
    return z, text_logits, gen.extra_probs(z)


def _text_phase(gen: Generator, view, inp):
    z, text_logits, extra = _forward_phase(gen, view, inp)
    return z, text_logits, extra, gen.sample_text(view, text_logits)


def _whole_step(gen: Generator, view, inp):
    """A step without hooks, as one graph: the fields of :class:`~dsm.generate.StepOutput` in order."""
    z, text_logits, extra, text_token = _text_phase(gen, view, inp)
    audio = gen.depformer(view, text_token, z) if gen.model.cfg.dep_q else None
    return gen.commit(view, text_token, audio), text_token, z, text_logits, extra
