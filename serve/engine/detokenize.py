"""Incremental detokenization: turn a growing list of token ids into text deltas, never splitting UTF-8."""

from __future__ import annotations

from typing import Any, Optional

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_TOKENS = 6  # tokens before the new ones decoded with them, so context-dependent leading spaces come out right


class IncrementalDetokenizer:
    """Decodes token ids as they arrive and hands out only the text that is final.

    Decoding a token alone loses the leading space some tokenizers attach by context, and a multi-byte character
    may span tokens. Fast tokenizers stream through the tokenizers library's ``DecodeStream`` (one call into Rust
    per token, ~1 µs against ~8 µs for the window below). Otherwise, and for whatever is held back at the end, we
    decode a short window: the text of ``ids[prefix:]`` minus that of ``ids[prefix:read]`` is what the new tokens
    add; if it ends in a replacement char we wait for more.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stream, self.backend = _decode_stream(tokenizer, self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the new printable text (possibly empty)."""
        self.ids.append(token_id)
        if self.stream is not None:
            text = self.stream.step(self.backend, token_id)
            if text is None:
                return ""
            self.prefix_offset = max(0, len(self.ids) - CONTEXT_TOKENS)
            self.read_offset = len(self.ids)
            return text
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """Text held back at the end (an incomplete character is emitted as-is)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""


def _decode_stream(tokenizer: Any, context: list[int]) -> tuple[Optional[Any], Any]:
    """(a DecodeStream primed with ``context``, the Rust tokenizer) for a fast tokenizer; (None, None) otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, None
    try:
        from tokenizers.decoders import DecodeStream

        return DecodeStream(ids=context, skip_special_tokens=True), backend
    except (ImportError, TypeError):  # tokenizers before 0.21 has no DecodeStream; before 0.22 no context ids
        return None, None
