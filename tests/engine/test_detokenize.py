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
