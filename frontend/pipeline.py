"""tokenize -> fit max_tokens -> prefill -> decode, for one request, with its timings."""

import logging
import time
from dataclasses import dataclass, field

from frontend.errors import internal_error, invalid_request
from frontend.metrics import RequestMetrics
from frontend.stage_types import (
    ChatTurn,
    Prefilled,
    PromptCache,
    Sampling,
    Stopping,
    TokenDelta,
    Tokenized,
)
from frontend.stages import DecodeStream, StageClients

logger = logging.getLogger(__name__)

# OpenAI's default for /v1/completions.
COMPLETION_DEFAULT_MAX_TOKENS = 16
# /v1/chat/completions default: the rest of the context window, capped at this (the
# Fireworks chat guide's default) so a forgotten max_tokens cannot hold a slot for 100k tokens.
CHAT_DEFAULT_MAX_TOKENS = 2048


@dataclass(slots=True)
class PromptSource:
    """A completion prompt (text or token ids) or a chat; exactly one is set."""

    prompt: str | list[int] | None = None
    messages: list[ChatTurn] | None = None

    @property
    def param(self) -> str:
        return "prompt" if self.messages is None else "messages"


@dataclass(slots=True)
class GenerationSettings:
    max_tokens: int | None  # None: default_max_tokens, capped to the room left
    default_max_tokens: int
    sampling: Sampling
    stop: list[str]
    ignore_eos: bool = False
    # context_length_exceeded_behavior="error": refuse instead of lowering max_tokens.
    error_on_overflow: bool = False
    cache: PromptCache = field(default_factory=PromptCache)


@dataclass(slots=True)
class Completion:
    text: str
    finish_reason: str
    num_prompt_tokens: int
    num_completion_tokens: int


def fit_max_tokens(
    num_prompt_tokens: int, settings: GenerationSettings, max_model_len: int, prompt_param: str
) -> int:
    """max_tokens lowered to the room the prompt leaves in the context window."""
    room = max_model_len - num_prompt_tokens
    if room < 1:
        # Decode always produces the token prefill sampled, so one slot must be left for it.
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt "
            f"has {num_prompt_tokens} tokens, which leaves no room for a completion: shorten "
            f"it by at least {1 - room} tokens.",
            prompt_param,
            "context_length_exceeded",
        )
    if settings.max_tokens is None:
        return min(settings.default_max_tokens, room)
    if settings.max_tokens > room and settings.error_on_overflow:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt "
            f"({num_prompt_tokens} tokens) plus max_tokens ({settings.max_tokens}) exceeds "
            f"it by {settings.max_tokens - room} tokens.",
            "max_tokens",
            "context_length_exceeded",
        )
    return min(settings.max_tokens, room)


class Generation:
    """One request after prefill: owns the KV handle until decode answers, and the decode call.

    `close()` must run on every path (done, failed, client gone). It is synchronous so that it
    still works inside a cancelled task.
    """

    def __init__(
        self,
        stages: StageClients,
        request_id: str,
        prompt_token_ids: list[int],
        prefilled: Prefilled,
        sampling: Sampling,
        stopping: Stopping,
        metrics: RequestMetrics,
    ) -> None:
        self._stages = stages
        self._request_id = request_id
        self._prompt_token_ids = prompt_token_ids
        self._prefilled = prefilled
        self._sampling = sampling
        self._stopping = stopping
        self.metrics = metrics
        self._stream: DecodeStream | None = None
        # Decode answered, so it holds the KV now and frees it on abort.
        self._claimed = False
        self._closed = False
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_generated = 0
        self.finish_reason: str | None = None

    async def next(self) -> TokenDelta | None:
        """The next decode message; None after the one that carried the finish reason."""
        if self.finish_reason is not None:
            return None
        if self._stream is None:
            self._stream = self._stages.generate(
                self._request_id,
                self._prompt_token_ids,
                self._prefilled,
                self._sampling,
                self._stopping,
            )
        delta = await self._stream.read()
        now = time.monotonic_ns()
        if delta is None:
            logger.error("decode stream of %s ended without a finish reason", self._request_id)
            raise internal_error()
        if not self._claimed:
            self._claimed = True
            self.metrics.first_token_at_ns = now
        if delta.queue_ns:
            # Decode streams prefill's token before pulling the KV; the message after the
            # sequence joined the batch carries the queue and transfer times.
            self.metrics.generation_queue_ns = delta.queue_ns
            self.metrics.kv_transfer_ns = delta.kv_transfer_ns
        self.metrics.last_token_at_ns = now
        self.num_generated = delta.num_generated or self.num_generated + len(delta.token_ids)
        self.finish_reason = delta.finish_reason
        return delta

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._stream is not None:
            self._stream.cancel()  # a no-op once the call has ended
        if not self._claimed:
            self._stages.release_later(self._prefilled.kv_handle.handle_id)


class Pipeline:
    def __init__(self, stages: StageClients) -> None:
        self._stages = stages

    async def start(
        self,
        request_id: str,
        source: PromptSource,
        settings: GenerationSettings,
        metrics: RequestMetrics,
    ) -> tuple[Generation, TokenDelta]:
        """Runs up to decode's first message, so stage failures still get an HTTP status.

        The caller owns `close()` of the returned generation.
        """
        generation = await self.prefill(request_id, source, settings, metrics)
        try:
            first = await generation.next()
        except BaseException:
            generation.close()
            raise
        assert first is not None  # next() only returns None after a finish reason
        return generation, first

    async def prefill(
        self,
        request_id: str,
        source: PromptSource,
        settings: GenerationSettings,
        metrics: RequestMetrics,
    ) -> Generation:
        tokenized = await self._tokenize(source)
        metrics.tokenizer_queue_ns = tokenized.queue_ns
        metrics.tokenizer_ns = tokenized.duration_ns
        metrics.prompt_tokens = len(tokenized.token_ids)
        if not tokenized.token_ids:
            raise invalid_request("The prompt is empty after tokenization.", source.param)
        limits = await self._stages.limits()
        metrics.backend_host = limits.backend_host
        max_tokens = fit_max_tokens(
            len(tokenized.token_ids), settings, limits.max_model_len, source.param
        )
        prefilled = await self._stages.prefill(
            request_id, tokenized.token_ids, settings.sampling, settings.cache
        )
        metrics.cached_prompt_tokens = prefilled.num_cached_tokens
        metrics.prefill_queue_ns = prefilled.queue_ns
        metrics.prefill_ns = prefilled.compute_ns
        stopping = Stopping(max_tokens, settings.stop, settings.ignore_eos)
        return Generation(
            self._stages,
            request_id,
            tokenized.token_ids,
            prefilled,
            settings.sampling,
            stopping,
            metrics,
        )

    async def collect(self, generation: Generation, first: TokenDelta) -> Completion:
        texts = [first.text]
        while (delta := await generation.next()) is not None:
            texts.append(delta.text)
        assert generation.finish_reason is not None
        return Completion(
            "".join(texts),
            generation.finish_reason,
            generation.num_prompt_tokens,
            generation.num_generated,
        )

    async def _tokenize(self, source: PromptSource) -> Tokenized:
        if source.messages is not None:
            return await self._stages.render_chat(source.messages)
        assert source.prompt is not None
        return await self._stages.tokenize(source.prompt)
