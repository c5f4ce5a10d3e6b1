"""Grammar masks on the logits' device: llguidance's bitmask is filled on the host, uploaded once, and applied in
place; no row of logits goes to the host, and a reused staging buffer never leaks one step's mask into the next."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from serve.engine.grammar import Grammars, regex_grammar
from serve.engine.uploads import Uploads


@pytest.fixture(scope="module")
def grammars(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def expected(logits: torch.Tensor, matcher) -> torch.Tensor:
    """The row masked from the matcher's own bitmask (bit t of the bytes: token t allowed)."""
    mask = matcher.compute_bitmask()
    allowed = [bool(mask[token // 8] >> (token % 8) & 1) for token in range(logits.shape[-1])]
    return logits.masked_fill(~torch.tensor(allowed), float("-inf"))


def test_constrained_rows_are_masked_in_place_and_others_left_alone(grammars):
    logits = torch.randn(3, grammars._tokenizer.vocab_size)
    original, address = logits.clone(), logits.data_ptr()
    digits, word = grammars.matcher(regex_grammar("[0-9]{3}")), grammars.matcher(regex_grammar("(yes|no)"))
    masked = grammars.mask(logits, [digits, None, word], Uploads(logits.device))
    assert masked.data_ptr() == address and logits.data_ptr() == address
    assert torch.equal(logits[0], expected(original[0], digits))
    assert torch.equal(logits[1], original[1])
    assert torch.equal(logits[2], expected(original[2], word))
    assert logits[0].isinf().sum() > logits.shape[-1] // 2  # most tokens are not digits


def test_a_reused_buffer_carries_no_mask_from_the_step_before(grammars):
    uploads = Uploads(torch.device("cpu"))
    vocab = grammars._tokenizer.vocab_size
    first = grammars.matcher(regex_grammar("a[0-9]"))
    grammars.mask(torch.randn(2, vocab), [first, first], uploads)
    free = grammars.matcher(regex_grammar("[a-z]+"))
    logits = torch.randn(1, vocab)
    original = logits.clone()
    grammars.mask(logits, [free], uploads)
    assert uploads.allocated == 1 and torch.equal(logits[0], expected(original[0], free))


def test_no_row_of_logits_goes_to_the_host(grammars, monkeypatch):
    vocab = grammars._tokenizer.vocab_size
    moved = []
    for name in ("cpu", "to"):
        original = getattr(torch.Tensor, name)

        def spy(tensor, *args, _original=original, _name=name, **kwargs):
            if tensor.is_floating_point() and tensor.dim() and tensor.shape[-1] == vocab:
                moved.append(_name)
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    matcher = grammars.matcher(regex_grammar("[0-9]+"))
    grammars.mask(torch.randn(4, vocab), [None, matcher, matcher, None], Uploads(torch.device("cpu")))
    assert moved == []
