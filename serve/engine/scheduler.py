"""The engine core's scheduler: the waiting queue, the running and preempted sequences, their KV blocks, session
pins and cancels, and each step's plan. The engine's step is ``schedule()``, the runner's ``step(plan)``, then
``postprocess(plan, output)``, which returns the clients' events; the scheduler never sees a client's stream."""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from serve.engine.block_manager import BlockManager
from serve.engine.sequence import Sequence
from serve.engine.types import FinishReason, Request, TokenChoice, TokenEvent

log = logging.getLogger(__name__)

Event = tuple[str, TokenEvent]  # a request's id and one of its events
StepOutput = tuple[list[Sequence], list[TokenChoice]]  # ModelRunner.step: who sampled what (a verified run: in order)
SKIP_AHEAD = 4  # waiting requests behind one whose blocks are not free that may be tried in its place
MAX_OVERTAKES = 16  # later requests that may start before a waiting one; then the blocks that free up are its own


@dataclass
class StepPlan:
    """Who runs in one step: decode sequences (one token each) and prompt chunks (sequence, token count); and the
    requests that ended while it was planned (cancelled, or could not start), whose final events are due."""

    decode: list[Sequence]
    prefill: list[tuple[Sequence, int]]
    ended: list[Event] = field(default_factory=list)

    @property
    def sequences(self) -> list[Sequence]:
        return self.decode + [seq for seq, _ in self.prefill]

    @property
    def empty(self) -> bool:
        """Nothing for the model to run."""
        return not self.decode and not self.prefill


