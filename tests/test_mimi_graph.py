"""GraphedMimiStep (the runtimes' Mimi step): replays equal eager steps, with resets and exec masks in between."""

import pytest
import torch

from dsm.mimi import Mimi, random_mimi_state_dict
from dsm.mimi_graph import GraphedMimiStep, mimi_buckets


def _run(mimi, graphed: bool, device, frames=6, B=3):
    g = torch.Generator().manual_seed(0)
    pcm = (0.1 * torch.randn(frames, B, 1, 1920, generator=g)).clamp(-1, 1).to(device)
    enc_state, dec_state = mimi.init_state(B), mimi.init_state(B)
    enc = GraphedMimiStep(mimi.encode_step, enc_state) if graphed else (lambda x: mimi.encode_step(x, enc_state))
    dec = GraphedMimiStep(mimi.decode_step, dec_state) if graphed else (lambda c: mimi.decode_step(c, dec_state))
    codes, out = [], []
    for t in range(frames):
        if t == 3:  # stream 1 restarts
            mask = torch.tensor([False, True, False], device=device)
            enc_state.reset(mask)
            dec_state.reset(mask)
        active = torch.tensor([t != 4, True, True], device=device)  # stream 0 pauses for a frame
        enc_state.set_exec_mask(active)
        dec_state.set_exec_mask(active)
        c = enc(pcm[t])
        codes.append(c.clone())
        out.append(dec(c).clone())
    return torch.stack(codes), torch.stack(out)


def test_eager_on_cpu_is_the_plain_step(mimi_sd):
    mimi = Mimi(mimi_sd)
    step = GraphedMimiStep(mimi.encode_step, mimi.init_state(3))
    assert not step.enabled
    codes, pcm = _run(mimi, graphed=True, device="cpu", frames=2)
    ref_codes, ref_pcm = _run(mimi, graphed=False, device="cpu", frames=2)
    assert torch.equal(codes, ref_codes) and torch.equal(pcm, ref_pcm)


@pytest.mark.gpu
def test_graph_replay_equals_eager_with_resets_and_pauses():
    mimi = Mimi(random_mimi_state_dict(0), device="cuda")
    codes, pcm = _run(mimi, graphed=True, device="cuda")
    ref_codes, ref_pcm = _run(mimi, graphed=False, device="cuda")
    assert torch.equal(codes[:, 1:], ref_codes[:, 1:])  # row 0's codes at its paused frame are garbage by contract
    assert torch.equal(codes[[0, 1, 2, 3, 5], 0], ref_codes[[0, 1, 2, 3, 5], 0])
    assert (pcm[[0, 1, 2, 3, 5]] - ref_pcm[[0, 1, 2, 3, 5]]).abs().max() <= 1e-5


def _run_prefixes(mimi, graphed: bool, device, warm: bool = False):
    """Rows [0, 3) of a 6-row state for 3 frames (row 1 paused at the second; on a GPU 3 rows take the transformers'
    torch path, whose scratch row is row 3), then row 3 opens and rows [0, 4) step: the runtimes' buckets. Returns
    the codes and PCM of the rows with a stream, per frame."""
    g = torch.Generator().manual_seed(1)
    pcm = (0.1 * torch.randn(6, 4, 1, 1920, generator=g)).clamp(-1, 1).to(device)
    enc_state, dec_state = mimi.init_state(6), mimi.init_state(6)
    if graphed:
        enc, dec = GraphedMimiStep(mimi.encode_step, enc_state), GraphedMimiStep(mimi.decode_step, dec_state)
        if warm:
            enc.warm_up(pcm[0, :1], [3, 4])
            dec.warm_up(torch.zeros(1, mimi.n_q, 1, dtype=torch.long, device=device), [3, 4])
    else:
        enc, dec = (lambda x: mimi.encode_step(x, enc_state.rows(x.shape[0]))), (
            lambda c: mimi.decode_step(c, dec_state.rows(c.shape[0])))
    out = []
    for t in range(6):
        n = 3 if t < 3 else 4
        if t == 3:
            opened = torch.arange(6, device=device) == 3
            enc_state.reset(opened)
            dec_state.reset(opened)
        active = torch.tensor([True, t != 1, True, t >= 3, False, False], device=device)
        enc_state.set_exec_mask(active)
        dec_state.set_exec_mask(active)
        c = enc(pcm[t, :n])
        y = dec(c)
        rows = active[:n].nonzero()[:, 0]
        out.append((c[rows].clone(), y[rows].clone()))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("warm", [False, True])
def test_graph_replay_of_row_prefixes_equals_eager(warm):
    """One graph per row count over views of one state (captured on first use, or beforehand by ``warm_up``, which
    must leave the state as it found it): replays equal eager steps on the same views."""
    mimi = Mimi(random_mimi_state_dict(0), device="cuda")
    got, want = _run_prefixes(mimi, True, "cuda", warm), _run_prefixes(mimi, False, "cuda")
    for t, ((c, y), (c_ref, y_ref)) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(c, c_ref), t
        assert (y - y_ref).abs().max() <= 1e-5, t


def test_row_prefixes_on_cpu_equal_the_views_eager_steps(mimi_sd):
    mimi = Mimi(mimi_sd)
    for (c, y), (c_ref, y_ref) in zip(_run_prefixes(mimi, True, "cpu"), _run_prefixes(mimi, False, "cpu"),
                                      strict=True):
        assert torch.equal(c, c_ref) and torch.equal(y, y_ref)


def test_mimi_buckets():
    """Past every small-batch kernel path (the 12.5 Hz convs' columns are the rows), then steps of 64."""
    import dsm_kernels

    assert mimi_buckets(1) == (1,) and mimi_buckets(100) == (100,) and mimi_buckets(128) == (128,)
    assert mimi_buckets(200) == (128, 192, 200) and mimi_buckets(768)[-3:] == (640, 704, 768)
    assert mimi_buckets(768)[0] > dsm_kernels.CONV_GEMV_MAX_COLUMNS >= 2 * dsm_kernels.GEMV_MAX_B
    assert mimi_buckets(6, smallest=2, step=1) == (2, 3, 4, 5, 6) and mimi_buckets(4, smallest=2, step=2) == (2, 4)
    with pytest.raises(ValueError, match="must be >= 1"):
        mimi_buckets(0)
