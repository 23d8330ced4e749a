"""The launcher at 1 prefill + 2 decode: killing a decode instance, then prefill, under load.

Its in-flight streams end with an error that says what happened, the other instance's
streams finish, new requests go to the survivor, and the launcher's restart of the killed
instance rejoins the rotation."""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import Stack, start_stack

MAX_TOKENS = 160
NUM_STREAMS = 6


@pytest.fixture(scope="module")
def stack() -> Stack:
    stack = start_stack(
        "--decode",
        "2",
        "--engine-args",
        "--kv-cache-tokens 8192",
        "--frontend-args",
        "--health-interval-s 0.5",
    )
    yield stack
    stack.stop()


def served_model(stack: Stack) -> str:
    return httpx.get(f"{stack.http_url}/v1/models", timeout=30).json()["data"][0]["id"]


def backend_host(stack: Stack, index: int) -> str:
    response = httpx.post(
        f"{stack.http_url}/v1/completions",
        json={"model": served_model(stack), "prompt": f"Request {index}:", "max_tokens": 2},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.headers["fireworks-backend-host"]


def stream_to_end(client: openai.OpenAI, model: str, started: list[int], index: int) -> str:
    """Streams one long completion; returns its finish reason or the error's message."""
    try:
        stream = client.completions.create(
            model=model,
            prompt=f"Story {index}: once upon a time",
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        finish = None
        for chunk in stream:
            started[index] += 1
            finish = chunk.choices[0].finish_reason or finish
        return str(finish)
    except openai.APIError as exc:
        return f"error: {exc.message}"


def test_killing_a_decode_instance_mid_load(stack: Stack) -> None:
    killed, survivor = stack.addresses["decode-2"], stack.addresses["decode-1"]
    client = openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)
    started = [0] * NUM_STREAMS
    with ThreadPoolExecutor(NUM_STREAMS) as pool:
        model = served_model(stack)
        streams = [
            pool.submit(stream_to_end, client, model, started, i) for i in range(NUM_STREAMS)
        ]
        deadline = time.monotonic() + 120
        while min(started) < 3:  # every stream is generating, spread over both instances
            ended = [s.result() for s in streams if s.done()]
            assert not ended and time.monotonic() < deadline, (started, ended)
            time.sleep(0.05)
        os.kill(stack.pids["decode-2"], signal.SIGKILL)
        # Requests arriving meanwhile go to the survivor.
        assert {backend_host(stack, i) for i in range(4)} == {survivor}
        outcomes = [stream.result(timeout=300) for stream in streams]
    failed = [o for o in outcomes if o.startswith("error")]
    assert 0 < len(failed) < NUM_STREAMS, outcomes
    assert all(o == "length" for o in outcomes if o not in failed), outcomes
    for message in failed:
        assert f"decode instance {killed} stopped while generating" in message, message

    # The launcher restarts it on its address; the frontend takes it back once healthy.
    deadline = time.monotonic() + 180
    while not any(line.startswith("restarting decode-2") for line in stack.output):
        assert time.monotonic() < deadline, "".join(stack.output[-20:])
        time.sleep(0.2)
    hosts: set[str] = set()
    while killed not in hosts:
        assert time.monotonic() < deadline, hosts
        with ThreadPoolExecutor(2) as pool:
            hosts |= set(pool.map(lambda i: backend_host(stack, i), range(2)))
        time.sleep(0.5)
    health = httpx.get(f"{stack.http_url}/health", timeout=30).json()
    assert health["instances"]["decode"] == {killed: "SERVING", survivor: "SERVING"}


def long_completion(client: openai.OpenAI, model: str, index: int) -> str:
    """A prompt long enough to be still in prefill; returns the finish reason or the error."""
    try:
        response = client.completions.create(
            model=model,
            prompt=f"Notes {index}: " + " ".join(f"item {i} is {i * index}." for i in range(400)),
            max_tokens=8,
            temperature=0,
        )
        return str(response.choices[0].finish_reason)
    except openai.APIError as exc:
        return f"error: {exc.message}"


def test_killing_prefill_mid_load(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)
    model = served_model(stack)
    with ThreadPoolExecutor(NUM_STREAMS) as pool:
        requests = [pool.submit(long_completion, client, model, i) for i in range(NUM_STREAMS)]
        time.sleep(1.0)  # queued and computing in prefill
        os.kill(stack.pids["prefill"], signal.SIGKILL)
        outcomes = [request.result(timeout=300) for request in requests]  # none hangs
    failed = [o for o in outcomes if o.startswith("error")]
    assert failed, outcomes
    for message in failed:
        # Lost while prefilling (no instance left), or its KV lost before decode took it.
        assert "prefill stage is unavailable" in message or "was lost" in message, message

    # The launcher restarts it; once healthy, requests are served again. (The prompt is too
    # long for decode to compute itself: a short one would not need prefill.)
    deadline = time.monotonic() + 180
    while True:
        response = httpx.post(
            f"{stack.http_url}/v1/completions",
            json={"model": model, "prompt": "Back again: " + "and again " * 200, "max_tokens": 2},
            timeout=120,
        )
        if response.status_code == 200:
            break
        assert response.status_code == 503 and time.monotonic() < deadline, response.text
        time.sleep(0.5)
    assert any(line.startswith("restarting prefill") for line in stack.output)
