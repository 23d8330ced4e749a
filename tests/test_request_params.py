"""The shared request types cross the wire unchanged, and one name holds from API to engine."""

import dataclasses

import pytest

from frontend.api.schemas import ChatCompletionRequest, CompletionRequest
from services.request_params import Grammar, PromptCache, SamplingParams, Stopping
from services.rpc import common_pb2

SAMPLED = SamplingParams(
    temperature=0.0,
    top_p=0.0,
    top_k=7,
    seed=2**64 - 1,
    min_p=0.25,
    typical_p=0.0,
    frequency_penalty=-2.0,
    presence_penalty=1.5,
    repetition_penalty=0.0,
    mirostat_target=3.0,
    mirostat_lr=0.5,
    logit_bias={0: -100.0, 49151: 100.0},
    logprobs=True,
    top_logprobs=5,
    grammar=Grammar("json_schema", '{"type": "object"}', strict=True),
)


@pytest.mark.parametrize("params", [SamplingParams(), SAMPLED], ids=["defaults", "zeros"])
def test_sampling_round_trips_through_protobuf(params: SamplingParams) -> None:
    wire = common_pb2.SamplingParams.FromString(params.to_pb().SerializeToString())
    assert SamplingParams.from_pb(wire) == params


def test_unset_sampling_fields_take_the_api_defaults() -> None:
    assert SamplingParams.from_pb(common_pb2.SamplingParams()) == SamplingParams()


def test_every_sampling_field_is_a_proto_field_and_an_api_field_of_the_same_name() -> None:
    proto_fields = common_pb2.SamplingParams.DESCRIPTOR.fields_by_name
    for field in dataclasses.fields(SamplingParams):
        assert field.name in proto_fields
        descriptor = proto_fields[field.name]
        default = SamplingParams().__getattribute__(field.name)
        if not descriptor.has_presence:
            # A field without presence reads as its zero when unset: that must be its default.
            assert default == descriptor.default_value or default == {}, field.name
        if field.name != "grammar":  # response_format or tools
            assert field.name in CompletionRequest.model_fields
            assert field.name in ChatCompletionRequest.model_fields


def test_stopping_and_prompt_cache_round_trip() -> None:
    stopping = Stopping(max_tokens=9, stop=["\n\n", "END"], ignore_eos=True)
    assert Stopping.from_pb(stopping.to_pb()) == stopping
    for cache in (PromptCache(), PromptCache("tenant", 0), PromptCache(max_len=48)):
        wire = common_pb2.PromptCache.FromString(cache.to_pb().SerializeToString())
        assert PromptCache.from_pb(wire) == cache


def test_the_cache_never_serves_a_prompts_last_token_nor_past_max_len() -> None:
    assert PromptCache().servable_tokens(32) == 31
    assert PromptCache(max_len=20).servable_tokens(32) == 20
    assert PromptCache(max_len=0).servable_tokens(32) == 0
    tokens = list(range(64))
    assert len(PromptCache().block_hashes(tokens, 16)) == 4
    assert len(PromptCache(max_len=40).block_hashes(tokens, 16)) == 2
    assert PromptCache("a").block_hashes(tokens, 16) != PromptCache("b").block_hashes(tokens, 16)
