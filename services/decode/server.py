"""Decode service: pulls KV (or computes the prompt itself), batches generation, streams
tokens with their text."""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc

from services import engine_service
from services.decode.closing import BudgetCloser
from services.decode.drafts import Drafter, PredictionDrafter, PromptLookupDrafter
from services.decode.engine import DecodeEngine
from services.decode.kv_pull import KvPuller
from services.decode.prefill_allowlist import PrefillAllowList
from services.decode.sequence import Finish, Sequence, StopRules
from services.decode.text_stream import TextStream
from services.engine.block_manager import blocks_needed
from services.engine.grammar import GrammarCompiler
from services.engine.sampling_state import MirostatState, SampledToken
from services.errors import InvalidArgumentError, ResourceExhaustedError, UnavailableError
from services.grammar_wire import grammar_state
from services.request_params import PromptCache, Stopping
from services.rpc import decode_pb2, decode_pb2_grpc
from services.wire import checked_sampling, token_logprob_pb

MAX_STOP_SEQUENCES = 16
_FINISH_PB = {
    None: decode_pb2.FINISH_REASON_UNSPECIFIED,
    Finish.STOP: decode_pb2.FINISH_REASON_STOP,
    Finish.LENGTH: decode_pb2.FINISH_REASON_LENGTH,
}


# What the Abort RPC puts in a sequence's output queue (the engine never sends it).
_CANCELLED = (None, None)


def deliver(outputs: list[tuple[Sequence, SampledToken | None, Finish | None]]) -> None:
    """Runs on the event loop once per step: hands each sequence its new token."""
    for seq, token, finish in outputs:
        seq.outputs.put_nowait((token, finish))


