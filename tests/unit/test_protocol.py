"""The messages between the front and an engine process: each crosses a real pipe intact, and each side decodes
them in one place, where a message it does not know is logged as an error."""

import logging
import multiprocessing
import time

from serve.engine.host import Core, Outbox
from serve.engine.protocol import (
    CallDone,
    Cancel,
    CloseSession,
    DeviceName,
    Events,
    Failed,
    InstallAdapter,
    ModelCard,
    ModelView,
    Ready,
    RetireAdapter,
    Snapshot,
    Stop,
    Submit,
    dispatch,
)
from serve.engine.types import EngineLoad, EngineStats, FinishReason, Limits, Request, SamplingParams, TokenEvent

REQUEST = Request([1, 2, 3], SamplingParams(max_new_tokens=4, seed=7), adapter="sql", session_id="s1")
MESSAGES = [
    Submit(3, REQUEST),
    Cancel(REQUEST.id),
    CloseSession("s1"),
    InstallAdapter(4, "sql", 2, "/adapters/sql", max_rank=8),
    RetireAdapter(5, "sql"),
    Stop(),
    Ready(
        ModelCard(
            "tiny", ModelView({"vocab_size": 10}), DeviceName("cuda", "cuda:1"), "torch.bfloat16", adapters={"a": 1}
        ),
        Limits(511, 512, 4096, 8, 16, 256),
        frozenset({2}),
        EngineLoad(0, 0),
    ),
    Failed("no weights"),
    Events(
        ((3, TokenEvent(9, "x")), (3, TokenEvent.ending(REQUEST, FinishReason.LENGTH))),
        Snapshot(1, 2, EngineStats(blocks_used=3, steps=4)),
    ),
    CallDone(4, "adapter 'sql': bad", refused=True),
]


def echo(conn) -> None:
    """In a spawned child: send back every message until the pipe closes."""
    while True:
        try:
            conn.send(conn.recv())
        except EOFError:
            return


def test_every_message_type_round_trips_through_a_spawned_process():
    context = multiprocessing.get_context("spawn")
    front, child_end = context.Pipe(duplex=True)
    child = context.Process(target=echo, args=(child_end,), daemon=True)
    child.start()
    child_end.close()
    try:
        for message in MESSAGES:
            front.send(message)
            assert front.poll(30), type(message).__name__
            back = front.recv()
            assert back == message and type(back) is type(message)
    finally:
        front.close()
        child.join(10)
    assert str(MESSAGES[6].model.device) == "cuda:1"


def test_dispatch_calls_the_handler_of_the_type_and_logs_an_unknown_one(caplog):
    seen = []
    handlers = {Cancel: seen.append}
    assert dispatch(Cancel("r1"), handlers, "engine process") is True
    with caplog.at_level(logging.ERROR, logger="serve.engine.protocol"):
        assert dispatch(("cancel", "r1"), handlers, "engine process") is False
    assert seen == [Cancel("r1")]
    assert "engine process got a message it does not handle: ('cancel', 'r1')" in caplog.text


class FakeConn:
    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)


class RefusingEngine:
    """Just enough of an Engine for the core's decoding: refuses every request, counts cancels."""

    waiting = running = 0

    def __init__(self):
        self.cancelled = []

    def stats(self):
        return EngineStats()

    def submit(self, request, sink, index):
        raise LookupError(f"adapter {request.adapter!r} is not loaded")

    def cancel(self, request_id):
        self.cancelled.append(request_id)


def test_the_core_ends_a_refused_request_with_its_reason_and_logs_unknown_messages(caplog):
    conn, engine = FakeConn(), RefusingEngine()
    core = Core(engine, Outbox(conn))
    core.handle(Submit(7, REQUEST))
    core.handle(Cancel("r9"))
    with caplog.at_level(logging.ERROR, logger="serve.engine.protocol"):
        core.handle(("stop",))
    assert not core.stopped and "does not handle: ('stop',)" in caplog.text
    core.handle(Stop())
    (events,) = conn.sent
    ((key, final),) = events.events
    assert key == 7 and final.finish_reason is FinishReason.ERROR and final.error == "adapter 'sql' is not loaded"
    assert engine.cancelled == ["r9"] and core.stopped


def test_an_unreadable_adapter_folder_comes_back_refused():
    conn = FakeConn()
    core = Core(RefusingEngine(), Outbox(conn))
    core.handle(InstallAdapter(1, "sql", 3, "/nowhere"))  # read on a thread of its own
    deadline = time.monotonic() + 30
    while not conn.sent and time.monotonic() < deadline:
        time.sleep(0.01)
    (done,) = conn.sent
    assert done.call == 1 and done.refused and "adapter 'sql': /nowhere needs adapter_config.json" in done.error
