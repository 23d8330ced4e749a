"""The checks of scripts/compose-check (which installs what they need and runs this file): the
stack from compose.yaml, built and used as a client would use it. One line per check, PASS or
FAIL; the exit status is the number of failed checks (capped at 100)."""

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "llmserve-check"
PORT = int(os.environ.get("HTTP_PORT", "18080"))
BASE = f"http://127.0.0.1:{PORT}"
COMPOSE = ["docker", "compose", "-f", str(ROOT / "compose.yaml"), "-p", PROJECT]
ENV = {**os.environ, "HTTP_PORT": str(PORT)}
# About 1,700 tokens: a hundred KV blocks for the prefix cache and for the transfer to decode.
LONG_PROMPT = " ".join(
    f"Note {i}: the stack keeps this prompt's blocks in its prefix cache." for i in range(100)
)

results: list[tuple[str, bool]] = []


def log(message: str) -> None:
    print(f"  {message}", flush=True)


def check(name: str, body: Callable[[], str]) -> bool:
    """Runs one check: PASS with what it found, or FAIL with why."""
    print(f"-- {name}", flush=True)
    start = time.monotonic()
    try:
        detail = body()
        ok = True
    except Exception as exc:  # noqa: BLE001 - any failure is this check's FAIL
        detail, ok = f"{type(exc).__name__}: {exc}", False
    took = time.monotonic() - start
    print(f"{'PASS' if ok else 'FAIL'} {name} ({took:.1f} s): {detail}", flush=True)
    results.append((name, ok))
    return ok


def run(args: list[str], timeout: float = 900, quiet: bool = False) -> str:
    if not quiet:
        log("$ " + " ".join(args))
    done = subprocess.run(
        args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"{args[:4]} exited {done.returncode}:\n" + "\n".join(tail))
    return done.stdout


def containers(service: str) -> list[str]:
    return run([*COMPOSE, "ps", "-a", "-q", service], quiet=True).split()


def inspect(container: str, template: str) -> str:
    return run(["docker", "inspect", "-f", template, container], quiet=True).strip()


def get(path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(BASE + path, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def health() -> dict:
    status, body = get("/health")
    return json.loads(body) if body.startswith("{") else {"status": status}


def wait_for(what: str, ready: Callable[[], bool], timeout: float = 180) -> float:
    start = time.monotonic()
    while not ready():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what} after {timeout:.0f} s")
        time.sleep(1)
    return time.monotonic() - start


def decode_serving(count: int) -> Callable[[], bool]:
    def ready() -> bool:
        body = health()
        instances = body.get("instances", {}).get("decode", {})
        serving = [i for i, s in instances.items() if s == "SERVING"]
        return body.get("status") == "ok" and len(serving) == count == len(instances)

    return ready


client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=300)
model = ""


# The checks, in order.


def build() -> str:
    mode = os.environ.get("BUILD", "offline")
    if mode == "skip":
        run(["docker", "image", "inspect", "llmserve:cpu"], quiet=True)
        return "BUILD=skip: the existing llmserve:cpu"
    start = time.monotonic()
    out = run(["scripts/build-image", *(["--offline"] if mode == "offline" else [])], 1800)
    size = int(inspect("llmserve:cpu", "{{.Size}}"))
    lines = out.strip().splitlines()
    return f"{mode}: {time.monotonic() - start:.0f} s, image {size / 1e6:.0f} MB ({lines[-1]})"


def up() -> str:
    global model
    run([*COMPOSE, "down", "--volumes", "--remove-orphans"], quiet=True)  # an earlier run's
    start = time.monotonic()
    run([*COMPOSE, "up", "-d", "--wait", "--wait-timeout", "600"], 900)
    took = time.monotonic() - start
    states = {
        service: inspect(containers(service)[0], "{{.State.Health.Status}}")
        for service in ("tokenizer", "prefill", "decode", "frontend")
    }
    assert set(states.values()) == {"healthy"}, states
    model = client.models.list().data[0].id
    return f"{took:.0f} s from `up` to all four healthy; model {model}"


def health_and_metrics() -> str:
    status, body = get("/health")
    assert status == 200, (status, body)
    stages = json.loads(body)["stages"]
    assert stages == dict.fromkeys(("tokenizer", "prefill", "decode"), "SERVING"), stages
    status, text = get("/metrics")
    assert status == 200, status
    up_lines = re.findall(r'^llmserve_stage_up\{stage="(\w+)"\} (\S+)$', text, re.M)
    assert up_lines and all(float(v) == 1 for _, v in up_lines), up_lines
    families = len(set(re.findall(r"^# TYPE (\S+)", text, re.M)))
    return f"/health 200 {stages}; /metrics 200, {families} metric families, every stage up"


