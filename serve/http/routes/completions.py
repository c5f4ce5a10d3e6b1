"""OpenAI text completions (/v1/completions, and ``{"prompt": ...}`` on /invocations): one or many prompts, as text
or token ids, ``n`` choices each; ``echo`` with ``logprobs`` scores the prompt (``max_tokens: 0`` scores only)."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Union

from flask import Response, jsonify

from serve.engine import TokenEvent
from serve.front.context import Api, RequestContext
from serve.front.generation import Choice, Generation, timing_headers
from serve.http.routes import sse
from serve.http.routes.common import admit, service, stream_events, token_texts, validator
from serve.http.schemas import openai as oa

Top = list[tuple[str, float]]
Usage = Callable[[dict[int, TokenEvent]], dict[str, Any]]  # every choice's final event -> the usage object
Entries = tuple[list[str], list[Optional[float]], list[Optional[dict]]]  # token texts, log-probabilities, alternatives


def completions(payload: dict[str, Any], context: RequestContext) -> Response:
    """Serve one text completion request."""
    valid = validator().completion(payload)
    req, prompts = valid.body, list(valid.prompts)
    generation = admit(valid, context.speaking(Api.COMPLETION, req.stream))
    echoes = [_echo_text(prompt) if req.echo else "" for prompt in req.prompts]
    completion_id = oa.new_id("cmpl")
    if req.stream:
        return sse.response(_chunks(generation, req, completion_id, prompts, echoes), generation.pending)
    choices = service().collect(generation)
    rendered = [_choice(req, c, prompts, echoes) for c in choices]
    body = oa.text_completion(completion_id, req.model, rendered, _usage(choices, req.n))
    response = jsonify(body)
    response.headers.update(timing_headers(choices[0].final))
    return response


def _echo_text(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else service().tokenizer.decode(prompt)


def _choice(req: oa.CompletionRequest, choice: Choice, prompts: list[list[int]], echoes: list[str]) -> dict[str, Any]:
    prompt = choice.index // req.n
    first = choice.tokens[0] if choice.tokens else choice.final  # a scoring-only request has no token events
    logprobs = _logprobs(req, choice.tokens, prompts[prompt] if req.scores_prompt else None, first, 0)
    reason = oa.openai_finish_reason(choice.final.finish_reason)
    return oa.text_choice(choice.index, echoes[prompt] + choice.text, reason, logprobs)


def _logprobs(
    req: oa.CompletionRequest, events: list[TokenEvent], prompt: Optional[list[int]], first: TokenEvent, offset: int
) -> Optional[dict]:
    """The legacy ``logprobs`` object: the echoed ``prompt``'s tokens (when given), then the generated ones."""
    if req.logprobs is None:
        return None
    texts, values, tops = _prompt_entries(prompt, first) if prompt is not None else ([], [], [])
    generated = token_texts([event.token_id for event in events])
    texts += generated
    values += [event.logprob for event in events]
    tops += [_with_chosen(_top(event.top_logprobs), text, event.logprob) for text, event in zip(generated, events)]
    return oa.completion_logprobs(texts, values, tops, offset)


def _prompt_entries(prompt: list[int], first: TokenEvent) -> Entries:
    """Each prompt token's text, log-probability (None for the first) and likeliest alternatives (with itself)."""
    texts = token_texts(prompt)
    values = list(first.prompt_logprobs or [None] * len(prompt))
    top_lists = list(first.prompt_top_logprobs or [()] * len(prompt))
    tops: list[Optional[dict]] = [None]
    for text, value, top in zip(texts[1:], values[1:], top_lists[1:]):
        tops.append(_with_chosen(_top(top), text, value))
    return texts, values, tops


def _top(top: tuple[tuple[int, float], ...]) -> Top:
    return list(zip(token_texts([token_id for token_id, _ in top]), [logprob for _, logprob in top]))


def _with_chosen(top: Top, text: str, logprob: Optional[float]) -> dict[str, float]:
    """The alternatives as {token: logprob}, the chosen token always among them (so ``logprobs: 0`` lists it)."""
    listed = dict(top)
    if logprob is not None:
        listed.setdefault(text, logprob)
    return listed


def _usage(choices: list[Choice], n: int) -> dict[str, Any]:
    return _usage_of({choice.index: choice.final for choice in choices}, n)


def _usage_of(finals: dict[int, TokenEvent], n: int) -> dict[str, Any]:
    """Usage summed over the prompts: each prompt (and its cached part) counted once, every choice's tokens."""
    firsts = [final for index, final in finals.items() if index % n == 0]
    return oa.usage(
        sum(final.prompt_tokens for final in firsts),
        sum(final.generated_tokens for final in finals.values()),
        sum(final.cached_tokens for final in firsts),
    )


def _chunks(
    generation: Generation,
    req: oa.CompletionRequest,
    completion_id: str,
    prompts: list[list[int]],
    echoes: list[str],
) -> Iterator[str]:
    """The stream: per choice, its echoed prompt (scored) with its first event, then a chunk per token."""

    def chunk(index: int, text: str, reason: Optional[str], logprobs: Optional[dict]) -> str:
        return sse.event(oa.text_completion(completion_id, req.model, [oa.text_choice(index, text, reason, logprobs)]))

    offsets: dict[int, int] = {}

    def render(index: int, event: TokenEvent) -> Iterator[str]:
        prompt = index // req.n
        if index not in offsets:  # this choice's first event: the echo goes first
            offsets[index] = len(echoes[prompt])
            if echoes[prompt]:
                scored = _logprobs(req, [], prompts[prompt], event, 0) if req.scores_prompt else None
                yield chunk(index, echoes[prompt], None, scored)
        tokens = [event] if event.token_id is not None else []
        logprobs = _logprobs(req, tokens, None, event, offsets[index])
        offsets[index] += len(event.text)
        if event.text or event.finish_reason is not None or tokens:
            yield chunk(index, event.text, oa.openai_finish_reason(event.finish_reason), logprobs)

    end = stream_end(req, completion_id, "text_completion", lambda finals: _usage_of(finals, req.n))
    return sse.stream(stream_events(generation), render, generation.context.api.error_style, end)


def stream_end(
    req: Union[oa.ChatCompletionRequest, oa.CompletionRequest], completion_id: str, obj: str, usage: Usage
) -> sse.End:
    """How an OpenAI stream ends: the usage chunk when ``stream_options.include_usage`` asks for it, then [DONE]."""

    def end(finals: dict[int, TokenEvent]) -> Iterator[str]:
        if req.include_usage:
            yield sse.event(oa.usage_chunk(completion_id, req.model, obj, usage(finals)))
        yield sse.DONE

    return end
