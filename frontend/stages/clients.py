"""gRPC clients of the three stages: with the directory, the frontend's only protobuf edge.

frontend.stages.routing picks the instance of the directory's for each call. Every RPC error
becomes an ApiError here (via frontend.stages.rpc_errors), so nothing above this module sees
grpc.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import grpc

from frontend.config import FrontendConfig
from frontend.stages.directory import StageDirectory, no_instance
from frontend.stages.instances import Instance, StagePool
from frontend.stages.routing import CacheIndexes, LeastLoadedRouter, PrefillRouter
from frontend.stages.rpc_errors import stage_error
from frontend.stages.types import (
    ChatTurn,
    Choice,
    Prefilled,
    Tokenized,
)
from frontend.stages.wire import (
    DecodeStream,
    chat_message_pb,
    logprob_from_pb,
)
from services.rpc import decode_pb2, prefill_pb2, prefill_pb2_grpc, tokenizer_pb2

logger = logging.getLogger(__name__)
T = TypeVar("T")


class StageClients:
    """The stages' RPCs, each on the instance routing picks among the directory's."""

    def __init__(self, config: FrontendConfig, directory: StageDirectory) -> None:
        self._config = config
        self.directory = directory
        self._prefill_router: PrefillRouter | None = None
        self._decode_caches: CacheIndexes | None = None
        self._least_loaded = {"tokenizer": LeastLoadedRouter(), "decode": LeastLoadedRouter()}
        # Fire-and-forget RPCs (Release) held here so they are not garbage-collected mid-flight.
        self._background: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Waits (a bounded time) for the fire-and-forget RPCs still running, then closes
        the directory's channels."""
        if self._background:
            await asyncio.wait(self._background, timeout=self._config.release_timeout_s)
        await self.directory.close()

    async def tokenize(
        self, prompt: str | list[int], add_special_tokens: bool = True, param: str = "prompt"
    ) -> Tokenized:
        """A prompt (or other text: `param` names its field in errors) as token ids."""
        if isinstance(prompt, str):
            request = tokenizer_pb2.TokenizeRequest(
                text=prompt, add_special_tokens=add_special_tokens
            )
        else:
            request = tokenizer_pb2.TokenizeRequest(token_ids=tokenizer_pb2.TokenIds(ids=prompt))
        response = await self._unary(
            "tokenizer",
            lambda stub: stub.Tokenize(request, timeout=self._config.tokenize_timeout_s),
            param=param,
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

    async def prefill(self, choice: Choice, prompt_logprobs: bool = False) -> Prefilled:
        token_ids = choice.prompt_ids
        request = prefill_pb2.PrefillRequest(
            request_id=choice.id,
            token_ids=token_ids,
            sampling=choice.sampling.to_pb(),
            prompt_cache=choice.prompt_cache.to_pb(),
            prompt_logprobs=prompt_logprobs,
        )
        router = await self._router()
        pool = await self.directory.pool("prefill")
        hashes = router.caches.servable_hashes(token_ids, choice.prompt_cache)
        queued: dict[Instance, int] = {}  # what this call added to instances' queues

        def route(instances: Sequence[Instance]) -> Instance:
            chosen = router.choose(instances, len(token_ids), hashes)
            chosen.instance.queued_tokens += chosen.uncached_tokens
            queued[chosen.instance] = chosen.uncached_tokens
            return chosen.instance

        def call(stub: prefill_pb2_grpc.PrefillStub) -> grpc.aio.UnaryUnaryCall:
            return stub.Prefill(request, timeout=choice.time_left())

        try:
            instance, response = await self._call(pool, route, call, None)
        except asyncio.CancelledError:
            # The answer may have been on its way (prefill done, its handle pinned for us):
            # Abort frees whatever the request holds on the instance last tried.
            if queued:
                self._later(self._abort_prefill(next(reversed(queued)), choice.id))
            raise
        finally:
            for instance_queued, tokens in queued.items():
                instance_queued.queued_tokens -= tokens
        router.caches.record(instance, hashes)
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

    async def decode_computing(self, choice: Choice) -> Instance | None:
        """The decode instance that is to compute this choice's prompt itself, if any: the one
        Generate would go to now, when its prefix cache (as far as this frontend knows) leaves
        at most --local-prefill-tokens of the prompt to compute. None: prefill computes it."""
        limit = self._config.local_prefill_tokens
        instances = (await self.directory.pool("decode")).healthy()
        if limit == 0 or not instances:
            return None
        instance = self._least_loaded["decode"].choose(instances)
        num_tokens = len(choice.prompt_ids)
        if num_tokens <= limit:
            return instance
        caches = await self._decode_cache_indexes()
        hashes = caches.servable_hashes(choice.prompt_ids, choice.prompt_cache)
        return instance if num_tokens - caches.cached_tokens(instance, hashes) <= limit else None

    async def generate(
        self, choice: Choice, prefilled: Prefilled | None, instance: Instance | None = None
    ) -> DecodeStream:
        """Starts Generate on `instance` if it is still healthy, else on the least loaded
        decode instance. Without `prefilled`, decode computes the prompt itself."""
        pool = await self.directory.pool("decode")
        instances = pool.healthy()
        if not instances:
            raise no_instance("decode")
        if not any(i is instance for i in instances):
            instance = self._least_loaded["decode"].choose(instances)
        assert instance is not None
        handoff: dict[str, Any] = {"compute_prompt": True}
        if prefilled is not None:
            handoff = {
                "kv_handle": prefilled.kv_handle,
                "first_token_id": prefilled.first_token_id,
                "first_token_logprob": prefilled.first_token_logprob,
                "mirostat_mu": prefilled.mirostat_mu,  # None leaves the optional field unset
            }
        request = decode_pb2.GenerateRequest(
            request_id=choice.id,
            prompt_token_ids=choice.prompt_ids,
            sampling=choice.sampling.to_pb(),
            stopping=choice.stopping.to_pb(),
            prompt_cache=choice.prompt_cache.to_pb(),
            prediction_token_ids=choice.prediction_ids,
            **handoff,
        )
        stream = instance.stub.Generate(request, timeout=choice.time_left())
        return DecodeStream(pool, instance, stream, choice.sampling.logprobs)

    async def decode_holds(self, choice: Choice, instance: Instance) -> None:
        """Decode `instance` holds the choice's prompt blocks (pulled or computed); its prefix
        cache keeps them after the request. A request that ends at prefill's token never
        gets there: decode pulls nothing for it."""
        caches = await self._decode_cache_indexes()
        caches.record(instance, caches.servable_hashes(choice.prompt_ids, choice.prompt_cache))

    def release_later(self, prefilled: Prefilled) -> None:
        """Frees a KV handle decode never took, without making the caller wait.

        Runs as its own task because the caller is often being cancelled (client gone), and
        an await there would be cancelled with it.
        """
        self._later(self._release(prefilled.prefill_instance, prefilled.kv_handle.handle_id))

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort_prefill(self, instance: Instance, request_id: str) -> None:
        request = prefill_pb2.AbortRequest(request_id=request_id)
        try:
            await instance.stub.Abort(request, timeout=self._config.release_timeout_s)
        except grpc.aio.AioRpcError as exc:
            logger.warning("aborting %s on prefill failed: %s", request_id, exc.code().name)

    async def _release(self, address: str, handle_id: str) -> None:
        instance = (await self.directory.pool("prefill")).get(address)
        if instance is None:
            return  # gone: its blocks went with it
        request = prefill_pb2.ReleaseRequest(handle_id=handle_id)
        try:
            await instance.stub.Release(request, timeout=self._config.release_timeout_s)
        except grpc.aio.AioRpcError as exc:
            logger.warning("releasing KV handle %s failed: %s", handle_id, exc.code().name)

    async def _router(self) -> PrefillRouter:
        if self._prefill_router is None:
            limits = await self.directory.limits()
            self._prefill_router = PrefillRouter(self._config.prefill_routing, limits.block_size)
        return self._prefill_router

    async def _decode_cache_indexes(self) -> CacheIndexes:
        if self._decode_caches is None:
            limits = await self.directory.limits()
            self._decode_caches = CacheIndexes(limits.block_size)
        return self._decode_caches

    async def _unary(
        self, stage: str, call: Callable[[Any], Awaitable[T]], param: str | None = None
    ) -> T:
        pool = await self.directory.pool(stage)
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


def _tokenized(response: tokenizer_pb2.TokenizeResponse) -> Tokenized:
    return Tokenized(
        list(response.token_ids), response.queue_ns, response.duration_ns, response.prompt
    )
