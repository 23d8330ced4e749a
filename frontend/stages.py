"""gRPC clients of the three stages: the frontend's only protobuf edge.

One grpc.aio channel per stage, created inside the running event loop. Every RPC error
becomes an ApiError here (via frontend.rpc_errors), so nothing above this module sees grpc.
"""

import asyncio
import logging
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from frontend.config import FrontendConfig
from frontend.errors import ApiError, internal_error
from frontend.rpc_errors import rpc_errors
from frontend.stage_types import (
    STAGE_NAMES,
    ChatTurn,
    ModelLimits,
    Prefilled,
    PromptCache,
    Sampling,
    Stopping,
    TokenDelta,
    Tokenized,
)
from services.rpc import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # gRPC's default reconnect backoff grows to 120 s: a stage that took a minute to load its
    # model would then stay unreachable long after it came up. Reconnecting is cheap here.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
_FINISH_REASONS = {
    decode_pb2.FINISH_REASON_STOP: "stop",
    decode_pb2.FINISH_REASON_LENGTH: "length",
}


class DecodeStream:
    """One Generate call. Cancelling it aborts the request on the decode side."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call

    async def read(self) -> TokenDelta | None:
        """The next message, or None once the stream has ended."""
        with rpc_errors("decode"):
            message = await self._call.read()
        if message is grpc.aio.EOF:
            return None
        assert isinstance(message, decode_pb2.GenerateResponse)
        return TokenDelta(
            token_ids=list(message.token_ids),
            text=message.text,
            finish_reason=_FINISH_REASONS.get(message.finish_reason),
            num_generated=message.num_generated,
            queue_ns=message.queue_ns,
            kv_transfer_ns=message.kv_transfer_ns,
        )

    def cancel(self) -> None:
        self._call.cancel()


class StageClients:
    def __init__(self, config: FrontendConfig) -> None:
        self._config = config
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._limits: ModelLimits | None = None
        self._limits_lock = asyncio.Lock()
        # Fire-and-forget RPCs (Release) held here so they are not garbage-collected mid-flight.
        self._background: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Opens the channels; must run inside the event loop that will use them."""
        if self._channels:
            return
        addresses = {
            "tokenizer": self._config.tokenizer_address,
            "prefill": self._config.prefill_address,
            "decode": self._config.decode_address,
        }
        for stage, address in addresses.items():
            self._channels[stage] = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._tokenizer = tokenizer_pb2_grpc.TokenizerStub(self._channels["tokenizer"])
        self._prefill = prefill_pb2_grpc.PrefillStub(self._channels["prefill"])
        self._decode = decode_pb2_grpc.DecodeStub(self._channels["decode"])
        self._health = {s: health_pb2_grpc.HealthStub(c) for s, c in self._channels.items()}
        self._info = {
            "tokenizer": self._tokenizer.Info,
            "prefill": self._prefill.Info,
            "decode": self._decode.Info,
        }

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=self._config.release_timeout_s)
        for channel in self._channels.values():
            await channel.close(grace=1.0)
        self._channels.clear()

    async def tokenize(self, prompt: str | list[int]) -> Tokenized:
        self.start()
        if isinstance(prompt, str):
            request = tokenizer_pb2.TokenizeRequest(text=prompt, add_special_tokens=True)
        else:
            request = tokenizer_pb2.TokenizeRequest(token_ids=tokenizer_pb2.TokenIds(ids=prompt))
        with rpc_errors("tokenizer", param="prompt"):
            response = await self._tokenizer.Tokenize(
                request, timeout=self._config.tokenize_timeout_s
            )
        return Tokenized(list(response.token_ids), response.queue_ns, response.duration_ns)

    async def render_chat(self, turns: Sequence[ChatTurn]) -> Tokenized:
        self.start()
        request = tokenizer_pb2.RenderChatRequest(
            messages=[
                tokenizer_pb2.ChatMessage(role=t.role, content=t.content, name=t.name)
                for t in turns
            ],
            add_generation_prompt=True,
        )
        with rpc_errors("tokenizer", param="messages"):
            response = await self._tokenizer.RenderChat(
                request, timeout=self._config.tokenize_timeout_s
            )
        return Tokenized(list(response.token_ids), response.queue_ns, response.duration_ns)

    async def prefill(
        self, request_id: str, token_ids: list[int], sampling: Sampling, cache: PromptCache
    ) -> Prefilled:
        self.start()
        request = prefill_pb2.PrefillRequest(
            request_id=request_id,
            token_ids=token_ids,
            sampling=_sampling_pb(sampling),
            cache_salt=cache.isolation_key,
            cache_max_tokens=cache.max_tokens,  # None leaves the optional field unset
        )
        with rpc_errors("prefill"):
            response = await self._prefill.Prefill(request)
        return Prefilled(
            response.kv_handle,
            response.first_token_id,
            response.queue_ns,
            response.compute_ns,
            response.num_cached_tokens,
        )

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        prefilled: Prefilled,
        sampling: Sampling,
        stopping: Stopping,
    ) -> DecodeStream:
        self.start()
        request = decode_pb2.GenerateRequest(
            request_id=request_id,
            kv_handle=prefilled.kv_handle,
            prompt_token_ids=prompt_token_ids,
            first_token_id=prefilled.first_token_id,
            sampling=_sampling_pb(sampling),
            stopping=decode_pb2.StoppingCriteria(
                max_tokens=stopping.max_tokens, stop=stopping.stop, ignore_eos=stopping.ignore_eos
            ),
        )
        return DecodeStream(self._decode.Generate(request))

    def release_later(self, handle_id: str) -> None:
        """Frees a KV handle decode never took, without making the caller wait.

        Runs as its own task because the caller is often being cancelled (client gone), and
        an await there would be cancelled with it.
        """
        self.start()
        task = asyncio.get_running_loop().create_task(self._release(handle_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(self, handle_id: str) -> None:
        # With one prefill instance the handle's prefill_address is this channel's target.
        request = prefill_pb2.ReleaseRequest(handle_id=handle_id)
        try:
            await self._prefill.Release(request, timeout=self._config.release_timeout_s)
        except grpc.aio.AioRpcError as exc:
            logger.warning("releasing KV handle %s failed: %s", handle_id, exc.code().name)

    async def limits(self) -> ModelLimits:
        """Model name and context length from the stages' Info, fetched once they answer."""
        if self._limits is None:
            async with self._limits_lock:
                if self._limits is None:
                    self._limits = await self._fetch_limits()
        return self._limits

    async def warm_up(self) -> None:
        """Fetches Info in the background until the stages are up, so requests need not."""
        delay = 0.5
        while self._limits is None:
            try:
                limits = await self.limits()
                logger.info(
                    "stages ready: model %s, context %d", limits.model_id, limits.max_model_len
                )
            except ApiError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _fetch_limits(self) -> ModelLimits:
        self.start()
        replies = await asyncio.gather(
            *(self._fetch_info(stage) for stage in STAGE_NAMES), return_exceptions=True
        )
        infos = []
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
            infos.append(reply)
        model_ids = {i.model.model_id for i in infos if i.model.model_id}
        if len(model_ids) > 1:
            logger.warning("stages report different models: %s", sorted(model_ids))
        # Decode must hold prompt + completion, prefill the prompt: the smallest window wins.
        lengths = [i.limits.max_model_len for i in infos if i.limits.max_model_len > 0]
        lengths = lengths or [i.model.context_length for i in infos if i.model.context_length > 0]
        if not lengths:
            logger.error("no stage reports a context length")
            raise internal_error()
        decode_info = infos[STAGE_NAMES.index("decode")]
        return ModelLimits(
            model_id=next((i.model.model_id for i in infos if i.model.model_id), ""),
            max_model_len=min(lengths),
            backend_host=decode_info.instance or self._config.decode_address,
        )

    async def _fetch_info(self, stage: str) -> common_pb2.InfoResponse:
        # Quiet: warm_up polls stages that are still loading, and a request that needs
        # Info reports the 503 anyway.
        with rpc_errors(stage, quiet=True):
            return await self._info[stage](
                common_pb2.InfoRequest(), timeout=self._config.info_timeout_s
            )

    async def health(self) -> dict[str, str]:
        """Each stage's grpc.health.v1 status name, or the gRPC code when it does not answer."""
        self.start()
        statuses = await asyncio.gather(*(self._check(stage) for stage in STAGE_NAMES))
        return dict(zip(STAGE_NAMES, statuses, strict=True))

    async def _check(self, stage: str) -> str:
        try:
            reply = await self._health[stage].Check(
                health_pb2.HealthCheckRequest(), timeout=self._config.health_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _sampling_pb(sampling: Sampling) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        seed=sampling.seed,  # None leaves the optional field unset
    )
