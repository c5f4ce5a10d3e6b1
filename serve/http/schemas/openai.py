"""OpenAI chat and text completion requests; the response models and their builders (openai_responses)
are imported here, so one module serves the routes."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator

from serve.engine.grammar import GrammarError, json_schema_grammar
from serve.engine.types import SamplingParams
from serve.errors import ValidationFailed
from serve.http.schemas.common import (
    MAX_LOGIT_BIAS,
    MAX_PROMPTS,
    MAX_TOP_LOGPROBS,
    LenientModel,
    SamplingFields,
    normalize_stop,
)
from serve.http.schemas.openai_responses import (  # noqa: F401 (re-exported: the routes build bodies through this module)
    SYSTEM_FINGERPRINT,
    ChatCompletion,
    ChatCompletionChunk,
    ModelList,
    TextCompletion,
    chat_choice,
    chat_chunk,
    chat_completion,
    completion_logprobs,
    logprob_entry,
    new_id,
    openai_finish_reason,
    text_choice,
    text_completion,
    usage,
    usage_chunk,
)
from serve.http.schemas.tools import NamedToolChoice, Tool, ToolChoice, call_schema, forced_tools, template_tool_calls

OPENAI_DEFAULT_TEMPERATURE = 1.0
MAX_CACHE_SALT_CHARS = 256  # a salt names a prefix-cache partition (a tenant): an id or a digest, never a document
CacheSalt = Annotated[str, Field(min_length=1, max_length=MAX_CACHE_SALT_CHARS)]
MAX_TEMPLATE_KWARGS = 32  # chat_template_kwargs entries
# What the server itself hands the chat template; a client's chat_template_kwargs may not replace them.
TEMPLATE_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt", "chat_template", "tokenize", "documents"})


class TextPart(LenientModel):
    """A text content part."""

    type: Literal["text"]
    text: str


class ImageUrl(LenientModel):
    url: str = Field(min_length=1)
    detail: Optional[Literal["auto", "low", "high"]] = None  # accepted; the model's processor decides the resolution


class ImagePart(LenientModel):
    """An image content part (a base64 data URL, or an http(s) URL where ALLOW_IMAGE_URLS is on): for a
    vision-language model; a text-only model answers it with a 400."""

    type: Literal["image_url"]
    image_url: ImageUrl


class FunctionCall(LenientModel):
    name: str
    arguments: str = "{}"


class AssistantToolCall(LenientModel):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


Content = Union[str, list[Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]]]


class ChatMessage(LenientModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: Optional[list[AssistantToolCall]] = None
    content: Optional[Content] = Field(default=None, validate_default=True)
    name: Optional[str] = None
    tool_call_id: Optional[str] = None

    @field_validator("content")
    @classmethod
    def _content_present(cls, value: Optional[Content], info: ValidationInfo) -> Optional[Content]:
        """Only an assistant message that carries tool_calls may leave content out (as OpenAI requires)."""
        if value is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise ValueError("field required (only an assistant message with tool_calls may omit content)")
        return value

    def as_template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it: role, content (plain text, or text and ``{"type": "image"}``
        parts where it holds images), and tool-call fields when present."""
        message: dict[str, Any] = {"role": self.role, "content": self._template_content()}
        if self.tool_calls:
            message["tool_calls"] = template_tool_calls([call.model_dump() for call in self.tool_calls])
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message

    def _template_content(self) -> Any:
        parts = [] if isinstance(self.content, str) else self.content or []
        if not any(isinstance(part, ImagePart) for part in parts):
            return self.content if isinstance(self.content, str) else "".join(part.text for part in parts)
        return [{"type": "image"} if isinstance(part, ImagePart) else part.model_dump() for part in parts]

    @property
    def image_urls(self) -> list[str]:
        """The URLs of this message's image parts, in order."""
        parts = [] if isinstance(self.content, str) else self.content or []
        return [part.image_url.url for part in parts if isinstance(part, ImagePart)]


class StreamOptions(LenientModel):
    include_usage: bool = False


