"""What a choice shows besides its text: logprobs (completions and chat, with and without echo),
echo, raw_output and return_token_ids, whole and streamed, against the fake stages."""

import json
from typing import Any

from fastapi.testclient import TestClient

from tests.sse import sse_events
from tests.test_frontend_fake_stages import (
    BOS,
    BOS_TEXT,
    MODEL_ID,
    FakeStages,
    fake_logprob,
)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
HI_IDS = [BOS, ord("h"), ord("i")]


def post(fake_client: TestClient, path: str, **fields: Any) -> dict[str, Any]:
    body = {"model": MODEL_ID, "max_tokens": 3, **fields}
    if path == COMPLETIONS:
        body.setdefault("prompt", "hi")
    else:
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
    response = fake_client.post(path, json=body)
    assert response.status_code == 200, response.text
    if not fields.get("stream"):
        return response.json()
    return {"events": sse_events(response.text)}


def top(count: int, **sampled: float) -> dict[str, float]:
    """A legacy top_logprobs dict: the fake's alternatives "A", "B", ... and the sampled token."""
    return {chr(ord("A") + i): -0.125 * (i + 1) for i in range(count)} | sampled


def test_completion_logprobs_legacy_shape(fake_client: TestClient, fakes: FakeStages) -> None:
    choice = post(fake_client, COMPLETIONS, logprobs=2)["choices"][0]
    assert choice["text"] == "abc"
    assert choice["logprobs"] == {
        "tokens": ["a", "b", "c"],
        "token_logprobs": [fake_logprob(ord(c)) for c in "abc"],
        "top_logprobs": [top(2, **{c: fake_logprob(ord(c))}) for c in "abc"],
        "text_offset": [0, 1, 2],
        "token_ids": [ord(c) for c in "abc"],
    }
    sampling = fakes.prefill.requests[-1].sampling
    assert (sampling.logprobs, sampling.top_logprobs) == (True, 2)
    assert fakes.prefill.requests[-1].prompt_logprobs is False
    assert fakes.decode.requests[-1].first_token_logprob.token == "a"


def test_completion_logprobs_boolean_form_takes_top_logprobs(fake_client: TestClient) -> None:
    lps = post(fake_client, COMPLETIONS, logprobs=True, top_logprobs=1)["choices"][0]["logprobs"]
    assert lps["top_logprobs"][0] == top(1, a=fake_logprob(ord("a")))
    lps = post(fake_client, COMPLETIONS, logprobs=0)["choices"][0]["logprobs"]
    assert lps["top_logprobs"][0] == {"a": fake_logprob(ord("a"))}


def test_completion_echo_with_logprobs(fake_client: TestClient, fakes: FakeStages) -> None:
    choice = post(fake_client, COMPLETIONS, logprobs=1, echo=True)["choices"][0]
    assert choice["text"] == "hiabc"
    lps = choice["logprobs"]
    assert lps["tokens"] == [BOS_TEXT, "h", "i", "a", "b", "c"]
    # The first prompt token has no context, so no logprob.
    assert lps["token_logprobs"] == [None, *(fake_logprob(ord(c)) for c in "hiabc")]
    assert lps["top_logprobs"][0] is None
    assert lps["top_logprobs"][1] == top(1, h=fake_logprob(ord("h")))
    # Offsets index the returned text; BOS, absent from it, sits at 0.
    assert lps["text_offset"] == [0, 0, 1, 2, 3, 4]
    assert lps["token_ids"] == [*HI_IDS, *map(ord, "abc")]
    assert fakes.prefill.requests[-1].prompt_logprobs is True


def test_completion_echo_last_and_plain_echo(fake_client: TestClient) -> None:
    choice = post(fake_client, COMPLETIONS, logprobs=0, echo_last=1)["choices"][0]
    assert choice["text"] == "iabc"
    assert choice["logprobs"]["tokens"] == ["i", "a", "b", "c"]
    assert choice["logprobs"]["text_offset"] == [0, 1, 2, 3]
    assert post(fake_client, COMPLETIONS, echo=True)["choices"][0] == {
        "index": 0,
        "text": "hiabc",
        "logprobs": None,
        "finish_reason": "length",
    }
    # A token-id prompt is echoed as its text.
    echoed = post(fake_client, COMPLETIONS, prompt=[ord("o"), ord("k")], echo=True)["choices"][0]
    assert echoed["text"] == "okabc"


