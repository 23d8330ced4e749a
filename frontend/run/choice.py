"""One choice after its prefill (or with decode computing its prompt): the decode call, and
what it has produced so far."""

import logging
import time
from dataclasses import dataclass, field

from frontend.errors import SERVER_ERROR, ApiError, internal_error
from frontend.metrics.request import RequestMetrics
from frontend.metrics.server import ServerMetrics
from frontend.run.prompts import PreparedPrompt
from frontend.stages.clients import DecodeStream, StageClients
from frontend.stages.instances import Instance
from frontend.stages.types import Choice, Prefilled, TokenDelta, TokenLogprob

logger = logging.getLogger(__name__)
# A request whose decode instance fails before answering is tried on this many instances.
_GENERATE_ATTEMPTS = 2


@dataclass(slots=True)
class ChoiceOutput:
    """Everything a choice generated, in order (the echo lives with its prompt)."""

    index: int
    prompt: PreparedPrompt
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_generated: int = 0
    # Characters of the logprob tokens before the latest delta's: its first text_offset.
    delta_offset: int = 0
    _token_chars: int = 0

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def add(self, delta: TokenDelta) -> None:
        self.texts.append(delta.text)
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        self.delta_offset = self._token_chars
        self._token_chars += sum(len(lp.token) for lp in delta.logprobs)
        self.num_generated = delta.num_generated or self.num_generated + len(delta.token_ids)
        self.finish_reason = delta.finish_reason


class Generation:
    """Owns the KV handle until decode answers, then the decode call. Without a KV handle
    (`prefilled` None), decode computes the prompt itself, on `instance` if still healthy.

    `close()` must run on every path (done, failed, client gone). It is synchronous so that it
    still works inside a cancelled task.
    """

    def __init__(
        self,
        stages: StageClients,
        choice: Choice,
        output: ChoiceOutput,
        prefilled: Prefilled | None,
        metrics: RequestMetrics,
        server_metrics: ServerMetrics,
        instance: Instance | None = None,
    ) -> None:
        self._stages = stages
        self._choice = choice
        self._prefilled = prefilled
        self._instance = instance
        self._metrics = metrics
        self._server_metrics = server_metrics
        self.output = output
        self._stream: DecodeStream | None = None
        # Decode answered, so it holds the KV now and frees it on abort.
        self._claimed = False
        self._holds_prompt = False  # decode's prefix cache has the prompt (recorded once)
        self._closed = False
        self._last_message_ns: int | None = None
        self._attempts = 0  # decode instances tried

    @property
    def finished(self) -> bool:
        return self.output.finish_reason is not None

    async def next(self) -> TokenDelta | None:
        """The next decode message; None after the one that carried the finish reason."""
        if self.finished:
            return None
        if not self._choice.stopping.max_tokens:
            return self._scored()
        delta = await self._read()
        now = time.monotonic_ns()
        if delta is None:
            logger.error("decode stream of %s ended without a finish reason", self._choice.id)
            raise internal_error()
        self._claimed = True
        if not self._holds_prompt and (self._prefilled is None or delta.queue_ns):
            # Decode computed the prompt, or pulled its KV and joined the batch.
            self._holds_prompt = True
            await self._stages.decode_holds(self._choice, self._stream.instance)
        if delta.queue_ns and not self._metrics.generation_queue_ns:
            # Decode streams prefill's token before pulling the KV; the message after the
            # sequence joined the batch carries the queue and transfer times.
            self._metrics.generation_queue_ns = delta.queue_ns
            self._metrics.kv_transfer_ns = delta.kv_transfer_ns
        last = self._metrics.last_token_at_ns
        self._metrics.last_token_at_ns = now if last is None else max(last, now)
        gap_ns = None if self._last_message_ns is None else now - self._last_message_ns
        self._last_message_ns = now
        self._server_metrics.observe_tokens(len(delta.token_ids), gap_ns)
        if delta.speculation is not None:
            self._metrics.add_speculation(delta.speculation)
        self.output.add(delta)
        return delta

    def _scored(self) -> TokenDelta:
        """max_tokens 0 (echo only): the prompt has been scored by its prefill, so its KV is
        freed and decode never asked; the choice ends with no token, cut by its length."""
        self.close()
        delta = TokenDelta([], "", "length", num_generated=0)
        self.output.add(delta)
        return delta

    async def _read(self) -> TokenDelta | None:
        """Decode's next message. A decode instance that fails before its first message is
        replaced by another (it had taken nothing: prefill still holds the KV handle); one
        that fails later ends the request with an error saying so."""
        while True:
            if self._stream is None:
                self._attempts += 1
                self._stream = await self._stages.generate(
                    self._choice, self._prefilled, self._instance
                )
                if not self._metrics.backend_host:
                    self._metrics.backend_host = self._stream.instance.address
            try:
                return await self._stream.read()
            except ApiError as exc:
                if exc.code != "stage_unavailable":
                    raise
                if self._claimed:
                    raise ApiError(
                        503,
                        f"The decode instance {self._stream.instance.address} stopped while "
                        f"generating this request, after {self.output.num_generated} tokens; "
                        "the request was aborted. Retry it.",
                        type=SERVER_ERROR,
                        code="stage_unavailable",
                    ) from None
                if self._attempts == _GENERATE_ATTEMPTS:
                    raise
                logger.warning(
                    "decode instance %s failed before answering %s; retrying elsewhere",
                    self._stream.instance.address,
                    self._choice.id,
                )
                self._stream = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._stream is not None:
            self._stream.cancel()  # a no-op once the call has ended
        if not self._claimed and self._prefilled is not None:
            self._stages.release_later(self._prefilled)
