"""n choices per prompt, several prompts per request, and chat prompt truncation, against the
fake stages."""

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.sse import sse_events
from tests.test_frontend_fake_stages import (
    BOS,
    MODEL_ID,
    FakeStages,
)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


@pytest.fixture(autouse=True)
def fresh_records(fakes: FakeStages) -> Iterator[None]:
    fakes.prefill.requests.clear()
    fakes.prefill.started.clear()
    fakes.prefill.finished.clear()
    fakes.decode.requests.clear()
    fakes.tokenizer.renders.clear()
    yield
    fakes.decode.token_delay_s = 0.0


def test_n_choices(fake_client: TestClient, fakes: FakeStages) -> None:
    body = {"model": MODEL_ID, "prompt": "hi", "n": 3, "max_tokens": 2, "seed": 7}
    result = fake_client.post(COMPLETIONS, json=body).json()
    assert [(c["index"], c["text"]) for c in result["choices"]] == [(0, "ab"), (1, "ab"), (2, "ab")]
    # Prompt tokens count once; completion tokens over all choices.
    assert result["usage"]["prompt_tokens"] == 3
    assert result["usage"]["completion_tokens"] == 6
    assert result["usage"]["prompt_tokens_details"]["cached_tokens"] == 2
    by_id = {r.request_id: r for r in fakes.prefill.requests}
    rid = result["id"]
    assert set(by_id) == {rid, f"{rid}-1", f"{rid}-2"}
    assert [by_id[i].sampling.seed for i in (rid, f"{rid}-1", f"{rid}-2")] == [7, 8, 9]
    assert sorted(r.sampling.seed for r in fakes.decode.requests) == [7, 8, 9]


def test_first_choice_prefills_alone(fake_client: TestClient, fakes: FakeStages) -> None:
    fakes.prefill.delay_s = 0.05
    try:
        body = {"model": MODEL_ID, "prompt": "hi", "n": 3, "max_tokens": 1}
        rid = fake_client.post(COMPLETIONS, json=body).json()["id"]
    finally:
        fakes.prefill.delay_s = 0.0
    started, finished = fakes.prefill.started, fakes.prefill.finished
    first, others = rid, (f"{rid}-1", f"{rid}-2")
    # The others start once the first is done, so that they hit the prefix cache...
    assert all(started[other] >= finished[first] for other in others)
    # ...and they run together.
    assert started[others[1]] < finished[others[0]] and started[others[0]] < finished[others[1]]


def test_n_choices_stream(fake_client: TestClient, fakes: FakeStages) -> None:
    fakes.decode.token_delay_s = 0.002
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "hi"}],
        "n": 3,
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
        "perf_metrics_in_response": True,
    }
    events = sse_events(fake_client.post(CHAT, json=body).text)
    *chunks, usage_only = events
    assert usage_only["choices"] == [] and usage_only["usage"]["completion_tokens"] == 12
    assert all(len(e["choices"]) == 1 for e in chunks)
    texts: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    for event in chunks:
        choice = event["choices"][0]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finishes.setdefault(choice["index"], []).append(choice["finish_reason"])
    assert texts == {0: "abcd", 1: "abcd", 2: "abcd"}
    assert finishes == {0: ["length"], 1: ["length"], 2: ["length"]}
    # Only the last finish chunk carries the metrics; with include_usage, the totals go only
    # on the usage chunk.
    finals = [e for e in chunks if e["choices"][0]["finish_reason"]]
    assert [("usage" in e, "perf_metrics" in e) for e in finals] == [(False, False)] * 2 + [
        (False, True)
    ]


def test_several_prompts(fake_client: TestClient, fakes: FakeStages) -> None:
    body = {"model": MODEL_ID, "prompt": ["hi", "hey"], "n": 2, "max_tokens": 2, "echo": True}
    result = fake_client.post(COMPLETIONS, json=body).json()
    # Prompt i, choice j -> index i * n + j.
    assert [(c["index"], c["text"]) for c in result["choices"]] == [
        (0, "hiab"),
        (1, "hiab"),
        (2, "heyab"),
        (3, "heyab"),
    ]
    assert result["usage"]["prompt_tokens"] == 3 + 4
    assert result["usage"]["completion_tokens"] == 8
    assert sorted(len(r.token_ids) for r in fakes.prefill.requests) == [3, 3, 4, 4]


def test_token_id_prompts(fake_client: TestClient, fakes: FakeStages) -> None:
    body = {"model": MODEL_ID, "prompt": [[5, 6], [7]], "max_tokens": 1, "return_token_ids": True}
    choices = fake_client.post(COMPLETIONS, json=body).json()["choices"]
    assert [c["prompt_token_ids"] for c in choices] == [[5, 6], [7]]
    assert [c["index"] for c in choices] == [0, 1]


