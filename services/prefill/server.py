"""Prefill service: computes prompts' KV, samples first tokens, serves KV to decode."""

import asyncio
from collections.abc import AsyncIterator

import torch

from services import engine_service
from services.engine.grammar import GrammarCompiler
from services.engine.tokenizer import Tokenizer
from services.errors import AbortedError, InvalidArgumentError, NotFoundError, UnavailableError
from services.grammar_wire import grammar_state
from services.prefill.engine import PrefillEngine, PrefillJob
from services.request_params import PromptCache
from services.rpc import common_pb2, prefill_pb2, prefill_pb2_grpc
from services.wire import checked_sampling, token_logprob_pb

KV_CHUNK_BYTES = 1 << 20  # per message, far below the gRPC message limit


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, engine: PrefillEngine, address: str, tokenizer: Tokenizer) -> None:
        self.engine = engine
        self.worker = engine.worker
        self.address = address
        self.tokenizer = tokenizer  # token texts for logprobs
        self.grammars = GrammarCompiler(tokenizer, self.worker.config.vocab_size)
        self.draining = False

    async def drain(self, deadline: float) -> None:
        """Refuses new prompts; returns once every prompt is done and each handle pulled or
        released (or at `deadline`)."""
        self.draining = True
        await engine_service.wait_until(self.engine.idle, deadline)

    async def Prefill(self, request, context):
        if self.draining:
            raise UnavailableError("this prefill instance is shutting down; use another")
        config = self.worker.config
        if not request.token_ids:
            raise InvalidArgumentError("token_ids is empty")
        if len(request.token_ids) >= config.max_position_embeddings:
            raise InvalidArgumentError(
                f"prompt has {len(request.token_ids)} tokens; the context window is "
                f"{config.max_position_embeddings}"
            )
        if any(t < 0 or t >= config.vocab_size for t in request.token_ids):
            raise InvalidArgumentError(f"token ids must be in [0, {config.vocab_size})")
        sampling = checked_sampling(request.sampling, config.vocab_size)
        prompt_cache = PromptCache.from_pb(request.prompt_cache)
        if prompt_cache.max_len is not None and prompt_cache.max_len < 0:
            raise InvalidArgumentError("prompt_cache.max_len must be >= 0")
        grammar = await grammar_state(sampling.grammar, self.grammars)
        token_ids = list(request.token_ids)
        loop = asyncio.get_running_loop()
        job = PrefillJob(
            request_id=request.request_id,
            token_ids=token_ids,
            sampling=sampling,
            wants_prompt_logprobs=request.prompt_logprobs,
            grammar=grammar,
            block_hashes=prompt_cache.block_hashes(token_ids, self.worker.pool.block_size),
            root_hash=prompt_cache.root_hash(),
            servable_tokens=prompt_cache.servable_tokens(len(token_ids)),
            future=loop.create_future(),
            loop=loop,
        )
        self.engine.submit(job)
        try:
            result = await job.future
        except asyncio.CancelledError:
            self.engine.abort(request.request_id)
            future = job.future
            if future.done() and not future.cancelled() and future.exception() is None:
                # Finished just as the caller left: nobody will pull or release it.
                self.engine.release(future.result().handle_id)
            raise
        handle = common_pb2.KvHandle(
            prefill_address=self.address,
            handle_id=result.handle_id,
            num_tokens=len(job.token_ids),
            num_blocks=len(result.block_ids),
            block_size=self.worker.pool.block_size,
            lease_ms=int(self.engine.lease_s * 1000),
        )
        shared = self.worker.pool.shared
        if shared is not None:
            handle.shm_path = shared.path
        response = prefill_pb2.PrefillResponse(
            kv_handle=handle,
            first_token_id=result.first_token.token_id,
            queue_ns=result.queue_ns,
            compute_ns=result.compute_ns,
            num_cached_tokens=result.num_cached_tokens,
            prompt_logprobs=[token_logprob_pb(t, self.tokenizer) for t in result.prompt_logprobs],
            mirostat_mu=result.mirostat_mu,
        )
        if job.sampling.wants_logprobs:
            response.first_token_logprob.CopyFrom(
                token_logprob_pb(result.first_token, self.tokenizer)
            )
        return response

    async def PullKv(self, request, context) -> AsyncIterator[prefill_pb2.KvChunk]:
        handle_id = request.handle_id
        handle = self.engine.begin_pull(handle_id)
        if handle is None:
            raise NotFoundError(f"no KV handle {handle_id!r} (expired or pulled)")
        try:
            if not 0 <= request.first_block <= len(handle.block_ids):
                raise InvalidArgumentError(f"first_block must be in [0, {len(handle.block_ids)}]")
            chunks = kv_chunks(self.worker.pool.cache, handle.block_ids, request.first_block)
            while True:
                # Renewed before each chunk is read, so no chunk ever reads freed blocks.
                if not self.engine.renew(handle_id):
                    raise AbortedError(f"the lease of KV handle {handle_id!r} ran out")
                chunk = next(chunks, None)
                if chunk is None:
                    break
                yield chunk
        finally:
            self.engine.end_pull(handle_id)

    async def Release(self, request, context):
        return prefill_pb2.ReleaseResponse(released=self.engine.release(request.handle_id))

    async def Abort(self, request, context):
        return prefill_pb2.AbortResponse(aborted=self.engine.abort(request.request_id))

    async def Renew(self, request, context):
        handle = self.engine.renew(request.handle_id)
        if handle is None:
            return prefill_pb2.RenewResponse(renewed=False)
        response = prefill_pb2.RenewResponse(renewed=True, block_ids=handle.block_ids)
        shared = self.worker.pool.shared
        if shared is not None:
            response.shm_path, response.shm_pool_id = shared.path, shared.pool_id
        return response

    async def Info(self, request, context):
        return engine_service.info_response(
            "prefill", self.address, self.engine, max_prefill_tokens=self.engine.max_prefill_tokens
        )


