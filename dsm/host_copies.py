"""Copies between host and device that do not make the host wait for the device at each one.

A ``.cpu()`` or ``.tolist()`` of a CUDA tensor makes the host wait for the stream, and the GPU then idles until the
host has queued its next work. A runtime that reads two tensors a step (STT: text tokens and VAD probabilities) and
steps several frames a call (offline transcription) paid one such round trip per read. :class:`HostReads` queues
each read as a copy into pinned host memory, in stream order (a graph's output buffer is read before the next replay
overwrites it), and waits once, when the host needs the values.

The other way, a copy from pageable host memory is synchronous in PyTorch: :func:`to_device` sends small host
tensors (masks, forced tokens) from pinned memory instead, queued behind the work already on the stream.
"""

from __future__ import annotations

import torch


class HostReads:
    """Copies of device tensors to the host, queued now and waited for once by :meth:`wait`.

    ``read(t)`` returns the index of ``t``'s copy in :meth:`wait`'s list. Host tensors are copied at once (the
    caller may reuse or edit the tensor after the read, on any device).
    """

    def __init__(self):
        self._copies: list[torch.Tensor] = []
        # per device (Mimi and the LM may be on two GPUs; an event belongs to one), recorded again after each copy:
        # the last one is waited for
        self._done: dict[torch.device, torch.cuda.Event] = {}

    def read(self, t: torch.Tensor) -> int:
        if t.device.type == "cpu":
            self._copies.append(t.clone())
        else:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            self._copies.append(host)
            done = self._done.get(t.device)
            if done is None:
                done = self._done[t.device] = torch.cuda.Event()
            done.record(torch.cuda.current_stream(t.device))
        return len(self._copies) - 1

    def wait(self) -> list[torch.Tensor]:
        """The host copies, in the order read; waits for each device read from once, for the copies only: work
        queued after the last read (an overlapped runtime's next call) keeps running."""
        for done in self._done.values():  # (a second wait finds them done)
            done.synchronize()
        out, self._copies = self._copies, []
        return out


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host tensor ``t`` on ``device`` (a copy), queued behind the stream's work without waiting for it: it leaves
    from pinned memory (``t`` itself if pinned, else a pinned copy), which PyTorch's pinned allocator keeps until the
    device has read it; the caller must not write a pinned ``t`` until then."""
    if torch.device(device).type != "cuda":
        return t.to(device, copy=True)
    return t.pin_memory().to(device, non_blocking=True)


def copy_from_host(dst: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(t)`` of host tensor ``t``, queued without waiting for the device (as :func:`to_device`)."""
    return dst.copy_(t.pin_memory() if dst.is_cuda else t, non_blocking=True)
