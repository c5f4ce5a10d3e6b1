"""The step's uploader: values arrive intact, staging buffers are reused, and a buffer whose copy may still be in
flight is never written (proven on the CPU with fences that say when a copy is done)."""

from __future__ import annotations

import torch

from serve.engine import uploads as uploads_module
from serve.engine.uploads import MIN_BYTES, Uploads

CPU = torch.device("cpu")


class Fence:
    """A stand-in for a CUDA event: a copy is in flight until the test says it is done."""

    def __init__(self):
        self.done, self.waited = False, 0

    def record(self):
        self.done = False

    def query(self):
        return self.done

    def synchronize(self):
        self.waited += 1
        self.done = True


def fenced():
    fences = []

    def make():
        fences.append(Fence())
        return fences[-1]

    return Uploads(CPU, fence=make), fences


def test_values_arrive_with_their_dtype_and_shape():
    uploads = Uploads(CPU)
    rows = uploads.tensor([[1.0, 20.0, 0.5], [0.75, 5.0, 1.0]], torch.float32)
    assert rows.dtype == torch.float32 and rows.tolist() == [[1.0, 20.0, 0.5], [0.75, 5.0, 1.0]]
    assert uploads.tensor([3, 1, 2], torch.long).tolist() == [3, 1, 2]
    assert uploads.tensor(torch.tensor([5, 6]), torch.long).tolist() == [5, 6]
    assert uploads.tensor([], torch.long).shape == (0,)


def test_a_buffer_is_reused_and_what_it_gave_stays_intact():
    uploads = Uploads(CPU)
    first = uploads.tensor([1, 2, 3], torch.long)
    second = uploads.tensor([7, 8, 9], torch.long)
    assert first.tolist() == [1, 2, 3] and second.tolist() == [7, 8, 9]  # results never alias the staging buffer
    assert uploads.allocated == 1


def test_a_larger_upload_grows_the_buffer():
    uploads = Uploads(CPU)
    uploads.tensor([1], torch.long)
    big = list(range(MIN_BYTES))  # 8 bytes each: past the first buffer
    assert uploads.tensor(big, torch.long).tolist() == big
    assert uploads.tensor(big, torch.long).tolist() == big and uploads.allocated == 2


def test_a_buffer_in_flight_is_not_written_until_its_copy_is_done():
    uploads, fences = fenced()
    first = uploads.stage((4,), torch.long)
    first.host.copy_(torch.tensor([1, 2, 3, 4]))
    first.send()
    second = uploads.stage((4,), torch.long)  # the first copy may still read its buffer
    assert second.host.data_ptr() != first.host.data_ptr() and first.host.tolist() == [1, 2, 3, 4]
    second.send()
    fences[0].done = True
    third = uploads.stage((4,), torch.long)  # the oldest buffer is done: reused
    assert third.host.data_ptr() == first.host.data_ptr() and uploads.allocated == 2


def test_a_host_far_ahead_waits_for_the_oldest_copy_only(monkeypatch):
    monkeypatch.setattr(uploads_module, "MAX_IN_FLIGHT", 3)
    uploads, fences = fenced()
    for value in range(3):
        uploads.tensor([value], torch.long)
    assert [fence.waited for fence in fences] == [0, 0, 0]
    uploads.tensor([9], torch.long)
    assert [fence.waited for fence in fences] == [1, 0, 0] and uploads.allocated == 3
