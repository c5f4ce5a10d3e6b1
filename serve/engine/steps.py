"""How the engine thread runs a planned step: read at once, or launched before the last step is read (the host
working ahead, serve/engine/ahead.py). Either way the runner's output goes to ``Scheduler.postprocess`` and its
events to the engine's streams, and a failure fails only the sequences of its step."""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Optional, Union

from serve.engine.ahead import Sampled, feeds_on_device
from serve.engine.scheduler import Event, Scheduler, StepOutput, StepPlan


class InFlight(NamedTuple):
    """A launched step whose tokens the host has not read yet."""

    plan: StepPlan
    sampled: Sampled


class Steps:
    """Runs the engine's steps on ``runner`` and hands their outputs to ``scheduler``; ``deliver`` takes the events.
    ``lose_ranks``: a step of a tensor-parallel engine failed (the engine stops serving). Counts the steps, those
    launched ahead, and the seconds spent in them."""

    def __init__(
        self,
        runner,
        scheduler: Scheduler,
        deliver: Callable[[list[Event]], None],
        lose_ranks: Callable[[Exception], None],
    ):
        self.runner, self.scheduler = runner, scheduler
        self._deliver, self._lose_ranks = deliver, lose_ranks
        self.pending: Optional[InFlight] = None  # a launched step whose tokens the host has not read
        self.count = 0
        self.ahead_count = 0  # steps launched while the step before them was still in flight
        self.busy_seconds = 0.0

    def may_work_ahead(self, adapters_busy: bool) -> bool:
        """Whether the next step may be planned before the pending one is read: no verified run (its length is on
        the device), no adapter swap waiting, and every sampled sequence takes its next input on the device."""
        sampled = self.pending.sampled if self.pending is not None else None
        if sampled is None or sampled.verifying or adapters_busy:
            return False
        return all(map(feeds_on_device, sampled.sequences))

    def at_once(self, plan: StepPlan) -> None:
        """One forward pass over the plan, its tokens read before the next is planned (nothing may be pending)."""
        started = time.perf_counter()
        try:
            output = self.runner.step(plan)
        except Exception as exc:  # noqa: BLE001 - the engine keeps serving the others
            self._failed(plan, exc, started)
            return
        self._finish(plan, output, started)

    def ahead(self, plan: StepPlan) -> None:
        """Launch the plan (its rows of the pending step's sequences read their tokens on the device), then read the
        pending step while it runs; the plan's step is pending next."""
        started = time.perf_counter()
        pending = self.pending
        try:
            sampled = self.runner.launch(plan, pending.sampled if pending is not None else None)
        except Exception as exc:  # noqa: BLE001 - the engine keeps serving the others
            self.collect()
            self._failed(plan, exc, started)
            return
        for seq in sampled.sequences:
            seq.pending_tokens += 1
        self.ahead_count += pending is not None
        self.busy_seconds += time.perf_counter() - started
        self.collect()
        self.pending = InFlight(plan, sampled)

    def collect(self) -> None:
        """Read the pending step's tokens and deliver its events (nothing when none is pending)."""
        if self.pending is None:
            return
        started = time.perf_counter()
        (plan, sampled), self.pending = self.pending, None
        try:
            output: Union[StepOutput, Exception] = self.runner.collect(sampled)
        except Exception as exc:  # noqa: BLE001 - the engine keeps serving the others
            output = exc
        for seq in sampled.sequences:
            seq.pending_tokens -= 1
        self._finish(plan, output, started)

    def _failed(self, plan: StepPlan, exc: Exception, started: float) -> None:
        """A step's launch failed: its sequences fail, or, with tensor-parallel ranks (which may be out of step
        now), the engine stops serving."""
        if self.runner.ranks is not None:
            self._lose_ranks(exc)
            return
        self._finish(plan, exc, started)

    def _finish(self, plan: StepPlan, output: Union[StepOutput, Exception], started: float) -> None:
        self._deliver(self.scheduler.postprocess(plan, output))
        self.count += 1
        self.busy_seconds += time.perf_counter() - started
