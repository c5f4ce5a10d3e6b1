"""OpenAI Responses API requests (``POST /v1/responses``): the body's models and its refusals (the chat completion
body it becomes: responses_api_chat).

Stateless: nothing is stored, so the fields that need server state (``store: true``, ``previous_response_id``,
``conversation``, ``background``, ``item_reference`` items) and OpenAI's built-in tools are refused with a 400 that
names the field. Unknown fields are ignored, as on the chat route.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

from serve.http.schemas.common import LenientModel

MAX_TOOLS = 128
MAX_INPUT_ITEMS = 2048
TAG = "~"  # begins the tags of this module's unions, which error locations leave out (see error_location)
NO_STATE = "this server keeps no responses (stateless); send the whole conversation in input"
REASONING_EFFORTS = Literal["none", "minimal", "low", "medium", "high"]


def _refused(message: str) -> PydanticCustomError:
    """A validation error whose message is ``message`` as it is (no "Value error," prefix)."""
    return PydanticCustomError("unsupported", message)


class InputTextPart(LenientModel):
    """A text part: ``input_text`` (user, system, developer) or ``output_text`` (an earlier assistant answer)."""

    type: Literal["input_text", "output_text"]
    text: str


class RefusalPart(LenientModel):
    """An earlier assistant refusal, replayed as its text."""

    type: Literal["refusal"]
    refusal: str

    @property
    def text(self) -> str:
        return self.refusal


class InputImagePart(LenientModel):
    """An image by URL (a base64 data URL, or http(s) where ALLOW_IMAGE_URLS is on), for a vision-language model;
    ``file_id`` is refused (no file store)."""

    type: Literal["input_image"]
    image_url: Optional[str] = None
    file_id: Optional[str] = None
    detail: Optional[Literal["auto", "low", "high"]] = None

    @model_validator(mode="after")
    def _by_url(self) -> "InputImagePart":
        if self.file_id is not None or not self.image_url:
            raise _refused("an input_image needs its image_url (file_id needs a file store, which this server has not)")
        return self

    def chat_part(self) -> dict[str, Any]:
        return {"type": "image_url", "image_url": {"url": self.image_url}}


class UnsupportedPart(LenientModel):
    """A file or audio part: refused (no file store, no audio model)."""

    type: str

    @model_validator(mode="after")
    def _refuse(self) -> "UnsupportedPart":
        raise _refused(f"{self.type!r} parts are not supported; send input_text or input_image parts")


def _part_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return TAG + (kind if kind in ("input_text", "output_text", "refusal", "input_image") else "other")


ContentPart = Annotated[
    Union[
        Annotated[InputTextPart, Tag(f"{TAG}input_text")],
        Annotated[InputTextPart, Tag(f"{TAG}output_text")],
        Annotated[RefusalPart, Tag(f"{TAG}refusal")],
        Annotated[InputImagePart, Tag(f"{TAG}input_image")],
        Annotated[UnsupportedPart, Tag(f"{TAG}other")],
    ],
    Discriminator(_part_kind),
]


def _shape(value: Any) -> Optional[str]:
    if isinstance(value, str):
        return f"{TAG}text"
    return f"{TAG}list" if isinstance(value, list) else None


def text_or_list(item: Any, **list_limits: Any) -> Any:
    """A string or a list of ``item``: its errors name only the branch the value took."""
    return Annotated[
        Union[Annotated[str, Tag(f"{TAG}text")], Annotated[list[item], Field(**list_limits), Tag(f"{TAG}list")]],
        Discriminator(
            _shape, custom_error_type="string_or_list", custom_error_message="a string or a list is expected"
        ),
    ]


TextContent = text_or_list(ContentPart)


class MessageItem(LenientModel):
    """A message: a role and its text (a string or text parts)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: TextContent

    @property
    def text(self) -> str:
        parts = [] if isinstance(self.content, str) else self.content
        return self.content if isinstance(self.content, str) else "".join(p.text for p in parts if hasattr(p, "text"))

    @property
    def chat_content(self) -> Any:
        """The content as a chat message's: its text, or text and image parts where it holds images."""
        parts = [] if isinstance(self.content, str) else self.content
        if not any(isinstance(part, InputImagePart) for part in parts):
            return self.text
        return [p.chat_part() if isinstance(p, InputImagePart) else {"type": "text", "text": p.text} for p in parts]


class FunctionCallItem(LenientModel):
    """A function call the model made in an earlier turn."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str = "{}"


class FunctionCallOutputItem(LenientModel):
    """The result of an earlier function call, sent back to the model."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: TextContent

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(part.text for part in self.output)


class ReasoningItem(LenientModel):
    """An earlier turn's reasoning, as clients send the previous output back: accepted and left out of the prompt
    (chat templates drop earlier turns' thoughts)."""

    type: Literal["reasoning"]


class ItemReference(LenientModel):
    """A reference to a stored item: refused, nothing is stored."""

    type: Literal["item_reference"]

    @model_validator(mode="after")
    def _refuse(self) -> "ItemReference":
        raise _refused(f"item_reference items are not supported: {NO_STATE}")


def _item_kind(value: Any) -> Optional[str]:
    """An input item's type; a message may leave it out (OpenAI's "easy" input message)."""
    if isinstance(value, dict):
        return TAG + str(value.get("type", "message"))
    return None


