"""The event sequence of a streamed response (OpenAI's Responses streaming events), numbered in order.

response.created, response.in_progress; per output item response.output_item.added, its content part's
.added, the text deltas, the text's .done, the part's .done, response.output_item.done; then response.completed
(response.incomplete when cut by the token budget, response.failed after an ``error`` event when generation fails).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from serve.http.routes import sse
from serve.http.schemas import responses_api_output as out


class _OpenPart:
    """The item being streamed: a message's output_text or a reasoning item's reasoning_text."""

    def __init__(self, kind: str, index: int):
        self.kind = kind  # "message" or "reasoning"
        self.id = out.new_item_id("msg" if kind == "message" else "rs")
        self.index = index
        self.text = ""

    @property
    def part_type(self) -> str:
        return "output_text" if self.kind == "message" else "reasoning_text"

    def part(self) -> dict[str, Any]:
        base = {"type": self.part_type, "text": self.text}
        return {**base, "annotations": [], "logprobs": []} if self.kind == "message" else base

    def item(self, status: str) -> dict[str, Any]:
        if self.kind == "message":
            return out.message_item(self.id, self.text, status)
        return out.reasoning_item(self.id, self.text, status)


class ResponseEvents:
    """Writes one response's stream: every event carries the next ``sequence_number``."""

    def __init__(self, skeleton: dict[str, Any]):
        self.skeleton = skeleton
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # the items done so far
        self.open: Optional[_OpenPart] = None

    def _event(self, kind: str, **fields: Any) -> str:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse.event(body, name=kind)

    def begin(self) -> Iterator[str]:
        yield self._event("response.created", response=self.skeleton)
        yield self._event("response.in_progress", response=self.skeleton)

    def text(self, delta: str) -> Iterator[str]:
        """Answer text: opens the message item (closing a reasoning item first) on its first delta."""
        yield from self._delta("message", "response.output_text.delta", delta)

    def reasoning(self, delta: str) -> Iterator[str]:
        """The model's thoughts, in a reasoning item of their own."""
        yield from self._delta("reasoning", "response.reasoning_text.delta", delta)

    def _delta(self, kind: str, event: str, delta: str) -> Iterator[str]:
        if not delta:
            return
        if self.open is None or self.open.kind != kind:
            yield from self._close("completed")
            yield from self._open(kind)
        part = self.open
        part.text += delta
        extra = {"logprobs": []} if kind == "message" else {}
        yield self._event(event, item_id=part.id, output_index=part.index, content_index=0, delta=delta, **extra)

    def _open(self, kind: str) -> Iterator[str]:
        part = self.open = _OpenPart(kind, len(self.output))
        yield self._event("response.output_item.added", output_index=part.index, item=part.item("in_progress"))
        where = {"item_id": part.id, "output_index": part.index, "content_index": 0}
        yield self._event("response.content_part.added", **where, part=part.part())

    def _close(self, status: str) -> Iterator[str]:
        part, self.open = self.open, None
        if part is None:
            return
        where = {"item_id": part.id, "output_index": part.index, "content_index": 0}
        done = "response.output_text.done" if part.kind == "message" else "response.reasoning_text.done"
        extra = {"logprobs": []} if part.kind == "message" else {}
        yield self._event(done, **where, text=part.text, **extra)
        yield self._event("response.content_part.done", **where, part=part.part())
        item = part.item(status)
        self.output.append(item)
        yield self._event("response.output_item.done", output_index=part.index, item=item)

    def calls(self, calls: list[dict[str, Any]]) -> Iterator[str]:
        """Function calls (chat ``tool_calls`` entries), each an item of its own after what came before."""
        if not calls:
            return
        yield from self._close("completed")
        for call in calls:
            yield from self._function_call(call)

    def finish(self, usage: dict[str, Any], cut: bool) -> Iterator[str]:
        """Close the open item, then send the final response (``cut``: incomplete, by the token budget)."""
        if self.open is None and not self.output:
            yield from self._open("message")  # an empty answer is still a message
        yield from self._close("incomplete" if cut else "completed")
        body = out.finished(self.skeleton, self.output, usage, cut)
        yield self._event("response.incomplete" if cut else "response.completed", response=body)

    def _function_call(self, call: dict[str, Any]) -> Iterator[str]:
        index = len(self.output)
        item = out.function_call_item(out.new_item_id("fc"), call, "completed")
        yield self._event(
            "response.output_item.added", output_index=index, item={**item, "arguments": "", "status": "in_progress"}
        )
        where = {"item_id": item["id"], "output_index": index}
        yield self._event("response.function_call_arguments.delta", **where, delta=item["arguments"])
        yield self._event("response.function_call_arguments.done", **where, arguments=item["arguments"])
        self.output.append(item)
        yield self._event("response.output_item.done", output_index=index, item=item)

    def fail(self, code: str, message: str, param: Optional[str] = None) -> Iterator[str]:
        """A generation that failed after the stream began: an ``error`` event, then response.failed."""
        yield from self._close("incomplete")
        yield self._event("error", code=code, message=message, param=param)
        yield self._event("response.failed", response=out.failed(self.skeleton, self.output, message))
