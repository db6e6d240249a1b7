"""Condition pages: the TTS voice cross-attention K/V in a shared, content-keyed page pool (dsm.engine)."""

from __future__ import annotations

import random

import pytest
import torch

from dsm.bench import _random_conditions, random_model
from dsm.conditioning import TensorInput, cross_page_keys
from dsm.engine import Engine, EngineFull, SharedPagePool
from dsm.generate import Generator
from dsm.presets import preset_config

PADDING_PAGES = 4  # one voice in the first of 5 speaker slots: slots 1-4 are learnt padding


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return random_model(preset_config("tiny-tts"), "cpu", torch.float32, seed=4)[0]


def _voice(stream: int, model) -> dict:
    return _random_conditions(model, stream)


def _counting_cross_kv(model, monkeypatch) -> list[int]:
    calls = [0]
    real = model.cross_kv

    def counted(src):
        calls[0] += 1
        return real(src)

    monkeypatch.setattr(model, "cross_kv", counted)
    return calls


def _alone(model, stream: int, steps: int) -> list[torch.Tensor]:
    """z of each step of the stream with voice ``stream`` alone, its K/V in pages of its own (the generator)."""
    gen = Generator(model, use_sampling=False, support_out_of_sync=True)
    state = gen.init_state(1, _voice(stream, model))
    return [gen.step(state).z[0].clone() for _ in range(steps)]


def test_pool_counts_hits_caches_and_evicts_the_least_recent():
    pool = SharedPagePool(6)  # 5 pages + the null page
    a, fresh_a = pool.acquire([b"p0", b"p1", b"a"])
    assert 0 not in a and fresh_a == [True] * 3 and pool.used == 3
    b, fresh_b = pool.acquire([b"p0", b"p1", b"b"])
    assert b[:2] == a[:2] and b[2] not in a and fresh_b == [False, False, True] and pool.used == 4
    pool.release(a)
    assert pool.used == 3 and pool.cached == 1  # a's own page is kept under its key
    again, fresh = pool.acquire([b"p0", b"p1", b"a"])
    assert again == a and fresh == [False] * 3 and pool.cached == 0
    pool.release(again)
    pool.release(b)
    assert pool.used == 0 and pool.cached == 4
    c, fresh_c = pool.acquire([b"c0", b"c1", b"c2"])  # the free page, then the 2 least recently released
    assert fresh_c == [True] * 3 and set(c) == {5, a[2], a[0]}  # a's own page, then p0 (released before p1)
    assert pool.used == 3 and pool.cached == 2 and b[2] not in c  # "b" and "p1" were released last
    with pytest.raises(EngineFull, match="condition page pool exhausted"):
        pool.acquire([b"d0", b"d1", b"d2"])  # 2 cached pages can be freed, 3 are needed
    assert pool.used == 3 and pool.cached == 2  # all or nothing
    assert pool.acquire([b"p1", b"b"])[1] == [False, False]  # the survivors are still found


def test_pool_hits_are_never_evicted_by_the_same_acquire():
    pool = SharedPagePool(4)
    x, _ = pool.acquire([b"x"])
    y, _ = pool.acquire([b"y"])
    pool.release(x)
    pool.release(y)  # both cached, x oldest; 1 free page
    pages, fresh = pool.acquire([b"n1", b"n2", b"x"])  # the hit on x must not be the page n2 evicts
    assert fresh == [True, True, False] and pages[2] == x[0] and y[0] in pages[:2]


def test_pool_forget_drops_unwritten_content():
    pool = SharedPagePool(4)
    pages, fresh = pool.acquire([b"k", None])
    pool.release(pages, forget=fresh)
    assert pool.used == 0 and pool.cached == 0
    _, fresh = pool.acquire([b"k"])
    assert fresh == [True]  # not found again: its content was never written


