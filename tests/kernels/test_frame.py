"""Delayed-stream bookkeeping ops (frame_inputs, frame_commit, kv_slots, Mimi's mimi_rows): every backend against its
reference op on fresh random states. Integer ops: results, and the in-place updates of the cache and offsets, must be
identical."""

import numpy as np
import pytest
import torch

from dsm_kernels import reference, resolve
from dsm_kernels.testing import aot_compile, aot_script_main, kernel_device, poison_, strided

BACKENDS = [pytest.param("triton"), pytest.param("cuda", marks=pytest.mark.gpu)]


def _state(B, K, CT, max_delay, seed):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randint(-2, 3000, (B, K, CT), generator=g)
    # offsets around the delays (initial tokens on, off) and far past the ring length
    offsets = torch.randint(0, 3 * CT + max_delay + 2, (B,), generator=g)
    offsets[0] = 0
    ex = torch.rand(B, generator=g) < 0.7
    ex[0] = True
    return g, cache, offsets, ex


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,K,n_gen,delays,inputs", [
    (5, 33, 1, [0] + [6] * 32, True),  # STT-like: text + 32 input streams, delay 6 (CT = max_delay + 2 = 8)
    (4, 33, 1, [0] * 33, True),  # all delays 0: write and read hit the same cell
    (3, 33, 33, [0, 0] + [2] * 31, False),  # TTS-like: everything generated
    (6, 5, 2, [0, 1, 2, 4, 4], True),
])  # fmt: skip
def test_frame_inputs(backend, B, K, n_gen, delays, inputs):
    dev = kernel_device(backend)
    max_delay = max(delays)
    CT = max_delay + 2
    g, cache, offsets, ex = _state(B, K, CT, max_delay, seed=B * 31 + K)
    delays_t = torch.tensor(delays)
    initial = torch.randint(3000, 4000, (K,), generator=g)
    tok = torch.randint(0, 2048, (B, K - n_gen), generator=g) if inputs else None
    exp_cache = cache.clone()
    exp = reference.frame_inputs_ref(exp_cache, offsets, ex, delays_t, initial, tok, n_gen)

    got_cache = cache.to(dev)
    move = (lambda t: None if t is None else t.to(dev))  # noqa: E731
    got = resolve("frame_inputs", backend, dev)(got_cache, offsets.to(dev), ex.to(dev), delays_t.to(dev),
                                                 initial.to(dev), move(tok), n_gen)  # fmt: skip
    assert torch.equal(got.cpu(), exp)
    assert torch.equal(got_cache.cpu(), exp_cache)
    assert (exp == initial[None]).any() and (exp != initial[None]).any()  # both cases exercised


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,K,dq,delays", [
    (5, 33, 0, [0] + [6] * 32),
    (4, 33, 32, [0, 0] + [2] * 31),
    (3, 9, 8, [0, 3] + [3] * 7),  # max delay == delay: read the cell written this step
    (7, 5, 4, [0, 0, 2, 2, 2]),
])  # fmt: skip
def test_frame_commit(backend, B, K, dq, delays):
    dev = kernel_device(backend)
    max_delay = max(delays)
    CT = max_delay + 2
    g, cache, offsets, ex = _state(B, K, CT, max_delay, seed=B * 7 + dq)
    delays_t = torch.tensor(delays)
    text = torch.randint(0, 8000, (B,), generator=g)
    audio = torch.randint(-1, 2048, (B, dq), generator=g) if dq else None
    exp_cache, exp_off = cache.clone(), offsets.clone()
    exp = reference.frame_commit_ref(exp_cache, exp_off, ex, delays_t, text, audio, max_delay)

    got_cache, got_off = cache.to(dev), offsets.to(dev)
    got = resolve("frame_commit", backend, dev)(got_cache, got_off, ex.to(dev), delays_t.to(dev), text.to(dev),
                                                 None if audio is None else audio.to(dev), max_delay)  # fmt: skip
    assert torch.equal(got.cpu(), exp)
    assert torch.equal(got_cache.cpu(), exp_cache) and torch.equal(got_off.cpu(), exp_off)
    assert (exp == -2).any() and (exp != -2).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,pps,page_size", [(1, 24, 16), (9, 3, 16), (70, 12, 64)])
