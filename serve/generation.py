"""Between routes and engine: encode prompts, check token limits, admit, and collect results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

from serve.config import Settings
from serve.engine import Engine, EngineNotReady, EngineOverloaded, Request, RequestStream, SamplingParams, TokenEvent
from serve.engine.engine import Limits
from serve.engine.types import FinishReason
from serve.errors import GenerationFailed, NotReady, Overloaded, ValidationFailed
from serve.log import log_request
from serve.metrics import Metrics
from serve.model.prompt import PromptError, encode, render_chat


@dataclass
class Completion:
    """A finished generation: its text and its final event (finish reason, counts, timings)."""

    text: str
    final: TokenEvent


class GenerationService:
    """What routes call: prompt -> admitted request stream -> (optionally) collected completion."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics

    @property
    def limits(self) -> Limits:
        self._require_ready()
        return self.engine.limits

    @property
    def tokenizer(self) -> Any:
        self._require_ready()
        return self.engine.tokenizer

    def _require_ready(self) -> None:
        if not self.engine.ready:
            raise NotReady("the model is still loading; retry when /ping answers 200")

    def chat_prompt(self, messages: Iterable[dict[str, Any]]) -> list[int]:
        """Token ids of the messages rendered with the model's chat template."""
        try:
            text = render_chat(self.tokenizer, messages)
        except PromptError as exc:
            raise ValidationFailed(f"messages: {exc}", "messages") from exc
        return encode(self.tokenizer, text, add_special_tokens=False)

    def text_prompt(self, text: str, truncate: Optional[int] = None) -> list[int]:
        """Token ids of a raw prompt; ``truncate`` keeps only its last tokens (TGI)."""
        ids = encode(self.tokenizer, text, add_special_tokens=True)
        return ids[-truncate:] if truncate else ids

    def start(
        self,
        prompt_ids: list[int],
        requested_max_tokens: Optional[int],
        to_params: Callable[[int], SamplingParams],
        prompt_field: str,
    ) -> RequestStream:
        """Check the limits, then admit; raises a 4xx/5xx ServeError before any byte is sent."""
        max_new_tokens = self._max_new_tokens(len(prompt_ids), requested_max_tokens, prompt_field)
        request = Request(prompt_ids=prompt_ids, params=to_params(max_new_tokens))
        try:
            return self.engine.submit(request)
        except EngineOverloaded as exc:
            raise Overloaded(str(exc)) from exc
        except EngineNotReady as exc:
            raise NotReady(str(exc)) from exc

    def _max_new_tokens(self, prompt_tokens: int, requested: Optional[int], prompt_field: str) -> int:
        limits = self.limits
        if prompt_tokens == 0:
            raise ValidationFailed(f"{prompt_field}: the prompt is empty", prompt_field)
        if prompt_tokens > limits.max_input_tokens:
            raise ValidationFailed(
                f"{prompt_field}: the prompt has {prompt_tokens} tokens, more than MAX_INPUT_TOKENS="
                f"{limits.max_input_tokens}",
                prompt_field,
            )
        room = limits.max_total_tokens - prompt_tokens
        if requested is not None and requested > room:
            raise ValidationFailed(
                f"max_tokens: {requested} new tokens plus the {prompt_tokens} prompt tokens exceed "
                f"MAX_TOTAL_TOKENS={limits.max_total_tokens}; ask for at most {room}",
                "max_tokens",
            )
        return min(room, self.settings.default_max_new_tokens) if requested is None else requested

    def collect(self, stream: RequestStream, route: str) -> Completion:
        """Wait for the whole generation; GenerationFailed (424) if the model failed."""
        pieces: list[str] = []
        final: Optional[TokenEvent] = None
        try:
            for event in stream:
                pieces.append(event.text)
                final = event
        finally:
            stream.close()
            self.record(route, stream.request.id, final, streamed=False)
        if final is None or final.finish_reason is FinishReason.ERROR:
            raise GenerationFailed(f"generation failed: {final.error if final else 'no result'}")
        return Completion("".join(pieces), final)


    def stream_events(self, stream: RequestStream, route: str, heartbeat: float) -> Iterator[Optional[TokenEvent]]:
        """A stream's events, None every ``heartbeat`` s of silence; GenerationFailed if the model failed.

        However the iteration ends (finished, failed, or the client left and WSGI closed the generator), the request
        is cancelled if still running, logged and counted.
        """
        final: Optional[TokenEvent] = None
        try:
            for event in stream.events(heartbeat=heartbeat):
                if event is not None and event.finish_reason is FinishReason.ERROR:
                    raise GenerationFailed(f"generation failed: {event.error}")
                if event is not None and event.finish_reason is not None:
                    final = event
                yield event
        finally:
            stream.close()
            self.record(route, stream.request.id, final, streamed=True)

    def record(self, route: str, request_id: str, final: Optional[TokenEvent], streamed: bool) -> None:
        """Log the request's line and count it in the metrics (final is None when the client left mid-stream)."""
        log_request(route, request_id, final, streamed)
        if final is not None:
            self.metrics.observe(final)


def timing_headers(final: TokenEvent) -> dict[str, str]:
    """TGI's response headers with the request's timings (milliseconds) and token counts."""
    if final.timings is None:
        return {}
    per_token = final.timings.decode / max(final.generated_tokens - 1, 1)
    return {
        "x-compute-time": f"{(final.timings.prefill + final.timings.decode) * 1000:.0f}",
        "x-queue-time": f"{final.timings.queue * 1000:.0f}",
        "x-prompt-tokens": str(final.prompt_tokens),
        "x-generated-tokens": str(final.generated_tokens),
        "x-time-per-token": f"{per_token * 1000:.0f}",
    }
