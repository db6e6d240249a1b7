"""The engine: slots join and leave, pages are recycled, streams are isolated, output equals the plain generator."""

from __future__ import annotations

import copy
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from another_thread import CallFromAnotherThread  # noqa: E402
from moshi_oracle import dsm_lm_from_moshi, moshi_lm_from_config  # noqa: E402

import dsm_kernels  # noqa: E402
from dsm.engine import Engine, EngineFull, PagePool  # noqa: E402
from dsm.generate import Generator  # noqa: E402

STT = dict(
    delays=[0] * 33, n_q=32, dep_q=0, card=64, text_card=40, dim=32, num_layers=2, num_heads=2, context=10,
    gating="silu", norm="rms_norm_f32", positional_embedding="rope", max_period=100000.0, hidden_scale=4.125,
    depformer_multi_linear=True, extra_heads_num_heads=4, extra_heads_dim=6,
)
TTS = dict(
    delays=[0, 0, 2, 2, 2], n_q=4, dep_q=4, card=32, text_card=30, dim=32, num_layers=2, num_heads=2, context=6,
    gating="silu", norm="rms_norm_f32", positional_embedding="rope", max_period=10000.0, hidden_scale=4.125,
    depformer_dim=16, depformer_num_heads=2, depformer_num_layers=1, depformer_dim_feedforward=48,
    depformer_multi_linear=True, depformer_weights_per_step=True, depformer_pos_emb="none",
)


@pytest.fixture(scope="module")
def stt_model():
    return dsm_lm_from_moshi(STT, moshi_lm_from_config(STT, seed=11))


@pytest.fixture(scope="module")
def tts_model():
    return dsm_lm_from_moshi(TTS, moshi_lm_from_config(TTS, seed=12))


def _audio(seed, steps):
    return torch.randint(0, 64, (steps, 32), generator=torch.Generator().manual_seed(seed))


def test_page_pool_recycles():
    pool = PagePool(5)
    pages = [pool.alloc() for _ in range(4)]
    assert 0 not in pages and pool.available == 0
    with pytest.raises(EngineFull, match="exhausted"):
        pool.alloc()
    pool.release(pages)
    assert pool.available == 4 and pool.used == 0


def test_single_stream_equals_generator(stt_model):
    steps = 25
    audio = _audio(0, steps)
    gen = Generator(stt_model, use_sampling=False)
    state = gen.init_state(1)
    ref = [gen.step(state, audio[t][None]).tokens[0] for t in range(steps)]
    eng = Engine(stt_model, max_slots=4, use_sampling=False)
    slot = eng.open()
    inputs = torch.zeros(4, 32, dtype=torch.long)
    for t in range(steps):
        inputs[slot] = audio[t]
        out = eng.step(inputs)
        assert torch.equal(out.tokens[slot], ref[t])


def _run_alone(model, audio, buckets, max_slots, backend=None):
    eng = Engine(model, max_slots=max_slots, buckets=buckets, use_sampling=False, backend=backend)
    slot = eng.open()
    inputs = torch.zeros(max_slots, 32, dtype=torch.long)
    toks = []
    for t in range(audio.shape[0]):
        inputs[slot] = audio[t]
        toks.append(eng.step(inputs, active=[slot]).tokens[slot].clone())
    return slot, toks