def test_chat_logprobs_shape(fake_client: TestClient) -> None:
    choice = post(fake_client, CHAT, logprobs=True, top_logprobs=2)["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "abc"}
    assert choice["logprobs"]["content"][0] == {
        "token": "a",
        "logprob": fake_logprob(ord("a")),
        "bytes": [ord("a")],
        "top_logprobs": [
            {"token": "A", "logprob": -0.125, "bytes": [ord("A")]},
            {"token": "B", "logprob": -0.25, "bytes": [ord("B")]},
        ],
    }
    assert [e["token"] for e in choice["logprobs"]["content"]] == ["a", "b", "c"]
    assert post(fake_client, CHAT)["choices"][0]["logprobs"] is None


def test_chat_echo_with_logprobs(fake_client: TestClient) -> None:
    choice = post(fake_client, CHAT, logprobs=True, echo=True)["choices"][0]
    rendered = "user:hi\n"
    assert choice["message"]["content"] == rendered + "abc"
    content = choice["logprobs"]["content"]
    assert [e["token"] for e in content] == [BOS_TEXT, *rendered, "a", "b", "c"]
    assert content[0]["logprob"] is None
    assert content[1]["logprob"] == fake_logprob(ord("u"))


def test_raw_output(fake_client: TestClient) -> None:
    choice = post(fake_client, COMPLETIONS, raw_output=True, logprobs=1)["choices"][0]
    raw = choice["raw_output"]
    assert raw["prompt_fragments"] == ["hi"]
    assert raw["prompt_token_ids"] == HI_IDS
    assert raw["completion"] == "abc"
    assert raw["completion_token_ids"] == [ord(c) for c in "abc"]
    assert raw["completion_logprobs"]["content"][1] == {
        "token": "b",
        "logprob": fake_logprob(ord("b")),
        "bytes": [ord("b")],
        "token_id": ord("b"),
        "text_offset": 1,
        "top_logprobs": [{"token": "A", "logprob": -0.125, "bytes": [65], "token_id": 65}],
    }
    chat = post(fake_client, CHAT, raw_output=True)["choices"][0]["raw_output"]
    assert chat["prompt_fragments"] == ["user:hi\n"]
    assert chat["completion_logprobs"] is None


def test_return_token_ids(fake_client: TestClient) -> None:
    for path in (COMPLETIONS, CHAT):
        choice = post(fake_client, path, return_token_ids=True)["choices"][0]
        assert choice["token_ids"] == [ord(c) for c in "abc"]
        assert choice["prompt_token_ids"][0] == BOS
    assert "token_ids" not in post(fake_client, COMPLETIONS)["choices"][0]


def test_stream_carries_logprobs_and_token_ids(fake_client: TestClient) -> None:
    fields = {"logprobs": 1, "echo": True, "return_token_ids": True, "raw_output": True}
    whole = post(fake_client, COMPLETIONS, **fields)["choices"][0]
    events = post(fake_client, COMPLETIONS, stream=True, **fields)["events"]
    choices = [e["choices"][0] for e in events]
    assert choices[0]["prompt_token_ids"] == HI_IDS
    assert "".join(c["text"] for c in choices) == whole["text"]
    with_lps = [c["logprobs"] for c in choices if c["logprobs"]]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset", "token_ids"):
        assert sum((lp[key] for lp in with_lps), []) == whole["logprobs"][key]
    assert sum((c.get("token_ids", []) for c in choices), []) == whole["token_ids"]
    assert choices[-1]["finish_reason"] == "length"
    assert choices[-1]["raw_output"] == whole["raw_output"]


def test_chat_stream_logprobs(fake_client: TestClient) -> None:
    events = post(fake_client, CHAT, stream=True, logprobs=True)["events"]
    choices = [e["choices"][0] for e in events]
    assert choices[0]["delta"] == {"role": "assistant", "content": ""}
    tokens = [e["token"] for c in choices if c["logprobs"] for e in c["logprobs"]["content"]]
    assert tokens == ["a", "b", "c"]


def test_accepted_fields_without_effect(fake_client: TestClient) -> None:
    fields = {"metadata": {"trace_id": "t-1"}, "reasoning_effort": "high", "user": "u-1"}
    result = post(fake_client, CHAT, **fields)
    assert "t-1" not in json.dumps(result) and "u-1" not in json.dumps(result)
    assert result["choices"][0]["message"]["content"] == "abc"
