"""Request bodies of /v1/completions and /v1/chat/completions, fields ordered like the OpenAI docs.

Only the fields this server implements are declared; `frontend.unsupported` strips the
documented-but-unimplemented ones first, so `extra="forbid"` rejects exactly the unknown ones.
Strict mode: `"16"` is not an integer and `1` is not `true`, as in OpenAI's API.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
MAX_STOP_SEQUENCES = 4
MAX_N = 128  # the documented range of n; values inside it are refused as "not yet", not "invalid"
CHAT_ROLES = ("system", "user", "assistant")
UNSUPPORTED_ROLES = ("developer", "tool", "function")

# The token-id form of a prompt: a list of ints, or one list of them.
TokenIds = list[int]


def invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


def unsupported(message: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported_value", message)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = None


Temperature = Annotated[float | None, Field(ge=0, le=2)]
TopP = Annotated[float | None, Field(gt=0, le=1)]
TopK = Annotated[int | None, Field(ge=0, le=100)]
Seed = Annotated[int | None, Field(ge=0, le=UINT64_MAX)]
MaxTokens = Annotated[int | None, Field(ge=1)]
LengthBehavior = Literal["truncate", "error"] | None


class _GenerationRequest(_Strict):
    """The fields and validators both endpoints share; subclasses add the prompt or messages."""

    model: str
    max_tokens: MaxTokens = None
    max_completion_tokens: MaxTokens = None
    n: int | None = None
    seed: Seed = None
    stop: list[str] = Field(default_factory=list)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature = None
    top_p: TopP = None
    user: str | None = None
    # Fireworks extensions.
    top_k: TopK = None
    ignore_eos: bool | None = None
    context_length_exceeded_behavior: LengthBehavior = None
    perf_metrics_in_response: bool | None = None
    prompt_cache_isolation_key: str | None = None
    prompt_cache_max_len: Annotated[int | None, Field(ge=0, le=INT32_MAX)] = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= MAX_N:
            raise invalid(f"n must be between 1 and {MAX_N}.")
        if value is not None and value != 1:
            raise unsupported("n > 1 is not supported yet.")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> list[str]:
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise invalid("stop must be a string or a list of strings.")
        if len(stops) > MAX_STOP_SEQUENCES:
            raise invalid(f"stop takes at most {MAX_STOP_SEQUENCES} sequences.")
        if any(not s for s in stops):
            raise invalid("stop sequences must not be empty.")
        return stops


class CompletionRequest(_GenerationRequest):
    prompt: str | TokenIds

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> str | TokenIds:
        return normalize_prompt(value)


class ChatMessage(_Strict):
    role: str
    # Validated by `_text_content` even when absent: only assistant turns may omit it.
    content: str | None = Field(default=None, validate_default=True)
    name: str | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, value: Any) -> str:
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
        return normalize_content(value)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)


def normalize_prompt(value: Any) -> str | TokenIds:
    """One prompt as a string or token ids; a batch of one is unwrapped, larger batches refused."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid("prompt must be a string, a list of strings or a list of token ids.")
    if not value:
        raise invalid("prompt must not be empty.")
    if all(type(x) is int for x in value):
        if any(not 0 <= x <= INT32_MAX for x in value):
            raise invalid("token ids in prompt must be non-negative 32-bit integers.")
        return value
    if all(isinstance(x, str) for x in value) or all(isinstance(x, list) for x in value):
        if len(value) > 1:
            raise unsupported("batched prompts are not supported yet; send one prompt per request.")
        if isinstance(value[0], list) and not value[0]:
            raise invalid("prompt must not be empty.")
        if isinstance(value[0], list) and not all(type(x) is int for x in value[0]):
            raise invalid("a token-id prompt must be a list of integers.")
        return normalize_prompt(value[0])
    raise invalid("prompt must be a string, a list of strings or a list of token ids.")


def normalize_content(value: Any) -> str:
    """Message content as one string; text parts are joined by newlines (as vLLM does)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid("content must be a string or a list of text parts.")
    texts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict):
            raise invalid(f"content[{i}] must be an object.")
        kind = part.get("type")
        if kind != "text":
            if isinstance(kind, str):
                raise unsupported(f"content[{i}]: part type '{kind}' is not supported yet.")
            raise invalid(f"content[{i}].type must be 'text'.")
        if not isinstance(part.get("text"), str):
            raise invalid(f"content[{i}].text must be a string.")
        unknown = sorted(set(part) - {"type", "text"})
        if unknown:
            raise invalid(f"content[{i}] has an unknown field '{unknown[0]}'.")
        texts.append(part["text"])
    return "\n".join(texts)