@pytest.mark.parametrize("backend", ["reference", pytest.param("cuda", marks=pytest.mark.gpu), "cuda_emu"])
def test_stream_isolation_among_63_others(stt_model, backend, request, monkeypatch):
    """A stream's tokens among 63 others (different start times and lengths, joining, leaving, pausing) are
    bit-identical to the same stream alone in an engine of the same bucket: on the reference ops, on the GPU's
    kernels, and on the CUDA kernels emulated on the CPU: a kernel that read another slot's pages or state would
    show here."""
    calls, model, max_slots = None, stt_model, 64
    if backend == "cuda_emu":
        calls, backend = request.getfixturevalue("cuda_emulated"), "cuda"
        # the ops without a CUDA kernel on the reference, not the (slow) Triton interpreter: the CUDA kernels are
        # what this case is about
        monkeypatch.setattr(dsm_kernels, "available_backends", lambda device="cpu": ["reference", "cuda"])
    elif backend == "cuda":
        model = copy.deepcopy(stt_model).to("cuda")
    steps, start = 30, 7
    target = _audio(99, steps)
    _, alone = _run_alone(model, target, (max_slots,), max_slots, backend)
    eng = Engine(model, max_slots=max_slots, buckets=(max_slots,), use_sampling=False, backend=backend)
    rng = random.Random(0)
    others: dict[int, tuple[int, torch.Tensor]] = {}  # slot -> (step it joined, its audio)

    def join(step):
        others[eng.open()] = (step, _audio(rng.randrange(10**6), start + steps))

    for _ in range(max_slots * 5 // 16):
        join(0)
    inputs = torch.zeros(max_slots, 32, dtype=torch.long)
    target_slot, got, full = None, [], False
    for step in range(start + steps):
        if step == start:
            target_slot = eng.open()
        for s in list(others):
            if rng.random() < 0.05:
                eng.close(s)
                del others[s]
        while eng.num_open < max_slots - (target_slot is None) and (step == start + 3 or rng.random() < 0.5):
            join(step)
        full |= eng.num_open == max_slots
        active = []
        for s, (joined, a) in others.items():
            if rng.random() < 0.8:  # some streams have no audio this step: frozen
                inputs[s] = a[step - joined]
                active.append(s)
        if target_slot is not None:
            inputs[target_slot] = target[step - start]
            active.append(target_slot)
        out = eng.step(inputs, active=active)
        if target_slot is not None:
            got.append(out.tokens[target_slot].clone())
    assert full, f"the test never had {max_slots} streams open at once"
    assert len(got) == steps
    assert all(torch.equal(a, b) for a, b in zip(got, alone, strict=True))
    assert calls is None or calls["paged_decode_attention"] and calls["sample_tokens"], calls


def test_joins_and_leaves_leak_no_pages(stt_model):
    eng = Engine(stt_model, max_slots=8, use_sampling=False)
    rng = random.Random(1)
    inputs = torch.zeros(8, 32, dtype=torch.long)
    total_pages = eng.pool.available
    for i in range(10_000):
        if eng.num_open and (eng.num_open == 8 or rng.random() < 0.5):
            eng.close(rng.choice(sorted(eng.slots)))
        else:
            eng.open()
        if i % 25 == 0 and eng.num_open:
            eng.step(inputs)
    for s in sorted(eng.slots):
        eng.close(s)
    assert eng.pool.available == total_pages and eng.pool.used == 0


def test_step_input_errors_change_nothing(stt_model):
    eng = Engine(stt_model, max_slots=4, use_sampling=False)
    eng.open(), eng.open()
    inputs = torch.zeros(4, 32, dtype=torch.long)
    for bad in [None, inputs[:1], inputs[0], inputs[:, :31], inputs[..., None]]:
        with pytest.raises(ValueError, match="input"):
            eng.step(bad)
    card = stt_model.cfg.card
    for bad, what in [(inputs.float(), "integer"), (inputs - 2, r"\[-2, -2\]"), (inputs + card + 1, f"{card}")]:
        with pytest.raises(ValueError, match=f"inputs: .*{what}"):  # past the tables: a device fault on a GPU
            eng.step(bad)
    assert eng.pool.used == 0 and eng.state.positions.tolist() == [0] * 4
    eng.step(inputs[:2] - 1, active=[1, 1, 0])  # -1 is a zero embedding
    eng.step(inputs[:2] + card, active=[1, 1, 0])  # card: the initial token (moshi's Rust alignment feeds it)
    eng.step(inputs[:2], active=[1, 1, 0])  # the bucket's rows suffice; a repeated slot steps once
    assert [eng.slots[s].position for s in (0, 1)] == [3, 3] and eng.state.positions[:2].tolist() == [3, 3]


def test_inputs_need_to_cover_the_active_slots_only(stt_model):
    """Inputs may stop after the highest active slot (the STT runtime passes Mimi's codes for the rows Mimi ran,
    which can be fewer than the LM's bucket): the bucket's rows they miss are inactive, and the steps equal steps
    given every row. Missing an active slot is refused."""
    audio = torch.randint(0, 64, (4, 4, 32), generator=torch.Generator().manual_seed(3))
    outs = []
    for rows in (4, 3):
        eng = Engine(stt_model, max_slots=4, buckets=(1, 4), use_sampling=False)
        for _ in range(3):
            eng.open()
        outs.append(torch.stack([eng.step(audio[t, :rows], active=[0, 2]).z[[0, 2]].clone() for t in range(4)]))
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match=r"3 <= rows <= 4 \(rows by slot, covering active slot 2\), got \(2, 32\)"):
        eng.step(audio[0, :2], active=[0, 2])
    assert eng.state.positions.tolist() == [4, 0, 4, 0]


