"""GraphedMimiStep (the runtimes' Mimi step): replays equal eager steps, with resets and exec masks in between."""

import pytest
import torch

from dsm.mimi import Mimi, random_mimi_state_dict
from dsm.mimi_graph import GraphedMimiStep


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
