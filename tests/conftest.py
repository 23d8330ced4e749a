"""Fixtures shared by the suite: the real four-process stack, started by the launcher."""

import os
import pathlib
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import openai
import pytest
from fastapi.testclient import TestClient

from frontend.app import create_app
from services.engine.device import choose_device
from services.engine.grammar import GrammarCompiler
from services.engine.loader import load_tokenizer
from services.engine.quantization import compute_dtype, resolve_quantization
from services.engine.tokenizer import Tokenizer
from tests.test_frontend_fake_stages import FakeStages, fake_config, start_fake_stages

ROOT = pathlib.Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 240
# What the launcher's engines compute in on this machine (--dtype auto): float32 on our CPU
# kernels (the default GGUF), else bfloat16 where the CPU has AMX or there is a GPU.
_DEVICE = choose_device()
STACK_DTYPE = compute_dtype(resolve_quantization("auto", "gguf", _DEVICE), _DEVICE)
# The default model's vocabulary (its embedding rows).
VOCAB_SIZE = 49152


@dataclass
class Stack:
    process: subprocess.Popen
    http_url: str
    addresses: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def start_stack(*extra: str) -> Stack:
    """Starts the launcher on free ports and waits until it reports every stage healthy."""
    cmd = [
        sys.executable,
        "-m",
        "services.launcher",
        "--port",
        "0",
        "--grpc-ports",
        "0,0,0",
        "--startup-timeout",
        str(STARTUP_TIMEOUT_S),
        *extra,
    ]
    process = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    stack = Stack(process, http_url="")
    assert process.stdout is not None
    for line in process.stdout:
        stack.output.append(line)
        if line.startswith("ready: "):  # ready: NAME on ADDRESS (pid PID)
            words = line.split()
            stack.addresses[words[1]] = words[3]
            stack.pids[words[1]] = int(words[5].rstrip(")"))
        if line.startswith("serving the API on "):
            stack.http_url = line.split()[4].removesuffix("/v1")
            break
    if not stack.http_url:
        process.kill()
        pytest.fail("stack did not start:\n" + "".join(stack.output[-40:]))
    # Keep draining the pipe so that the services never block on it.
    threading.Thread(target=lambda: stack.output.extend(process.stdout), daemon=True).start()
    return stack


@pytest.fixture(scope="session")
def stack():
    stack = start_stack()
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def client(stack):
    """The openai client on the shared stack (test modules with fake stages have their own)."""
    return openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def fakes() -> Iterator[FakeStages]:
    """Fake tokenizer, prefill and decode servers (tests/test_frontend_fake_stages.py), one set
    per test module."""
    stages = start_fake_stages()
    yield stages
    stages.stop()


@pytest.fixture(scope="module")
def fake_client(fakes: FakeStages) -> Iterator[TestClient]:
    """An in-process frontend over the fakes."""
    with TestClient(create_app(fake_config(fakes))) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """The default model's tokenizer."""
    return load_tokenizer("default")


@pytest.fixture(scope="session")
def compiler(tokenizer: Tokenizer) -> GrammarCompiler:
    """A grammar compiler for the default model's vocabulary."""
    return GrammarCompiler(tokenizer, VOCAB_SIZE)