def test_a_raising_hook_leaves_the_step_undone(stt_model):
    """A hook (STTRuntime's on_text) that raises mid-step: the frame was not committed, and the engine goes on
    exactly as if that step had never been called (host and device positions agree, no ring entry on the null page,
    so no page is shared with another stream)."""
    audio = torch.randint(0, 64, (12, 2, 32), generator=torch.Generator().manual_seed(5))

    def run(fail_at):
        eng = Engine(stt_model, max_slots=2, page_size=4, buckets=(2,), use_sampling=False)
        eng.open(), eng.open()
        zs = []
        for t in range(12):
            if t == fail_at:
                for hook in ("on_text", "on_text_logits"):
                    with pytest.raises(ZeroDivisionError):
                        eng.step(audio[t], **{hook: lambda x: 1 / 0})
                assert eng.state.positions.tolist() == [eng.slots[s].position for s in (0, 1)] == [t, t]
            zs.append(eng.step(audio[t]).z.clone())
        assert 0 not in eng.state.kv.block_table.tolist()
        return torch.stack(zs)

    assert torch.equal(run(4), run(None))  # position 4 starts the second page: the case that hit the null page


def test_a_raising_hook_leaves_the_generators_step_undone(stt_model, tts_model):
    """The same on the plain Generator (what STTRuntime(engine=False) steps): its KV positions had advanced past the
    uncommitted frame, so every later step attended over a stale K/V row at the wrong position."""
    for model in (stt_model, tts_model):
        n_in = model.cfg.num_codebooks - model.cfg.dep_q - 1
        audio = torch.randint(0, 64, (8, 2, n_in), generator=torch.Generator().manual_seed(5)) if n_in else None
        hooks = [("on_text", lambda x: 1 / 0), ("on_text_logits", lambda x: 1 / 0)]
        if model.cfg.dep_q:
            hooks += [("on_audio", lambda x: 1 / 0), ("depformer_replace_tokens", torch.zeros(3))]

        def run(fail_at, model=model, audio=audio, hooks=hooks):
            gen = Generator(model, use_sampling=False)
            st = gen.init_state(2, require_conditions=False)
            logits = []
            for t in range(8):
                inp = None if audio is None else audio[t]
                if t == fail_at:
                    for hook, value in hooks:
                        with pytest.raises((ZeroDivisionError, RuntimeError)):
                            gen.step(st, inp, **{hook: value})
                        assert st.positions.tolist() == [t] * st.positions.shape[0], hook
                logits.append(gen.step(st, inp).text_logits.clone())
            return torch.stack(logits)

        assert torch.equal(run(3), run(None))


def test_hooks_cannot_open_or_close_streams(stt_model):
    """A hook that closes (or opens) a stream mid-step is refused: the step then undoes itself like any raising hook,
    and the engine goes on as if it had not been called. Closing there used to raise a KeyError after the frame was
    committed, leaving the later slots with stale host positions."""
    audio = torch.randint(0, 64, (6, 2, 32), generator=torch.Generator().manual_seed(6))

    def run(interfere):
        eng = Engine(stt_model, max_slots=2, page_size=4, buckets=(2,), use_sampling=False)
        eng.open(), eng.open()
        zs = []
        for t in range(6):
            if interfere and t == 4:
                for hook in (lambda x: eng.close(0), lambda x: eng.open()):
                    with pytest.raises(RuntimeError, match="from a step hook"):
                        eng.step(audio[t], on_text=hook)
                assert sorted(eng.slots) == [0, 1]
                assert eng.state.positions.tolist() == [eng.slots[s].position for s in (0, 1)] == [t, t]
            zs.append(eng.step(audio[t]).z.clone())
        return torch.stack(zs)

    assert torch.equal(run(True), run(False))


def test_a_call_from_another_thread_waits_for_the_step(stt_model):
    """The engine's calls hold its lock: a close from another thread during a step runs after it. It used to run
    inside the step (refused as if a hook had called it; two threads stepping at once corrupted both)."""
    eng = Engine(stt_model, max_slots=2, page_size=4, use_sampling=False)
    eng.open(), eng.open()
    other = CallFromAnotherThread(lambda: eng.close(1))
    eng.step(_audio(0, 2), on_text=lambda tokens: other.start_inside_the_step())
    other.join()
    assert sorted(eng.slots) == [0] and eng.slots[0].position == 1
    assert repr(eng) == ("Engine(slots 1/2 open, KV pages 1/6 used, buckets=(1, 2), device=cpu, "
                         "cuda_graphs=False)")
    assert repr(eng.state) == "GenState(batch_size=2, kv_rows=2, conditioned=False, device=cpu)"