def _speculation_pb(drafter: Drafter) -> decode_pb2.Speculation:
    prediction = drafter.prediction.tokens if isinstance(drafter, PredictionDrafter) else []
    return decode_pb2.Speculation(
        prediction_tokens=len(prediction),
        draft_tokens=drafter.drafted,
        accepted_tokens=drafter.accepted,
        drafted_by_position=drafter.drafted_at,
        accepted_by_position=drafter.accepted_at,
    )


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, engine: DecodeEngine, address: str, tokenizer) -> None:
        self.engine = engine
        self.worker = engine.worker
        self.address = address
        self.tokenizer = tokenizer
        self.puller = KvPuller(engine)
        self.grammars = GrammarCompiler(tokenizer, self.worker.config.vocab_size)
        # Requests with a Generate stream open, by request id, for Abort.
        self._active: dict[str, Sequence] = {}
        self.draining = False

    async def drain(self, deadline: float) -> None:
        """Refuses new requests; returns once every open one has ended (or at `deadline`)."""
        self.draining = True
        await engine_service.wait_until(lambda: not self._active, deadline)

    def _new_sequence(self, request: decode_pb2.GenerateRequest) -> tuple[Sequence, list[bytes]]:
        """The request's sequence, and its prompt's block hashes as the request's prompt
        cache gives them (decode's own prefix-cache keys; the handle's are not taken)."""
        config = self.worker.config
        block_size = self.engine.blocks.block_size
        stopping = Stopping.from_pb(request.stopping)
        if stopping.max_tokens < 1:
            raise InvalidArgumentError("stopping.max_tokens must be at least 1")
        if len(stopping.stop) > MAX_STOP_SEQUENCES:
            raise InvalidArgumentError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        self._check_prompt(request)
        num_prompt = len(request.prompt_token_ids)
        prompt_cache = PromptCache.from_pb(request.prompt_cache)
        if prompt_cache.max_len is not None and prompt_cache.max_len < 0:
            raise InvalidArgumentError("prompt_cache.max_len must be >= 0")
        chain = prompt_cache.block_hashes(request.prompt_token_ids, block_size)
        max_len = min(num_prompt + stopping.max_tokens, config.max_position_embeddings)
        if blocks_needed(max_len, self.engine.blocks.block_size) > self.engine.blocks.num_blocks:
            raise InvalidArgumentError(
                f"prompt + max_tokens ({max_len} tokens) exceeds the decode KV pool "
                f"({self.engine.blocks.num_blocks * self.engine.blocks.block_size} tokens)"
            )
        computes_prompt = request.compute_prompt
        sampling = checked_sampling(request.sampling, config.vocab_size)
        if computes_prompt:  # the first token is sampled here
            first_ids = []
            mirostat = (
                None
                if sampling.mirostat_target is None
                else MirostatState.start(sampling.mirostat_target)
            )
        else:
            first_ids = [request.first_token_id]
            mirostat = (
                MirostatState(request.mirostat_mu) if request.HasField("mirostat_mu") else None
            )
        seq = Sequence(
            request_id=request.request_id,
            token_ids=[*request.prompt_token_ids, *first_ids],
            num_prompt_tokens=num_prompt,
            sampling=sampling,
            stop=StopRules(
                max_tokens=stopping.max_tokens,
                max_model_len=config.max_position_embeddings,
                eos_token_ids=frozenset(config.eos_token_ids),
                ignore_eos=stopping.ignore_eos,
            ),
            outputs=asyncio.Queue(),
            block_hashes=list(chain),
            prompt_cache=prompt_cache,
            extends_chain=len(chain) == num_prompt // block_size,
            mirostat=mirostat,
            computes_prompt=computes_prompt,
        )
        seq.drafter = self._drafter(request, seq)
        return seq, chain

    def _drafter(self, request: decode_pb2.GenerateRequest, seq: Sequence) -> Drafter | None:
        """The request's prediction drafter, else prompt lookup if enabled. Mirostat rows get
        none: their state changes with every token sampled, drafts included."""
        prediction = list(request.prediction_token_ids)
        config = self.worker.config
        if any(not 0 <= t < config.vocab_size for t in prediction):
            raise InvalidArgumentError(f"prediction_token_ids must be in [0, {config.vocab_size})")
        if len(prediction) > config.max_position_embeddings:
            raise InvalidArgumentError(
                f"prediction_token_ids has {len(prediction)} tokens; the context window is "
                f"{config.max_position_embeddings}"
            )
        max_draft = self.engine.max_draft_tokens
        if max_draft == 0 or seq.mirostat is not None:
            return None
        if prediction:
            return PredictionDrafter(prediction, seq.num_prompt_tokens, max_draft)
        return PromptLookupDrafter(max_draft) if self.engine.prompt_lookup else None

    def _check_prompt(self, request: decode_pb2.GenerateRequest) -> None:
        """Before anything is pulled: the handle must hold the prompt in decode's block size,
        and every id must be in the vocabulary (a bad id would fail the whole batch's step)."""
        handle, block_size = request.kv_handle, self.engine.blocks.block_size
        num_prompt = len(request.prompt_token_ids)
        vocab_size = self.worker.config.vocab_size
        if request.compute_prompt:
            if num_prompt == 0:
                raise InvalidArgumentError("prompt_token_ids is empty")
            if any(not 0 <= t < vocab_size for t in request.prompt_token_ids):
                raise InvalidArgumentError(f"token ids must be in [0, {vocab_size})")
            return
        if num_prompt != handle.num_tokens or num_prompt == 0:
            raise InvalidArgumentError("prompt_token_ids must match the KV handle's tokens")
        if handle.block_size != block_size:
            raise InvalidArgumentError(
                f"KV block size {handle.block_size} differs from decode's {block_size}"
            )
        if handle.num_blocks != blocks_needed(num_prompt, block_size):
            raise InvalidArgumentError(
                f"a KV handle for {num_prompt} tokens has {blocks_needed(num_prompt, block_size)} "
                f"blocks, not {handle.num_blocks}"
            )
        token_ids = [*request.prompt_token_ids, request.first_token_id]
        if any(not 0 <= t < vocab_size for t in token_ids):
            raise InvalidArgumentError(f"token ids must be in [0, {vocab_size})")

    async def Generate(self, request, context) -> AsyncIterator[decode_pb2.GenerateResponse]:
        received_ns = time.monotonic_ns()
        if self.draining:  # before the try: the handle is for another instance to take
            raise UnavailableError("this decode instance is shutting down; use another")
        address = request.kv_handle.prefill_address
        allowed = request.compute_prompt or await self.engine.prefill_instances.allows(address)
        if not allowed:  # never dialed
            raise InvalidArgumentError(
                f"kv_handle.prefill_address {address!r} is not a prefill instance this decode "
                "instance knows (--prefill)"
            )
        try:
            queued = len(self._active) - len(self.engine.scheduler.running)
            if queued >= self.engine.max_queued_requests:
                raise ResourceExhaustedError(
                    f"decode has {queued} requests waiting to join its batch; retry later"
                )
            seq, chain = self._new_sequence(request)
            seq.grammar = await grammar_state(seq.sampling.grammar, self.grammars)
            if seq.grammar is not None:
                first_allowed = seq.computes_prompt or seq.grammar.accept(request.first_token_id)
                if not first_allowed:
                    raise InvalidArgumentError("first_token_id is not allowed by the grammar")
                seq.closer = BudgetCloser(seq.grammar, self.tokenizer.encode)
        except BaseException:  # a bad request, or the caller gone: nobody will pull the KV
            if not request.compute_prompt:
                self.puller.release_later(request.kv_handle)
            raise
        self._active[seq.request_id] = seq
        try:
            # aclosing: a cancelled call closes the inner generator now, not when collected.
            responses = self._generate(seq, chain, request, context, received_ns)
            async with contextlib.aclosing(responses):
                async for response in responses:
                    yield response
        finally:
            if self._active.get(seq.request_id) is seq:
                del self._active[seq.request_id]

    async def _generate(
        self, seq: Sequence, chain: list[bytes], request, context, received_ns: int
    ) -> AsyncIterator[decode_pb2.GenerateResponse]:
        stopping = request.stopping
        text = TextStream(
            self.tokenizer, list(stopping.stop), stopping.include_stop_str, request.prompt_token_ids
        )
        finish, num_generated, pulled = None, 0, None
        if seq.computes_prompt:
            self.engine.add(seq)
        else:
            first = request.first_token_id
            finish = seq.stop.check(first, 1, len(seq.token_ids))
            num_generated = 1
            response, finish = self._response(seq, text, first, finish, num_generated)
            if seq.sampling.wants_logprobs:
                response.logprobs.append(request.first_token_logprob)
            if finish is not None:
                self.puller.release_later(request.kv_handle)
                yield response
                return
            try:
                yield response
            except BaseException:  # the caller went away after the first token, before the pull
                self.puller.release_later(request.kv_handle)
                raise
            prompt_ids = seq.token_ids[: seq.num_prompt_tokens]
            pulled = await self.puller.pull(request.kv_handle, prompt_ids, chain)
            seq.block_table, seq.num_cached = pulled.block_ids, seq.num_prompt_tokens
            self.engine.end_pull(seq)
        try:
            first_step = True
            while finish is None:
                token, finish = await seq.outputs.get()
                if (token, finish) == _CANCELLED:
                    await context.abort(grpc.StatusCode.CANCELLED, "aborted by an Abort call")
                if token is None:
                    await context.abort(grpc.StatusCode.INTERNAL, "decode step failed")
                num_generated += 1
                response, finish = self._response(seq, text, token.token_id, finish, num_generated)
                if seq.sampling.wants_logprobs:
                    response.logprobs.append(token_logprob_pb(token, self.tokenizer))
                if first_step and pulled is None:
                    response.prefill_queue_ns = seq.joined_ns - received_ns
                    response.prefill_compute_ns = seq.first_token_ns - seq.joined_ns
                    response.num_cached_tokens = seq.num_reused_tokens
                elif first_step:
                    response.queue_ns = seq.joined_ns - received_ns
                    response.kv_transfer_ns = pulled.duration_ns
                    response.kv_bytes = pulled.num_bytes
                    response.kv_transport = pulled.transport
                    response.num_reused_blocks = pulled.num_reused_blocks
                first_step = False
                yield response
        finally:
            if seq.finish is None:
                # Client gone, a stop string matched or Abort called: leave the batch at the
                # next step.
                self.engine.abort(seq.request_id)

    def _response(
        self,
        seq: Sequence,
        text: TextStream,
        token_id: int,
        finish: Finish | None,
        num_generated: int,
    ) -> tuple[decode_pb2.GenerateResponse, Finish | None]:
        """The response for the `num_generated`-th token (a step may deliver several)."""
        delta, stopped = text.push(token_id, is_last=finish is not None)
        if stopped:
            finish = Finish.STOP
        response = decode_pb2.GenerateResponse(
            token_ids=[token_id],
            text=delta,
            finish_reason=_FINISH_PB[finish],
            num_generated=num_generated,
        )
        if finish is not None and seq.drafter is not None:
            response.speculation.CopyFrom(_speculation_pb(seq.drafter))
        return response, finish

    async def Abort(self, request, context):
        seq = self._active.get(request.request_id)
        if seq is None:
            return decode_pb2.AbortResponse(aborted=False)
        # Ends the request's stream; its handler then takes the sequence out of the batch.
        seq.outputs.put_nowait(_CANCELLED)
        return decode_pb2.AbortResponse(aborted=True)

    async def Info(self, request, context):
        return engine_service.info_response(
            "decode", self.address, self.engine, max_batch_size=self.engine.scheduler.max_batch_size
        )