def test_kv_slots(backend, B, pps, page_size):
    dev = kernel_device(backend)
    g = torch.Generator().manual_seed(B + pps)
    bt = torch.randperm(B * pps + 5, generator=g)[: B * pps].view(B, pps).int()
    pos = torch.randint(0, 5 * pps * page_size, (B,), generator=g)
    write = torch.rand(B, generator=g) < 0.8
    write[0] = True
    exp_slot, exp_len = reference.kv_slots_ref(bt, pos, write, page_size)
    slot, lens = resolve("kv_slots", backend, dev)(bt.to(dev), pos.to(dev), write.to(dev), page_size)
    assert slot.dtype == exp_slot.dtype and lens.dtype == exp_len.dtype
    assert torch.equal(slot.cpu(), exp_slot) and torch.equal(lens.cpu(), exp_len)
    # advance: the same slots, the step's positions returned, the written rows' moved on by one in place
    moved = pos.clone().to(dev)
    if B > 1:
        write[1] = False  # a row not written keeps its position
    exp = reference.kv_slots_ref(bt, pos, write, page_size)
    got = resolve("kv_slots", backend, dev)(bt.to(dev), moved, write.to(dev), page_size, True)
    assert len(got) == 3 and torch.equal(got[2].cpu(), pos) and got[2].data_ptr() != moved.data_ptr()
    for x, e in zip(got[:2], exp, strict=True):
        assert torch.equal(x.cpu(), e)
    assert torch.equal(moved.cpu(), pos + write)
    strided = torch.zeros(2 * B, dtype=torch.long, device=dev)[::2]
    if backend == "reference":  # moves the view's elements on
        resolve("kv_slots", backend, dev)(bt.to(dev), strided, write.to(dev), page_size, True)
        assert torch.equal(strided.cpu(), write.long())
    else:  # a kernel reads positions at unit stride: it refuses rather than advance a copy
        with pytest.raises(ValueError, match="positions with stride 2 cannot be advanced"):
            resolve("kv_slots", backend, dev)(bt.to(dev), strided, write.to(dev), page_size, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,tokens,capacity,start", [(1, 2, 250, 0), (3, 1, 250, 0), (5, 4, 7, 0), (33, 2, 250, 0),
                                                     (6, 2, 250, 2**25 - 700)])  # days of a stream: fp32 rounds
def test_mimi_rows(backend, B, tokens, capacity, start, monkeypatch):
    """The rows' indices; their RoPE positions as moshi rounds them (``fp32(pos) + j`` in fp32: from 2**24 tokens on,
    7.8 days of a 25 Hz stream, not the exact ``pos + j`` converted once)."""
    dev = kernel_device(backend)
    g = torch.Generator().manual_seed(B * tokens)
    pos = start + torch.randint(0, 4 * capacity, (B,), generator=g)
    pos[0] = start + capacity - 1  # its tokens straddle the ring's wrap
    live = torch.rand(B, generator=g) < 0.7
    live[0] = True
    # the specification, row by row
    rows = [(b, j) for b in range(B) for j in range(tokens)]
    p = [int(pos[b]) + j for b, j in rows]
    rope = [int(np.float32(int(pos[b])) + np.float32(j)) for b, j in rows]
    assert (rope != p) == (start > 0)  # the large positions have some that round apart
    spec = (rope, [b * capacity + x % capacity if live[b] else -1 for (b, _), x in zip(rows, p, strict=True)],
            [x + 1 for x in p], [x + tokens - capacity - j for (_, j), x in zip(rows, p, strict=True)])
    exp = reference.mimi_rows_ref(pos, live, tokens, capacity)
    assert [t.tolist() for t in exp] == [list(v) for v in spec]
    real_empty = torch.empty  # poisoned outputs: a store the kernel misses shows

    def poisoned(*args, **kw):
        return real_empty(*args, **kw).fill_(-7)

    monkeypatch.setattr(torch, "empty", poisoned)
    got = resolve("mimi_rows", backend, dev)(pos.to(dev), live.to(dev), tokens, capacity)
    monkeypatch.undo()
    for x, e in zip(got, exp, strict=True):
        assert x.dtype == e.dtype and torch.equal(x.cpu(), e)
    # advance: the same rows, then the active streams' positions moved on by tokens (paused ones kept)
    moved = pos.clone().to(dev)
    got = resolve("mimi_rows", backend, dev)(moved, live.to(dev), tokens, capacity, True)
    for x, e in zip(got, exp, strict=True):
        assert torch.equal(x.cpu(), e)
    assert torch.equal(moved.cpu(), pos + tokens * live)
    with pytest.raises(ValueError, match="pos with stride 2 cannot be advanced"):
        resolve("mimi_rows", backend, dev)(torch.zeros(2 * B, dtype=torch.long, device=dev)[::2], live.to(dev),
                                           tokens, capacity, True)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_slots_strided_block_table(backend):
    dev = kernel_device(backend)
    bt = torch.arange(12, dtype=torch.int32).view(4, 3).t().contiguous().t()  # column-major: stride (1, 4)
    pos, write = torch.tensor([0, 5, 9, 2]), torch.ones(4, dtype=torch.bool)
    exp = reference.kv_slots_ref(bt, pos, write, 4)[0]
    assert exp.tolist() == [0, 17, 33, 38]
    got = resolve("kv_slots", backend, dev)(bt.to(dev), pos.to(dev), write.to(dev), 4)[0]
    assert torch.equal(got.cpu(), exp)


