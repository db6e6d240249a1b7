import os

import pytest
import torch

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # the moshi oracle would otherwise compile Inductor kernels on CPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): their ops are too small
    for intra-op threads, which on a busy 2-core box only add spin waits (one module went from 179 s to 5 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def mimi_sd():
    """``random_mimi_state_dict(0)``, built once per session (its codebook calibration runs Mimi over a probe, ~1.5 s
    a build) for the tests that only read it (``Mimi`` copies nothing in place). Built on one thread, as the
    ``tiny_stt_ckpt`` Mimi file is, so that the two are the same weights."""
    from dsm.mimi import random_mimi_state_dict

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return random_mimi_state_dict(0)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_stt_ckpt(tmp_path_factory):
    """The tiny-stt random checkpoint (seed 0, fp32 LM; its Mimi file is ``save_random_mimi(seed=0)``), written once
    per session, on one thread, for the STT, server and Mimi tests, which only read it."""
    from dsm.checkpoint import write_random_checkpoint

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return write_random_checkpoint("tiny-stt", tmp_path_factory.mktemp("stt") / "tiny-stt", seed=0,
                                       dtype=torch.float32)
    finally:
        torch.set_num_threads(n)
