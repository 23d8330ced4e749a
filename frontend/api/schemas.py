"""Request bodies of /v1/completions and /v1/chat/completions, fields ordered like the docs.

Only the fields this server implements are declared; `frontend.api.unsupported` strips the
documented-but-unimplemented ones first, so `extra="forbid"` rejects exactly the unknown ones.
Strict mode: `"16"` is not an integer and `1` is not `true`, as in OpenAI's API.
"""

from functools import cached_property
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from frontend.api import fields
from frontend.api.fields import INT32_MAX, MAX_TOP_LOGPROBS, Prompt, invalid, unsupported
from frontend.api.response_format import ResponseFormat
from frontend.api.tools import Tool, ToolUse, message_tool_calls, tool_choice_value, tool_use

UINT64_MAX = 2**64 - 1
MAX_N = 128
CHAT_ROLES = ("system", "user", "assistant", "tool")
# OpenAI's newer name for the system role, sent by current SDKs and agent frameworks.
SYSTEM_ROLE_ALIASES = ("developer",)
UNSUPPORTED_ROLES = ("function",)
# The chat reference's default for prompt_truncate_len.
DEFAULT_PROMPT_TRUNCATE_LEN = 1500


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    # vLLM's extension (sent by GuideLLM and vLLM's benchmark client): usage on every chunk.
    continuous_usage_stats: bool | None = None


MaxTokens = Annotated[int | None, Field(ge=1, le=INT32_MAX)]
Temperature = Annotated[float | None, Field(ge=0, le=2)]
Probability = Annotated[float | None, Field(ge=0, le=1)]
TopK = Annotated[int | None, Field(ge=0, le=100)]
Penalty = Annotated[float | None, Field(ge=-2, le=2)]
RepetitionPenalty = Annotated[float | None, Field(ge=0, le=2)]
MirostatTarget = Annotated[float | None, Field(gt=0)]
MirostatLr = Annotated[float | None, Field(gt=0)]
Seed = Annotated[int | None, Field(ge=0, le=UINT64_MAX)]
NumChoices = Annotated[int | None, Field(ge=1, le=MAX_N)]
TopLogprobs = Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS)]
Count = Annotated[int | None, Field(ge=0, le=INT32_MAX)]
PositiveCount = Annotated[int | None, Field(ge=1, le=INT32_MAX)]
LengthBehavior = Literal["truncate", "error"] | None


class _GenerationRequest(_Strict):
    """The fields and validators both endpoints share; subclasses add the prompt or messages."""

    model: str
    # 0 only with echo: the prompt scored, nothing generated (checked by `generation_request`).
    max_tokens: Count = None
    max_completion_tokens: Count = None
    temperature: Temperature = None
    top_p: Probability = None
    top_k: TopK = None
    min_p: Probability = None
    typical_p: Probability = None
    frequency_penalty: Penalty = None
    presence_penalty: Penalty = None
    repetition_penalty: RepetitionPenalty = None
    mirostat_target: MirostatTarget = None
    mirostat_lr: MirostatLr = None
    seed: Seed = None
    logit_bias: dict[int, float] | None = None
    n: NumChoices = None
    stop: list[str] = Field(default_factory=list)
    # Whether the text ends with a matched stop string; the default is the endpoint's.
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    echo: bool | None = None
    echo_last: Count = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs = None
    raw_output: bool | None = None
    return_token_ids: bool | None = None
    context_length_exceeded_behavior: LengthBehavior = None
    response_format: ResponseFormat | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    perf_metrics_in_response: bool | None = None
    prompt_cache_max_len: Count = None
    prompt_cache_isolation_key: str | None = None
    # Speculative decoding: what the output is expected to repeat (one of the two).
    speculation: str | list[int] | None = None
    prediction: str | None = None
    user: str | None = None
    # Accepted and stored nowhere.
    metadata: dict[str, Any] | None = None
    # Accepted without effect: the model does not reason (its Info notes say so).
    reasoning_effort: str | int | None = None
    images: None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> list[str]:
        return fields.stop_list(value)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias(cls, value: Any) -> dict[int, float] | None:
        return fields.logit_bias_map(value)

    @field_validator("reasoning_effort", mode="before")
    @classmethod
    def _reasoning_effort(cls, value: Any) -> str | int | None:
        return fields.reasoning_effort(value)

    @field_validator("speculation", mode="before")
    @classmethod
    def _speculation(cls, value: Any) -> str | list[int] | None:
        return fields.speculation(value)

    @field_validator("prediction", mode="before")
    @classmethod
    def _prediction(cls, value: Any) -> str | None:
        return fields.prediction_text(value)

    @field_validator("images", mode="before")
    @classmethod
    def _images(cls, value: Any) -> None:
        return fields.no_images(value)

    def wants_logprobs(self) -> bool:
        return self.logprobs is not None and self.logprobs is not False


class CompletionRequest(_GenerationRequest):
    # "The returned text will not contain the stop sequence."
    stop_str_included_by_default: ClassVar[bool] = False
    prompt: list[Prompt]
    # The legacy integer form counts alternatives; validated by `_logprobs`.
    logprobs: bool | int | None = None  # type: ignore[assignment]

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: Any) -> list[Prompt]:
        return fields.prompt_list(value)

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs(cls, value: Any) -> bool | int | None:
        return fields.completion_logprobs(value)


class ChatMessage(_Strict):
    role: str
    # Validated by `_text_content` even when absent: only assistant turns may omit it.
    content: str | None = Field(default=None, validate_default=True)
    name: str | None = None
    # Validated by `_tool_call_id` even when absent: tool results must say which call.
    tool_call_id: str | None = Field(default=None, validate_default=True)
    tool_calls: list[dict[str, Any]] | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, value: Any) -> str:
        if value in SYSTEM_ROLE_ALIASES:
            return "system"
        if value in UNSUPPORTED_ROLES:
            raise unsupported(f"role '{value}' is not supported yet.")
        if value not in CHAT_ROLES:
            raise invalid(f"role must be one of {', '.join(repr(r) for r in CHAT_ROLES)}.")
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, value: Any, info: ValidationInfo) -> str | None:
        if value is None:
            if info.data.get("role", "assistant") != "assistant":
                raise invalid("content is required for this role.")
            return None
        return fields.text_content(value)

    @field_validator("tool_call_id", mode="before")
    @classmethod
    def _tool_call_id(cls, value: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if role == "tool" and value is None:
            raise invalid("tool messages need the tool_call_id they answer.")
        if role not in ("tool", None) and value is not None:
            raise invalid("tool_call_id is only valid in tool messages.")
        return value

    @field_validator("tool_calls", mode="before")
    @classmethod
    def _tool_calls(cls, value: Any, info: ValidationInfo) -> list[dict[str, Any]] | None:
        if value is None or value == []:
            return None
        if info.data.get("role") != "assistant":
            raise invalid("tool_calls are only valid in assistant messages.")
        return message_tool_calls(value)


class ChatCompletionRequest(_GenerationRequest):
    # "The returned text will contain the stop sequence."
    stop_str_included_by_default: ClassVar[bool] = True
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    prompt_truncate_len: PositiveCount = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, value: Any) -> str | dict[str, Any] | None:
        return tool_choice_value(value)

    @cached_property
    def tool_use(self) -> ToolUse:
        """What the tools ask of the stages; raises a 400 when tool_choice does not fit them."""
        return tool_use(self.tools, self.tool_choice, self.parallel_tool_calls)