InputItem = Annotated[
    Union[
        Annotated[MessageItem, Tag(f"{TAG}message")],
        Annotated[FunctionCallItem, Tag(f"{TAG}function_call")],
        Annotated[FunctionCallOutputItem, Tag(f"{TAG}function_call_output")],
        Annotated[ReasoningItem, Tag(f"{TAG}reasoning")],
        Annotated[ItemReference, Tag(f"{TAG}item_reference")],
    ],
    Discriminator(
        _item_kind,
        custom_error_type="unsupported_item",
        custom_error_message=(
            "unsupported input item type; send message, function_call, function_call_output or reasoning items"
        ),
    ),
]


Input = text_or_list(InputItem, min_length=1, max_length=MAX_INPUT_ITEMS)


class FunctionTool(LenientModel):
    """A function the model may call (the Responses API's flat form of a chat tool)."""

    type: str
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: Optional[str] = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: Optional[bool] = None

    @model_validator(mode="before")
    @classmethod
    def _function_only(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if kind != "function":
            raise _refused(f"built-in tool type {kind!r} is not supported; only function tools are")
        return data

    def chat_tool(self) -> dict[str, Any]:
        """The tool as a chat completion body spells it."""
        function = {"name": self.name, "parameters": self.parameters}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


class FunctionChoice(LenientModel):
    type: Literal["function"]
    name: str


class TextFormat(LenientModel):
    """``text.format``: plain text, any JSON object, or JSON that follows ``schema``."""

    type: Literal["text", "json_object", "json_schema"]
    name: str = "response"
    description: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None

    @model_validator(mode="after")
    def _schema_given(self) -> "TextFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise _refused('schema: required when type is "json_schema"')
        return self

    def response_format(self) -> dict[str, Any]:
        """The chat body's ``response_format`` of this format."""
        if self.type != "json_schema":
            return {"type": self.type}
        return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.json_schema}}

    def echoed(self) -> dict[str, Any]:
        """The format as a response echoes it."""
        if self.type != "json_schema":
            return {"type": self.type}
        return {
            "type": "json_schema",
            "name": self.name,
            "schema": self.json_schema,
            "strict": self.strict,
            "description": self.description,
        }


class TextConfig(LenientModel):
    format: TextFormat = Field(default_factory=lambda: TextFormat(type="text"))


class ReasoningConfig(LenientModel):
    effort: Optional[REASONING_EFFORTS] = None
    summary: Optional[Literal["auto", "concise", "detailed"]] = None


def error_location(loc: tuple) -> tuple:
    """A pydantic error location without this module's union tags: ``("input", 0, "content")``."""
    return tuple(part for part in loc if not (isinstance(part, str) and part.startswith(TAG)))


def _tool_choice(value: Any) -> Any:
    """Only function choices are known: a built-in tool or ``allowed_tools`` choice is refused."""
    if isinstance(value, dict) and value.get("type") != "function":
        raise _refused(f"tool_choice of type {value.get('type')!r} is not supported; name a function tool")
    return value


ToolChoice = Annotated[Union[Literal["none", "auto", "required"], FunctionChoice], Field(union_mode="left_to_right")]
CacheKey = Annotated[str, Field(min_length=1, max_length=256)]


class ResponsesRequest(LenientModel):
    """A ``POST /v1/responses`` body."""

    model: str = "tgi"
    input: Input
    instructions: Optional[str] = Field(default=None, description="A system message put before the input")
    max_output_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    tools: Optional[list[FunctionTool]] = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Optional[ToolChoice] = None
    parallel_tool_calls: bool = True
    text: Optional[TextConfig] = None
    reasoning: Optional[ReasoningConfig] = None
    stream: bool = False
    metadata: Optional[dict[str, str]] = Field(default=None, max_length=16, description="Echoed in the response")
    prompt_cache_key: Optional[CacheKey] = Field(default=None, description="The prefix-cache salt (a tenant)")
    store: Optional[bool] = Field(default=None, description="Only false: nothing is stored")
    background: Optional[bool] = Field(default=None, description="Only false: responses are served in the request")
    truncation: Literal["disabled", "auto"] = "disabled"
    previous_response_id: None = Field(default=None, description="Refused: nothing is stored")
    conversation: None = Field(default=None, description="Refused: nothing is stored")
    prompt: None = Field(default=None, description="Refused: reusable prompts live on OpenAI's platform")

    _check_choice = field_validator("tool_choice", mode="before")(_tool_choice)

    @field_validator("store", "background")
    @classmethod
    def _only_false(cls, value: Optional[bool], info: Any) -> Optional[bool]:
        if value:
            reason = NO_STATE if info.field_name == "store" else "responses are served within the request"
            raise _refused(f"only false is supported: {reason}")
        return value

    @field_validator("previous_response_id", "conversation", "prompt", mode="before")
    @classmethod
    def _stateful(cls, value: Any, info: Any) -> Any:
        if value is None:
            return value
        if info.field_name == "prompt":
            raise _refused("stored prompt templates are not supported; send the text as instructions and input")
        raise _refused(f"not supported: {NO_STATE}")

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, value: str) -> str:
        if value == "auto":
            raise _refused('only "disabled" is supported: an input past MAX_INPUT_TOKENS is refused, never cut')
        return value

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, str) and not value:
            raise _refused("the input is empty")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_needs_tools(cls, value: Optional[ToolChoice], info: Any) -> Optional[ToolChoice]:
        if value not in (None, "none", "auto") and not info.data.get("tools"):
            raise _refused("a tool_choice other than none or auto needs a non-empty tools list")
        return value

    @property
    def text_format(self) -> TextFormat:
        return self.text.format if self.text else TextFormat(type="text")

    @property
    def effort(self) -> Optional[str]:
        return self.reasoning.effort if self.reasoning else None
