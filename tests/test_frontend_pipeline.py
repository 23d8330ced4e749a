"""The frontend against fake stages over real gRPC: response shapes, SSE, limits, metrics."""

import socket
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from frontend.app import create_app
from frontend.config import FrontendConfig
from services.request_params import SamplingParams
from tests.sse import sse_events
from tests.test_frontend_fake_stages import (
    BOS,
    MAX_MODEL_LEN,
    MODEL_ID,
    FakeStages,
    fake_config,
    start_fake_stages,
)

USER = [{"role": "user", "content": "hi"}]
STAGE_HEADERS = {
    "fireworks-tokenizer-queue-duration": "0.000001",
    "fireworks-tokenizer-duration": "0.000002",
    "fireworks-prefill-queue-duration": "0.000003",
    "fireworks-prefill-duration": "0.000004",
    "fireworks-generation-queue-duration": "0.000005",
    "fireworks-kv-transfer-duration": "0.000006",
    "fireworks-cached-prompt-tokens": "2",
}


@pytest.fixture(autouse=True)
def normal_decode(fakes: FakeStages) -> None:
    fakes.decode.mode = "normal"


def _eventually(check: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


def test_completion(fake_client: TestClient, fakes: FakeStages) -> None:
    body = {"model": MODEL_ID, "prompt": "hello", "max_tokens": 5}
    response = fake_client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["id"].startswith("cmpl-")
    assert result["object"] == "text_completion"
    assert result["model"] == MODEL_ID
    assert result["choices"] == [
        {"index": 0, "text": "abcde", "logprobs": None, "finish_reason": "length"}
    ]
    assert result["usage"] == {
        "prompt_tokens": 6,
        "completion_tokens": 5,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    assert "perf_metrics" not in result
    for name, value in STAGE_HEADERS.items():
        assert response.headers[name] == value
    assert response.headers["fireworks-prompt-tokens"] == "6"
    # The decode instance that served it, as the frontend addresses it.
    assert response.headers["fireworks-backend-host"] == fakes.addresses["decode"]
    for name in ("server-time-to-first-token", "server-processing-time"):
        assert float(response.headers[f"fireworks-{name}"]) > 0
    assert fakes.prefill.requests[-1].token_ids == [BOS, *map(ord, "hello")]
    assert fakes.decode.requests[-1].kv_handle.handle_id == f"kv-{result['id']}"


def test_completion_passes_sampling_and_stop(fake_client: TestClient, fakes: FakeStages) -> None:
    body = {
        "model": "accounts/fireworks/models/" + MODEL_ID,
        "prompt": [5, 6, 7],
        "temperature": 0.5,
        "top_p": 0.25,
        "top_k": 7,
        "seed": 42,
        "stop": ["d"],
        "ignore_eos": True,
        "perf_metrics_in_response": True,
    }
    response = fake_client.post("/v1/completions", json=body)
    result = response.json()
    assert result["choices"][0]["text"] == "abc"
    assert result["choices"][0]["finish_reason"] == "stop"
    sampling = fakes.prefill.requests[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (
        0.5,
        0.25,
        7,
        42,
    )
    assert fakes.decode.requests[-1].sampling == sampling
    stopping = fakes.decode.requests[-1].stopping
    assert (list(stopping.stop), stopping.ignore_eos, stopping.max_tokens) == (["d"], True, 16)
    assert fakes.prefill.requests[-1].token_ids == [5, 6, 7]
    perf = result["perf_metrics"]
    assert {f"fireworks-{k}": v for k, v in perf.items()} == {
        k: v
        for k, v in response.headers.items()
        if k.startswith("fireworks-") and k != "fireworks-sampling-options"
    }


def test_defaults_when_unset(fake_client: TestClient, fakes: FakeStages) -> None:
    fake_client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "x"})
    sampling = SamplingParams.from_pb(fakes.prefill.requests[-1].sampling)
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (1.0, 1.0, 0)
    assert fakes.decode.requests[-1].stopping.max_tokens == 16


def test_completion_stream(fake_client: TestClient) -> None:
    body = {
        "model": MODEL_ID,
        "prompt": "hello",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
        "perf_metrics_in_response": True,
    }
    response = fake_client.post("/v1/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    *deltas, final, usage_only = events
    assert {e["id"] for e in events} == {events[0]["id"]}
    assert all(e["object"] == "text_completion" for e in events)
    assert "".join(e["choices"][0]["text"] for e in deltas) == "abc"
    assert all(e["choices"][0]["finish_reason"] is None for e in deltas)
    assert final["choices"][0]["finish_reason"] == "length"
    usage = {
        "prompt_tokens": 6,
        "completion_tokens": 3,
        "total_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    assert "usage" not in final  # only on the usage chunk, as OpenAI sends it
    assert final["perf_metrics"]["prompt-tokens"] == "6"
    assert "server-processing-time" in final["perf_metrics"]
    assert usage_only["choices"] == [] and usage_only["usage"] == usage
    # Without include_usage, the finish chunk carries it (the Fireworks extension).
    del body["stream_options"]
    *_, final = sse_events(fake_client.post("/v1/completions", json=body).text)
    assert final["choices"][0]["finish_reason"] == "length" and final["usage"] == usage


def test_chat(fake_client: TestClient, fakes: FakeStages) -> None:
    response = fake_client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": USER})
    result = response.json()
    assert result["id"].startswith("chatcmpl-")
    assert result["object"] == "chat.completion"
    prompt_tokens = 1 + len("user:hi\n")
    room = MAX_MODEL_LEN - prompt_tokens
    # Default chat max_tokens: the rest of the window (below the 2048 cap here).
    assert fakes.decode.requests[-1].stopping.max_tokens == room
    choice = result["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"]) == room
    assert choice["finish_reason"] == "length"
    assert result["usage"]["prompt_tokens"] == prompt_tokens


def test_chat_stream(fake_client: TestClient) -> None:
    body = {"model": MODEL_ID, "messages": USER, "max_tokens": 2, "stream": True}
    events = sse_events(fake_client.post("/v1/chat/completions", json=body).text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"] for e in events[1:-1]] == [{"content": "a"}, {"content": "b"}]
    final = events[-1]
    assert final["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert final["usage"]["completion_tokens"] == 2
    assert "perf_metrics" not in final


def test_max_tokens_lowered_to_fit(fake_client: TestClient, fakes: FakeStages) -> None:
    body = {"model": MODEL_ID, "prompt": "hello", "max_tokens": 1000}
    assert fake_client.post("/v1/completions", json=body).status_code == 200
    assert fakes.decode.requests[-1].stopping.max_tokens == MAX_MODEL_LEN - 6


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x" * MAX_MODEL_LEN}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 99}]}, "messages"),
        (
            "/v1/completions",
            {"prompt": "hello", "max_tokens": 60, "context_length_exceeded_behavior": "error"},
            "max_tokens",
        ),
    ],
)
def test_context_length_exceeded(
    fake_client: TestClient, path: str, body: dict[str, Any], param: str
) -> None:
    response = fake_client.post(path, json={"model": MODEL_ID, **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, "context_length_exceeded")


def test_tokenizer_rejection_is_400(fake_client: TestClient) -> None:
    response = fake_client.post("/v1/completions", json={"model": MODEL_ID, "prompt": [1, 999]})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "token id out of range"
    assert response.json()["error"]["param"] == "prompt"


def test_decode_down_is_503_and_releases_the_kv(fake_client: TestClient, fakes: FakeStages) -> None:
    fakes.decode.mode = "unavailable"
    response = fake_client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "hi"})
    assert response.status_code == 503
    assert "decode" in response.json()["error"]["message"]
    handle_id = fakes.decode.requests[-1].kv_handle.handle_id
    assert _eventually(lambda: handle_id in fakes.prefill.released)


def test_health_and_models(fake_client: TestClient) -> None:
    response = fake_client.get("/health")
    assert response.status_code == 200
    assert response.json()["stages"] == dict.fromkeys(("tokenizer", "prefill", "decode"), "SERVING")
    models = fake_client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == [MODEL_ID]
    for model_id in (MODEL_ID, "accounts/fireworks/models/" + MODEL_ID):
        assert fake_client.get(f"/v1/models/{model_id}").json() == models[0]
    unknown = fake_client.get("/v1/models/other-model")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert (
        fake_client.post("/v1/completions", json={"model": "x", "prompt": "a"}).status_code == 404
    )


def test_frontend_started_before_the_stages(fakes: FakeStages) -> None:
    ports = {}
    for stage in ("tokenizer", "prefill", "decode"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports[stage] = sock.getsockname()[1]
    config = FrontendConfig(
        tokenizer_address=f"127.0.0.1:{ports['tokenizer']}",
        prefill_address=f"127.0.0.1:{ports['prefill']}",
        decode_address=f"127.0.0.1:{ports['decode']}",
    )
    with TestClient(create_app(config)) as early_client:
        # No served name configured: it comes from Info, which cannot be fetched yet.
        assert early_client.get("/v1/models").status_code == 503
        late = start_fake_stages(ports)
        try:
            assert _eventually(lambda: early_client.get("/v1/models").status_code == 200)
            assert early_client.get("/v1/models").json()["data"][0]["id"] == MODEL_ID
            body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2}
            assert _eventually(
                lambda: early_client.post("/v1/completions", json=body).status_code == 200
            )
        finally:
            late.stop()


@pytest.fixture
def local_client(fakes: FakeStages):
    """A frontend that has decode compute prompts of up to 8 uncached tokens."""
    with TestClient(create_app(fake_config(fakes, local_prefill_tokens=8))) as client:
        yield client


def test_decode_computes_a_short_prompt(local_client: TestClient, fakes: FakeStages) -> None:
    prefilled = len(fakes.prefill.requests)
    body = {"model": MODEL_ID, "prompt": "hello", "max_tokens": 5, "logprobs": 1}
    response = local_client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["choices"][0]["text"] == "abcde"
    assert result["choices"][0]["logprobs"]["tokens"][0] == "a"
    assert result["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}
    assert len(fakes.prefill.requests) == prefilled  # no prefill call
    sent = fakes.decode.requests[-1]
    assert sent.compute_prompt and not sent.HasField("kv_handle")
    assert list(sent.prompt_token_ids) == [BOS, *map(ord, "hello")]
    # The prefill spans are decode's; nothing was queued for a batch or moved.
    headers = response.headers
    assert headers["fireworks-prefill-queue-duration"] == "0.000007"
    assert headers["fireworks-prefill-duration"] == "0.000008"
    assert float(headers["fireworks-prefill-rpc-overhead-duration"]) > 0
    assert headers["fireworks-generation-queue-duration"] == "0.000000"
    assert headers["fireworks-kv-transfer-duration"] == "0.000000"


def test_decode_computes_a_long_prompt_once_it_holds_it(
    local_client: TestClient, fakes: FakeStages
) -> None:
    prompt = "nineteen characters"  # 20 tokens with BOS: a 16-token block, then 4
    body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 2}
    for _ in range(2):
        assert local_client.post("/v1/completions", json=body).status_code == 200
    first, second = fakes.decode.requests[-2:]
    assert not first.compute_prompt and first.kv_handle.handle_id  # prefill computed it
    assert second.compute_prompt  # decode holds all of it but the last block's tokens
    assert fakes.prefill.requests[-1].token_ids == first.prompt_token_ids


def test_a_prompt_that_ends_at_prefills_token_is_not_taken_for_cached_on_decode(
    local_client: TestClient, fakes: FakeStages
) -> None:
    # Decode pulls no KV for a request that ends at prefill's token (max_tokens 1, or an end
    # of turn), so its prefix cache never sees the prompt: prefill must compute it again.
    body = {"model": MODEL_ID, "prompt": "nineteen characters", "max_tokens": 1}
    for _ in range(2):
        assert local_client.post("/v1/completions", json=body).status_code == 200
    first, second = fakes.decode.requests[-2:]
    assert not first.compute_prompt and not second.compute_prompt
    assert second.kv_handle.handle_id


@pytest.mark.parametrize(
    "fields",
    [{"echo": True, "logprobs": 1}, {"echo": True, "max_tokens": 0}],
    ids=["prompt-logprobs", "scoring-only"],
)
def test_prompt_scoring_stays_on_prefill(
    local_client: TestClient, fakes: FakeStages, fields: dict
) -> None:
    prefilled = len(fakes.prefill.requests)
    body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2, **fields}
    assert local_client.post("/v1/completions", json=body).status_code == 200
    assert len(fakes.prefill.requests) == prefilled + 1