def test_open_seeds(stt_model):
    """A stream opened without a seed samples as that slot of a fresh engine does, whatever its slot's previous
    stream used; a seed that is not an int64 is refused before the slot is touched."""
    inputs = torch.randint(0, 64, (8, 2, 32), generator=torch.Generator().manual_seed(6))

    def sample(eng, slot):
        return torch.stack([eng.step(inputs[t], active=[slot]).tokens[slot].clone() for t in range(8)])

    fresh = Engine(stt_model, max_slots=2, buckets=(2,), seed=9)
    want = sample(fresh, fresh.open())
    eng = Engine(stt_model, max_slots=2, buckets=(2,), seed=9)
    slot = eng.open(seed=123)
    other = sample(eng, slot)
    eng.close(slot)
    assert torch.equal(sample(eng, eng.open()), want) and not torch.equal(other, want)
    for bad, err in ((2**63, ValueError), ("7", TypeError), (1.5, TypeError), (True, ValueError)):
        with pytest.raises(err, match="seed"):
            eng.open(seed=bad)
    assert sorted(eng.slots) == [0]
    top = Engine(stt_model, max_slots=2, seed=2**63 - 1)  # seed + slot wraps to int64, as in a fresh engine
    fresh_seeds = top.state.seeds.tolist()
    top.open(), top.open()
    assert top.state.seeds.tolist() == fresh_seeds


def test_long_stream_uses_bounded_pages(stt_model):
    eng = Engine(stt_model, max_slots=2, page_size=4, use_sampling=False)
    slot = eng.open()
    inputs = torch.zeros(2, 32, dtype=torch.long)
    for t in range(10 * stt_model.cfg.context):
        inputs[slot] = t % 64
        eng.step(inputs)
        assert len(eng.slots[slot].pages) <= eng.pages_per_slot
    assert eng.pool.used == eng.pages_per_slot  # ring full: ceil(10 / 4) = 3 pages, recycled since


def test_engine_full_errors(stt_model):
    eng = Engine(stt_model, max_slots=2, use_sampling=False)
    eng.open(), eng.open()
    with pytest.raises(EngineFull, match="slots"):
        eng.open()
    with pytest.raises(KeyError, match="not open"):
        eng.close(5)
    codes = torch.zeros(2, 32, dtype=torch.long)
    assert eng.step(codes, active=torch.tensor([1])).text_token.shape[0] == 2  # a tensor's slot numbers are slots
    with pytest.raises(TypeError):
        eng.step(codes, active=[0.0])  # not a slot number: refused, not truncated
    small = Engine(stt_model, max_slots=2, num_pages=2, page_size=4, use_sampling=False)
    small.open(), small.open()
    with pytest.raises(EngineFull, match="page"):
        small.step(torch.zeros(2, 32, dtype=torch.long))


@pytest.mark.parametrize("kw,message", [
    ({"max_slots": 0}, "max_slots must be an integer >= 1"),
    ({"page_size": 0}, "page_size must be an integer >= 1"),
    ({"num_pages": 0}, "num_pages must be an integer >= 2"),
    ({"kv_dtype": torch.int8}, "kv_dtype must be a floating-point torch dtype"),
    ({"kv_dtype": torch.bool}, "kv_dtype must be a floating-point torch dtype"),
    ({"kv_dtype": torch.float8_e4m3fnuz}, r"kv_dtype .*torch.float8_e4m3fn; got torch.float8_e4m3fnuz"),
    ({"kv_dtype": torch.float8_e5m2}, "kv_dtype must be a floating-point torch dtype the kernels store"),
    ({"kv_dtype": "fp8"}, "kv_dtype must be"),
])  # fmt: skip
def test_bad_engine_settings_are_refused(stt_model, kw, message):
    """Pool and cache settings that made a misleading error, a ZeroDivisionError, a silent default (num_pages=0) or
    wrong tokens (an integer KV cache truncates K and V), or failed in the kernels (e4m3fnuz), are refused by name."""
    with pytest.raises(ValueError, match=message):
        Engine(stt_model, **{"max_slots": 2, **kw})


