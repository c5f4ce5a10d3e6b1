import pytest
from transformers import AutoTokenizer

from serve.engine.detokenize import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(embedded_folder):
    return AutoTokenizer.from_pretrained(str(embedded_folder))


@pytest.mark.parametrize(
    "text",
    [
        "Hello world, this is a test.",
        "  leading spaces and\nnew lines\n\n",
        "Emoji 🤖🚀 and accents: café, naïve, 日本語",
    ],
)
def test_streamed_pieces_join_to_the_full_decode(tokenizer, text):
    prompt = tokenizer("Say:", add_special_tokens=False)["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.push(token) for token in ids] + [detok.flush()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in piece for piece in pieces)


def test_multibyte_character_is_not_split(tokenizer):
    ids = tokenizer("🤖", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "the emoji should span several byte-level tokens for this test to mean something"
    detok = IncrementalDetokenizer(tokenizer, [])
    pieces = [detok.push(token) for token in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🤖"


def stream_pieces(tokenizer, prompt, ids):
    detok = IncrementalDetokenizer(tokenizer, prompt)
    return [detok.push(token) for token in ids] + [detok.flush()], detok


@pytest.mark.parametrize(
    "text",
    [
        "Héllo wörld! 日本語のテキスト 🎉 def f(x): return x**2\n" * 3,
        " a leading space",
        "<|im_start|>assistant\nspecial tokens in the middle<|im_end|> and after",
    ],
)
def test_the_fast_stream_and_the_window_give_the_same_pieces(tokenizer, text):
    """Fast tokenizers stream through tokenizers' DecodeStream; slow ones (and the final flush) decode a window:
    both hand out the same text, piece for piece, with special tokens skipped."""
    prompt = tokenizer("The reply:", add_special_tokens=False)["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    fast, detok = stream_pieces(tokenizer, prompt, ids)
    assert detok.stream is not None  # the embedded tokenizer is a fast one

    class Slow:  # the same tokenizer seen without its Rust backend
        decode = staticmethod(tokenizer.decode)

    window, slow = stream_pieces(Slow(), prompt, ids)
    assert slow.stream is None
    assert fast == window and "".join(fast) == tokenizer.decode(ids, skip_special_tokens=True)


def test_an_unfinished_character_comes_out_at_the_end(tokenizer):
    ids = tokenizer("🤖", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [])
    assert [detok.push(token) for token in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.flush() == tokenizer.decode(ids[:-1])  # held back, then emitted as-is (replacement chars)