def ask(question: str, **options) -> tuple[str, str]:
    """A chat reply's text and finish_reason."""
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], **options
    )
    return reply.choices[0].message.content or "", reply.choices[0].finish_reason


def chat() -> str:
    text, finish = ask("Name a colour.", max_tokens=16, temperature=0)
    assert text.strip(), text
    return f"{text!r} (finish_reason {finish})"


def streamed_completion() -> str:
    stream = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=12, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    finish = [f for f in finish if f]
    assert len(chunks) > 1 and text and finish, chunks
    return f"{len(chunks)} chunks, {text!r}, finish_reason {finish[-1]}"


def structured_output() -> str:
    """xgrammar in the image (the CPU image leaves out triton, which it needs on CUDA alone)."""
    text, finish = ask(
        "Give a JSON object with a name.", max_tokens=40, response_format={"type": "json_object"}
    )
    if finish == "stop":
        assert isinstance(json.loads(text), dict), text
    assert text.lstrip().startswith("{"), text
    return f"{text!r} (finish_reason {finish})"


def tx_bytes(container: str) -> int:
    """Bytes the container has sent on its network (read from the host, in its namespace)."""
    pid = inspect(container, "{{.State.Pid}}")
    for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "eth0":
            return int(counters.split()[8])
    raise RuntimeError("no eth0 in the prefill container")


def prefix_cache_and_kv_over_grpc() -> str:
    (prefill,) = containers("prefill")
    command = inspect(prefill, "{{json .Config.Cmd}}")
    assert "--no-shared-kv" in command, command
    sent = []
    usages = []
    transfer = []
    for _ in range(2):
        before = tx_bytes(prefill)
        raw = client.completions.with_raw_response.create(
            model=model, prompt=LONG_PROMPT, max_tokens=4, temperature=0
        )
        reply = raw.parse()
        sent.append(tx_bytes(prefill) - before)
        usages.append(reply.usage)
        transfer.append(float(raw.headers.get("fireworks-kv-transfer-duration", "0")))
    first, second = usages
    cached = second.prompt_tokens_details.cached_tokens
    assert cached and cached > 0, f"second request: usage {second}"
    # Decode pulls the first request's KV from prefill's container: over a million bytes for a
    # prompt this long (23 KB a token as float16), where the other replies are a few KB.
    assert sent[0] > 1000 * first.prompt_tokens, f"prefill sent only {sent[0]} bytes"
    return (
        f"{first.prompt_tokens} prompt tokens; cached_tokens {cached} on the second request; "
        f"prefill's container (--no-shared-kv) sent {sent[0] / 1e6:.1f} MB for the first "
        f"(decode's KV pull over gRPC, kv-transfer-duration {transfer[0] * 1000:.0f} ms) and "
        f"{sent[1] / 1e3:.0f} KB for the second (decode held the prefix already)"
    )


