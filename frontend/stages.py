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
    StageStats,
    Stopping,
    Tokenized,
)
from frontend.stage_wire import (
    DecodeStream,
    chat_message_pb,
    limits_from_infos,
    logprob_from_pb,
    sampling_pb,
    stats_from_info,
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


class StageClients:
    def __init__(self, config: FrontendConfig) -> None:
        self._config = config
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._limits: ModelLimits | None = None
        self._limits_lock = asyncio.Lock()
        # Fire-and-forget RPCs (Release) held here so they are not garbage-collected mid-flight.
        self._background: set[asyncio.Task[None]] = set()
        self._addresses = {
            "tokenizer": config.tokenizer_address,
            "prefill": config.prefill_address,
            "decode": config.decode_address,
        }

    def start(self) -> None:
        """Opens the channels; must run inside the event loop that will use them."""
        if self._channels:
            return
        for stage, address in self._addresses.items():
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
        return _tokenized(response)

    async def render_chat(self, turns: Sequence[ChatTurn], tools_json: str = "") -> Tokenized:
        self.start()
        request = tokenizer_pb2.RenderChatRequest(
            messages=[chat_message_pb(t) for t in turns],
            add_generation_prompt=True,
            tools_json=tools_json,
        )
        with rpc_errors("tokenizer", param="messages"):
            response = await self._tokenizer.RenderChat(
                request, timeout=self._config.tokenize_timeout_s
            )
        return _tokenized(response)

    async def detokenize(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, special tokens included (they are part of the prompt)."""
        self.start()
        request = tokenizer_pb2.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=False)
        with rpc_errors("tokenizer", param="prompt"):
            response = await self._tokenizer.Detokenize(
                request, timeout=self._config.tokenize_timeout_s
            )
        return response.text

    async def prefill(
        self,
        request_id: str,
        token_ids: list[int],
        sampling: Sampling,
        cache: PromptCache,
        prompt_logprobs: bool = False,
    ) -> Prefilled:
        self.start()
        request = prefill_pb2.PrefillRequest(
            request_id=request_id,
            token_ids=token_ids,
            sampling=sampling_pb(sampling),
            cache_salt=cache.isolation_key,
            cache_max_tokens=cache.max_tokens,  # None leaves the optional field unset
            prompt_logprobs=prompt_logprobs,
        )
        with rpc_errors("prefill"):
            response = await self._prefill.Prefill(request)
        return Prefilled(
            response.kv_handle,
            response.first_token_id,
            response.queue_ns,
            response.compute_ns,
            response.num_cached_tokens,
            response.first_token_logprob if response.HasField("first_token_logprob") else None,
            [logprob_from_pb(lp) for lp in response.prompt_logprobs],
            response.mirostat_mu if response.HasField("mirostat_mu") else None,
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
            sampling=sampling_pb(sampling),
            stopping=decode_pb2.StoppingCriteria(
                max_tokens=stopping.max_tokens, stop=stopping.stop, ignore_eos=stopping.ignore_eos
            ),
            first_token_logprob=prefilled.first_token_logprob,
            mirostat_mu=prefilled.mirostat_mu,  # None leaves the optional field unset
        )
        return DecodeStream(self._decode.Generate(request), sampling.logprobs)

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

    async def _fetch_infos(
        self, timeout_s: float | None = None
    ) -> dict[str, common_pb2.InfoResponse | BaseException]:
        """Every stage's Info, or the error it failed with."""
        self.start()
        replies = await asyncio.gather(
            *(self._fetch_info(stage, timeout_s) for stage in STAGE_NAMES),
            return_exceptions=True,
        )
        return dict(zip(STAGE_NAMES, replies, strict=True))

    async def _fetch_limits(self) -> ModelLimits:
        infos = {}
        for stage, reply in (await self._fetch_infos()).items():
            if isinstance(reply, BaseException):
                raise reply
            infos[stage] = reply
        limits = limits_from_infos(infos, self._config.decode_address)
        if limits is None:
            logger.error("no stage reports a context length")
            raise internal_error()
        return limits

    async def stats(self) -> tuple[list[StageStats], list[str]]:
        """Each answering stage's load from its Info, and the stages that did not answer."""
        replies = await self._fetch_infos(self._config.metrics_timeout_s)
        stats, down = [], []
        for stage, reply in replies.items():
            if isinstance(reply, ApiError):
                down.append(stage)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                stats.append(stats_from_info(stage, reply, self._addresses[stage]))
        return stats, down

    async def _fetch_info(
        self, stage: str, timeout_s: float | None = None
    ) -> common_pb2.InfoResponse:
        # Quiet: warm_up polls stages that are still loading, and a request that needs
        # Info reports the 503 anyway.
        with rpc_errors(stage, quiet=True):
            return await self._info[stage](
                common_pb2.InfoRequest(), timeout=timeout_s or self._config.info_timeout_s
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


def _tokenized(response: tokenizer_pb2.TokenizeResponse) -> Tokenized:
    return Tokenized(
        list(response.token_ids), response.queue_ns, response.duration_ns, response.prompt
    )
