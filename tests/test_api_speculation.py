"""Predicted outputs through the whole stack with the openai client: `prediction` (OpenAI's
form) and `speculation` (Fireworks') on both endpoints, streamed or not, with n, echo and
logprobs; the same output as without, and the speculation metrics and usage counts."""

import httpx
import openai
import pytest

SPECULATION_METRICS = (
    "speculation-prompt-tokens",
    "speculation-prompt-matched-tokens",
    "speculation-generated-tokens",
    "speculation-acceptance",
)
MESSAGES = [{"role": "user", "content": "List the planets of the solar system, one per line."}]
PROMPT = "The seven days of the week are Monday, Tuesday,"


@pytest.fixture(scope="module")
def plain_chat(client, model) -> str:
    reply = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=60, temperature=0
    )
    return reply.choices[0].message.content


@pytest.fixture(scope="module")
def plain_completion(client, model) -> str:
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=40, temperature=0)
    return reply.choices[0].text


def halves(text: str) -> list[dict]:
    middle = len(text) // 2
    return [{"type": "text", "text": text[:middle]}, {"type": "text", "text": text[middle:]}]


@pytest.mark.parametrize("form", ["object", "parts", "string", "speculation"])
def test_chat_with_a_right_prediction_gives_the_same_reply_faster(client, model, plain_chat, form):
    prediction = {
        "object": {"type": "content", "content": plain_chat},
        "parts": {"type": "content", "content": halves(plain_chat)},
        "string": plain_chat,
    }.get(form)
    extra = {"speculation": plain_chat} if form == "speculation" else {"prediction": prediction}
    reply = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=60,
        temperature=0,
        extra_body={**extra, "perf_metrics_in_response": True},
    )
    assert reply.choices[0].message.content == plain_chat
    metrics = reply.model_extra["perf_metrics"]
    assert all(name in metrics for name in SPECULATION_METRICS)
    matched = int(metrics["speculation-prompt-matched-tokens"])
    assert int(metrics["speculation-prompt-tokens"]) > 0
    assert matched > reply.usage.completion_tokens // 2
    details = reply.usage.completion_tokens_details
    assert details.accepted_prediction_tokens == matched
    generated = int(metrics["speculation-generated-tokens"])
    assert details.rejected_prediction_tokens == generated - matched
    rates = [float(r) for r in metrics["speculation-acceptance"].split(",")]
    assert rates and all(0 <= r <= 1 for r in rates)


def test_completions_take_prediction_and_token_id_speculation(client, model, plain_completion):
    ids = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=40,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    completion_ids = ids.choices[0].model_extra["token_ids"]
    for extra in ({"prediction": plain_completion}, {"speculation": completion_ids}):
        raw = client.completions.with_raw_response.create(
            model=model, prompt=PROMPT, max_tokens=40, temperature=0, extra_body=extra
        )
        assert raw.parse().choices[0].text == plain_completion
        assert int(raw.headers["fireworks-speculation-prompt-matched-tokens"]) > 10
        assert raw.headers["fireworks-speculation-prompt-tokens"] != "0"


def test_streamed_prediction_gives_the_same_text_and_metrics_in_the_last_chunk(
    client, model, plain_chat
):
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=60,
        temperature=0,
        stream=True,
        prediction={"type": "content", "content": plain_chat},
        extra_body={"perf_metrics_in_response": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain_chat
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert all(name in last.model_extra["perf_metrics"] for name in SPECULATION_METRICS)


def test_a_wrong_prediction_changes_nothing_but_the_counts(client, model, plain_chat):
    reply = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=60,
        temperature=0,
        prediction={"type": "content", "content": "def main():\n    return 42\n" * 10},
    )
    assert reply.choices[0].message.content == plain_chat
    assert reply.usage.completion_tokens_details.accepted_prediction_tokens < 5


def test_sampled_choices_echo_and_logprobs_are_unchanged_by_a_prediction(client, model):
    def run(**extra):
        return client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=24,
            temperature=1.0,
            seed=42,
            n=2,
            echo=True,
            logprobs=2,
            extra_body=extra,
        )

    plain = run()
    predicted = run(prediction=plain.choices[0].text[len(PROMPT) :])
    for a, b in zip(plain.choices, predicted.choices, strict=True):
        assert a.text == b.text
        assert a.logprobs.token_logprobs == b.logprobs.token_logprobs
        assert a.logprobs.top_logprobs == b.logprobs.top_logprobs


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"prediction": 5}, "prediction"),
        ({"prediction": {"type": "file", "content": "x"}}, "prediction"),
        ({"speculation": [1, 2**20]}, "speculation"),
        ({"speculation": list(range(9000))}, "speculation"),
        ({"prediction": "Monday " * 9000}, "prediction"),
        ({"prediction": "x", "speculation": "x"}, "prediction"),
    ],
)
def test_bad_predictions_are_refused_by_name(client, model, extra, param):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(
            model=model, prompt=PROMPT, max_tokens=4, temperature=0, extra_body=extra
        )
    assert raised.value.body["param"] == param


def test_prometheus_counts_drafted_and_accepted_tokens_by_position(
    client, model, stack, plain_chat
):
    client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=60, temperature=0, prediction=plain_chat
    )
    text = httpx.get(f"{stack.http_url}/metrics").text
    drafted = [
        line
        for line in text.splitlines()
        if line.startswith(
            'llmserve_speculation_draft_tokens_total{position="1",source="prediction"}'
        )
    ]
    accepted = [
        line
        for line in text.splitlines()
        if line.startswith('llmserve_speculation_accepted_tokens_total{position="1"')
    ]
    assert drafted and float(drafted[0].split()[-1]) > 0
    assert accepted and float(accepted[0].split()[-1]) > 0
