"""max_tokens 0 with echo (the legacy scoring call) over the fake stages: the prompt and its
logprobs from prefill alone; decode is never called and prefill's KV is released."""

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.sse import sse_events
from tests.test_frontend_fake_stages import MODEL_ID, FakeStages, fake_logprob, token_text
from tests.test_frontend_pipeline import _eventually

COMPLETIONS = "/v1/completions"
SCORE = {"model": MODEL_ID, "prompt": "hello", "max_tokens": 0, "echo": True, "logprobs": 1}
# The fake tokenizer: BOS then one token per character.
PROMPT_TOKENS = 6


def _prefilled_only(fakes: FakeStages, num_decode_calls: int) -> None:
    """The last prefill asked for prompt logprobs, its KV was released, decode never called."""
    request = fakes.prefill.requests[-1]
    assert request.prompt_logprobs
    assert _eventually(lambda: f"kv-{request.request_id}" in fakes.prefill.released)
    assert len(fakes.decode.requests) == num_decode_calls


def test_max_tokens_0_with_echo_scores_the_prompt(
    fake_client: TestClient, fakes: FakeStages
) -> None:
    num_decode_calls = len(fakes.decode.requests)
    response = fake_client.post(COMPLETIONS, json=SCORE)
    assert response.status_code == 200, response.text
    body = response.json()
    (choice,) = body["choices"]
    assert choice["text"] == "hello" and choice["finish_reason"] == "length"
    lps = choice["logprobs"]
    assert len(lps["tokens"]) == PROMPT_TOKENS
    # The first token has no context; the others' are prefill's.
    ids = [ord(c) for c in "hello"]
    assert lps["token_logprobs"] == [None, *(fake_logprob(i) for i in ids)]
    assert lps["tokens"][1:] == [token_text(i) for i in ids]
    assert body["usage"]["completion_tokens"] == 0
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == PROMPT_TOKENS
    assert json.loads(response.headers["fireworks-sampling-options"])["max_tokens"] == 0
    _prefilled_only(fakes, num_decode_calls)


def test_max_tokens_0_streamed(fake_client: TestClient, fakes: FakeStages) -> None:
    num_decode_calls = len(fakes.decode.requests)
    body = {**SCORE, "stream": True, "stream_options": {"include_usage": True}}
    text = fake_client.post(COMPLETIONS, json=body).text
    echo, finish, usage = sse_events(text)
    assert echo["choices"][0]["text"] == "hello"
    assert len(echo["choices"][0]["logprobs"]["tokens"]) == PROMPT_TOKENS
    assert finish["choices"][0]["text"] == "" and finish["choices"][0]["finish_reason"] == "length"
    assert usage["usage"]["completion_tokens"] == 0
    _prefilled_only(fakes, num_decode_calls)


def test_max_completion_tokens_0_with_echo_last(fake_client: TestClient, fakes: FakeStages) -> None:
    num_decode_calls = len(fakes.decode.requests)
    body = {**SCORE, "max_completion_tokens": 0, "echo_last": 2, "echo": None}
    del body["max_tokens"]
    response = fake_client.post(COMPLETIONS, json=body)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    assert choice["text"] == "lo" and len(choice["logprobs"]["tokens"]) == 2
    _prefilled_only(fakes, num_decode_calls)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 0, "echo": False, "logprobs": 1}, "max_tokens"),
        ({"max_completion_tokens": 0, "echo_last": 0}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ],
)
def test_max_tokens_0_without_echo_is_a_400(
    fake_client: TestClient, fields: dict[str, Any], param: str
) -> None:
    chat = "messages" in fields
    body = {"model": MODEL_ID, **({} if chat else {"prompt": "hello"}), **fields}
    response = fake_client.post("/v1/chat/completions" if chat else COMPLETIONS, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and "echo" in error["message"]
