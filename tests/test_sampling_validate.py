"""validate() names the field that is out of range."""

import math

import pytest

from services.request_params import SamplingParams, validate


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", 2.01),
        ("temperature", math.nan),
        ("top_p", -0.1),
        ("top_p", 1.1),
        ("top_k", -1),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("typical_p", -0.1),
        ("typical_p", 1.01),
        ("frequency_penalty", -2.1),
        ("frequency_penalty", 2.1),
        ("presence_penalty", -2.1),
        ("presence_penalty", 2.1),
        ("repetition_penalty", -0.1),
        ("repetition_penalty", 2.1),
        ("mirostat_target", 0.0),
        ("mirostat_target", -1.0),
        ("mirostat_lr", 0.0),
        ("top_logprobs", -1),
        ("top_logprobs", 6),
        ("logit_bias", {1: 100.5}),
        ("logit_bias", {1: -101.0}),
        ("logit_bias", {-1: 1.0}),
    ],
)
def test_out_of_range_values_are_rejected_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        validate(SamplingParams(**{field: value}))


def test_logit_bias_ids_are_checked_against_the_vocabulary_when_given():
    params = SamplingParams(logit_bias={100: 1.0})
    validate(params)
    validate(params, vocab_size=101)
    with pytest.raises(ValueError, match="logit_bias"):
        validate(params, vocab_size=100)


def test_the_edges_of_every_range_are_accepted():
    validate(SamplingParams())
    validate(
        SamplingParams(
            temperature=2.0,
            top_p=0.0,
            top_k=100,
            min_p=1.0,
            typical_p=0.0,
            frequency_penalty=-2.0,
            presence_penalty=2.0,
            repetition_penalty=0.0,
            mirostat_target=0.1,
            mirostat_lr=1.0,
            logit_bias={0: -100.0, 5: 100.0},
            logprobs=True,
            top_logprobs=5,
        ),
        vocab_size=6,
    )
