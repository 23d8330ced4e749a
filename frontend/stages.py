"""gRPC clients of the three stages: the frontend's only protobuf edge.

Each stage may run as several instances (frontend.instances), one grpc.aio channel each,
created inside the running event loop; frontend.routing picks the instance for each call.
Every RPC error becomes an ApiError here (via frontend.rpc_errors), so nothing above this
module sees grpc.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from frontend.config import FrontendConfig
from frontend.errors import ApiError, internal_error, stage_unavailable
from frontend.instances import Instance, StagePool
from frontend.routing import LeastLoadedRouter, PrefillRouter
from frontend.rpc_errors import rpc_errors, stage_error
from frontend.stage_types import (
    STAGE_NAMES,
    ChatTurn,
    Choice,
    ModelLimits,
    Prefilled,
    StageStats,
    Tokenized,
)
from frontend.stage_wire import (
    DecodeStream,
    chat_message_pb,
    limits_from_infos,
    logprob_from_pb,
    stats_from_info,
)
from services.request_params import PromptCache
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
T = TypeVar("T")

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
    """Every stage's instances (frontend.instances) and the routing between them."""

    def __init__(self, config: FrontendConfig) -> None:
        self._config = config
        self._pools: dict[str, StagePool] = {}
        self._limits: ModelLimits | None = None
        self._limits_lock = asyncio.Lock()
        self._refresh_lock = asyncio.Lock()
        self._prefill_router: PrefillRouter | None = None
        self._least_loaded = {"tokenizer": LeastLoadedRouter(), "decode": LeastLoadedRouter()}
        # Fire-and-forget RPCs (Release) held here so they are not garbage-collected mid-flight.
        self._background: set[asyncio.Task[None]] = set()
        self._specs = {
            "tokenizer": config.tokenizer_address,
            "prefill": config.prefill_address,
            "decode": config.decode_address,
        }

    def start(self) -> None:
        """Creates the pools; must run inside the event loop that will use them."""
        if self._pools:
            return
        for stage, spec in self._specs.items():
            self._pools[stage] = StagePool(
                stage, spec, _STUBS[stage], _CHANNEL_OPTIONS, self._config.health_timeout_s
            )

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=self._config.release_timeout_s)
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()

    async def tokenize(self, prompt: str | list[int]) -> Tokenized:
        if isinstance(prompt, str):
            request = tokenizer_pb2.TokenizeRequest(text=prompt, add_special_tokens=True)
        else:
            request = tokenizer_pb2.TokenizeRequest(token_ids=tokenizer_pb2.TokenIds(ids=prompt))
        response = await self._unary(
            "tokenizer",
            lambda stub: stub.Tokenize(request, timeout=self._config.tokenize_timeout_s),
            param="prompt",
        )
        return _tokenized(response)

    async def render_chat(self, turns: Sequence[ChatTurn], tools_json: str = "") -> Tokenized:
        request = tokenizer_pb2.RenderChatRequest(
            messages=[chat_message_pb(t) for t in turns],
            add_generation_prompt=True,
            tools_json=tools_json,
        )
        response = await self._unary(
            "tokenizer",
            lambda stub: stub.RenderChat(request, timeout=self._config.tokenize_timeout_s),
            param="messages",
        )
        return _tokenized(response)

    async def detokenize(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, special tokens included (they are part of the prompt)."""
        request = tokenizer_pb2.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=False)
        response = await self._unary(
            "tokenizer",
            lambda stub: stub.Detokenize(request, timeout=self._config.tokenize_timeout_s),
            param="prompt",
        )
        return response.text

    async def prefill(
        self, choice: Choice, prompt_cache: PromptCache, prompt_logprobs: bool = False
    ) -> Prefilled:
        token_ids = choice.prompt_ids
        request = prefill_pb2.PrefillRequest(
            request_id=choice.id,
            token_ids=token_ids,
            sampling=choice.sampling.to_pb(),
            prompt_cache=prompt_cache.to_pb(),
            prompt_logprobs=prompt_logprobs,
        )
        router = await self._router()
        pool = await self._pool("prefill")
        hashes = router.servable_hashes(token_ids, prompt_cache)
        queued: dict[Instance, int] = {}  # what this call added to instances' queues

        def route(instances: Sequence[Instance]) -> Instance:
            chosen = router.choose(instances, len(token_ids), hashes)
            chosen.instance.queued_tokens += chosen.uncached_tokens
            queued[chosen.instance] = chosen.uncached_tokens
            return chosen.instance

        try:
            instance, response = await self._call(
                pool, route, lambda stub: stub.Prefill(request), None
            )
        finally:
            for instance_queued, tokens in queued.items():
                instance_queued.queued_tokens -= tokens
        router.record(instance, hashes)
        return Prefilled(
            response.kv_handle,
            response.first_token_id,
            response.queue_ns,
            response.compute_ns,
            response.num_cached_tokens,
            response.first_token_logprob if response.HasField("first_token_logprob") else None,
            [logprob_from_pb(lp) for lp in response.prompt_logprobs],
            response.mirostat_mu if response.HasField("mirostat_mu") else None,
            prefill_instance=instance.address,
        )

    async def generate(self, choice: Choice, prefilled: Prefilled) -> DecodeStream:
        """Starts Generate on the least loaded decode instance."""
        pool = await self._pool("decode")
        instances = pool.healthy()
        if not instances:
            raise no_instance("decode")
        instance = self._least_loaded["decode"].choose(instances)
        request = decode_pb2.GenerateRequest(
            request_id=choice.id,
            kv_handle=prefilled.kv_handle,
            prompt_token_ids=choice.prompt_ids,
            first_token_id=prefilled.first_token_id,
            sampling=choice.sampling.to_pb(),
            stopping=choice.stopping.to_pb(),
            first_token_logprob=prefilled.first_token_logprob,
            mirostat_mu=prefilled.mirostat_mu,  # None leaves the optional field unset
        )
        stream = instance.stub.Generate(request)
        return DecodeStream(pool, instance, stream, choice.sampling.logprobs)

    def release_later(self, prefilled: Prefilled) -> None:
        """Frees a KV handle decode never took, without making the caller wait.

        Runs as its own task because the caller is often being cancelled (client gone), and
        an await there would be cancelled with it.
        """
        task = asyncio.get_running_loop().create_task(self._release(prefilled))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(self, prefilled: Prefilled) -> None:
        handle_id = prefilled.kv_handle.handle_id
        instance = self._pools["prefill"].get(prefilled.prefill_instance)
        if instance is None:
            return  # gone: its blocks went with it
        request = prefill_pb2.ReleaseRequest(handle_id=handle_id)
        try:
            await instance.stub.Release(request, timeout=self._config.release_timeout_s)
        except grpc.aio.AioRpcError as exc:
            logger.warning("releasing KV handle %s failed: %s", handle_id, exc.code().name)

    async def _unary(
        self, stage: str, call: Callable[[Any], Awaitable[T]], param: str | None = None
    ) -> T:
        pool = await self._pool(stage)
        _, response = await self._call(pool, self._least_loaded[stage].choose, call, param)
        return response

    async def _call(
        self,
        pool: StagePool,
        pick: Callable[[Sequence[Instance]], Instance],
        call: Callable[[Any], Awaitable[T]],
        param: str | None,
    ) -> tuple[Instance, T]:
        """Runs `call` on the instance `pick` chooses among the healthy ones. An instance that
        is unreachable is marked down and the call tried on another: these calls are
        idempotent, and one that never reached its instance changed nothing there."""
        while True:
            instances = pool.healthy()
            if not instances:
                raise no_instance(pool.stage)
            instance = pick(instances)
            instance.in_flight += 1
            try:
                return instance, await call(instance.stub)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise stage_error(pool.stage, exc, param) from None
                pool.mark_down(instance, exc.code().name)
            finally:
                instance.in_flight -= 1

    async def _pool(self, stage: str) -> StagePool:
        """The stage's pool, discovered and checked at least once."""
        self.start()
        pool = self._pools[stage]
        if not pool.instances:
            await self.refresh()
        return pool

    async def _router(self) -> PrefillRouter:
        if self._prefill_router is None:
            limits = await self.limits()
            self._prefill_router = PrefillRouter(self._config.prefill_routing, limits.block_size)
        return self._prefill_router

    async def refresh(self) -> None:
        """Resolves every stage's targets, checks each instance's health, and reads the load
        of each healthy prefill and decode instance from its Info."""
        self.start()
        async with self._refresh_lock:
            pools = list(self._pools.values())
            await asyncio.gather(*(pool.discover() for pool in pools))
            await asyncio.gather(*(pool.check() for pool in pools))
            for stage in ("prefill", "decode"):
                healthy = self._pools[stage].healthy()
                replies = await asyncio.gather(
                    *(self._info(i, self._config.metrics_timeout_s) for i in healthy),
                    return_exceptions=True,
                )
                for instance, reply in zip(healthy, replies, strict=True):
                    if isinstance(reply, common_pb2.InfoResponse):
                        instance.reported_load = reply.stats.num_running + reply.stats.num_waiting
                        instance.num_kv_blocks = reply.limits.num_kv_blocks

    async def watch(self) -> None:
        """Refreshes the instances every `health_interval_s`, forever; fetches the model's
        limits as soon as every stage answers, so that requests need not."""
        delay = self._config.health_interval_s
        while True:
            try:
                await self.refresh()
                if self._limits is None:
                    limits = await self.limits()
                    logger.info(
                        "stages ready: model %s, context %d", limits.model_id, limits.max_model_len
                    )
            except ApiError:
                pass  # a stage is still loading, or down: the next round tries again
            except Exception:  # noqa: BLE001 - watching must outlive any one bad round
                logger.exception("refreshing the stage instances failed")
            await asyncio.sleep(delay)

    async def limits(self) -> ModelLimits:
        """Model name and context length from the stages' Info, fetched once they answer."""
        if self._limits is None:
            async with self._limits_lock:
                if self._limits is None:
                    self._limits = await self._fetch_limits()
        return self._limits

    async def _fetch_limits(self) -> ModelLimits:
        infos = {}
        for stage in STAGE_NAMES:
            pool = await self._pool(stage)
            instances = pool.healthy()
            if not instances:
                raise no_instance(stage)
            with rpc_errors(stage, quiet=True):
                infos[stage] = await self._info(instances[0])
        limits = limits_from_infos(infos)
        if limits is None:
            logger.error("no stage reports a context length")
            raise internal_error()
        return limits

    async def _info(
        self, instance: Instance, timeout_s: float | None = None
    ) -> common_pb2.InfoResponse:
        return await instance.stub.Info(
            common_pb2.InfoRequest(), timeout=timeout_s or self._config.info_timeout_s
        )

    async def stats(self) -> tuple[list[StageStats], list[str]]:
        """Each answering instance's load from its Info, and the stages none of whose
        instances answered."""
        self.start()
        pairs = [(stage, i) for stage, pool in self._pools.items() for i in pool.instances.values()]
        replies = await asyncio.gather(
            *(self._info(i, self._config.metrics_timeout_s) for _, i in pairs),
            return_exceptions=True,
        )
        stats, up = [], set()
        for (stage, instance), reply in zip(pairs, replies, strict=True):
            if isinstance(reply, grpc.aio.AioRpcError):
                continue
            if isinstance(reply, BaseException):
                raise reply
            up.add(stage)
            stats.append(stats_from_info(stage, reply, instance.address))
        return stats, [stage for stage in STAGE_NAMES if stage not in up]

    async def health(self) -> dict[str, dict[str, str]]:
        """Per stage, each instance's grpc.health.v1 status name (or the gRPC code it failed
        with), checked now."""
        await self.refresh()
        return {
            stage: {i.address: i.status for i in pool.instances.values()}
            for stage, pool in self._pools.items()
        }


def no_instance(stage: str) -> ApiError:
    """No instance of `stage` is serving (each one's going down was logged)."""
    return stage_unavailable(stage)


_STUBS: dict[str, Callable[[grpc.aio.Channel], Any]] = {
    "tokenizer": tokenizer_pb2_grpc.TokenizerStub,
    "prefill": prefill_pb2_grpc.PrefillStub,
    "decode": decode_pb2_grpc.DecodeStub,
}


def _tokenized(response: tokenizer_pb2.TokenizeResponse) -> Tokenized:
    return Tokenized(
        list(response.token_ids), response.queue_ns, response.duration_ns, response.prompt
    )