def test_several_prompts_stream(fake_client: TestClient) -> None:
    body = {"model": MODEL_ID, "prompt": ["a", "b"], "max_tokens": 2, "stream": True}
    events = sse_events(fake_client.post(COMPLETIONS, json=body).text)
    texts: dict[int, str] = {}
    for event in events:
        choice = event["choices"][0]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "ab", 1: "ab"}
    assert events[-1]["usage"]["prompt_tokens"] == 4


def _chat(fake_client: TestClient, messages: list[dict[str, str]], **fields: Any) -> dict[str, Any]:
    body = {"model": MODEL_ID, "messages": messages, "max_tokens": 1, **fields}
    response = fake_client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_prompt_truncate_len_evicts_earliest_turns(
    fake_client: TestClient, fakes: FakeStages
) -> None:
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "1"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "3"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "5"},
    ]
    # BOS + "system:s\n" (9) + "assistant:4\n" (12) + "user:5\n" (7) = 29 tokens.
    result = _chat(fake_client, messages, prompt_truncate_len=29)
    assert result["usage"]["prompt_tokens"] == 29
    kept = fakes.prefill.requests[-1].token_ids
    assert bytes(kept[1:]).decode() == "system:s\nassistant:4\nuser:5\n"
    fakes.tokenizer.renders.clear()
    # The default (1500) fits the whole chat: rendered once.
    whole = _chat(fake_client, messages)
    assert len(fakes.tokenizer.renders) == 1
    assert whole["usage"]["prompt_tokens"] == 1 + 9 + 7 + 12 + 7 + 12 + 7


def test_prompt_truncate_len_keeps_last_turn(fake_client: TestClient, fakes: FakeStages) -> None:
    messages = [{"role": "user", "content": "x" * 20}, {"role": "user", "content": "y" * 30}]
    # Even the last turn alone is longer: it is kept, and the context check decides.
    result = _chat(fake_client, messages, prompt_truncate_len=5)
    assert result["usage"]["prompt_tokens"] == 1 + len("user:\n") + 30
    tool_chat = [
        {"role": "user", "content": "q"},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]
    _chat(fake_client, tool_chat)
    assert [m.role for m in fakes.tokenizer.renders[-1].messages] == ["user", "tool"]


def test_logit_bias_outside_vocabulary(fake_client: TestClient, fakes: FakeStages) -> None:
    body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 1, "logit_bias": {"256": 1}}
    response = fake_client.post(COMPLETIONS, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "logit_bias"
    assert not fakes.prefill.requests
    body["logit_bias"] = {"255": -100, "3": 2.5}
    assert fake_client.post(COMPLETIONS, json=body).status_code == 200
    assert dict(fakes.prefill.requests[-1].sampling.logit_bias) == {255: -100.0, 3: 2.5}


def test_prompt_ids_start_with_bos(fake_client: TestClient, fakes: FakeStages) -> None:
    _chat(fake_client, [{"role": "user", "content": "hi"}])
    assert fakes.prefill.requests[-1].token_ids[0] == BOS


def test_failed_decode_releases_every_choice(fake_client: TestClient, fakes: FakeStages) -> None:
    fakes.decode.mode = "unavailable"
    fakes.prefill.released.clear()
    try:
        body = {"model": MODEL_ID, "prompt": ["a", "b"], "n": 3, "max_tokens": 2}
        response = fake_client.post(COMPLETIONS, json=body)
    finally:
        fakes.decode.mode = "normal"
    assert response.status_code == 503
    handles = {f"kv-{r.request_id}" for r in fakes.prefill.requests}
    assert len(handles) == 6
    assert _eventually(lambda: set(fakes.prefill.released) == handles)


def test_lost_kv_fails_its_request_and_leaves_decode_up(
    fake_client: TestClient, fakes: FakeStages
) -> None:
    fake_client.get("/health")  # checks again the instances an earlier test took down
    fakes.decode.mode = "kv_lost"
    try:
        body = {"model": MODEL_ID, "prompt": "a", "max_tokens": 4, "stream": True}
        events = sse_events(fake_client.post(COMPLETIONS, json=body).text)
    finally:
        fakes.decode.mode = "normal"
    assert events[-1]["error"]["code"] == "request_aborted"
    assert "retry" in events[-1]["error"]["message"]
    health = fake_client.get("/health").json()
    assert set(health["instances"]["decode"].values()) == {"SERVING"}
    body = {"model": MODEL_ID, "prompt": "a", "max_tokens": 2}
    assert fake_client.post(COMPLETIONS, json=body).status_code == 200


def _eventually(check: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return bool(check())
