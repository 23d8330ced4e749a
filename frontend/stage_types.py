"""What the frontend sends to and gets from the stages.

`frontend.stages` converts these at the RPC edge; everything above it sees dataclasses. The
one protobuf message here is the KV handle, which the frontend carries from prefill to
decode without looking inside.
"""

from dataclasses import dataclass, field

from services.rpc import common_pb2

STAGE_NAMES = ("tokenizer", "prefill", "decode")

@dataclass(slots=True)
class ChatTurn:
    role: str
    content: str
    name: str = ""


@dataclass(slots=True)
class Tokenized:
    token_ids: list[int]
    queue_ns: int
    duration_ns: int


@dataclass(slots=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    seed: int | None  # None: the stages draw from their own generator


@dataclass(slots=True)
class Stopping:
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass(slots=True)
class Prefilled:
    # Opaque to the frontend: prefill's answer, handed to decode as it came.
    kv_handle: common_pb2.KvHandle
    first_token_id: int
    queue_ns: int
    compute_ns: int
    num_cached_tokens: int = 0


@dataclass(slots=True)
class PromptCache:
    """How the prompt may use the prefix cache: a salt that isolates it, a length cap."""

    isolation_key: str = ""
    max_tokens: int | None = None  # None: no cap


@dataclass(slots=True)
class TokenDelta:
    """One decode message: new tokens, their text, and whether the sequence ended."""

    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" | "length" | None while running
    num_generated: int
    # Only the first message of a request carries these.
    queue_ns: int = 0
    kv_transfer_ns: int = 0


@dataclass(slots=True)
class ModelLimits:
    model_id: str
    max_model_len: int
    backend_host: str  # the decode instance, as it names itself
