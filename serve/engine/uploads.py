"""Small per-step tensors from the host to the device without a blocking copy.

A copy from pageable host memory (``torch.tensor(values).to(cuda)``) makes the host wait for the GPU. A step's
small uploads (per-row sampling parameters, logit biases, penalty rows, grammar bitmasks) go instead through
reused staging buffers, pinned on CUDA, copied ``non_blocking``. A buffer is not written again while its last
copy may still be in flight: each buffer carries a fence (a CUDA event recorded after its copy), and a write
takes the oldest buffer whose fence has passed, or a new buffer, so the host never waits for the GPU here. On
the CPU the same path runs with plain buffers and no fence (a copy there is done when it returns).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Optional

import torch

MIN_BYTES = 4096  # the smallest staging buffer
MAX_IN_FLIGHT = 64  # buffers whose copies may still run; past this the host waits for the oldest


def cuda_fence() -> Any:
    """A fence for a copy on the current CUDA stream: an event (``query``: has the copy finished?)."""
    return torch.cuda.Event()


class Staging:
    """One reused host buffer and the fence of its last copy."""

    def __init__(self, nbytes: int, pinned: bool, fence: Optional[Any]):
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.fence = fence
        self.recorded = False  # a copy from the buffer was issued since it was last known to be free

    def free(self) -> bool:
        return not self.recorded or self.fence is None or self.fence.query()

    def view(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.buffer[: _count(shape) * dtype.itemsize].view(dtype).view(shape)


class Staged:
    """A host view to fill in place (a staging buffer's head); ``send`` copies it to the device, once."""

    def __init__(self, uploads: "Uploads", staging: Staging, host: torch.Tensor):
        self._uploads, self._staging, self.host = uploads, staging, host

    def send(self) -> torch.Tensor:
        return self._uploads.send(self._staging, self.host)


class Uploads:
    """Turns host values into device tensors through reused staging buffers (pinned on CUDA), non-blocking.

    ``fence`` makes the fence of a copy (default: a CUDA event on CUDA, none on the CPU). One instance per thread
    that steps (a runner): buffers are not shared between threads.
    """

    def __init__(self, device: torch.device, fence: Optional[Callable[[], Any]] = None):
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda"
        self._fence = fence if fence is not None else (cuda_fence if self.pinned else None)
        self._sent: deque[Staging] = deque()  # oldest copy first (one stream: when it is not done, none after it is)
        self.allocated = 0  # staging buffers made so far

    def tensor(self, values: Any, dtype: torch.dtype) -> torch.Tensor:
        """``values`` (a list, nested lists, or a host tensor) as a new tensor of ``dtype`` on the device."""
        host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
        if host.dtype != dtype:
            host = host.to(dtype)
        staged = self.stage(tuple(host.shape), dtype)
        staged.host.copy_(host)
        return staged.send()

    def stage(self, shape: tuple[int, ...], dtype: torch.dtype) -> Staged:
        """A host view of ``shape`` to fill in place, then ``send``; nothing in flight reads it."""
        staging = self._take(max(1, dtype.itemsize * _count(shape)))
        return Staged(self, staging, staging.view(shape, dtype))

    def send(self, staging: Staging, host: torch.Tensor) -> torch.Tensor:
        """Copy ``host`` (a view of ``staging``) to a new device tensor without waiting; fence the buffer."""
        device = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        device.copy_(host, non_blocking=True)
        if staging.fence is not None:
            staging.fence.record()
            staging.recorded = True
        self._sent.append(staging)
        return device

    def _take(self, nbytes: int) -> Staging:
        """The oldest buffer whose last copy is done (grown to ``nbytes`` if smaller), or a new one."""
        if len(self._sent) >= MAX_IN_FLIGHT and not self._sent[0].free():
            self._sent[0].fence.synchronize()  # the host is this far ahead: wait for the oldest copy
        if self._sent and self._sent[0].free():
            staging = self._sent.popleft()
            staging.recorded = False
            if staging.buffer.numel() >= nbytes:
                return staging
        self.allocated += 1
        return Staging(max(MIN_BYTES, _round_up(nbytes)), self.pinned, self._fence() if self._fence else None)


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _round_up(nbytes: int) -> int:
    """The next power of two: a buffer that grows is not regrown by every slightly larger upload."""
    return 1 << (nbytes - 1).bit_length()


def default_uploads(device: torch.device, uploads: Optional[Uploads]) -> Uploads:
    """``uploads`` when given, else a private uploader for ``device`` (callers outside a runner)."""
    return uploads if uploads is not None else Uploads(device)
