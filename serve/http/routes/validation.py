"""One validation step per payload kind: a request body in, a ``ValidRequest`` out (TGI's ``validate()`` cut).

Each ``Validator`` method parses the body, then checks token ids, encodes the prompts (size first), compiles the
grammar, resolves the adapter and fits each prompt's new-token budget into the limits, in that order, so that the
same error wins when several are wrong. ``GenerationService.start`` admits only the ``ValidRequest`` that comes out.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Optional, TypeVar, Union

from serve.front.budget import new_token_budget
from serve.front.context import Api
from serve.front.generation import GenerationService, ValidRequest
from serve.front.images import image_limits, prompt_with_images, taking_images
from serve.http.routes.parsing import validate
from serve.http.schemas import openai as oa
from serve.http.schemas import tgi

Body = TypeVar("Body", oa.ChatCompletionRequest, oa.CompletionRequest, tgi.GenerateRequest)
# (the body's adapter field, its name, whether it is OpenAI's ``model``) -> a loaded adapter's name or None
AdapterResolver = Callable[[Optional[str], str, bool], Optional[str]]


class Validator:
    """Validates request bodies against the model: its tokenizer, limits and grammar checker come from ``service``;
    ``resolve_adapter`` names the adapter a request asks for (a 422 for one that is not loaded)."""

    def __init__(self, service: GenerationService, resolve_adapter: AdapterResolver):
        self.service = service
        self.resolve_adapter = resolve_adapter
        self.image_limits = image_limits(service.settings)

    def chat(self, payload: dict[str, Any]) -> ValidRequest[oa.ChatCompletionRequest]:
        """A chat completion body (/v1/chat/completions, or ``{"messages": ...}`` on /invocations), validated."""
        req = validate(oa.ChatCompletionRequest, payload)
        grammar, grammar_field = req.grammar()
        self.service.check_token_ids((token for token, _ in req.bias_entries), "logit_bias")
        tools = [tool.model_dump(exclude_none=True) for tool in req.active_tools]
        urls = [url for message in req.messages for url in message.image_urls]
        if urls:
            taking_images(self.service.tokenizer, urls, self.image_limits)
        prompt_ids = self.service.chat_prompt((m.as_template_dict() for m in req.messages), tools, req.template_kwargs)
        prompt_ids, images = prompt_with_images(self.service.tokenizer, prompt_ids, urls, self.image_limits)
        self.service.check_grammar(grammar, grammar_field)
        adapter = self.resolve_adapter(req.model, "model", True)
        valid = self._within_limits(Api.CHAT, req, [prompt_ids], "messages", grammar, req.n, adapter)
        return replace(valid, images=images)

    def completion(self, payload: dict[str, Any]) -> ValidRequest[oa.CompletionRequest]:
        """A text completion body (/v1/completions, or ``{"prompt": ...}`` on /invocations): one or many prompts."""
        req = validate(oa.CompletionRequest, payload)
        req.check_length()
        grammar = req.grammar()
        self.service.check_token_ids((token for token, _ in req.bias_entries), "logit_bias")
        count = len(req.prompts)
        prompts = [self._completion_prompt(prompt, index, count) for index, prompt in enumerate(req.prompts)]
        self.service.check_grammar(grammar, "response_format")
        adapter = self.resolve_adapter(req.model, "model", True)
        return self._within_limits(Api.COMPLETION, req, prompts, "prompt", grammar, req.n, adapter)

    def generate(self, payload: dict[str, Any]) -> ValidRequest[tgi.GenerateRequest]:
        """A TGI generate body (/generate, /generate_stream, /, or ``{"inputs": ...}`` on /invocations)."""
        req = validate(tgi.GenerateRequest, payload)
        grammar = req.parameters.grammar.text() if req.parameters.grammar else None
        prompt_ids = self.service.text_prompt(req.inputs, truncate=req.parameters.truncate, field="inputs")
        self.service.check_grammar(grammar, "parameters.grammar")
        adapter = self.resolve_adapter(req.parameters.adapter_id, "parameters.adapter_id", False)
        valid = self._within_limits(Api.TGI, req, [prompt_ids], "inputs", grammar, req.best_of, adapter)
        return self._watermarked(valid) if req.parameters.watermark else valid

    def _watermarked(self, valid: ValidRequest[tgi.GenerateRequest]) -> ValidRequest[tgi.GenerateRequest]:
        """``watermark: true``: TGI's green-list watermark, with WATERMARK_GAMMA and WATERMARK_DELTA."""
        mark = self.service.settings.watermark
        return replace(valid, params=tuple(replace(params, watermark=mark) for params in valid.params))

    def _completion_prompt(self, prompt: Union[str, list[int]], index: int, count: int) -> list[int]:
        """One prompt's token ids: a string is encoded, a list of ids is checked against the vocabulary."""
        if isinstance(prompt, str):
            return self.service.text_prompt(prompt)
        self.service.check_token_ids(prompt, "prompt" if count == 1 else f"prompt[{index}]")
        return list(prompt)

    def _within_limits(
        self,
        api: Api,
        req: Body,
        prompts: list[list[int]],
        field: str,
        grammar: Optional[str],
        n: int,
        adapter: Optional[str],
    ) -> ValidRequest[Body]:
        """The ValidRequest of ``prompts``: each prompt's budget checked against the limits, then its parameters."""
        limits, fill = self.service.limits, self.service.settings.default_max_new_tokens
        fields = [field if len(prompts) == 1 else f"{field}[{p}]" for p in range(len(prompts))]
        budgets = [
            new_token_budget(api, req.requested_max_tokens, len(ids), limits, fill, f)
            for ids, f in zip(prompts, fields)
        ]
        params = tuple(req.to_sampling_params(budget, grammar) for budget in budgets)
        return ValidRequest(req, tuple(prompts), params, n, adapter, req.prefix_cache_salt)