def test_triton_takes_strided_vectors():
    """[B] and [K] vectors as strided or expanded views (the checks and the reference take any layout): the Triton
    kernels read them at unit stride, so they must get them so, and frame_commit's offsets reach the caller's view."""
    dev = kernel_device("triton")
    B, K, CT = 3, 4, 5
    g = torch.Generator().manual_seed(5)
    bt = torch.randperm(14, generator=g)[:12].view(B, 4).to(dev)
    pos, write = torch.tensor([5, 17, 40], device=dev), torch.tensor([True, False, True], device=dev)
    every = torch.ones((), dtype=torch.bool, device=dev).expand(B)
    for p, w in ((strided(pos, 0), strided(write, False)), (pos, every)):
        got, exp = resolve("kv_slots", "triton", dev)(bt, p, w, 4), reference.kv_slots_ref(bt, p, w, 4)
        assert all(torch.equal(a, b) for a, b in zip(got, exp, strict=True)), (got, exp)
    cache = torch.randint(0, 100, (B, K, CT), generator=g).to(dev)
    offsets, ex = torch.tensor([3, 7, 12], device=dev), torch.tensor([True, True, False], device=dev)
    delays, initial = torch.tensor([0, 2, 1, 3], device=dev), torch.tensor([9, 8, 7, 6], device=dev)
    inp = torch.randint(0, 50, (B, 2), generator=g).to(dev)
    args = (strided(offsets, 0), strided(ex, False), strided(delays, 0), strided(initial, 0))
    c1, c2 = cache.clone(), cache.clone()
    got = resolve("frame_inputs", "triton", dev)(c1, *args, inp, 2)
    assert torch.equal(got, reference.frame_inputs_ref(c2, *args, inp, 2)) and torch.equal(c1, c2)
    text, audio = torch.tensor([1, 2, 3], device=dev), torch.randint(0, 50, (B, 2), generator=g).to(dev)
    (c1, o1), (c2, o2) = [(cache.clone(), strided(offsets, 0)) for _ in range(2)]
    rest = (strided(ex, False), strided(delays, 0), strided(text, 0), audio, 3)
    got = resolve("frame_commit", "triton", dev)(c1, o1, *rest)
    exp = reference.frame_commit_ref(c2, o2, *rest)
    assert torch.equal(got, exp) and torch.equal(c1, c2) and torch.equal(o1, o2), (got, exp, o1, o2)


