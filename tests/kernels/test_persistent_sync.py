"""The persistent kernels' barrier words (csrc/decoder.cu, depformer.cu, rvq.cu; ``dsm::grid_exit``): given
``counters`` with room for them (the engine's KV cache and Mimi's state keep such words), a kernel uses the caller's
words, at 0, and leaves them at 0, so that the next launch needs no memset first; given too few, it uses words of its
own and leaves the caller's untouched. On the GPU and emulated on the CPU, where the emulation's adversarial schedule
lets blocks leave a barrier late (a block that reset the words while another still waited would hang or let the next
launch through its barriers early, and the outputs would differ from the reference)."""

from __future__ import annotations

import pytest
import torch

from dsm_kernels import counter_words, reference
from dsm_kernels.decoder import decoder_step_ref
from dsm_kernels.testing import (
    check_rvq_codes,
    decoder_inputs,
    depformer_inputs,
    random_decoder_weights,
    random_depformer_weights,
)

PERSISTENT = [pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("cuda_emu")]


def _device(backend):
    return torch.device("cuda" if backend == "cuda" else "cpu")


@pytest.fixture
def syncs(monkeypatch):
    """The sync words of every emulated persistent launch (the tensor the kernel ran on)."""
    import cuda_emu

    seen = []
    run = cuda_emu._run_persistent

    def spy(launcher, args, sync, what):
        seen.append(sync)
        run(launcher, args, sync, what)

    monkeypatch.setattr(cuda_emu, "_run_persistent", spy)
    return seen


def _decoder(backend, w, ins):
    if backend == "cuda_emu":
        import cuda_emu

        return cuda_emu.decoder_step_emu(w, **ins, blocks=3)
    from dsm_kernels.cuda_ops import decoder_step_cuda

    return decoder_step_cuda(w, **ins, blocks=3)


def _depformer(backend, w, args):
    if backend == "cuda_emu":
        import cuda_emu

        return cuda_emu.depformer_frame_emu(w, **args, blocks=2)
    from dsm_kernels.cuda_ops import depformer_frame_cuda

    return depformer_frame_cuda(w, **args, blocks=2)


def _rvq(backend, x, aug, levels, ranges, counters):
    if backend == "cuda_emu":
        import cuda_emu

        return cuda_emu.rvq_encode_emu(x, aug, levels, ranges, counters=counters, blocks=3)
    from dsm_kernels.cuda_ops import rvq_encode_cuda

    return rvq_encode_cuda(x, aug, levels, ranges, counters=counters, blocks=3)


def _check_words(backend, syncs, counters, used: bool):
    if backend == "cuda_emu":
        assert (syncs[-1].data_ptr() == counters.data_ptr()) == used, "the caller's words were (not) used"


@pytest.mark.parametrize("backend", PERSISTENT)
def test_decode_step_reuses_the_callers_words(backend, request):
    syncs = request.getfixturevalue("syncs") if backend == "cuda_emu" else None
    dev = _device(backend)
    w = random_decoder_weights(layers=2, seed=4, device=dev)
    B = 3
    counters = torch.zeros(counter_words(B, w.num_heads), dtype=torch.int32, device=dev)
    few = torch.full((2,), 7, dtype=torch.int32, device=dev)  # fewer words than 2 + B * heads: not used
    for words, used in ((counters, True), (counters, True), (few, False), (counters, True)):
        ref, mine = decoder_inputs(w, B, device=dev), decoder_inputs(w, B, device=dev)
        _, lg_ref = decoder_step_ref(w, **ref)
        _, lg = _decoder(backend, w, dict(mine, counters=words))
        assert torch.isfinite(lg).all()
        assert float((lg - lg_ref).abs().max() / lg_ref.abs().max()) < 1e-5
        _check_words(backend, syncs, words, used)
        assert not counters.any() and (few == 7).all()


@pytest.mark.parametrize("backend", PERSISTENT)
def test_depth_transformer_reuses_the_callers_words(backend, request):
    syncs = request.getfixturevalue("syncs") if backend == "cuda_emu" else None
    dev = _device(backend)
    w = random_depformer_weights(schedule=(0, 1, 2, 3), layers=1, heads=2, seed=6, device=dev)
    counters = torch.zeros(3 + w.num_heads, dtype=torch.int32, device=dev)
    few = torch.full((3,), 7, dtype=torch.int32, device=dev)
    for words, used in ((counters, True), (few, False), (counters, True)):
        args = depformer_inputs(w, 2, temp=0.8, device=dev)
        want = reference.depformer_frame_ref(w, **args)
        got = _depformer(backend, w, dict(args, counters=words))
        assert got.shape == want.shape and torch.equal(got.cpu(), want.cpu())  # [B, dep_q], written in place
        _check_words(backend, syncs, words, used)
        assert not counters.any() and (few == 7).all()


@pytest.mark.parametrize("backend", PERSISTENT)
def test_rvq_encode_reuses_the_callers_words(backend, request):
    syncs = request.getfixturevalue("syncs") if backend == "cuda_emu" else None
    dev = _device(backend)
    levels, K, D = (1, 5), 24, 8
    g = torch.Generator().manual_seed(3)
    aug = torch.stack([reference.augment_codebook(b) for b in torch.randn(sum(levels), K, D, generator=g)])
    ranges = reference.rvq_level_ranges(levels, dev)
    counters = torch.zeros(2, dtype=torch.int32, device=dev)
    few = torch.full((1,), 7, dtype=torch.int32, device=dev)
    for words, used in ((counters, True), (few, False), (counters, True)):
        x = torch.randn(2, len(levels) * D, 1, generator=g)
        want = reference.rvq_encode_ref(x, aug, levels, reference.rvq_level_ranges(levels))
        got = _rvq(backend, x.to(dev), aug.to(dev), levels, ranges, words)
        assert check_rvq_codes(got.cpu(), want, x, aug, levels) == 0
        _check_words(backend, syncs, words, used)
        assert not counters.any() and (few == 7).all()


def test_counters_are_checked():
    import dsm_kernels

    levels = (1, 1)
    aug = torch.stack([reference.augment_codebook(torch.randn(4, 2)) for _ in range(2)])
    x = torch.randn(1, 4, 1)
    with pytest.raises(ValueError, match="counters must be a contiguous 1-D torch.int32"):
        dsm_kernels.rvq_encode(x, aug, levels, reference.rvq_level_ranges(levels),
                               counters=torch.zeros(2), backend="reference")  # fmt: skip