def kv_chunks(cache: torch.Tensor, block_ids: list[int], first_block: int):
    """Yields each layer's K and V for runs of blocks from `first_block` on, as raw bytes."""
    # cache: [num_layers, 2, num_blocks, num_kv_heads, block_size * head_dim]
    dtype = str(cache.dtype).removeprefix("torch.")
    block_bytes = cache[0, 0, 0].numel() * cache.element_size()
    per_chunk = max(1, KV_CHUNK_BYTES // (2 * block_bytes))
    index = torch.tensor(block_ids, device=cache.device)
    for layer in range(cache.shape[0]):
        for offset in range(first_block, len(block_ids), per_chunk):
            ids = index[offset : offset + per_chunk]
            k = cache[layer, 0, ids].cpu()
            v = cache[layer, 1, ids].cpu()
            yield prefill_pb2.KvChunk(
                layer=layer,
                block_offset=offset,
                num_blocks=len(ids),
                dtype=dtype,
                shape=list(k.shape),
                k=k.view(torch.uint8).numpy().tobytes(),
                v=v.view(torch.uint8).numpy().tobytes(),
            )


def main() -> None:
    parser = engine_service.engine_parser(
        "Prefill service", default_port=50052, kv_cache_share=0.125, max_kv_cache_tokens=32768
    )
    parser.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=256,
        help="token budget of one forward pass (on 2 CPU cores about 0.2 s: what a long "
        "prompt may delay decode's next step when the two share a compute lock)",
    )
    parser.add_argument("--kv-lease-s", type=float, default=30.0, help="seconds a handle is kept")
    parser.add_argument(
        "--max-queued-tokens",
        type=int,
        default=32768,
        help="prompt tokens queued and computing beyond which a new prompt is refused "
        "(RESOURCE_EXHAUSTED, HTTP 429): about 20 s of prefill on 2 CPU cores",
    )
    parser.add_argument(
        "--no-shared-kv",
        action="store_true",
        help="keep the KV pool out of shared memory: decode always pulls over gRPC",
    )
    args = parser.parse_args()
    engine_service.run(
        "prefill",
        args,
        make_engine=lambda worker: PrefillEngine(
            worker, args.max_prefill_tokens, args.kv_lease_s, args.max_queued_tokens
        ),
        servicer=PrefillServicer,
        add_servicer=prefill_pb2_grpc.add_PrefillServicer_to_server,
        service=prefill_pb2.DESCRIPTOR.services_by_name["Prefill"],
        shared_kv=not args.no_shared_kv,
    )


if __name__ == "__main__":
    main()
