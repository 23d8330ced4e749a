"""Conversions between protobuf messages and internal types, shared by the services."""

from services.engine.config import EngineInfo, ModelConfig
from services.engine.sampling_state import SampledToken
from services.engine.tokenizer import Tokenizer
from services.errors import InvalidArgumentError
from services.request_params import SamplingParams, validate
from services.rpc import common_pb2

# Accepted by the API but without effect on a model without these abilities.
NON_REASONING_NOTE = "reasoning_effort has no effect: the model is not a reasoning model"


def model_info(
    config: ModelConfig, engine: EngineInfo | None, block_size: int
) -> common_pb2.ModelInfo:
    """`engine` None: a stage that runs no model (the tokenizer)."""
    engine = engine or EngineInfo(dtype="", device="cpu", weight_format="")
    return common_pb2.ModelInfo(
        model_id=config.model_id,
        architecture=config.architecture,
        dtype=engine.dtype,
        device=engine.device,
        weight_format=engine.weight_format,
        kernels=engine.kernels,
        batch_invariant=engine.batch_invariant,
        kv_cache_dtype=engine.kv_cache_dtype,
        vocab_size=config.vocab_size,
        context_length=config.max_position_embeddings,
        block_size=block_size,
        eos_token_ids=config.eos_token_ids,
        notes={"reasoning_effort": NON_REASONING_NOTE},
    )


def checked_sampling(pb: common_pb2.SamplingParams, vocab_size: int) -> SamplingParams:
    """The request's sampling, its ranges checked for direct gRPC callers (the frontend checks
    them for HTTP ones)."""
    params = SamplingParams.from_pb(pb)
    try:
        validate(params, vocab_size)
    except ValueError as exc:
        raise InvalidArgumentError(f"sampling: {exc}") from exc
    return params


def token_logprob_pb(sampled: SampledToken, tokenizer: Tokenizer) -> common_pb2.TokenLogprob:
    """The sampled token's raw logprob and alternatives, each with its text and bytes."""
    text, raw = token_text(sampled.token_id, tokenizer)
    return common_pb2.TokenLogprob(
        token_id=sampled.token_id,
        logprob=sampled.logprob or 0.0,
        token=text,
        token_bytes=raw,
        top=[top_logprob_pb(token_id, logprob, tokenizer) for token_id, logprob in sampled.top],
    )


def top_logprob_pb(token_id: int, logprob: float, tokenizer: Tokenizer) -> common_pb2.TopLogprob:
    text, raw = token_text(token_id, tokenizer)
    return common_pb2.TopLogprob(token_id=token_id, logprob=logprob, token=text, token_bytes=raw)


def token_text(token_id: int, tokenizer: Tokenizer) -> tuple[str, bytes]:
    """A single token's bytes and their text; a partial UTF-8 character shows as U+FFFD."""
    if tokenizer.is_byte_level:
        raw = tokenizer.piece_bytes()[token_id]
        return raw.decode("utf-8", errors="replace"), raw
    text = tokenizer.decode([token_id])
    return text, text.encode()
