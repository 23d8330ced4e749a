"""Conversions between protobuf messages and internal types, shared by the services."""

from services.engine.config import ModelConfig
from services.engine.sampler import SamplingParams
from services.errors import InvalidArgumentError
from services.rpc import common_pb2

# Accepted by the API but without effect on a model without these abilities.
# The API's range; the frontend enforces it for HTTP callers, this for direct gRPC ones.
MAX_TEMPERATURE = 2.0
NON_REASONING_NOTE = "reasoning_effort has no effect: the model is not a reasoning model"


def model_info(
    config: ModelConfig, dtype: str, device: str, block_size: int
) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(
        model_id=config.model_id,
        architecture=config.architecture,
        dtype=dtype,
        device=device,
        vocab_size=config.vocab_size,
        context_length=config.max_position_embeddings,
        block_size=block_size,
        eos_token_ids=config.eos_token_ids,
        notes={"reasoning_effort": NON_REASONING_NOTE},
    )


def sampling_from_pb(pb: common_pb2.SamplingParams) -> SamplingParams:
    # Comparisons written so that NaN fails them too.
    if not 0.0 <= pb.temperature <= MAX_TEMPERATURE:
        raise InvalidArgumentError(f"sampling.temperature must be in [0, {MAX_TEMPERATURE}]")
    if not 0.0 <= pb.top_p <= 1.0:
        raise InvalidArgumentError("sampling.top_p must be in [0, 1] (0 means 1)")
    if pb.top_k < 0:
        raise InvalidArgumentError("sampling.top_k must be >= 0")
    return SamplingParams(
        temperature=pb.temperature,
        top_p=pb.top_p or 1.0,
        top_k=pb.top_k,
        seed=pb.seed if pb.HasField("seed") else None,
    )