def test_page_keys(model):
    prov, fuser = model.condition_provider, model.cfg.fuser
    a, a2, b = _voice(1, model), _voice(1, model), _voice(2, model)
    ka, kb = cross_page_keys(prov, fuser, a, 125), cross_page_keys(prov, fuser, b, 125)
    assert len(ka) == 5 and ka == cross_page_keys(prov, fuser, a2, 125)
    assert ka[0] != kb[0] and ka[1:] == kb[1:]  # one voice each; the padding slots are equal
    assert len(set(ka)) == 5  # the padding slots differ by position (positional embedding)
    # the same voice in the second speaker slot is other source rows (other positions)
    t, m = a["speaker_wavs"].tensor.clone(), a["speaker_wavs"].mask.clone()
    t[:, 125:250], m[:, 125:250] = t[:, :125], True
    two = dict(a, speaker_wavs=TensorInput(t, m))
    k2 = cross_page_keys(prov, fuser, two, 125)
    assert k2[0] == ka[0] and k2[1] != ka[1] and k2[2:] == ka[2:]
    # a masked row is padding whatever its values, but a mask bit alone changes the key
    m3 = m.clone()
    m3[0, 300] = True
    assert cross_page_keys(prov, fuser, dict(two, speaker_wavs=TensorInput(t, m3)), 125)[2] != k2[2]
    t4 = t.clone()
    t4[0, 400] = float("nan")  # a masked NaN row is a NaN source row (padding * 1 + NaN * 0): not the padding page
    assert cross_page_keys(prov, fuser, dict(two, speaker_wavs=TensorInput(t4, m)), 125)[3] != k2[3]
    assert cross_page_keys(prov, fuser, dict(a, cfg=["3.0"]), 125) == ka  # sum conditions are not in the pages
    on_device = dict(a, speaker_wavs=TensorInput(t.to("meta"), m.to("meta")))
    assert cross_page_keys(prov, fuser, on_device, 125) is None


def _schedule(model, steps: int) -> tuple[Engine, dict[int, list[torch.Tensor]]]:
    """Voices 1, 2, 1 opened at steps 0, 2, 4 of one engine: z of every step of each stream, by slot."""
    eng = Engine(model, max_slots=4, use_sampling=False)
    got: dict[int, list[torch.Tensor]] = {}
    for t in range(steps):
        if t in (0, 2, 4):
            got[eng.open(_voice({0: 1, 2: 2, 4: 1}[t], model))] = []
        out = eng.step()
        for slot, zs in got.items():
            zs.append(out.z[slot].clone())
    return eng, got


def test_streams_share_padding_and_voices_and_equal_private_pages(model, monkeypatch):
    """4 padding pages + one page per distinct voice for voices 1, 2, 1; every stream's temporal output is
    bit-identical to the same schedule with no page shared (batch shapes equal, so no rounding differs)."""
    monkeypatch.setattr("dsm.engine.cross_page_keys", lambda *a: None)  # every stream: pages of its own
    private, want = _schedule(model, 8)
    assert private.cross_pool.used == 3 * 5
    monkeypatch.undo()
    calls = _counting_cross_kv(model, monkeypatch)
    eng, got = _schedule(model, 8)
    assert calls[0] == 2  # the third stream found every page of voice 1
    assert eng.cross_pool.used == PADDING_PAGES + 2
    for slot, zs in got.items():
        assert all(torch.equal(g, r) for g, r in zip(zs, want[slot], strict=True)), slot
    assert not torch.equal(got[0][-1], got[1][-1])  # the voice matters: a mixed-up page would show
    for slot in list(eng.slots):
        eng.close(slot)
    assert eng.cross_pool.used == 0 and eng.cross_pool.cached == PADDING_PAGES + 2


def test_a_stream_alone_equals_the_generator(model):
    """One open stream (bucket 1) through the shared pool against the generator's private pages: bit-identical."""
    ref = _alone(model, 2, 5)
    eng = Engine(model, max_slots=4, use_sampling=False)
    eng.open(_voice(1, model))
    eng.close(0)  # voice 1's pages stay cached; voice 2 shares its padding pages
    slot = eng.open(_voice(2, model))
    assert all(torch.equal(eng.step().z[slot], r) for r in ref)


def test_a_cached_voice_is_reused_and_an_evicted_one_recomputed(model, monkeypatch):
    steps = 4
    ref = {v: _alone(model, v, steps) for v in (1, 2, 3)}
    calls = _counting_cross_kv(model, monkeypatch)
    eng = Engine(model, max_slots=2, cross_pages=1 + PADDING_PAGES + 2, use_sampling=False)

    def run(voice):
        slot = eng.open(_voice(voice, model))
        zs = [eng.step().z[slot].clone() for _ in range(steps)]
        eng.close(slot)
        assert all(torch.equal(g, r) for g, r in zip(zs, ref[voice], strict=True)), voice

    run(1)
    run(2)
    assert calls[0] == 2 and eng.cross_pool.cached == PADDING_PAGES + 2
    run(1)  # cached: nothing computed
    assert calls[0] == 2
    run(3)  # the pool is full: evicts voice 2's page (released before voice 1's)
    assert calls[0] == 3
    run(1)
    assert calls[0] == 3
    run(2)  # evicted: computed again, with the same outputs
    assert calls[0] == 4


