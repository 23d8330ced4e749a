"""Protobuf <-> the frontend's dataclasses, in one place for every stage message."""

import logging

import grpc

from frontend.errors import internal_error
from frontend.stages.instances import Instance, StagePool
from frontend.stages.rpc_errors import stage_error
from frontend.stages.types import (
    DEFAULT_BLOCK_SIZE,
    ChatTurn,
    ModelLimits,
    SpeculationStats,
    StageStats,
    TokenDelta,
    TokenLogprob,
    TopLogprob,
)
from services.rpc import common_pb2, decode_pb2, tokenizer_pb2

logger = logging.getLogger(__name__)

_FINISH_REASONS = {
    decode_pb2.FINISH_REASON_STOP: "stop",
    decode_pb2.FINISH_REASON_LENGTH: "length",
}


def chat_message_pb(turn: ChatTurn) -> tokenizer_pb2.ChatMessage:
    return tokenizer_pb2.ChatMessage(
        role=turn.role,
        content=turn.content,
        name=turn.name,
        tool_call_id=turn.tool_call_id or "",
        tool_calls_json=turn.tool_calls_json,
    )


def logprob_from_pb(pb: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(
        token_id=pb.token_id,
        logprob=pb.logprob,
        token=pb.token,
        token_bytes=pb.token_bytes,
        top=[TopLogprob(t.token_id, t.logprob, t.token, t.token_bytes) for t in pb.top],
    )


def delta_from_pb(message: decode_pb2.GenerateResponse, want_logprobs: bool) -> TokenDelta:
    logprobs = [logprob_from_pb(lp) for lp in message.logprobs]
    if want_logprobs and len(logprobs) != len(message.token_ids):
        logger.error("decode sent %d logprobs for %d tokens", len(logprobs), len(message.token_ids))
        raise internal_error()
    return TokenDelta(
        token_ids=list(message.token_ids),
        text=message.text,
        finish_reason=_FINISH_REASONS.get(message.finish_reason),
        num_generated=message.num_generated,
        queue_ns=message.queue_ns,
        kv_transfer_ns=message.kv_transfer_ns,
        prefill_queue_ns=message.prefill_queue_ns,
        prefill_compute_ns=message.prefill_compute_ns,
        num_cached_tokens=message.num_cached_tokens,
        logprobs=logprobs,
        speculation=_speculation(message.speculation) if message.HasField("speculation") else None,
    )


def _speculation(pb: decode_pb2.Speculation) -> SpeculationStats:
    return SpeculationStats(
        prediction_tokens=pb.prediction_tokens,
        draft_tokens=pb.draft_tokens,
        accepted_tokens=pb.accepted_tokens,
        drafted_by_position=list(pb.drafted_by_position),
        accepted_by_position=list(pb.accepted_by_position),
    )


def limits_from_infos(infos: dict[str, common_pb2.InfoResponse]) -> ModelLimits | None:
    """The model's limits as every stage can serve them; None when no stage reports a window."""
    model_ids = {i.model.model_id for i in infos.values() if i.model.model_id}
    if len(model_ids) > 1:
        logger.warning("stages report different models: %s", sorted(model_ids))
    # Decode must hold prompt + completion, prefill the prompt: the smallest window wins.
    lengths = [i.limits.max_model_len for i in infos.values() if i.limits.max_model_len > 0]
    lengths = lengths or [i.model.context_length for i in infos.values() if i.model.context_length]
    if not lengths:
        return None
    vocab_sizes = [i.model.vocab_size for i in infos.values() if i.model.vocab_size > 0]
    return ModelLimits(
        model_id=next((i.model.model_id for i in infos.values() if i.model.model_id), ""),
        max_model_len=min(lengths),
        block_size=infos["prefill"].model.block_size or DEFAULT_BLOCK_SIZE,
        # Every stage must accept a biased id, so the smallest vocabulary bounds them.
        vocab_size=min(vocab_sizes, default=0),
    )


def stats_from_info(stage: str, info: common_pb2.InfoResponse, address: str) -> StageStats:
    stats = info.stats
    return StageStats(
        service=info.service or stage,
        instance=address,
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        num_free_blocks=stats.num_free_blocks,
        num_used_blocks=stats.num_used_blocks,
        prefix_cache_queried_blocks=stats.prefix_cache_queried_blocks,
        prefix_cache_hit_blocks=stats.prefix_cache_hit_blocks,
        num_steps=stats.num_steps,
        step_seconds=stats.step_time_ns / 1e9,
        num_grammar_steps=stats.num_grammar_steps,
        grammar_seconds=stats.grammar_time_ns / 1e9,
        num_requests=stats.num_requests,
        num_tokens=stats.num_tokens,
        kv_cache_bytes=stats.kv_cache_bytes,
        weight_bytes=stats.weight_bytes,
    )


class DecodeStream:
    """One Generate call on one decode instance, counted in its load while open. Cancelling
    it aborts the request on the decode side; an instance that drops it is marked down."""

    def __init__(
        self,
        pool: StagePool,
        instance: Instance,
        call: grpc.aio.UnaryStreamCall,
        want_logprobs: bool,
    ) -> None:
        self.instance = instance
        self._pool = pool
        self._call = call
        self._want_logprobs = want_logprobs
        self._open = True
        instance.in_flight += 1

    async def read(self) -> TokenDelta | None:
        """The next message, or None once the stream has ended."""
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            self._end()
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._pool.mark_down(self.instance, exc.code().name)
            raise stage_error("decode", exc) from None
        if message is grpc.aio.EOF:
            self._end()
            return None
        assert isinstance(message, decode_pb2.GenerateResponse)
        return delta_from_pb(message, self._want_logprobs)

    def cancel(self) -> None:
        self._call.cancel()
        self._end()

    def _end(self) -> None:
        if self._open:
            self._open = False
            self.instance.in_flight -= 1