def test_a_kv_cache_past_the_memory_is_refused_in_words(stt_model, monkeypatch):
    """A batch or context whose KV cache cannot fit is refused before anything is allocated (on a CPU, torch.zeros
    would fill pages until the OOM killer came), naming the cache and the sizes; bench's probes and the CLI take it
    as the out-of-memory error it is."""
    import dsm.kv_cache
    from dsm.kv_cache import PagedKVCache

    with pytest.raises(torch.OutOfMemoryError, match=r"Engine's KV cache \(10000000 slots x context \d+, 2 layers\) "
                       r"needs [\d.]+ GiB for K and V \(2 x \d+ x 16 x \d+ x \d+ float32\), and cpu has [\d.]+ GiB "
                       "of memory"):
        Engine(stt_model, max_slots=10**7)
    with pytest.raises(torch.OutOfMemoryError, match=r"the KV cache of 2 rows x context 100000000000 needs"):
        PagedKVCache.allocate(num_layers=1, batch_size=2, heads=2, head_dim=8, context=10**11)
    mib = 2**20  # a GPU's room is its free memory plus what torch's allocator holds unused
    monkeypatch.setattr(dsm.kv_cache, "memory_room", lambda device: (mib, "free"))
    with pytest.raises(torch.OutOfMemoryError, match=r"^x needs 1.0 MiB for K and V \(131073 float32\), and cpu has "
                       r"1.0 MiB free$"):
        dsm.kv_cache.zeros_kv((mib // 8 + 1,), torch.float32, "cpu", "x")  # 8 bytes past the room: refused
    k, v = dsm.kv_cache.zeros_kv((mib // 4,), torch.bfloat16, "cpu", "x")  # exactly the room: allocated
    assert k.shape == v.shape == (mib // 4,) and not k.any() and not v.any()


def test_bad_open_and_step_arguments(stt_model):
    eng = Engine(stt_model, max_slots=2, use_sampling=False)
    with pytest.raises(TypeError, match="slot must be an int, got True"):
        eng.open(slot=True)
    with pytest.raises(TypeError, match="slot must be an int, got 1.0"):
        eng.open(slot=1.0)
    assert eng.open(slot=np.int64(1)) == 1 and type(next(iter(eng.slots))) is int  # as step() takes slots
    eng.close(1)
    eng.open()
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor of token ids, got ndarray"):
        eng.step(np.zeros((2, 32), dtype=np.int64))


@pytest.mark.parametrize("kw,message", [
    ({"temp": float("nan")}, "temp must be a finite number >= 0"),
    ({"temp_text": -0.5}, "temp_text must be a finite number >= 0"),
    ({"temp": "0.8"}, "temp must be a finite number"),
    ({"top_k": -1}, "top_k must be an int >= 0"),
    ({"top_k_text": 2.5}, "top_k_text must be an int >= 0"),
    ({"cfg_coef": float("inf")}, "cfg_coef must be a finite number"),
])  # fmt: skip
def test_bad_sampling_settings_are_refused(stt_model, kw, message):
    """Settings that would reach every stream's sampler (no per-step host check) are refused up front."""
    if "cfg_coef" not in kw:  # the engine refuses CFG row doubling first
        with pytest.raises(ValueError, match=message):
            Engine(stt_model, max_slots=1, **kw)
    with pytest.raises(ValueError, match=message):
        Generator(stt_model, **kw)


def test_page_exhaustion_changes_nothing(stt_model):
    """EngineFull from a step where some slots got their page and a later one did not: no page is taken, and once a
    stream is closed the others go on exactly as on an engine with pages to spare (no ring entry on the null page)."""
    audio = torch.randint(0, 64, (16, 3, 32), generator=torch.Generator().manual_seed(3))

    def run(num_pages):
        eng = Engine(stt_model, max_slots=3, page_size=4, num_pages=num_pages, buckets=(3,), use_sampling=False)
        for _ in range(3):
            eng.open()
        zs = []
        for t in range(16):
            if t == 8:
                if num_pages is not None:
                    used = eng.pool.used
                    with pytest.raises(EngineFull, match=r"slots \[0, 1, 2\] each need a new page, 2 free"):
                        eng.step(audio[t])
                    assert eng.pool.used == used and [len(eng.slots[s].pages) for s in range(3)] == [2, 2, 2]
                eng.close(2)
            zs.append(eng.step(audio[t]).z[:2].clone())
        assert 0 not in eng.state.kv.block_table[:2, :3].tolist()
        return torch.stack(zs)

    assert torch.equal(run(9), run(None))  # 8 pages: the third stream's page at position 8 is missing


def test_tts_engine_matches_generator(tts_model):
    """Depformer model through the engine, two streams at different offsets, vs the generator run alone."""
    steps = 20
    gen = Generator(tts_model, use_sampling=False, support_out_of_sync=True)
    st = gen.init_state(1)
    ref = [gen.step(st).tokens[0] for _ in range(steps)]
    eng = Engine(tts_model, max_slots=3, use_sampling=False)
    first = eng.open()
    for _ in range(5):
        eng.step()
    second = eng.open()
    got = []
    for _ in range(steps):
        got.append(eng.step().tokens[second].clone())
    assert first != second
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


class EmulatedGraph:
    """CPU stand-in for ``dsm.cuda_graphs.LazyGraph`` (patched in as ``dsm.engine.LazyGraph``) with a CUDA graph's
    address semantics: the first call is a real eager step, every later one runs the closure given at creation (a
    graph replays the addresses it captured), and from the capture (the second call) on, results land in the
    tensors the capture returned. It catches a phase reading a tensor that a real graph would never see again."""

    def __init__(self, fn, pool):
        self.fn, self.calls, self.out = fn, 0, None

    def replay(self):
        self.calls += 1
        new = self.fn()
        if self.calls == 1:
            return new
        if self.out is None:
            self.out = new
        else:
            for dst, src in zip(_tensors(self.out), _tensors(new), strict=True):
                dst.copy_(src)
        return self.out


def _tensors(out):
    return [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]


GRAPH_MODES = [pytest.param("emulated"), pytest.param("cuda", marks=pytest.mark.gpu)]


def _graph_engine(model, mode, monkeypatch, graphs, **kw):
    if mode == "cuda":
        return Engine(model.to("cuda"), cuda_graphs=graphs, **kw)
    eng = Engine(model, cuda_graphs=False, **kw)
    if graphs:
        monkeypatch.setattr("dsm.engine.LazyGraph", EmulatedGraph)
        eng.cuda_graphs = True
    return eng


@pytest.mark.parametrize("mode", GRAPH_MODES)
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_hooks_that_leave_ids_past_the_tables_are_refused(tts_model, mode, graphs, monkeypatch):
    """A text or audio hook that leaves a token id no embedding table has fails the step with an error naming the
    hook, before the id is committed (on a GPU the next step's gather would read outside the table and fault every
    stream); the step is undone, and the engine goes on as if it had never been called. The largest valid text id
    (a demultiplexed pair) is taken."""
    cfg = tts_model.cfg
    vt = cfg.text_card + 1
    text_max = vt * (vt + 1) - 1 if cfg.demux_second_text_stream else cfg.text_card

    def run(bad):
        eng = _graph_engine(tts_model, mode, monkeypatch, graphs, max_slots=2, temp=0.6, temp_text=0.6)
        eng.open(seed=1), eng.open(seed=2)
        toks = []
        for t in range(6):
            if t == 3 and bad:
                for hook, value, match in (("on_text", text_max + 1, r"on_text: .*\[-1, "),
                                           ("on_text", -2, "on_text"), ("on_audio", cfg.card + 1, "on_audio"),
                                           ("on_audio", -7, "on_audio")):
                    with pytest.raises(ValueError, match=match):
                        eng.step(**{hook: lambda x, v=value: x.__setitem__(1, v)})
                assert eng.state.positions.tolist() == [eng.slots[s].position for s in (0, 1)] == [t, t]
            toks.append(eng.step(on_text=lambda x: x.__setitem__(0, text_max)).tokens.clone())
        return torch.stack(toks)

    assert torch.equal(run(True), run(False))


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_unchecked_hooks_skip_the_range_check_only(tts_model, graphs, monkeypatch):
    """``check_hooks=False`` (the TTS runtime, whose hooks write ids it built itself): the hooks' tokens are not
    range-checked (a host wait for the device each), and the steps give the same tokens as with the check."""
    calls, real = [], Generator.check_hook_tokens
    monkeypatch.setattr(Generator, "check_hook_tokens", lambda self, t, hook: calls.append(hook) or real(self, t, hook))
    outs = []
    for check in (True, False):
        eng = _graph_engine(tts_model, "emulated", monkeypatch, graphs, max_slots=2, temp=0.6, temp_text=0.6)
        eng.open(seed=1), eng.open(seed=2)
        calls.clear()
        toks = [eng.step(on_text=lambda x: x.__setitem__(0, 3), on_audio=lambda a: a.__setitem__(1, 0),
                         check_hooks=check).tokens.clone() for _ in range(4)]
        assert calls == (["on_text", "on_audio"] * 4 if check else [])
        outs.append(torch.stack(toks))
    assert torch.equal(*outs)


@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_cuda_graph_engine_equals_eager(stt_model, mode, monkeypatch):
    dev = "cuda" if mode == "cuda" else "cpu"
    steps = 12
    audio = _audio(3, steps).to(dev)
    outs = {}
    for graphs in (False, True):
        eng = _graph_engine(stt_model, mode, monkeypatch, graphs, max_slots=4, use_sampling=False)
        a, b = eng.open(), eng.open()
        inputs = torch.zeros(4, 32, dtype=torch.long, device=dev)
        toks = []
        for t in range(steps):
            inputs[a], inputs[b] = audio[t], audio[steps - 1 - t]
            toks.append(eng.step(inputs).tokens[:2].clone())
        outs[graphs] = torch.stack(toks)
        if graphs:  # no hooks: every step one graph, nothing copied between phases
            assert {phase for _, phase in eng._graphs} == {"step"}
        outs[graphs, "vad"] = eng.step(inputs).extra_probs[:2].clone()  # the VAD heads, in the graph
    assert outs[True, "vad"].shape == (2, 4) and torch.equal(outs[False, "vad"], outs[True, "vad"])
    assert len(set(outs[False][:, 0, 0].tolist())) > 1  # the tokens move, so a stale replay cannot pass
    assert torch.equal(outs[False], outs[True])


@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_cuda_graph_engine_with_hooks_equals_eager(tts_model, mode, monkeypatch):
    """TTS-style stepping under graphs: replaced (text-only) steps, then a logits hook, a text hook that forces
    tokens in place and an audio hook, all between the captured phases."""
    dev = "cuda" if mode == "cuda" else "cpu"
    outs = {}
    for graphs in (False, True):
        eng = _graph_engine(tts_model, mode, monkeypatch, graphs, max_slots=2, temp=0.6, temp_text=0.6)
        eng.open(seed=1), eng.open(seed=2)
        silent = torch.full((2, tts_model.cfg.dep_q), -1, dtype=torch.long, device=dev)
        toks = []
        for t in range(14):
            def bonus(logits):
                logits[..., 3] += 0.5

            def force(tok, t=t):
                if t % 3 == 0:
                    tok.fill_(5)

            def mute(audio, t=t):
                if t < 8:
                    audio[:, 1:].fill_(-1)

            replace = silent if t < 4 else None
            out = eng.step(on_text_logits=bonus, on_text=force, depformer_replace_tokens=replace, on_audio=mute)
            toks.append(out.tokens.clone())
        outs[graphs] = torch.stack(toks)
    assert torch.equal(outs[False], outs[True])


@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_cuda_graph_engine_plain_tts_steps_equal_eager(tts_model, mode, monkeypatch):
    """Plain TTS steps (the whole step one graph) mixed with steps whose hook changes nothing (the phase graphs: text,
    depth, commit), with streams joining and leaving: both graph sets step the same state, as eagerly."""
    dev = "cuda" if mode == "cuda" else "cpu"
    outs = {}
    for graphs in (False, True):
        eng = _graph_engine(tts_model, mode, monkeypatch, graphs, max_slots=4, buckets=(4,), temp=0.6)
        slots = [eng.open(seed=s) for s in (1, 2)]
        toks = []
        for t in range(14):
            if t == 5:
                slots.append(eng.open(seed=3))
            if t == 8:
                eng.close(slots.pop(0))
            out = eng.step(**({"on_text": lambda tokens: None} if t % 4 == 3 else {}))
            assert out.extra_probs is None  # no extra heads
            toks.append(out.tokens[2].clone())  # the stream that joins at step 5
        outs[graphs] = torch.stack(toks).to(dev)
        if graphs:
            # a text hook alone: the depth transformer and the commit in one graph
            assert {"step", "text", "depth_commit"} <= {phase for _, phase in eng._graphs}
    assert torch.equal(outs[False], outs[True])


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_audio_delay_steps_equals_the_tts_audio_hook(tts_model, graphs, monkeypatch):
    """``audio_delay_steps=d`` keeps each codebook's audio at -1 until the row's offset reaches its delay + d, on the
    device inside the step (a text hook alone then leaves the depth transformer and the commit one graph): the tokens
    of an ``on_audio`` hook doing the same (the TTS runtime's former hook)."""
    d, dq = 3, tts_model.cfg.dep_q
    start = torch.tensor(tts_model.cfg.delays[1 : 1 + dq]) + d
    outs = []
    for option in (False, True):
        eng = _graph_engine(tts_model, "emulated", monkeypatch, graphs, max_slots=2, temp=0.6, temp_text=0.6,
                            **({"audio_delay_steps": d} if option else {}))  # fmt: skip
        eng.open(seed=1), eng.open(seed=2)

        def hook(audio, eng=eng):
            audio.masked_fill_(eng.state.offsets[:2, None] < start[None], -1)

        outs.append(torch.stack([eng.step(on_text=lambda t: None, **({} if option else {"on_audio": hook})).tokens
                                 .clone() for _ in range(12)]))  # fmt: skip
        if graphs and option:
            assert "depth_commit" in {phase for _, phase in eng._graphs}
    assert torch.equal(outs[0], outs[1])
    audio = outs[0][..., 1:]
    assert (audio == -1).any() and (audio >= 0).any()  # both sides of the delay reached


@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_cuda_graph_audio_hook_leaves_replace_tokens_alone(tts_model, mode, monkeypatch):
    """An ``on_audio`` hook edits the step's audio, not the caller's ``depformer_replace_tokens`` (eager clones it):
    a replace tensor reused across steps gives the same tokens under graphs as eagerly."""
    dev = "cuda" if mode == "cuda" else "cpu"
    outs = {}
    for graphs in (False, True):
        eng = _graph_engine(tts_model, mode, monkeypatch, graphs, max_slots=2, buckets=(2,), temp=0.6)
        eng.open(seed=1), eng.open(seed=2)
        replace = torch.full((2, tts_model.cfg.dep_q), 3, dtype=torch.long, device=dev)
        toks = [eng.step(depformer_replace_tokens=replace, on_audio=lambda a: a.add_(1)).tokens.clone()
                for _ in range(6)]
        assert replace.eq(3).all(), replace
        outs[graphs] = torch.stack(toks)
    assert torch.equal(outs[False], outs[True])


def test_bad_replace_tokens_change_nothing(tts_model):
    """A ``depformer_replace_tokens`` of the wrong size is refused before the step takes pages or runs."""
    eng = Engine(tts_model, max_slots=4, buckets=(4,), use_sampling=False)
    eng.open(), eng.open()
    dq = tts_model.cfg.dep_q
    for rows, cols in ((2, dq), (4, dq - 1), (8, dq)):
        with pytest.raises(ValueError, match="depformer_replace_tokens"):
            eng.step(depformer_replace_tokens=torch.full((rows, cols), -1))
    assert eng.pool.used == 0 and eng.state.positions.tolist() == [0] * 4
    eng.step(depformer_replace_tokens=torch.full((4, dq), -1, dtype=torch.int32))  # rows [0, bucket), any int dtype
    assert [eng.slots[s].position for s in (0, 1)] == [1, 1]


def test_buckets_must_fit_max_slots(stt_model):
    """A bucket above ``max_slots`` would be chosen for the top slots with only ``max_slots`` rows behind it."""
    for buckets in ((2, 8), (0, 4), (2,)):
        with pytest.raises(ValueError, match="buckets"):
            Engine(stt_model, max_slots=4, buckets=buckets)


def test_a_slot_opened_between_steps_stays_frozen_until_it_is_stepped(stt_model):
    """A step uploads the exec mask only when its active set changes; open() turns the new slot's row on, so the
    next step must upload it again even with the same active set, or the new slot would run without being asked."""
    eng = Engine(stt_model, max_slots=3, buckets=(3,), use_sampling=False)
    a = eng.open()
    inputs = torch.zeros(3, 32, dtype=torch.long)
    for _ in range(2):  # the second step reuses the uploaded mask
        eng.step(inputs, active=[a])
    b = eng.open()
    eng.step(inputs, active=[a])
    assert eng.state.positions.tolist()[: b + 1] == [3, 0] and eng.state.offsets.tolist()[b] == 0
    eng.step(inputs, active=[a, b])
    eng.close(a)
    eng.step(inputs, active=[b])
    assert eng.state.positions.tolist()[b] == eng.slots[b].position == 2


@pytest.mark.gpu
def test_steps_queued_without_sync_keep_their_exec_masks(stt_model):
    """Two steps queued behind a busy GPU with different active slots: each runs on its own exec mask (the host
    buffer of the first one's mask copy must not be refilled by the second step before that copy runs)."""
    eng = Engine(stt_model.to("cuda"), max_slots=2, buckets=(2,), use_sampling=False)
    a, b = eng.open(), eng.open()
    inputs = torch.zeros(2, 32, dtype=torch.long, device="cuda")
    for _ in range(3):  # eager call, capture, replay
        eng.step(inputs)
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # the host queues both steps long before the device reaches them
    eng.step(inputs, active=[a, b])
    eng.step(inputs, active=[a])
    assert eng.state.positions.tolist() == [eng.slots[a].position, eng.slots[b].position] == [5, 4]


def test_warm_up_captures_every_bucket_and_changes_no_output(tts_model, monkeypatch):
    """After ``warm_up`` every bucket's plain and text-only phases are captured (emulated graphs), no page or slot is
    held, and a stream samples exactly what it samples on an engine that was never warmed up."""

    def run(warm):
        eng = _graph_engine(tts_model, "emulated", monkeypatch, True, max_slots=4, temp=0.6, temp_text=0.6)
        if warm:
            eng.warm_up()
            captured = {key for key, g in eng._graphs.items() if isinstance(g, EmulatedGraph) and g.calls >= 2}
            phases = ("step", "text", "depth_commit", "commit_audio")  # commit_audio: the text-only steps
            assert {(b, p) for b in eng.buckets for p in phases} <= captured, captured
            assert eng.pool.used == 0 and eng.num_open == 0
        slot = eng.open(seed=9)
        silent = torch.full((1, tts_model.cfg.dep_q), -1, dtype=torch.long)
        return torch.stack([eng.step(depformer_replace_tokens=silent if t < 3 else None).tokens[slot].clone()
                            for t in range(8)])  # fmt: skip

    assert torch.equal(run(True), run(False))
    # a runtime that takes one path captures only its graphs: the TTS runtime (every step hooked), the STT one
    for kw, absent, present in (({"plain": False}, "step", "text"), ({"hooked": False}, "depth_commit", "step")):
        eng = _graph_engine(tts_model, "emulated", monkeypatch, True, max_slots=2, temp=0.6)
        eng.warm_up(**kw)
        phases = {phase for _, phase in eng._graphs}
        assert present in phases and absent not in phases, (kw, phases)
    with pytest.raises(RuntimeError, match="idle"):
        eng = _graph_engine(tts_model, "emulated", monkeypatch, True, max_slots=2, temp=0.6)
        eng.open()
        eng.warm_up()
