"""The host works ahead of the device (ASYNC_SCHEDULING): step N+1 is planned and launched while step N still runs.

A step's sampled tokens stay on the device: the next step's rows of the sequences it sampled read them there
(``ModelRunner.launch(plan, pending)``), and their copy to the host travels without blocking (``HostCopy``), read
only once the next step is launched (``ModelRunner.collect``). So the GPU does not idle while Python schedules,
builds the inputs and writes the events. The scheduler plans such a step as if each sampled token were already
appended: it grows block tables for them, never preempts a sequence whose token is still on the device, and leaves
out a sequence that its pending token ends by length. A sequence that its pending token ends otherwise (EOS, a stop
string) runs one wasted row, whose result is dropped.

Rows whose next step needs the last token on the host wait for it instead: a grammar's mask, the watermark's green
list, a speculative proposal. Under tensor parallelism rank 0 broadcasts the fed token ids to the other ranks
(``TensorParallel.broadcast``) before the forward's first collective. On the CPU a step runs when it is launched,
so there is nothing to overlap, and ``auto`` leaves it off there; tests turn it on to prove the same path on the
CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # torch is imported where a step runs, not where the engine package is (the front imports it)
    import torch


@dataclass(frozen=True)
class AheadReport:
    """Whether the engine launches a step before reading the last one's tokens, and why (/info says it)."""

    enabled: bool = False
    reason: str = "not loaded"


def works_ahead(setting: str, device: Any, speculative: bool, ranks_without_broadcast: bool) -> AheadReport:
    """What ASYNC_SCHEDULING (auto, true, false) gives for a model on ``device``. ``ranks_without_broadcast``:
    tensor-parallel ranks over a model that cannot broadcast rank 0's token ids to them."""
    if setting == "false":
        return AheadReport(False, "off: ASYNC_SCHEDULING=false")
    if speculative:
        return AheadReport(False, "off: speculative decoding proposes from the last token, which the host must read")
    if ranks_without_broadcast:
        return AheadReport(False, "off: the tensor-parallel ranks cannot receive token ids left on rank 0's device")
    if setting == "auto" and getattr(device, "type", "cpu") != "cuda":
        return AheadReport(False, "off: on the CPU a step runs when it is launched, so there is nothing to overlap")
    return AheadReport(True, "on: the next step is planned and launched while the device runs the last one")


class HostCopy:
    """A device tensor on its way to the host: on CUDA a non-blocking copy into pinned memory, fenced by an event
    (so the host may launch more work before it reads); on the CPU the tensor itself."""

    def __init__(self, tensor: torch.Tensor):
        import torch

        self.done: Optional[Any] = None
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host = tensor

    def read(self) -> list:
        """The values as a Python list, once the copy has landed."""
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()


@dataclass
class Sampled:
    """A launched step's samples: who was sampled (a verifying sequence once per scored row), the tokens still on
    the device (``NON_FINITE`` where a row's logits were not), and their copy to the host, holding the
    log-probability table when ``widest`` is set."""

    sequences: list[Any]
    tokens: Optional[torch.Tensor] = None
    copy: Optional[HostCopy] = None
    widest: Optional[int] = None
    verifying: bool = False
    _rows: Optional[dict] = field(default=None, repr=False)

    @property
    def rows(self) -> dict:
        """Each sampled sequence's row of ``tokens`` (one row each: a verifying step is never worked ahead of)."""
        if self._rows is None:
            self._rows = {seq: row for row, seq in enumerate(self.sequences)}
        return self._rows


def feeds_on_device(seq: Any) -> bool:
    """Whether a sequence's next step may take its last token from the device: nothing on the host reads that token
    before the step (a grammar's matcher and the watermark's green list do)."""
    return seq.matcher is None and seq.request.params.watermark is None