def test_a_full_condition_pool_refuses_a_stream_and_changes_nothing(model):
    steps = 5
    ref = _alone(model, 1, steps)
    eng = Engine(model, max_slots=3, cross_pages=1 + PADDING_PAGES + 1, use_sampling=False)
    slot = eng.open(_voice(1, model))
    zs = [eng.step().z[slot].clone()]
    with pytest.raises(EngineFull, match="cross_pages"):
        eng.open(_voice(2, model))
    assert sorted(eng.slots) == [slot] and eng.cross_pool.used == PADDING_PAGES + 1
    zs += [eng.step().z[slot].clone() for _ in range(steps - 1)]
    assert all(torch.equal(g, r) for g, r in zip(zs, ref, strict=True))
    second = eng.open(_voice(1, model))  # the same voice still fits: it takes no new page
    assert second != slot and eng.cross_pool.used == PADDING_PAGES + 1


def test_a_failed_condition_write_leaves_no_stale_page(model, monkeypatch):
    eng = Engine(model, max_slots=2, use_sampling=False)
    real = model.cross_kv

    def broken(src):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(model, "cross_kv", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        eng.open(_voice(1, model))
    assert not eng.slots and eng.cross_pool.used == 0 and eng.cross_pool.cached == 0
    monkeypatch.setattr(model, "cross_kv", real)
    slot = eng.open(_voice(1, model))
    assert torch.equal(eng.step().z[slot], _alone(model, 1, 1)[0])


def test_a_source_of_another_length_is_refused(model):
    eng = Engine(model, max_slots=2, use_sampling=False)
    eng.open(_voice(1, model))
    short = _voice(2, model)
    sw = short["speaker_wavs"]
    short["speaker_wavs"] = TensorInput(sw.tensor[:, :250], sw.mask[:, :250])
    with pytest.raises(ValueError, match="250 positions.*625"):
        eng.open(short)
    assert len(eng.slots) == 1 and eng.cross_pool.used == PADDING_PAGES + 1


def test_churn_leaks_no_page_and_keeps_a_long_stream_intact(model):
    """500 random opens and closes over 6 voices on a pool that must evict, around one stream that stays open: its
    outputs stay those it has alone, and the reference counts always equal the open streams' distinct pages."""
    rng = random.Random(0)
    eng = Engine(model, max_slots=4, cross_pages=1 + PADDING_PAGES + 3, use_sampling=False)
    keeper = eng.open(_voice(1, model))
    ref = _alone(model, 1, 12)
    zs, refused = [], 0
    for op in range(500):
        others = [s for s in eng.slots if s != keeper]
        if others and (rng.random() < 0.5 or len(eng.slots) == eng.max_slots):
            eng.close(rng.choice(others))
        else:
            try:
                eng.open(_voice(rng.randrange(2, 8), model))
            except EngineFull:
                refused += 1
        pages = {p for s in eng.slots.values() for p in s.cross_pages}
        assert eng.cross_pool.used == len(pages)
        if op % 45 == 0:
            zs.append(eng.step(active=[keeper]).z[keeper].clone())
    assert refused  # the pool was too small for some mixes: those opens were refused
    assert all(torch.equal(g, r) for g, r in zip(zs, ref, strict=True))
    for slot in list(eng.slots):
        eng.close(slot)
    assert eng.cross_pool.used == 0
    table = eng.state.cross.block_table
    assert not table.any()  # closed rows point at the null page


@pytest.mark.parametrize("mode", [pytest.param("emulated"), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_graphs_see_condition_pages_change_under_them(model, mode, monkeypatch):
    """Under CUDA graphs (or the CPU emulation of their address semantics) streams with voices join, leave and
    reuse a slot with another voice between replays: the captured steps read the new page tables, so every step
    equals the eager engine's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_engine import _graph_engine

    events = {0: ("open", 1), 2: ("open", 2), 5: ("close", 0), 6: ("open", 3), 9: ("open", 1)}
    outs = {}
    for graphs in (False, True):
        eng = _graph_engine(model, mode, monkeypatch, graphs, max_slots=4, buckets=(4,), use_sampling=False)
        zs = []
        for t in range(12):
            if t in events:
                what, arg = events[t]
                eng.open(_voice(arg, model)) if what == "open" else eng.close(arg)
            out = eng.step()
            zs.append(torch.stack([out.z[s] for s in sorted(eng.slots)]).float().cpu())
        outs[graphs] = zs
        monkeypatch.undo()
    for zs in outs.values():
        assert not torch.equal(zs[6][0], zs[0][0])  # slot 0's new stream, voice 3: not voice 1's first step
        assert torch.equal(zs[9][2], zs[0][0])  # voice 1 again, in slot 2, from its cached pages
    assert all(torch.equal(a, b) for a, b in zip(outs[False], outs[True], strict=True))
