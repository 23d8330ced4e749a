"""Request validation of the frontend, with every stage down.

A stage that is down answers 503, so a 400/404 here also proves the request was refused
before any stage was contacted.
"""

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from frontend.app import create_app
from tests.test_frontend_fake_stages import dead_stages_config

MODEL = "test-model"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(dead_stages_config(MODEL))) as test_client:
        yield test_client


def completion_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hi", **fields}


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, **fields}


def assert_error_shape(body: dict[str, Any]) -> dict[str, Any]:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# (body, status, param) for /v1/completions.
COMPLETION_CASES = [
    ({"prompt": "hi"}, 400, "model"),
    ({"model": MODEL}, 400, "prompt"),
    (completion_body(model=5), 400, "model"),
    (completion_body(model="other-model"), 404, "model"),
    (completion_body(model="accounts/fireworks/models/other-model"), 404, "model"),
    (completion_body(prompt=5), 400, "prompt"),
    (completion_body(prompt=None), 400, "prompt"),
    (completion_body(prompt=[]), 400, "prompt"),
    (completion_body(prompt=["a", "b"]), 400, "prompt"),
    (completion_body(prompt=[[1, 2], [3]]), 400, "prompt"),
    (completion_body(prompt=[[]]), 400, "prompt"),
    (completion_body(prompt=[1, "a"]), 400, "prompt"),
    (completion_body(prompt=[-1]), 400, "prompt"),
    (completion_body(prompt=[2**31]), 400, "prompt"),
    (completion_body(prompt=[True]), 400, "prompt"),
    (completion_body(prompt=[["a"]]), 400, "prompt"),
    (completion_body(max_tokens="16"), 400, "max_tokens"),
    (completion_body(max_tokens=0), 400, "max_tokens"),
    (completion_body(max_tokens=-1), 400, "max_tokens"),
    (completion_body(max_tokens=1.5), 400, "max_tokens"),
    (completion_body(max_tokens=True), 400, "max_tokens"),
    (completion_body(max_completion_tokens=0), 400, "max_completion_tokens"),
    (completion_body(max_tokens=5, max_completion_tokens=5), 400, "max_completion_tokens"),
    (completion_body(n=2), 400, "n"),
    (completion_body(n=0), 400, "n"),
    (completion_body(n=129), 400, "n"),
    (completion_body(n="1"), 400, "n"),
    (completion_body(seed=-1), 400, "seed"),
    (completion_body(seed=2**64), 400, "seed"),
    (completion_body(seed="1"), 400, "seed"),
    (completion_body(stop=5), 400, "stop"),
    (completion_body(stop=[1]), 400, "stop"),
    (completion_body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (completion_body(stop=[""]), 400, "stop"),
    (completion_body(stream="yes"), 400, "stream"),
    (completion_body(stream=1), 400, "stream"),
    (completion_body(stream_options={"include_usage": "yes"}), 400, "stream_options.include_usage"),
    (completion_body(stream_options={"bogus": True}), 400, "stream_options.bogus"),
    (completion_body(stream_options=True), 400, "stream_options"),
    (completion_body(temperature=-0.1), 400, "temperature"),
    (completion_body(temperature=2.5), 400, "temperature"),
    (completion_body(temperature="1"), 400, "temperature"),
    (completion_body(temperature=True), 400, "temperature"),
    (completion_body(top_p=0), 400, "top_p"),
    (completion_body(top_p=1.5), 400, "top_p"),
    (completion_body(top_k=-1), 400, "top_k"),
    (completion_body(top_k=101), 400, "top_k"),
    (completion_body(top_k=1.5), 400, "top_k"),
    (completion_body(user=5), 400, "user"),
    (completion_body(ignore_eos="no"), 400, "ignore_eos"),
    (
        completion_body(context_length_exceeded_behavior="drop"),
        400,
        "context_length_exceeded_behavior",
    ),
    (completion_body(perf_metrics_in_response=1), 400, "perf_metrics_in_response"),
    # Documented but not implemented yet: refused unless neutral.
    (completion_body(logprobs=1), 400, "logprobs"),
    (completion_body(logprobs=True), 400, "logprobs"),
    (completion_body(top_logprobs=2), 400, "top_logprobs"),
    (completion_body(echo=True), 400, "echo"),
    (completion_body(echo_last=3), 400, "echo_last"),
    (completion_body(logit_bias={"1": 5}), 400, "logit_bias"),
    (completion_body(frequency_penalty=0.5), 400, "frequency_penalty"),
    (completion_body(presence_penalty=-1), 400, "presence_penalty"),
    (completion_body(presence_penalty=False), 400, "presence_penalty"),
    (completion_body(repetition_penalty=1.2), 400, "repetition_penalty"),
    (completion_body(min_p=0.1), 400, "min_p"),
    (completion_body(typical_p=0.5), 400, "typical_p"),
    (completion_body(mirostat_target=1.5), 400, "mirostat_target"),
    (completion_body(mirostat_lr=0.1), 400, "mirostat_lr"),
    (completion_body(response_format={"type": "json_object"}), 400, "response_format"),
    (completion_body(raw_output=True), 400, "raw_output"),
    (completion_body(return_token_ids=True), 400, "return_token_ids"),
    (completion_body(prompt_cache_isolation_key=5), 400, "prompt_cache_isolation_key"),
    (completion_body(prompt_cache_max_len=-1), 400, "prompt_cache_max_len"),
    (completion_body(prompt_cache_max_len="10"), 400, "prompt_cache_max_len"),
    (completion_body(speculation="abc"), 400, "speculation"),
    (completion_body(prediction={"type": "content", "content": "x"}), 400, "prediction"),
    (completion_body(metadata={"a": "b"}), 400, "metadata"),
    (completion_body(reasoning_effort="low"), 400, "reasoning_effort"),
    (completion_body(images=["data:image/png;base64,AA"]), 400, "images"),
    (completion_body(best_of=2), 400, "best_of"),
    (completion_body(suffix="end"), 400, "suffix"),
    (completion_body(tools=[]), 400, "tools"),  # a chat field: unknown to completions
    (completion_body(bogus_field=1), 400, "bogus_field"),
]

# (body, status, param) for /v1/chat/completions.
CHAT_CASES = [
    ({"model": MODEL}, 400, "messages"),
    ({"messages": USER}, 400, "model"),
    (chat_body(model="other-model"), 404, "model"),
    (chat_body(messages=[]), 400, "messages"),
    (chat_body(messages="hi"), 400, "messages"),
    (chat_body(messages=[5]), 400, "messages.0"),
    (chat_body(messages=[{"content": "hi"}]), 400, "messages.0.role"),
    (chat_body(messages=[{"role": "robot", "content": "hi"}]), 400, "messages.0.role"),
    (chat_body(messages=[{"role": "tool", "content": "hi"}]), 400, "messages.0.role"),
    (chat_body(messages=[{"role": 1, "content": "hi"}]), 400, "messages.0.role"),
    (chat_body(messages=[{"role": "user"}]), 400, "messages.0.content"),
    (chat_body(messages=[{"role": "user", "content": None}]), 400, "messages.0.content"),
    (chat_body(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content"),
    (chat_body(messages=[*USER, {"role": "user", "content": {"a": 1}}]), 400, "messages.1.content"),
    (
        chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
        "messages.0.content",
    ),
    (
        chat_body(messages=[{"role": "user", "content": [{"type": "text"}]}]),
        400,
        "messages.0.content",
    ),
    (
        chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}]),
        400,
        "messages.0.content",
    ),
    (chat_body(messages=[{"role": "user", "content": "hi", "name": 5}]), 400, "messages.0.name"),
    (chat_body(messages=[{"role": "user", "content": "hi", "extra": 5}]), 400, "messages.0.extra"),
    (
        chat_body(messages=[{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]),
        400,
        "messages.0.tool_calls",
    ),
    (chat_body(max_tokens=0), 400, "max_tokens"),
    (chat_body(temperature=3), 400, "temperature"),
    (chat_body(n=3), 400, "n"),
    (chat_body(stop=["a", 2]), 400, "stop"),
    (chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    (chat_body(tool_choice="required"), 400, "tool_choice"),
    (chat_body(response_format={"type": "json_object"}), 400, "response_format"),
    (chat_body(logprobs=True), 400, "logprobs"),
    (chat_body(prompt_truncate_len=100), 400, "prompt_truncate_len"),
    (chat_body(frequency_penalty=1), 400, "frequency_penalty"),
    (chat_body(prompt="hi"), 400, "prompt"),  # a completions field: unknown to chat
    (chat_body(bogus_field=1), 400, "bogus_field"),
]


@pytest.mark.parametrize(("body", "status", "param"), COMPLETION_CASES)
def test_completion_field_is_checked(
    client: TestClient, body: dict[str, Any], status: int, param: str
) -> None:
    response = client.post(COMPLETIONS, json=body)
    assert response.status_code == status, response.text
    error = assert_error_shape(response.json())
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "status", "param"), CHAT_CASES)
def test_chat_field_is_checked(
    client: TestClient, body: dict[str, Any], status: int, param: str
) -> None:
    response = client.post(CHAT, json=body)
    assert response.status_code == status, response.text
    error = assert_error_shape(response.json())
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": ',
        b"not json",
        b"[1, 2]",
        b'"text"',
        b"\xff\xfe{",
        b"[" * 100_000,
        b"",
        b'{"model": "test-model", "prompt": "\\ud800", "messages": [{"role": "user", '
        b'"content": "\\udc00"}]}',
    ],
)
def test_malformed_body_is_400(client: TestClient, path: str, raw: bytes) -> None:
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = assert_error_shape(response.json())
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None


def test_non_finite_number_is_400(client: TestClient) -> None:
    raw = b'{"model": "test-model", "prompt": "hi", "temperature": NaN}'
    response = client.post(COMPLETIONS, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert assert_error_shape(response.json())["param"] == "temperature"


def test_unsupported_field_error_says_not_supported(client: TestClient) -> None:
    response = client.post(COMPLETIONS, json=completion_body(frequency_penalty=0.5))
    error = assert_error_shape(response.json())
    assert "not supported yet" in error["message"]
    assert error["code"] == "unsupported_parameter"


def test_batched_prompt_error_says_not_supported(client: TestClient) -> None:
    response = client.post(COMPLETIONS, json=completion_body(prompt=["a", "b"]))
    assert "batched prompts are not supported yet" in response.json()["error"]["message"]