@pytest.mark.gpu
@pytest.mark.parametrize("tts", [False, True], ids=["stt", "tts"])
def test_cuda_frame_embed_real_shapes_and_graph_replay(tts):
    """On the GPU at the models' shapes (64 rows, 33 streams, d = 2048 bf16: 8 programs a row running at once, only
    the first writing the row's bookkeeping), replayed from a CUDA graph over three steps: the ring, column, slots
    and positions exactly as the reference's, the embedding within one bf16 ulp of the fp32 sum."""
    from dsm_kernels.testing import bf16_ulp, frame_embed_fp32, frame_embed_inputs

    ref = frame_embed_inputs(64, 2048, tts=tts, vt=8001, seed=5)
    dev = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in ref.items()}
    g = torch.Generator().manual_seed(6)
    graph, out = None, None
    for i in range(3):
        if not tts:  # this step's audio codes
            ref["input_tokens"] = torch.randint(0, 2049, ref["input_tokens"].shape, generator=g)
            dev["input_tokens"].copy_(ref["input_tokens"])
        if i == 0:  # eager (and compiled); then captured, which records without running
            got = resolve("frame_embed", "cuda", "cuda")(**dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = resolve("frame_embed", "cuda", "cuda")(**dev)
        else:
            graph.replay()
            got = out
        exp = reference.frame_embed_ref(**ref)
        got = [t.cpu() for t in got]
        for name, a, b in zip(("tokens", "slot", "seq_lens", "before"), got[1:], exp[1:], strict=True):
            assert torch.equal(a, b), (i, name)
        assert torch.equal(dev["cache"].cpu(), ref["cache"]) and torch.equal(dev["positions"].cpu(), ref["positions"])
        exp32 = frame_embed_fp32(ref, exp[1])
        assert ((got[0].float() - exp32).abs() <= bf16_ulp(exp32)).all(), i
        ref["offsets"] += ref["exec_mask"].long()  # the commit's advance between steps (frame_commit's job)
        dev["offsets"].copy_(ref["offsets"])


def test_triton_aot_compiles_for_sm90(aot_output):
    out = aot_output(__file__)
    assert out.count("cubin") == 8 and out.count("0 local memory ops") == 2, out


def _aot() -> None:
    from dsm_kernels.frame import _frame_commit_kernel, _frame_embed_kernel, _frame_inputs_kernel, _kv_slots_kernel
    from dsm_kernels.mimi_kernels import _mimi_rows_kernel
    from dsm_kernels.testing import local_memory_ops

    i64 = "*i64"
    ring = {"cache_ptr": i64, "off_ptr": i64, "ex_ptr": "*i1", "delay_ptr": i64, "out_ptr": i64}
    cases = [
        (_frame_inputs_kernel, dict(ring, init_ptr=i64, tok_ptr=i64), {"HAS_INPUT": True, "BLOCK_K": 64}),
        (_frame_inputs_kernel, dict(ring, init_ptr=i64, tok_ptr=i64), {"HAS_INPUT": False, "BLOCK_K": 64}),
        (_frame_commit_kernel, dict(ring, text_ptr=i64, audio_ptr=i64), {"HAS_AUDIO": True, "BLOCK_K": 64}),
        (_frame_commit_kernel, dict(ring, text_ptr=i64, audio_ptr=i64), {"HAS_AUDIO": False, "BLOCK_K": 1}),
        (_kv_slots_kernel, {"bt_ptr": "*i32", "pos_ptr": i64, "write_ptr": "*i1", "slot_ptr": i64, "len_ptr": "*i32",
                            "before_ptr": i64}, {"ADVANCE": True, "BLOCK": 1024}),
        (_mimi_rows_kernel, {"pos_ptr": i64, "exec_ptr": "*i1", "positions_ptr": i64, "slots_ptr": i64,
                             "lens_ptr": "*i32", "starts_ptr": "*i32"}, {"ADVANCE": True, "BLOCK": 4}),
    ]  # fmt: skip
    for kernel, types, consts in cases:
        cc = aot_compile(kernel, types, consts, num_warps=1)
        assert "sm_90" in cc.asm["ptx"]
        print(f"{kernel.fn.__name__}: {len(cc.asm['cubin'])} B cubin")
    # frame_embed at the STT (33 streams, 32 of them input) and TTS (all generated, demultiplexed text, a condition)
    # layouts, bf16 tables, as launched (256 columns a program, 2 warps)
    bf16 = "*bf16"
    types = dict(ring, init_ptr=i64, in_ptr=i64, text_ptr=bf16, text2_ptr=bf16, audio_ptr=bf16, cond_ptr=bf16,
                 bt_ptr="*i32", pos_ptr=i64, tok_ptr=i64, slot_ptr=i64, len_ptr="*i32", before_ptr=i64, out_ptr=bf16)
    for consts in ({"K": 33, "N_GEN": 1, "HAS_INPUT": True, "HAS_TEXT2": False, "HAS_COND": False, "BLOCK_D": 256},
                   {"K": 33, "N_GEN": 33, "HAS_INPUT": False, "HAS_TEXT2": True, "HAS_COND": True, "BLOCK_D": 256}):
        cc = aot_compile(_frame_embed_kernel, types, consts, num_warps=2)
        print(f"_frame_embed_kernel: {len(cc.asm['cubin'])} B cubin, {local_memory_ops(cc.asm['cubin'])} local "
              "memory ops")


if __name__ == "__main__":
    aot_script_main(_aot, __file__)


def _embed_tables(K, D, Vt, Va, dtype, g):
    text = (torch.randn(Vt, D, generator=g) * 0.5).to(dtype)
    audio = (torch.randn(K - 1, Va, D, generator=g) * 0.5).to(dtype)
    return text, audio


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["stt", "tts", "same-cell", "fp32-odd-D"])
def test_frame_embed(backend, case):
    """frame_embed = frame_inputs + multistream_embed + kv_slots (advanced) in one launch: the ring, the input
    column, the slots, sequence lengths, RoPE positions and the advanced positions exactly as the reference; the
    embedding as multistream_embed (fp32: equal; bf16: within one bf16 ulp of the fp32 sum). Several programs per
    row (a narrow block of columns), of which only the first may write the row's bookkeeping."""
    dev = kernel_device(backend)
    g = torch.Generator().manual_seed(hash(case) % 1000)
    B, K, n_gen, delays, D, dtype, text2, cond, inputs = {
        "stt": (5, 33, 1, [0] + [6] * 32, 64, torch.bfloat16, False, False, True),
        "tts": (4, 33, 33, [0, 0] + [2] * 31, 64, torch.bfloat16, True, True, False),
        "same-cell": (3, 9, 1, [0] * 9, 32, torch.bfloat16, False, False, True),  # delay % ring == 0
        "fp32-odd-D": (6, 5, 2, [0, 1, 2, 4, 4], 40, torch.float32, False, True, True),
    }[case]
    CT = max(delays) + 2
    _, cache, offsets, ex = _state(B, K, CT, max(delays), seed=B * 7 + K)
    ex[-1] = False  # a row that does not execute: no ring write, no K/V slot, its position kept
    Vt, Va = 40, 30
    cache = cache.clamp(-1, min(Vt, Va) - 1)  # ids the tables have (-1: no embedding)
    delays_t = torch.tensor(delays)
    initial = torch.randint(0, min(Vt, Va), (K,), generator=g)
    if text2:  # demultiplexed text ids (first + (second + 1) * Vt) in column 0
        cache[:, 0] = torch.randint(-1, Vt * (Vt + 1), (B, CT), generator=g)
    tok = torch.randint(0, Va, (B, K - n_gen), generator=g) if inputs else None
    text, audio = _embed_tables(K, D, Vt, Va, dtype, g)
    t2 = _embed_tables(K, D, Vt, Va, dtype, g)[0] if text2 else None
    c = torch.randn(B, D, generator=g).to(dtype) if cond else None
    bt = torch.randint(0, 50, (B, 3), generator=g, dtype=torch.int32)
    pos = torch.randint(0, 200, (B,), generator=g)
    exp_cache, exp_pos = cache.clone(), pos.clone()
    exp = reference.frame_embed_ref(exp_cache, offsets, ex, delays_t, initial, tok, n_gen, text, audio, bt, exp_pos,
                                    16, text_table2=t2, cond=c)  # fmt: skip
    exp32 = reference.multistream_embed_ref(exp[1], text.float(), audio.float(),
                                            text_table2=None if t2 is None else t2.float(),
                                            cond=None if c is None else c.float())  # fmt: skip

    def move(t):
        return None if t is None else t.to(dev)

    got_cache, got_pos = cache.to(dev), pos.to(dev)
    kw = {"block_d": 16} if backend == "triton" else {}
    out = poison_(torch.empty(B, D, dtype=dtype, device=dev))
    got = resolve("frame_embed", backend, dev)(got_cache, move(offsets), move(ex), move(delays_t), move(initial),
                                               move(tok), n_gen, move(text), move(audio), move(bt), got_pos, 16,
                                               text_table2=move(t2), cond=move(c), out=out, **kw)  # fmt: skip
    assert got[0] is out
    got = [t.cpu() for t in got]
    for name, a, b in zip(("tokens", "slot", "seq_lens", "before"), got[1:], exp[1:], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(got_cache.cpu(), exp_cache) and torch.equal(got_pos.cpu(), exp_pos)
    assert got[0].dtype == dtype and not got[0].isnan().any()
    if dtype == torch.float32:
        torch.testing.assert_close(got[0], exp32, atol=1e-6, rtol=1e-6)
    else:
        from dsm_kernels.testing import bf16_ulp

        assert ((got[0].float() - exp32).abs() <= bf16_ulp(exp32)).all()
    assert (exp[2] == -1).any() and (exp[2] >= 0).any()  # inactive and active rows both exercised
