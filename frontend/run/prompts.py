"""A request's prompts: tokenized (chats rendered and truncated), fitted to the context window,
and what of them is echoed back."""

import functools
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

from frontend.api.request import GenerationRequest, PromptSource
from frontend.errors import internal_error, invalid_request
from frontend.metrics.request import PathTimings
from frontend.stages.clients import StageClients
from frontend.stages.types import ChatTurn, Prefilled, Tokenized, TokenLogprob
from services.request_params import OutputOptions

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Echo:
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with logprobs only


@dataclass(slots=True)
class PreparedPrompt:
    index: int
    token_ids: list[int]
    text: str  # as given, or the rendered chat; filled in by `describe` when needed
    max_tokens: int
    # The first choice's prefill, when prefill computed the prompt (the prompt's logprobs,
    # when asked), and its cache hits wherever it was computed.
    prefilled: Prefilled | None = None
    num_cached_tokens: int = 0
    echo: Echo = field(default_factory=Echo)


def fit_max_tokens(num_prompt_tokens: int, request: GenerationRequest, max_model_len: int) -> int:
    """max_tokens lowered to the room the prompt leaves in the context window."""
    room = max_model_len - num_prompt_tokens
    if room < 1:
        # Decode always produces the token prefill sampled, so one slot must be left for it.
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt "
            f"has {num_prompt_tokens} tokens, which leaves no room for a completion: shorten "
            f"it by at least {1 - room} tokens.",
            request.source.param,
            "context_length_exceeded",
        )
    if request.max_tokens is None:
        return min(request.default_max_tokens, room)
    if request.max_tokens > room and request.error_on_overflow:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt "
            f"({num_prompt_tokens} tokens) plus max_tokens ({request.max_tokens}) exceeds "
            f"it by {request.max_tokens - room} tokens.",
            "max_tokens",
            "context_length_exceeded",
        )
    return min(request.max_tokens, room)


class PromptTokenizer:
    """Tokenizer calls of one prompt, each timed into the prompt's path to its first token."""

    def __init__(self, stages: StageClients, timings: PathTimings) -> None:
        self._stages = stages
        self._timings = timings

    async def tokenize(self, source: PromptSource, index: int) -> Tokenized:
        if source.messages is not None:
            return await self._render_within(source)
        assert source.prompts is not None
        return await self._timed(self._stages.tokenize(source.prompts[index]))

    async def _render_within(self, source: PromptSource) -> Tokenized:
        """The chat rendered whole, or without its earliest non-system turns when longer than
        `truncate_len` (the last turn always stays; the tools are always listed). If nothing
        fits, the shortest rendering is returned and the context-window check decides."""
        assert source.messages is not None
        turns, limit = source.messages, source.truncate_len
        render = functools.partial(self._render, tools_json=source.tools_json)
        rendered = await render(turns)
        evictable = [i for i, turn in enumerate(turns[:-1]) if turn.role != "system"]
        if limit is None or len(rendered.token_ids) <= limit or not evictable:
            return rendered

        def without_first(count: int) -> list[ChatTurn]:
            evicted = set(evictable[:count])
            return [turn for i, turn in enumerate(turns) if i not in evicted]

        shortest = await render(without_first(len(evictable)))
        if len(shortest.token_ids) > limit:
            return shortest
        # Binary search for the fewest evictions that fit: fewer turns never render longer.
        best, low, high = shortest, 1, len(evictable) - 1
        while low <= high:
            middle = (low + high) // 2
            candidate = await render(without_first(middle))
            if len(candidate.token_ids) <= limit:
                best, high = candidate, middle - 1
            else:
                low = middle + 1
        return best

    async def _render(self, turns: list[ChatTurn], tools_json: str) -> Tokenized:
        return await self._timed(self._stages.render_chat(turns, tools_json))

    async def _timed(self, call: Awaitable[Tokenized]) -> Tokenized:
        started = time.monotonic_ns()
        tokenized = await call
        wall_ns = time.monotonic_ns() - started
        self._timings.add_tokenizer_call(wall_ns, tokenized.queue_ns, tokenized.duration_ns)
        return tokenized


async def describe(
    stages: StageClients, prompt: PreparedPrompt, options: OutputOptions, want_logprobs: bool
) -> None:
    """Fills in what the response shows of the prompt: its text (for raw_output or the echo of
    a token-id prompt), and the echoed part, with its logprobs when asked."""
    ids = prompt.token_ids
    count = options.echo_count(len(ids))
    if (options.raw_output or count == len(ids)) and not prompt.text:
        prompt.text = await stages.detokenize(ids)
    if not count:
        return
    if count == len(ids):
        prompt.echo.text = prompt.text
    else:
        prompt.echo.text = await stages.detokenize(ids[-count:])
    if not want_logprobs:
        return
    assert prompt.prefilled is not None
    entries = list(prompt.prefilled.prompt_logprobs)
    if len(entries) != len(ids) - 1:
        logger.error("prefill sent %d prompt logprobs for %d tokens", len(entries), len(ids))
        raise internal_error()
    if count == len(ids):
        # The first prompt token has no context, hence no logprob.
        first = await stages.detokenize(ids[:1])
        entries.insert(0, TokenLogprob(ids[0], None, first, first.encode()))
    prompt.echo.logprobs = entries[-count:]
