"""Every invalid value of every field, sent to a serving frontend alongside valid streams: each
gets a 400 (or 404) naming its field, and the valid requests around them finish untouched."""

import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi.testclient import TestClient

from tests.sse import sse_events
from tests.test_frontend_fake_stages import (
    ALPHABET,
    MODEL_ID,
    FakeStages,
)
from tests.test_frontend_validation import CHAT, CHAT_CASES, COMPLETION_CASES, COMPLETIONS, MODEL

NUM_VALID = 12
VALID_MAX_TOKENS = 20
VALID_N = 2


def _served(body: dict[str, Any]) -> dict[str, Any]:
    """A table body, naming the fakes' model where the table names the valid one."""
    body = copy.deepcopy(body)
    if body.get("model") == MODEL:
        body["model"] = MODEL_ID
    return body


def _valid(index: int) -> tuple[str, dict[str, Any]]:
    fields = {
        "model": MODEL_ID,
        "max_tokens": VALID_MAX_TOKENS,
        "n": VALID_N,
        "stream": True,
        "logprobs": True,
        "seed": index,
    }
    if index % 2:
        return CHAT, {**fields, "messages": [{"role": "user", "content": f"hi {index}"}]}
    return COMPLETIONS, {**fields, "prompt": f"hi {index}"}


def _stream_texts(fake_client: TestClient, path: str, body: dict[str, Any]) -> dict[int, str]:
    response = fake_client.post(path, json=body)
    assert response.status_code == 200, response.text
    texts: dict[int, str] = {}
    for event in sse_events(response.text):
        assert "error" not in event, event
        for choice in event["choices"]:
            piece = choice.get("text") or choice.get("delta", {}).get("content") or ""
            texts[choice["index"]] = texts.get(choice["index"], "") + piece
    return texts


def _check_invalid(fake_client: TestClient, path: str, case: tuple[Any, int, str]) -> str | None:
    """None when the case was refused as expected, else what went wrong."""
    body, status, param = case
    response = fake_client.post(path, json=_served(body))
    error = response.json().get("error", {})
    if response.status_code != status or error.get("param") != param:
        return f"{path} {body}: {response.status_code} {error}"
    return None


def test_invalid_fields_are_refused_without_disturbing_valid_requests(
    fake_client: TestClient, fakes: FakeStages
) -> None:
    fakes.decode.token_delay_s = 0.002
    fakes.prefill.requests.clear()
    invalid = [(COMPLETIONS, c) for c in COMPLETION_CASES] + [(CHAT, c) for c in CHAT_CASES]
    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            valid = [pool.submit(_stream_texts, fake_client, *_valid(i)) for i in range(NUM_VALID)]
            refused = [
                pool.submit(_check_invalid, fake_client, path, case) for path, case in invalid
            ]
            failures = [f.result() for f in refused if f.result() is not None]
            texts = [f.result() for f in valid]
    finally:
        fakes.decode.token_delay_s = 0.0
    assert not failures, "\n".join(failures)  # type: ignore[arg-type]
    expected = ("a" + ALPHABET[1:] * 2)[:VALID_MAX_TOKENS]
    assert texts == [dict.fromkeys(range(VALID_N), expected)] * NUM_VALID
    # The refused requests never reached a stage that does work.
    assert len(fakes.prefill.requests) == NUM_VALID * VALID_N
