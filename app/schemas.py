"""OpenAI-shaped request and response bodies (pydantic), plus ringserve's few extensions."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    field_validator,
)

FinishReason = Literal["stop", "length"]
MAX_N = 16  # choices per prompt; the engine also refuses n above its slot count
MAX_STOP = 16
MAX_STOP_CHARS = 512  # stop matching holds back up to this much text per sequence, every token
MAX_PROMPTS = 64  # prompts in one completions request (each becomes its own engine request)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # OpenAI documents `seed` as a 64-bit integer
INT32_MAX = 2**31 - 1  # bound of every count and token id: no model comes near it


def _encodable(value: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"); text that UTF-8 cannot encode is refused."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode: lone surrogate U+{ord(value[exc.start]):04X} "
                         f"at position {exc.start}") from None
    return value


# Every string field of a request body: strict (no coercion) and valid Unicode.
Text = Annotated[StrictStr, AfterValidator(_encodable)]
TokenId = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]
StopText = Annotated[Text, Field(max_length=MAX_STOP_CHARS)]


class _Body(BaseModel):
    # Unknown fields are ignored (clients send options we don't model, e.g. `user`), but every
    # modelled field is strict so a wrong type is a 400, never a silent coercion ("1" -> 1).
    model_config = ConfigDict(extra="ignore", strict=True, protected_namespaces=())


class StreamOptions(_Body):
    include_usage: bool = Field(False, description="Send a last chunk carrying `usage`.")


class SamplingFields(_Body):
    """Sampling fields shared by completions and chat completions."""

    model: Text = Field(
        ..., max_length=256, description="Served model name (see GET /v1/models)."
    )
    max_tokens: StrictInt | None = Field(
        None, ge=1, le=INT32_MAX,
        description="Most tokens to generate; default: up to the model's limit.",
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    n: StrictInt = Field(1, ge=1, le=MAX_N, description="Choices to generate per prompt.")
    stream: bool = Field(False, description="Stream server-sent events ending `data: [DONE]`.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")
    stop: StopText | list[StopText] | None = Field(
        None, description=f"Up to {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters "
        "that end generation (never returned).",
    )
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Penalty on seen tokens.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Penalty per occurrence.")
    seed: StrictInt | None = Field(
        None, ge=INT64_MIN, le=INT64_MAX, description="Seed for reproducible sampling (64-bit)."
    )
    # ringserve extensions (OpenAI SDK: pass through `extra_body`)
    top_k: StrictInt = Field(
        0, ge=0, le=INT32_MAX, description="Keep the k most likely tokens; 0 is off."
    )
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p * top prob.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="CTRL-style penalty.")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence.")
    stop_token_ids: list[TokenId] | None = Field(
        None, max_length=64, description="Token ids that end generation."
    )
    deadline_s: float | None = Field(
        None, gt=0.0, le=86400.0,
        description="Seconds from arrival; a request still queued then is answered 504.",
    )

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops


Prompt = (Text | Annotated[list[Text], Field(max_length=MAX_PROMPTS)] | list[TokenId]
          | Annotated[list[list[TokenId]], Field(max_length=MAX_PROMPTS)])


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: Prompt = Field(
        ..., description=f"Text, token ids, or a list of up to {MAX_PROMPTS} of either."
    )
    logprobs: StrictInt | None = Field(
        None, ge=0, le=20, description="Return this many top alternatives per token."
    )
    echo: bool = Field(False, description="Prefix each choice's text with its prompt.")


class TextPart(_Body):
    type: Literal["text"] = Field(..., description="Only text parts are supported.")
    text: Text = Field(..., description="The text.")


class ChatMessage(_Body):
    # Exactly the roles chat templates render: `developer` (OpenAI's newer name for the system
    # prompt) is rendered as `system`; tool and function messages are not supported.
    role: Literal["system", "developer", "user", "assistant"] = Field(
        ..., description="Who wrote the message; `developer` is treated as `system`."
    )
    content: Text | list[TextPart] | None = Field(..., description="Message text.")
    name: Text | None = Field(None, description="Optional author name (not rendered).")

    def template_role(self) -> str:
        """The role the chat template sees."""
        return "system" if self.role == "developer" else self.role

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation.")
    max_completion_tokens: StrictInt | None = Field(
        None, ge=1, le=INT32_MAX, description="Alias of max_tokens (newer OpenAI name)."
    )
    logprobs: bool = Field(False, description="Return log-probabilities of output tokens.")
    top_logprobs: StrictInt | None = Field(
        None, ge=0, le=20, description="Alternatives per token (needs logprobs=true)."
    )
    add_generation_prompt: bool = Field(
        True, description="Append the assistant turn header to the chat template."
    )


# Responses ------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int = Field(..., description="Tokens in the prompt(s).")
    completion_tokens: int = Field(..., description="Tokens generated over all choices.")
    total_tokens: int = Field(..., description="Sum of the two.")


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list, description="Each generated token.")
    token_logprobs: list[float | None] = Field(default_factory=list, description="Their logprobs.")
    top_logprobs: list[dict[str, float] | None] = Field(
        default_factory=list, description="Top alternatives per token."
    )
    text_offset: list[int] = Field(default_factory=list, description="Offset of each token.")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ringserve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