class GrammarWithTools(ValidationFailed):
    """``response_format`` with ``tools``: refused with TGI's message and error type."""

    error_type = "grammar and tools"

    def __init__(self) -> None:
        super().__init__("Grammar and tools are mutually exclusive", "response_format")


class JsonSchemaFormat(LenientModel):
    name: str = "response"
    description: Optional[str] = None
    json_schema: dict[str, Any] = Field(alias="schema", default_factory=lambda: {"type": "object"})
    strict: Optional[bool] = None


class ResponseFormat(LenientModel):
    """OpenAI's spelling (``json_schema: {"name", "schema"}``) and TGI's (``value``: a schema or {"name", "schema"})."""

    type: Literal["text", "json", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None
    value: Union[dict[str, Any], bool, None] = Field(default=None, description="TGI's spelling: the JSON schema")

    def grammar(self) -> Optional[str]:
        """The grammar that enforces this format (None for plain text)."""
        if self.type == "text":
            return None
        if self.value is not None:
            value = self.value
            nested = self.type == "json_schema" and isinstance(value, dict) and isinstance(value.get("schema"), dict)
            return json_schema_grammar(value["schema"] if nested else value)
        if self.type == "json_object":
            return json_schema_grammar(True)
        if self.json_schema is None:
            field = "json_schema" if self.type == "json_schema" else "value"
            raise ValidationFailed(f'response_format.{field}: required when type is "{self.type}"', "response_format")
        return json_schema_grammar(self.json_schema.json_schema)


class _OpenAIRequest(SamplingFields):
    stream_options: Optional[StreamOptions] = None
    cache_salt: Optional[CacheSalt] = Field(default=None, description="vLLM's: shares the prefix cache only within it")
    prompt_cache_key: Optional[CacheSalt] = Field(default=None, description="OpenAI's: the salt when none is given")
    logit_bias: Optional[dict[str, float]] = Field(
        default=None,
        max_length=MAX_LOGIT_BIAS,
        description="Token id (string) -> bias in [-100, 100], added to its logit",
    )

    @field_validator("logit_bias")
    @classmethod
    def _bias_entries(cls, value: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        for key, bias in (value or {}).items():
            if not key.strip().isdigit():
                raise ValueError(f'key {key!r} is not a token id (send token ids as strings: {{"50256": -100}})')
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias {bias} for token {key} is outside [-100, 100]")
        return value

    @field_validator("stream_options")
    @classmethod
    def _needs_stream(cls, value: Optional[StreamOptions], info: ValidationInfo) -> Optional[StreamOptions]:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return value

    @property
    def bias_entries(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias) pairs."""
        return tuple((int(key), bias) for key, bias in (self.logit_bias or {}).items())

    @property
    def prefix_cache_salt(self) -> Optional[str]:
        """The prefix-cache partition the client asks for: ``cache_salt``, else ``prompt_cache_key``."""
        return self.cache_salt if self.cache_salt is not None else self.prompt_cache_key

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def logprob_count(self) -> Optional[int]:
        """How many alternatives per token to return (None: no log-probabilities)."""
        return None

    @property
    def scores_prompt(self) -> bool:
        """Whether the prompt's tokens get log-probabilities too."""
        return False

    def to_sampling_params(self, max_new_tokens: int, grammar: Optional[str] = None) -> SamplingParams:
        """Engine parameters; OpenAI's defaults are temperature 1 and top_p 1 when not given."""
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=OPENAI_DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p,
            typical_p=self.typical_p,
            repetition_penalty=self.repetition_penalty or 1.0,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            seed=self.seed,
            stop=normalize_stop(self.stop),
            ignore_eos=self.ignore_eos,
            logprobs=self.logprob_count,
            grammar=grammar,
            logit_bias=self.bias_entries,
            prompt_logprobs=self.scores_prompt,
        )


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = Field(default=None, max_length=128)
    tool_choice: Optional[ToolChoice] = None
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high"]] = Field(
        default=None, description="Passed to the chat template as `reasoning_effort` (gpt-oss reads it)"
    )
    chat_template_kwargs: Optional[dict[str, Any]] = Field(
        default=None,
        max_length=MAX_TEMPLATE_KWARGS,
        description='More variables for the chat template, e.g. {"enable_thinking": false} (Qwen3)',
    )

    @field_validator("chat_template_kwargs")
    @classmethod
    def _own_names(cls, value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        taken = sorted(set(value or {}) & TEMPLATE_VARIABLES)
        if taken:
            raise ValueError(f"{', '.join(taken)}: set by the server, not through chat_template_kwargs")
        return value

    @property
    def template_kwargs(self) -> dict[str, Any]:
        """Variables the chat template gets besides the messages and tools."""
        extra = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            extra.setdefault("reasoning_effort", self.reasoning_effort)
        return extra

    @model_validator(mode="after")
    def _consistent(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError(f"tool_choice {self._choice_name} needs a non-empty tools list")
        return self

    @property
    def _choice_name(self) -> str:
        choice = self.tool_choice
        return repr(choice.function.name) if isinstance(choice, NamedToolChoice) else repr(choice)

    @property
    def requested_max_tokens(self) -> Optional[int]:
        """``max_completion_tokens`` (it wins) or ``max_tokens``; None when neither is set (see serve.front.budget)."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprob_count(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def active_tools(self) -> list[Tool]:
        """The tools the model is told about ("none" hides them)."""
        return [] if self.tool_choice == "none" else list(self.tools or [])

    @property
    def forced_tools(self) -> list[Tool]:
        return forced_tools(self.active_tools, self.tool_choice)

    def grammar(self) -> tuple[Optional[str], str]:
        """The output grammar and the field it comes from: a forced tool call, else the response format (a format
        that constrains the output is refused together with ``tools``, with TGI's message)."""
        if self.tools is not None and self.response_format is not None and self.response_format.type != "text":
            raise GrammarWithTools()
        try:
            if self.forced_tools:
                return json_schema_grammar(call_schema(self.forced_tools)), "tools"
            return (self.response_format.grammar() if self.response_format else None), "response_format"
        except GrammarError as exc:
            field = "tools" if self.forced_tools else "response_format"
            raise ValidationFailed(f"{field}: the JSON schema does not compile: {exc}", field) from None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompt = Union[str, Annotated[list[str], Field(min_length=1)], TokenIds, Annotated[list[TokenIds], Field(min_length=1)]]


class CompletionRequest(_OpenAIRequest):
    prompt: Prompt = Field(description=f"A string, token ids, or a list of either (≤ {MAX_PROMPTS}): n choices each")
    max_tokens: Optional[int] = Field(default=None, ge=0, description="0 with echo: score the prompt only")
    echo: bool = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: Optional[ResponseFormat] = None  # an extension (vLLM has it too): constrained completions

    def grammar(self) -> Optional[str]:
        """The grammar of ``response_format`` (None for free text)."""
        try:
            return self.response_format.grammar() if self.response_format else None
        except GrammarError as exc:
            raise ValidationFailed(
                f"response_format: the JSON schema does not compile: {exc}", "response_format"
            ) from None

    @property
    def requested_max_tokens(self) -> Optional[int]:
        """``max_tokens`` (0 scores the prompt only); None when not set (serve.front.budget applies OpenAI's 16)."""
        return self.max_tokens

    @property
    def logprob_count(self) -> Optional[int]:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _bounded_prompts(cls, value: Any) -> Any:
        if isinstance(value, list) and isinstance(value[0], (str, list)) and len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(value)}")
        return value

    @property
    def prompts(self) -> list[Union[str, list[int]]]:
        """Each prompt of the request: a string or a list of token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)

    @property
    def scores_prompt(self) -> bool:
        """echo with logprobs: the prompt's tokens are scored too (lm-eval-harness's loglikelihood requests)."""
        return self.echo and self.logprobs is not None

    def check_length(self) -> None:
        """max_tokens 0 only scores the prompt, which needs echo (OpenAI's rule)."""
        if self.max_tokens == 0 and not self.echo:
            raise ValidationFailed("max_tokens: 0 is only allowed with echo: true (scoring the prompt)", "max_tokens")
