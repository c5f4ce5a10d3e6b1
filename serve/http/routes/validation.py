"""One validation step per payload kind: a request body in, a ``ValidRequest`` out (TGI's ``validate()`` cut).

Each ``validate_*`` parses the body, then checks token ids, encodes the prompts (size first), compiles the grammar,
resolves the adapter and fits each prompt's new-token budget into the limits, in that order, so that the same error
wins when several are wrong. ``GenerationService.start`` admits only the ``ValidRequest`` that comes out.
"""

from __future__ import annotations

from typing import Any, Optional, TypeVar, Union

from serve.http.errors import ValidationFailed
from serve.front.generation import ValidRequest
from serve.sagemaker.adapter_routes import requested_adapter
from serve.http.routes.common import service, validate
from serve.http.schemas import openai as oa
from serve.http.schemas import tgi

Body = TypeVar("Body", oa.ChatCompletionRequest, oa.CompletionRequest, tgi.GenerateRequest)


def validate_chat(payload: dict[str, Any]) -> ValidRequest[oa.ChatCompletionRequest]:
    """A chat completion body (/v1/chat/completions, or ``{"messages": ...}`` on /invocations), validated."""
    req = validate(oa.ChatCompletionRequest, payload)
    grammar, grammar_field = req.grammar()
    service().check_token_ids((token for token, _ in req.bias_entries), "logit_bias")
    tools = [tool.model_dump(exclude_none=True) for tool in req.active_tools]
    prompt_ids = service().chat_prompt((m.as_template_dict() for m in req.messages), tools)
    service().check_grammar(grammar, grammar_field)
    adapter = requested_adapter(req.model, "model", openai_model=True)
    return _within_limits(req, [prompt_ids], "messages", grammar, req.n, adapter)


def validate_completion(payload: dict[str, Any]) -> ValidRequest[oa.CompletionRequest]:
    """A text completion body (/v1/completions, or ``{"prompt": ...}`` on /invocations): one or many prompts."""
    req = validate(oa.CompletionRequest, payload)
    req.check_length()
    grammar = req.grammar()
    service().check_token_ids((token for token, _ in req.bias_entries), "logit_bias")
    prompts = [_completion_prompt(prompt, index, len(req.prompts)) for index, prompt in enumerate(req.prompts)]
    service().check_grammar(grammar, "response_format")
    adapter = requested_adapter(req.model, "model", openai_model=True)
    return _within_limits(req, prompts, "prompt", grammar, req.n, adapter)


def validate_generate(payload: dict[str, Any]) -> ValidRequest[tgi.GenerateRequest]:
    """A TGI generate body (/generate, /generate_stream, /, or ``{"inputs": ...}`` on /invocations)."""
    req = validate(tgi.GenerateRequest, payload)
    grammar = req.parameters.grammar.text() if req.parameters.grammar else None
    prompt_ids = service().text_prompt(req.inputs, truncate=req.parameters.truncate, field="inputs")
    service().check_grammar(grammar, "parameters.grammar")
    adapter = requested_adapter(req.parameters.adapter_id, "parameters.adapter_id")
    return _within_limits(req, [prompt_ids], "inputs", grammar, req.best_of, adapter)


def _completion_prompt(prompt: Union[str, list[int]], index: int, count: int) -> list[int]:
    """One prompt's token ids: a string is encoded, a list of ids is checked against the vocabulary."""
    if isinstance(prompt, str):
        return service().text_prompt(prompt)
    service().check_token_ids(prompt, "prompt" if count == 1 else f"prompt[{index}]")
    return list(prompt)


def _within_limits(
    req: Body, prompts: list[list[int]], field: str, grammar: Optional[str], n: int, adapter: Optional[str]
) -> ValidRequest[Body]:
    """The ValidRequest of ``prompts``: each prompt's budget checked against the limits, then its parameters built."""
    fields = [field if len(prompts) == 1 else f"{field}[{p}]" for p in range(len(prompts))]
    params = tuple(
        req.to_sampling_params(max_new_tokens(len(ids), req.requested_max_tokens, name), grammar)
        for ids, name in zip(prompts, fields)
    )
    return ValidRequest(req, tuple(prompts), params, n, adapter)


def max_new_tokens(prompt_tokens: int, requested: Optional[int], prompt_field: str) -> int:
    """The new-token budget of a prompt: 422 when it is empty, too long, or leaves no room for ``requested``."""
    limits = service().limits
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
    return min(room, service().settings.default_max_new_tokens) if requested is None else requested
