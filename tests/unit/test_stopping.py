from serve.engine.stopping import StopStringMatcher


def feed_all(matcher, pieces):
    return "".join(matcher.feed(piece) for piece in pieces)


def test_no_stops_passes_text_through():
    assert feed_all(StopStringMatcher(()), ["a", "b"]) == "ab"


def test_stop_inside_one_piece_cuts_before_it():
    matcher = StopStringMatcher(("END",))
    assert feed_all(matcher, ["hello END world"]) == "hello "
    assert matcher.matched == "END"


def test_stop_across_token_boundaries():
    matcher = StopStringMatcher(("###",))
    out = feed_all(matcher, ["one #", "#", "# two"])
    assert out == "one " and matcher.matched == "###"


def test_partial_match_is_held_back_then_released():
    matcher = StopStringMatcher(("STOP",))
    assert matcher.feed("go ST") == "go "
    assert matcher.feed("AY") == "STAY"
    assert matcher.matched is None


def test_flush_releases_held_text_at_the_end():
    matcher = StopStringMatcher(("\n\nUser:",))
    assert matcher.feed("bye\n\n") == "bye"
    assert matcher.flush() == "\n\n"


def test_earliest_of_several_stops_wins():
    matcher = StopStringMatcher(("b", "a"))
    assert matcher.feed("xxab") == "xx" and matcher.matched == "a"