def main() -> None:
    parser = engine_service.engine_parser(
        "Decode service", default_port=50053, kv_cache_share=0.25, max_kv_cache_tokens=65536
    )
    parser.add_argument("--max-batch-size", type=int, default=64, help="sequences per step")
    parser.add_argument(
        "--prefill",
        default="",
        help="the prefill instances (host:port,...; names re-resolved) whose KV this decode "
        "instance pulls; empty: those on this host's loopback interface only",
    )
    parser.add_argument(
        "--max-queued-requests",
        type=int,
        default=0,
        help="requests waiting to join the batch beyond which a new one is refused "
        "(RESOURCE_EXHAUSTED, HTTP 429); 0: four batches' worth",
    )
    parser.add_argument(
        "--max-step-tokens",
        type=int,
        default=2048,
        help="token budget of one step (recompute, draft tokens)",
    )
    parser.add_argument(
        "--max-chunk-tokens",
        type=int,
        default=256,
        help="prompt tokens one step computes at most (a prompt decode computes itself, or "
        "one recomputed after a preemption): a longer one takes several steps, so the running "
        "streams' next tokens wait for one chunk at a time (as prefill's --max-prefill-tokens)",
    )
    parser.add_argument(
        "--max-draft-tokens",
        type=int,
        default=16,
        help="speculative decoding: most draft tokens one sequence verifies in a step "
        "(0: never speculate, predictions are then ignored)",
    )
    parser.add_argument(
        "--prompt-lookup",
        action="store_true",
        help="speculate without a prediction too: draft the continuation of the output's "
        "last tokens where they occur earlier in the prompt or output (n-gram lookup)",
    )
    args = parser.parse_args()
    if args.max_chunk_tokens < 1:  # no prompt could ever join the batch
        parser.error("--max-chunk-tokens must be at least 1")
    engine_service.run(
        "decode",
        args,
        make_engine=lambda worker: DecodeEngine(
            worker,
            args.max_batch_size,
            args.max_step_tokens,
            deliver,
            args.max_queued_requests or 4 * args.max_batch_size,
            PrefillAllowList(args.prefill),
            max_draft_tokens=args.max_draft_tokens,
            prompt_lookup=args.prompt_lookup,
            max_chunk_tokens=args.max_chunk_tokens,
        ),
        servicer=DecodeServicer,
        add_servicer=decode_pb2_grpc.add_DecodeServicer_to_server,
        service=decode_pb2.DESCRIPTOR.services_by_name["Decode"],
    )


if __name__ == "__main__":
    main()
