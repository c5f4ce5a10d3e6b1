"""SSE writes: events that are already waiting share one write; nothing is held back once none waits."""

from serve.http.routes.sse import MAX_CHUNKS_PER_WRITE, coalesce


def test_waiting_events_share_a_write_and_the_last_is_never_held_back():
    waiting = iter([True, True, False, False, True, False])  # pending() after each of six chunks
    writes = list(coalesce(iter("abcdef"), lambda: next(waiting)))
    assert writes == ["abc", "d", "ef"]


def test_a_write_holds_at_most_max_chunks():
    writes = list(coalesce(iter(["x"] * (MAX_CHUNKS_PER_WRITE + 3)), lambda: True))
    assert [len(write) for write in writes] == [MAX_CHUNKS_PER_WRITE, 3]