def stream_until_failure(stop_decode: Callable[[], None]) -> str:
    """Streams a long completion, stops decode after 10 tokens and returns the stream's error."""
    stream = client.completions.create(
        model=model,
        prompt="Once upon a time",
        max_tokens=3000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    tokens = 0
    try:
        for _chunk in stream:
            tokens += 1
            if tokens == 10:
                threading.Thread(target=stop_decode).start()
    except openai.APIError as error:
        message = str(error.message)
        assert "decode" in message, message
        return f"after {tokens} chunks: {type(error).__name__}: {message}"
    raise AssertionError(f"the stream ended without an error after {tokens} chunks")


def completion_ok() -> str:
    reply = client.completions.create(model=model, prompt="One, two,", max_tokens=8)
    assert reply.choices[0].text, reply
    return repr(reply.choices[0].text)


def docker_kill_mid_stream() -> str:
    (decode,) = containers("decode")
    restarts = inspect(decode, "{{.RestartCount}}")
    error = stream_until_failure(lambda: run(["docker", "kill", decode], quiet=True))
    log(f"the stream's error: {error}")
    time.sleep(3)
    state = inspect(decode, "{{.State.Status}}, restart count {{.RestartCount}}")
    # Docker counts `docker kill` as a manual stop: no restart policy applies to it.
    log(f"decode 3 s after `docker kill`: {state} (was {restarts})")
    log("(Docker applies no restart policy after `docker kill`: `up -d` starts it, as an operator")
    log("would; the next check crashes decode instead, which the restart policy does handle)")
    run([*COMPOSE, "up", "-d", "--wait", "decode"], 300)
    waited = wait_for("decode serving again", decode_serving(1))
    return f"{error}; `compose up -d` brought it back, serving after {waited:.0f} s more; " + (
        f"next request: {completion_ok()}"
    )


def decode_crash_mid_stream() -> str:
    (decode,) = containers("decode")
    restarts = int(inspect(decode, "{{.RestartCount}}"))
    pid = int(inspect(decode, "{{.State.Pid}}"))
    # A crash, as the OOM killer makes one: SIGKILL to the container's process from outside.
    error = stream_until_failure(lambda: os.kill(pid, 9))
    log(f"the stream's error: {error}")
    start = time.monotonic()
    wait_for("restart", lambda: int(inspect(decode, "{{.RestartCount}}")) > restarts, 60)
    wait_for("healthy", lambda: inspect(decode, "{{.State.Health.Status}}") == "healthy")
    wait_for("decode serving again", decode_serving(1))
    took = time.monotonic() - start
    return (
        f"{error}; restart policy brought it back (restart count {restarts} -> "
        f"{inspect(decode, '{{.RestartCount}}')}), serving after {took:.0f} s; "
        f"next request: {completion_ok()}"
    )


def decode_requests() -> dict[str, float]:
    _, text = get("/metrics")
    pattern = r'^llmserve_instance_requests_total\{instance="([^"]+)",service="decode"\} (\S+)$'
    return {instance: float(value) for instance, value in re.findall(pattern, text, re.M)}


def two_decode_replicas() -> str:
    start = time.monotonic()
    run([*COMPOSE, "up", "-d", "--wait", "--scale", "decode=2"], 600)
    wait_for("two decode instances serving", decode_serving(2))
    took = time.monotonic() - start
    before = decode_requests()

    def one(i: int) -> str:
        raw = client.completions.with_raw_response.create(
            model=model, prompt=f"Request {i}:", max_tokens=24, extra_body={"ignore_eos": True}
        )
        return raw.headers.get("fireworks-backend-host", "?")

    with ThreadPoolExecutor(8) as pool:
        hosts = list(pool.map(one, range(8)))
    time.sleep(1)
    after = decode_requests()
    served = {i: after[i] - before.get(i, 0) for i in after}
    assert len(served) == 2 and all(n > 0 for n in served.values()), (before, after)
    counts = {h: hosts.count(h) for h in set(hosts)}
    return (
        f"scaled in {took:.0f} s; 8 concurrent requests, decode counters "
        f"llmserve_instance_requests_total +{served}; backend-host headers {counts}"
    )


def down() -> str:
    run([*COMPOSE, "down", "--volumes"], 300)
    label = f"label=com.docker.compose.project={PROJECT}"
    left = {
        kind: run(["docker", kind, "ls", "-q", "--filter", label], quiet=True).split()
        for kind in ("network", "volume")
    }
    left["container"] = run(["docker", "ps", "-aq", "--filter", label], quiet=True).split()
    assert not any(left.values()), left
    return "no container, network or volume of the project left"


def main() -> int:
    if not check("build the image", build):
        return 1
    try:
        if check("compose up: every service healthy", up):
            check("/health and /metrics answer", health_and_metrics)
            check("chat completion (openai client)", chat)
            check("streamed completion (openai client)", streamed_completion)
            check("structured output (response_format json_object)", structured_output)
            check(
                "same long prompt twice: cached tokens, KV pulled over gRPC",
                prefix_cache_and_kv_over_grpc,
            )
            check(
                "docker kill decode mid-stream: clear error, back, next request OK",
                docker_kill_mid_stream,
            )
            check(
                "decode crashes mid-stream: clear error, restart policy, next request OK",
                decode_crash_mid_stream,
            )
            check("decode scaled to 2: requests land on both", two_decode_replicas)
    finally:
        if os.environ.get("KEEP") != "1":
            check("compose down leaves nothing behind", down)
    failed = [name for name, ok in results if not ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed", flush=True)
    for name in failed:
        print(f"FAILED: {name}")
    return min(len(failed), 100)


if __name__ == "__main__":
    sys.exit(main())
