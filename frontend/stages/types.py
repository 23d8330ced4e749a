"""What the frontend sends to and gets from the stages.

`frontend.stages.wire` converts these at the RPC edge; everything above it sees dataclasses.
The one protobuf message here is the KV handle, which the frontend carries from prefill to
decode without looking inside.
"""

import time
from dataclasses import dataclass, field

from services.request_params import PromptCache, SamplingParams, Stopping
from services.rpc import common_pb2

STAGE_NAMES = ("tokenizer", "prefill", "decode")
DEFAULT_BLOCK_SIZE = 16


@dataclass(slots=True)
class ChatTurn:
    role: str
    content: str
    name: str = ""
    tool_call_id: str = ""
    tool_calls_json: str = ""  # assistant: its calls, as the OpenAI JSON list


@dataclass(slots=True)
class Tokenized:
    token_ids: list[int]
    queue_ns: int
    duration_ns: int
    text: str = ""  # the text as given, or the rendered chat; empty for token-id prompts


@dataclass(slots=True)
class Choice:
    """One choice of one prompt, as its prefill and decode calls send it."""

    id: str  # the request's id for its first choice, "<id>-<index>" for the others
    prompt_ids: list[int]
    sampling: SamplingParams
    stopping: Stopping
    prompt_cache: PromptCache
    deadline: float  # time.monotonic() by which the request must be done
    prediction_ids: list[int] = field(default_factory=list)  # what the output may repeat

    def time_left(self) -> float:
        """The deadline of its stage calls, in seconds from now (at least a moment)."""
        return max(0.001, self.deadline - time.monotonic())


@dataclass(slots=True)
class TopLogprob:
    token_id: int
    logprob: float
    token: str
    token_bytes: bytes


@dataclass(slots=True)
class TokenLogprob:
    """A token and its logprob; `logprob` is None for a prompt's first token (no context)."""

    token_id: int
    logprob: float | None
    token: str
    token_bytes: bytes
    top: list[TopLogprob] = field(default_factory=list)


@dataclass(slots=True)
class Prefilled:
    # Opaque to the frontend: prefill's answer, handed to decode as it came.
    kv_handle: common_pb2.KvHandle
    first_token_id: int
    queue_ns: int
    compute_ns: int
    num_cached_tokens: int = 0
    # Also opaque: passed through to decode, which streams it with the first token.
    first_token_logprob: common_pb2.TokenLogprob | None = None
    # With prompt logprobs: one per prompt token from the second on.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    # Mirostat's state after the first token, passed through for decode to continue from.
    mirostat_mu: float | None = None
    # The prefill instance (as this frontend addresses it) that holds the KV handle.
    prefill_instance: str = ""


@dataclass(slots=True)
class TokenDelta:
    """One decode message: new tokens, their text, and whether the sequence ended."""

    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" | "length" | None while running
    num_generated: int
    # Only the first message after the sequence joined the batch carries these.
    queue_ns: int = 0
    kv_transfer_ns: int = 0
    # When decode computed the prompt, the first message carries its prefill's numbers.
    prefill_queue_ns: int = 0
    prefill_compute_ns: int = 0
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id, if asked
    speculation: "SpeculationStats | None" = None  # the last message, if drafts were verified


@dataclass(slots=True)
class SpeculationStats:
    """Draft tokens verified for a request (all its choices) and how many were accepted."""

    prediction_tokens: int = 0  # tokens of the request's prediction (0: prompt lookup)
    draft_tokens: int = 0
    accepted_tokens: int = 0
    # Per draft position in a step: drafted and accepted counts.
    drafted_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)

    def add(self, other: "SpeculationStats") -> None:
        self.draft_tokens += other.draft_tokens
        self.accepted_tokens += other.accepted_tokens
        for mine, theirs in (
            (self.drafted_by_position, other.drafted_by_position),
            (self.accepted_by_position, other.accepted_by_position),
        ):
            mine += [0] * (len(theirs) - len(mine))
            for i, count in enumerate(theirs):
                mine[i] += count

    def acceptance(self) -> list[float]:
        """The share of drafts accepted at each position."""
        pairs = zip(self.accepted_by_position, self.drafted_by_position, strict=True)
        return [accepted / drafted for accepted, drafted in pairs]


@dataclass(slots=True)
class ModelLimits:
    model_id: str
    max_model_len: int
    block_size: int = DEFAULT_BLOCK_SIZE  # prefill's KV block: the unit of its prefix cache
    vocab_size: int = 0  # 0: unknown, token ids are not checked here


@dataclass(slots=True)
class StageStats:
    """One stage instance's load, from its Info, for /metrics."""

    service: str
    instance: str
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_used_blocks: int
    prefix_cache_queried_blocks: int
    prefix_cache_hit_blocks: int
    num_steps: int
    step_seconds: float
    num_grammar_steps: int
    grammar_seconds: float
    num_requests: int
    num_tokens: int
    kv_cache_bytes: int
    weight_bytes: int
