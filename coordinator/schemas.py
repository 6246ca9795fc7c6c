"""The consumer API's request and response bodies (OpenAI-compatible), as pydantic models.

They are the OpenAPI schema and what is sent: the routes build their responses, stream chunks and
errors from these models, so the docs and the wire cannot drift apart. Unknown request fields are
ignored, as OpenAI's own clients send some we do not use; fields we do use are checked strictly
(no `true` or "3" where a number goes, no lone surrogates in text) and a bad one is a 422.

Limits here are static; the limit that depends on the served model (a prompt's characters against
the context, see `Service.check_chars`) is checked before tokenizing."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator,
                      model_validator)

MAX_PROMPT_CHARS = 100_000
MAX_NEW_TOKENS = 4096
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
MAX_MESSAGES = 256
MAX_API_KEY_CHARS = 256


def _unicode(value: str) -> str:
    """JSON can carry lone surrogates (`"\\ud800"`); they are not text, and tokenizers reject them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return value


def text(min_chars: int = 0, max_chars: int | None = None):
    """A string of valid Unicode, its length limits in the schema (checked before the Unicode check)."""
    return Annotated[str, StringConstraints(min_length=min_chars, max_length=max_chars), AfterValidator(_unicode)]


ModelName = text(1, 256)
StopText = text(1, MAX_STOP_CHARS)
PromptText = text(1, MAX_PROMPT_CHARS)
MessageText = text(0, MAX_PROMPT_CHARS)
ApiKeyText = text(0, MAX_API_KEY_CHARS)
# JSON types as they are: no coercion of bools or strings, no NaN or infinity (Python's parser reads them)
STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = STRICT



    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = STRICT

    model: ModelName
    max_tokens: Annotated[int | None, Field(ge=1, le=MAX_NEW_TOKENS)] = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0, description="0 is greedy; default 1 as in OpenAI")] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    seed: Annotated[int | None, Field(ge=0, lt=2**63, description="sampling seed; random when absent")] = None
    n: Annotated[int, Field(ge=1, le=1, description="only 1 is supported")] = 1
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        return [value] if isinstance(value, str) else value or []

    def stops(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(SamplingFields):
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=1)] = Field(
        description="one prompt (a list of one string is accepted)")
    max_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)] = 16

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        return value[0] if isinstance(value, list) else value

    def chars(self) -> int:
        return len(self.prompt)


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant"]
    content: MessageText


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int | None, Field(ge=1, le=MAX_NEW_TOKENS)] = None

    @model_validator(mode="after")
    def _total(self):
        if sum(len(m.content) for m in self.messages) > MAX_PROMPT_CHARS:
            raise ValueError(f"the messages hold more than {MAX_PROMPT_CHARS} characters in all")
        return self

    def chars(self) -> int:
        return sum(len(m.content) for m in self.messages)

    def new_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class StreamRequest(BaseModel):
    """The first (and only) message a client sends on the WebSocket: a completion or a chat request."""
    model_config = STRICT

    api_key: ApiKeyText | None = None
    completion: CompletionRequest | None = None
    chat: ChatCompletionRequest | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    """One server-sent chunk of a streamed completion (the last, with usage, has no choices)."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class StreamDone(BaseModel):
    """The WebSocket's last message of a request that ended normally."""
    object: Literal["done"] = "done"
    id: str
    finish_reason: Literal["stop", "length"]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "meshpool"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class UsageRecord(BaseModel):
    request_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_units: int
    finish_reason: str
    ts_ms: int


class Account(BaseModel):
    object: Literal["account"] = "account"
    name: str
    account_id: str
    balance_units: int = Field(description="credits free to spend")
    held_units: int = Field(description="credits held in escrow by requests in flight")
    spent_units: int = Field(description="credits paid for tokens produced")
    requests: int
    recent_usage: list[UsageRecord]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class StreamError(ErrorBody):
    """The WebSocket's last message of a request that failed: the HTTP status it would have had."""
    status: int
