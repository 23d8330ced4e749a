"""Valid requests, health and discovery with every stage down: 503s in the error shape."""

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from frontend.app import create_app
from tests.test_frontend_fake_stages import dead_stages_config
from tests.test_frontend_validation import (
    CHAT,
    COMPLETIONS,
    MODEL,
    assert_error_shape,
    chat_body,
    completion_body,
)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(dead_stages_config(MODEL))) as test_client:
        yield test_client


# Valid requests, every field included. With the stages down they get as far as the first
# stage call, which answers 503.
VALID_COMPLETIONS = [
    completion_body(),
    completion_body(model="accounts/fireworks/models/test-model"),
    completion_body(prompt=["hi"]),
    completion_body(prompt=["hi", "there", ""]),
    completion_body(prompt=[1, 2, 3]),
    completion_body(prompt=[[1, 2, 3]]),
    completion_body(prompt=[[1, 2, 3], [4]]),
    completion_body(prompt=""),
    completion_body(stream=True, stream_options={"include_usage": True}),
    completion_body(
        logprobs=None,
        echo=False,
        frequency_penalty=0,
        presence_penalty=0.0,
        repetition_penalty=1,
        logit_bias={},
        response_format={"type": "text"},
        best_of=1,
        n=1,
        top_k=0,
        seed=0,
        stop="\n",
        max_completion_tokens=5,
        context_length_exceeded_behavior="error",
        perf_metrics_in_response=True,
        ignore_eos=True,
        user="u",
    ),
    completion_body(
        max_tokens=5,
        temperature=2,
        top_p=0,
        top_k=100,
        min_p=1,
        typical_p=0.5,
        frequency_penalty=-2,
        presence_penalty=2,
        repetition_penalty=1.2,
        mirostat_target=5.0,
        mirostat_lr=0.1,
        seed=2**64 - 1,
        logit_bias={"5": -100, "6": 100, "7": 0.5},
        n=128,
        stop=["a", "b", "c", "d"],
        echo=True,
        echo_last=3,
        logprobs=5,
        top_logprobs=0,
        raw_output=True,
        return_token_ids=True,
        context_length_exceeded_behavior="truncate",
        stream=False,
        prompt_cache_max_len=0,
        prompt_cache_isolation_key="k",
        metadata={"trace": {"a": [1]}},
        reasoning_effort="high",
        images=[],
    ),
    completion_body(logprobs=True, top_logprobs=5, reasoning_effort=100, images=None),
    completion_body(logprobs=0, echo=False, echo_last=0, reasoning_effort="none"),
]
VALID_CHATS = [
    chat_body(),
    chat_body(stream=True),
    chat_body(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "bob"},
            {"role": "assistant", "content": None, "tool_calls": []},
            {"role": "user", "content": "again"},
        ],
        logprobs=False,
        tools=[],
        tool_choice="auto",
        parallel_tool_calls=True,
        stop=["a", "b", "c", "d"],
        temperature=0,
        top_p=1,
    ),
    chat_body(
        messages=[
            {"role": "user", "content": "what is 6 * 7?"},
            {"role": "assistant", "content": "let me check"},
            {"role": "tool", "content": "42", "tool_call_id": "call_1", "name": "calc"},
        ],
        logprobs=True,
        top_logprobs=3,
        n=4,
        echo=True,
        prompt_truncate_len=10,
        max_completion_tokens=7,
        raw_output=True,
        return_token_ids=True,
        logit_bias={"3": 1},
        metadata={},
        reasoning_effort="low",
    ),
]


@pytest.mark.parametrize(
    ("path", "body"),
    [(COMPLETIONS, b) for b in VALID_COMPLETIONS] + [(CHAT, b) for b in VALID_CHATS],
)
def test_valid_request_with_stages_down_is_503(
    client: TestClient, path: str, body: dict[str, Any]
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 503, response.text
    error = assert_error_shape(response.json())
    assert error["type"] == "server_error"
    assert "tokenizer" in error["message"]


def test_inference_prefix_is_served(client: TestClient) -> None:
    assert client.post("/inference" + COMPLETIONS, json=completion_body()).status_code == 503
    assert client.post("/inference" + CHAT, json=completion_body(prompt=None)).status_code == 400


def test_health_is_503_naming_the_stages_down(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert set(body["stages"]) == {"tokenizer", "prefill", "decode"}
    assert all(status != "SERVING" for status in body["stages"].values())
    error = assert_error_shape({"error": body["error"]})
    assert "tokenizer" in error["message"] and "decode" in error["message"]


def test_models_lists_the_served_model(client: TestClient) -> None:
    for path in ("/v1/models", "/inference/v1/models"):
        body = client.get(path).json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == [MODEL]
        assert body["data"][0]["object"] == "model"


def test_unknown_route_uses_the_error_shape(client: TestClient) -> None:
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert_error_shape(response.json())
    response = client.get(COMPLETIONS)
    assert response.status_code == 405
    assert_error_shape(response.json())
