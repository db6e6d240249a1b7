"""dsm.host_copies: device results read on the host with one wait, small host tensors sent without one."""

import time

import pytest
import torch

from dsm.host_copies import HostReads, copy_from_host, to_device


def test_reads_come_back_in_order_as_they_were_when_read():
    a, b = torch.arange(4), torch.ones(2, 3)
    reads = HostReads()
    ia, ib = reads.read(a), reads.read(b)
    a += 10  # the caller reuses its buffer after the read (a graph's output at the next replay)
    host = reads.wait()
    assert (ia, ib) == (0, 1) and host[0].tolist() == [0, 1, 2, 3] and torch.equal(host[1], b)
    assert reads.wait() == []  # each wait hands its copies over once


def test_host_to_device_helpers_copy():
    t = torch.tensor([True, False])
    out = to_device(t, "cpu")
    t[0] = False
    assert out.tolist() == [True, False]  # a copy, never the caller's tensor
    dst = torch.zeros(2, dtype=torch.long)
    copy_from_host(dst, torch.tensor([3, 4]))
    assert dst.tolist() == [3, 4]


@pytest.mark.gpu
def test_cuda_a_wait_is_for_the_reads_not_for_later_work():
    """The wait covers the copies only: device work queued after the last read (here ~1 s of sleep; in the STT
    runtime, the next overlapped call) does not hold the host. The copies are right, and the helpers' host-to-device
    copies are queued behind the stream's work."""
    x = torch.arange(10, device="cuda")
    reads = HostReads()
    i = reads.read(x * 2)
    torch.cuda._sleep(2_000_000_000)  # ~1 s at H100/H200 clocks
    late = to_device(torch.tensor([5, 6]), "cuda")
    dst = torch.zeros(2, dtype=torch.long, device="cuda")
    copy_from_host(dst, torch.tensor([7, 8]))
    t = time.perf_counter()
    host = reads.wait()
    waited = time.perf_counter() - t
    assert host[i].tolist() == list(range(0, 20, 2))
    assert waited < 0.3, f"waited {waited:.3f} s: for the sleep queued after the read"
    assert late.tolist() == [5, 6] and dst.tolist() == [7, 8]
