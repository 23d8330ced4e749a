"""What clients rely on beyond the generation itself: request ids, the developer role, model
retrieval, and usage reported once in a stream (LangChain adds up every usage it sees)."""

import time
import uuid

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI

QUESTION = [{"role": "user", "content": "What is 2+2?"}]


def test_a_client_request_id_is_echoed_and_names_the_request_everywhere(stack, client, model):
    request_id = f"trace-{uuid.uuid4().hex[:12]}"
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=QUESTION,
        max_tokens=2,
        extra_headers={"X-Request-Id": request_id},
    )
    assert raw.headers["x-request-id"] == request_id
    assert raw.parse().id == f"chatcmpl-{request_id}"
    # The frontend logs the request as it answers; the line reaches the stack's output through
    # the launcher's pipe a moment later.
    deadline = time.monotonic() + 10
    while not any(request_id in line for line in stack.output):
        assert time.monotonic() < deadline, "no log line names the request"
        time.sleep(0.05)


def test_every_response_has_a_request_id(stack, client, model):
    raw = client.completions.with_raw_response.create(model=model, prompt="Hi", max_tokens=1)
    request_id = raw.headers["x-request-id"]
    assert raw.parse().id == f"cmpl-{request_id}"
    assert raw.request_id == request_id  # what the openai SDK exposes
    second = client.completions.with_raw_response.create(model=model, prompt="Hi", max_tokens=1)
    assert second.headers["x-request-id"] != request_id
    for path in ("/v1/models", "/v1/nothing-here"):
        assert httpx.get(stack.http_url + path).headers["x-request-id"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="Hi", max_tokens=-1)
    assert err.value.request_id


def test_developer_messages_are_system_messages(client, model):
    def rendered(role: str) -> tuple[list[int], str]:
        messages = [{"role": role, "content": "Answer in French."}, *QUESTION]
        body = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=8,
            temperature=0,
            extra_body={"raw_output": True},
        ).model_dump()["choices"][0]
        return body["raw_output"]["prompt_token_ids"], body["message"]["content"]

    assert rendered("developer") == rendered("system")


def test_models_retrieve(client, model):
    listed = client.models.list().data[0]
    assert client.models.retrieve(model) == listed
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found"


def test_streamed_usage_counts_once_in_langchain(stack, model):
    chat = ChatOpenAI(
        model=model,
        base_url=f"{stack.http_url}/v1",
        api_key="unused",
        max_tokens=6,
        temperature=0,
        stream_usage=True,
    )
    whole = chat.invoke("What is 2+2?").usage_metadata
    streamed = None
    for chunk in chat.stream("What is 2+2?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None
    assert streamed.usage_metadata == whole
    assert whole["output_tokens"] == 6
