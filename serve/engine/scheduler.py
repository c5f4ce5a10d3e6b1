"""Admission, the waiting queue and the per-step plan: who may enter, who runs this step, who was cancelled."""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Optional

from serve.engine.sequence import Sequence
from serve.engine.types import Request


class EngineOverloaded(RuntimeError):
    """More requests than the admission cap are in flight."""

    @classmethod
    def at(cls, in_flight: int, limit: int) -> "EngineOverloaded":
        return cls(f"{in_flight} requests in flight, the limit is {limit}; retry later")


@dataclass
class StepPlan:
    """Who runs in one step: decode sequences (one token each) and prompt chunks (sequence, token count)."""

    decode: list[Sequence]
    prefill: list[tuple[Sequence, int]]


class Scheduler:
    """Requests wait FIFO until the KV blocks of their prompt are free; each step decodes every running sequence and
    prefills waiting prompts in chunks, at most ``prefill_budget`` prompt tokens per step so decode never stalls for
    long."""

    def __init__(self, max_in_flight: int, prefill_budget: int):
        self.max_in_flight = max_in_flight
        self.prefill_budget = prefill_budget
        self._waiting: collections.deque[Request] = collections.deque()
        self._in_flight: set[str] = set()
        self._cancelled: set[str] = set()
        self._condition = threading.Condition()

    def admit(self, request: Request) -> None:
        """Queue a request (HTTP thread), or raise EngineOverloaded when the cap is reached."""
        with self._condition:
            if len(self._in_flight) >= self.max_in_flight:
                raise EngineOverloaded.at(len(self._in_flight), self.max_in_flight)
            self._in_flight.add(request.id)
            self._waiting.append(request)
            self._condition.notify()

    def wait_for_work(self, timeout: float) -> None:
        """Block the idle engine until a request arrives (or ``timeout``)."""
        with self._condition:
            if not self._waiting:
                self._condition.wait(timeout)

    def peek_waiting(self) -> Optional[Request]:
        """The oldest waiting request, left in the queue (None when none waits)."""
        with self._condition:
            return self._waiting[0] if self._waiting else None

    def pop_waiting(self, limit: int) -> list[Request]:
        """Up to ``limit`` of the oldest waiting requests."""
        with self._condition:
            return [self._waiting.popleft() for _ in range(min(limit, len(self._waiting)))]

    def pop_cancelled_waiting(self) -> list[Request]:
        """Waiting requests whose clients already left: they never get blocks."""
        with self._condition:
            gone = [request for request in self._waiting if request.id in self._cancelled]
            for request in gone:
                self._waiting.remove(request)
            return gone

    def plan(self, running: list[Sequence]) -> StepPlan:
        """Decode every prefilled sequence; spend the prefill budget on prompts, oldest first."""
        decode = [seq for seq in running if seq.prompt_left == 0]
        prefill: list[tuple[Sequence, int]] = []
        budget = self.prefill_budget
        for seq in running:
            if seq.prompt_left and budget > 0:
                count = min(seq.prompt_left, budget)
                prefill.append((seq, count))
                budget -= count
        return StepPlan(decode, prefill)

    def cancel(self, request_id: str) -> None:
        """Mark a request cancelled; the engine drops it before its next step."""
        with self._condition:
            if request_id in self._in_flight:
                self._cancelled.add(request_id)

    def is_cancelled(self, request_id: str) -> bool:
        with self._condition:
            return request_id in self._cancelled

    def finish(self, request_id: str) -> None:
        """Free the request's admission place."""
        with self._condition:
            self._in_flight.discard(request_id)
            self._cancelled.discard(request_id)

    @property
    def in_flight(self) -> int:
        with self._condition:
            return len(self._in_flight)

    @property
    def waiting(self) -> int:
        with self._condition:
            return len(self._waiting)