class Scheduler:
    """Requests wait in arrival order until the batch has room and the KV blocks of their prompt are free; one
    whose blocks are not free lets the next ``skip_ahead`` requests try in its place, until ``max_overtakes`` have
    started before it (then the blocks that free up wait for it). Preempted sequences resume, in the order they
    were preempted, before any new request starts. Each step decodes every running sequence and prefills prompts
    in chunks, at most ``prefill_budget`` prompt tokens per step, so decode never stalls for long.

    Session pins are a cache: they give way, oldest first, when a request could start or a running sequence grow
    with their blocks. When a decoding sequence needs a block and none is free, the sequence that has run longest
    since it last started or resumed is preempted (round robin), so no stream is picked again before the others.

    ``new_sequence`` makes a request's Sequence (its RNG, its grammar matcher); ``forget`` drops what the runner
    keeps for a sequence that stops running; ``cache_key`` names a request's adapter and salt in prefix-cache keys.
    ``add``, ``cancel``, ``close_session`` and the counts are for any thread; the rest is for the engine thread alone.
    """

    def __init__(
        self,
        blocks: BlockManager,
        max_batch: int,
        prefill_budget: int,
        new_sequence: Callable[[Request], Sequence],
        forget: Callable[[Sequence], None] = lambda seq: None,
        cache_key: Callable[[Request], Optional[str]] = lambda request: request.adapter,
        watermark: Optional[int] = None,
        skip_ahead: int = SKIP_AHEAD,
        max_overtakes: int = MAX_OVERTAKES,
        speculator: Any = None,
    ):
        """``watermark``: blocks kept free for running sequences to grow into (default 1% of the pool);
        ``speculator``: proposes tokens for decoding sequences to verify (serve.engine.speculative; None: off)."""
        self.blocks = blocks
        self.max_batch = max_batch
        self.prefill_budget = prefill_budget
        self.skip_ahead = skip_ahead
        self.max_overtakes = max_overtakes
        self.watermark = max(1, blocks.usable_blocks // 100) if watermark is None else watermark
        self._new_sequence = new_sequence
        self._forget = forget
        self._cache_key = cache_key
        self.speculator = speculator
        self.running: list[Sequence] = []  # in the order they started or resumed
        self.preempted: collections.deque[Sequence] = collections.deque()  # resumed before new requests, in order
        self.preemptions = 0
        self.pins_released = 0  # session pins given way to a sequence that needed their blocks
        self.steps = 0
        self._overtaken: dict[str, int] = {}  # waiting request id -> later requests that started before it
        self.peak_running = 0
        self._waiting: collections.deque[Request] = collections.deque()
        self._in_flight: set[str] = set()
        self._cancelled: set[str] = set()
        self._closed_sessions: collections.deque[str] = collections.deque()
        self._condition = threading.Condition()

    # --- any thread ---------------------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request (the front decides whether it may come in)."""
        with self._condition:
            self._in_flight.add(request.id)
            self._waiting.append(request)
            self._condition.notify()

    def cancel(self, request_id: str) -> None:
        """Mark a request cancelled; it is dropped before the next step (ids not in flight are ignored)."""
        with self._condition:
            if request_id in self._in_flight:
                self._cancelled.add(request_id)

    def close_session(self, session_id: str) -> None:
        """Unpin the session's blocks before the next step (the blocks stay cached until evicted)."""
        self._closed_sessions.append(session_id)

    def wait_for_work(self, timeout: float) -> None:
        """Block the idle engine until a request arrives (or ``timeout``)."""
        with self._condition:
            if not self._waiting:
                self._condition.wait(timeout)

    @property
    def in_flight(self) -> int:
        """Requests added and not finished: waiting, running or preempted."""
        with self._condition:
            return len(self._in_flight)

    @property
    def waiting(self) -> int:
        """Requests not running: queued, or preempted and waiting to resume."""
        with self._condition:
            return len(self._waiting) + len(self.preempted)

    # --- the engine thread --------------------------------------------------------------------------------------

    def schedule(self, ahead: bool = False) -> Optional[StepPlan]:
        """Release closed sessions' pins, drop cancelled requests, start what fits (preempted sequences first), give
        each decoding sequence room for its next token (preempting when the pool is full), and plan the step.

        ``ahead``: the last step's tokens are still on the device (serve/engine/ahead.py). Decoding sequences get
        their room first, and None comes back, with nothing else done, when that would preempt one of them: the
        caller collects the last step, then schedules again."""
        if ahead and not self._grow_decoding(preempt=False):
            return None
        while self._closed_sessions:
            self.blocks.unpin(self._closed_sessions.popleft())
        self.steps += 1
        ended = self._drop_cancelled()
        ended += self._admit()
        self._grow_decoding()
        plan = self._plan()
        if self.speculator is not None:
            self.speculator.plan(plan.decode, self.blocks, self._headroom())
        plan.ended = ended
        return plan

    def postprocess(self, plan: StepPlan, output: Union[StepOutput, Exception]) -> list[Event]:
        """Record the step's tokens (or its failure, which fails only the sequences of this step); returns the
        events for the clients, finishing the sequences that ended."""
        if self.speculator is not None:
            self.speculator.settle(plan.decode, [] if isinstance(output, Exception) else output[0], self.blocks)
        if isinstance(output, Exception):
            return self._fail(plan, output)
        events: list[Event] = []
        try:
            self._key_full_blocks(plan)
            for seq, choice in zip(*output):
                if seq.finish_reason is not None:  # tokens of an accepted run past the one that ended it
                    continue
                event = seq.append(choice)
                events.append((seq.id, event) if event.finish_reason is None else self._finish(seq, event))
        except Exception as exc:  # noqa: BLE001 - the engine keeps serving the others
            events += self._fail(plan, exc)
        return events

    def _plan(self) -> StepPlan:
        """Decode every prefilled sequence, except one whose tokens still on the device reach its length limit;
        spend the prefill budget on prompts, oldest first."""
        decode = [seq for seq in self.running if seq.prompt_left == 0 and not seq.ends_with_pending]
        prefill: list[tuple[Sequence, int]] = []
        budget = self.prefill_budget
        for seq in self.running:
            if seq.prompt_left and budget > 0:
                count = min(seq.prompt_left, budget)
                prefill.append((seq, count))
                budget -= count
        return StepPlan(decode, prefill)

    def _admit(self) -> list[Event]:
        """Resume preempted sequences, then start waiting requests, while the batch has room and their blocks are
        free; returns the final events of requests that could not start."""
        ended: list[Event] = []
        while len(self.running) < self.max_batch:
            if self.preempted:
                if not self._resume(self.preempted[0]):
                    break
                self._run(self.preempted.popleft())
            elif not self._start_next(ended):
                break
            self.peak_running = max(self.peak_running, len(self.running))
        return ended

    def _headroom(self) -> int:
        """Blocks a new allocation must leave free: the watermark, while others run and may grow."""
        return self.watermark if self.running else 0

    def _run(self, seq: Sequence) -> None:
        """Put a started or resumed sequence last in line to be preempted."""
        seq.started_step = self.steps
        self.running.append(seq)

    def _allocate(self, tokens: list[int], key: Optional[str], reuse: bool) -> Optional[tuple[list[int], int]]:
        """Blocks for a sequence to start or resume; session pins give way, oldest first, when that makes it fit."""
        headroom = self._headroom()
        allocated = self.blocks.allocate(tokens, key, reuse, headroom)
        if allocated is None and self.blocks.fits_without_pins(tokens, key, reuse, headroom):
            while allocated is None and self._unpin_oldest("a waiting sequence needs the blocks"):
                allocated = self.blocks.allocate(tokens, key, reuse, headroom)
        return allocated

    def _unpin_oldest(self, why: str) -> bool:
        """Release the oldest session pin (False: none is left)."""
        session = self.blocks.unpin_oldest()
        if session is None:
            return False
        self.pins_released += 1
        log.info("session %s: pinned blocks released (%s)", session, why)
        return True

    def _resume(self, seq: Sequence) -> bool:
        """Blocks for a preempted sequence to resume (its own earlier blocks may still be in the prefix cache)."""
        allocated = self._allocate(seq.prefill_ids, self._cache_key(seq.request), True)
        if allocated is None:
            return False
        seq.block_table, seq.num_cached = allocated
        return True

    def _start_next(self, ended: list[Event]) -> bool:
        """Start the oldest waiting request whose prompt's blocks are free, looking past at most ``skip_ahead`` that
        are not, and past none that ``max_overtakes`` requests overtook already (False: none may start now)."""
        with self._condition:
            window = list(itertools.islice(self._waiting, self.skip_ahead + 1))
        for position, request in enumerate(window):
            reuse = not request.params.prompt_logprobs  # scoring a prompt needs the logits of all its positions
            allocated = self._allocate(request.prompt_ids, self._cache_key(request), reuse)
            if allocated is not None:
                self._leave_queue(request, overtaken=window[:position])
                self._start(request, allocated, ended)
                return True
            if self._overtaken.get(request.id, 0) >= self.max_overtakes:
                return False  # aged: what frees up is kept for it
        return False

    def _leave_queue(self, request: Request, overtaken: list[Request]) -> None:
        """Take a starting request out of the queue; those it passed count one more overtake each."""
        with self._condition:
            del self._waiting[next(index for index, queued in enumerate(self._waiting) if queued is request)]
        self._overtaken.pop(request.id, None)
        for passed in overtaken:
            self._overtaken[passed.id] = self._overtaken.get(passed.id, 0) + 1

    def _start(self, request: Request, allocated: tuple[list[int], int], ended: list[Event]) -> None:
        """Run a request on its blocks. One whose sequence cannot be made fails alone: its final event goes to
        ``ended``."""
        table, cached = allocated
        try:
            seq = self._new_sequence(request)
        except Exception as exc:  # noqa: BLE001 - the engine keeps serving the others
            self.blocks.free(table)
            log.exception("request %s could not start", request.id)
            error = f"{type(exc).__name__}: {exc}"
            ended.append(self._release(request.id, TokenEvent.ending(request, FinishReason.ERROR, error)))
            return
        seq.block_table, seq.num_cached, seq.cached_tokens = table, cached, cached
        self._run(seq)

    def _grow_decoding(self, preempt: bool = True) -> bool:
        """Give each decoding sequence the block its next token needs; when none is free, session pins give way,
        then the victim (``_victim``) is preempted and its blocks come back, until it fits. Without ``preempt``,
        stop at the first sequence that does not fit (False)."""
        size = self.blocks.block_size
        for seq in list(self.running):
            has_room = seq.num_cached < len(seq.block_table) * size
            if seq not in self.running or seq.prompt_left or has_room or seq.ends_with_pending:
                continue
            while not self._append_block(seq):
                if not preempt:
                    return False
                victim = self._victim()
                self._preempt(victim)
                if victim is seq:
                    break
        return True

    def _append_block(self, seq: Sequence) -> bool:
        """One more block for a decoding sequence: a free one, else one that releasing session pins frees."""
        if self.blocks.append_block(seq.block_table):
            return True
        if not self.blocks.pin_only_blocks():
            return False
        while self._unpin_oldest("a running sequence needs a block"):
            if self.blocks.append_block(seq.block_table):
                return True
        return False

    def _victim(self) -> Sequence:
        """The sequence to preempt: the one that has run longest since it last started or resumed (of those, the one
        preempted least, then the newest). A resumed sequence is last in line, so it is never picked again before
        the others have had their turn."""
        return min(reversed(self.running), key=lambda seq: (seq.started_step, seq.preemptions))

    def _preempt(self, seq: Sequence) -> None:
        """Take a running sequence's blocks back and queue it to resume before new requests (behind those preempted
        earlier); its client sees no gap in its stream, only a pause."""
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        self._forget(seq)
        seq.preempt()
        self.preempted.append(seq)
        self.preemptions += 1
        log.info("preempted request %s after %d tokens (KV pool full)", seq.id, len(seq.output_ids))

    def _drop_cancelled(self) -> list[Event]:
        """End the cancelled requests wherever they are: waiting ones never get blocks."""
        with self._condition:
            if not self._cancelled:
                return []
            cancelled = set(self._cancelled)
            gone = [request for request in self._waiting if request.id in cancelled]
            for request in gone:
                self._waiting.remove(request)
                self._overtaken.pop(request.id, None)
        ended = [self._release(request.id, TokenEvent.ending(request, FinishReason.CANCELLED)) for request in gone]
        for seq in [seq for seq in self.running if seq.id in cancelled]:
            ended.append(self._finish(seq, seq.end(FinishReason.CANCELLED)))
        for seq in [seq for seq in self.preempted if seq.id in cancelled]:
            self.preempted.remove(seq)
            self._forget(seq)
            ended.append(self._release(seq.id, seq.end(FinishReason.CANCELLED)))
        return ended

    def _key_full_blocks(self, plan: StepPlan) -> None:
        """Enter the blocks this step filled into the prefix cache (their keys and values are written now)."""
        size = self.blocks.block_size
        for seq in plan.sequences:
            if seq.finish_reason is None and seq.num_cached // size > seq.keyed_blocks:
                tokens = seq.all_ids[: seq.num_cached]
                key = self._cache_key(seq.request)
                seq.keyed_blocks = self.blocks.register_full_blocks(seq.block_table, tokens, key, seq.keyed_blocks)

    def _fail(self, plan: StepPlan, exc: Exception) -> list[Event]:
        """End this step's sequences that still run with an ERROR event."""
        failed = [seq for seq in plan.sequences if seq in self.running]
        log.error("engine step failed; failing its %d requests", len(failed), exc_info=exc)
        error = f"{type(exc).__name__}: {exc}"
        return [self._finish(seq, seq.end(FinishReason.ERROR, error)) for seq in failed]

    def fail_all(self, error: str) -> list[Event]:
        """End every request in flight (waiting, running or preempted) with an ERROR event: the engine cannot go on."""
        with self._condition:
            waiting, self._waiting = list(self._waiting), type(self._waiting)()
        ended = [
            self._release(request.id, TokenEvent.ending(request, FinishReason.ERROR, error)) for request in waiting
        ]
        ended += [self._finish(seq, seq.end(FinishReason.ERROR, error)) for seq in list(self.running)]
        for seq in list(self.preempted):
            self.preempted.remove(seq)
            self._forget(seq)
            ended.append(self._release(seq.id, seq.end(FinishReason.ERROR, error)))
        return ended

    def _finish(self, seq: Sequence, event: TokenEvent) -> Event:
        """Give back a running sequence's blocks and its place (a session keeps its conversation's full blocks
        pinned for its next turn); returns its final event."""
        self.running.remove(seq)
        session = seq.request.session_id
        if session is not None and event.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            if not self.blocks.pin(session, seq.block_table[: seq.keyed_blocks]):
                log.info("session %s: not pinned (pinned sessions hold half the KV pool)", session)
        self.blocks.free(seq.block_table)
        self._forget(seq)
        return self._release(seq.id, event)

    def _release(self, request_id: str, event: TokenEvent) -> Event:
        """Free a request's place in flight; its final event is the caller's to deliver."""
        with self._condition:
            self._in_flight.discard(request_id)
            self._cancelled.discard(request_id)
        return request_id, event
