"""Session fixtures for the service tests, a plugin: `pytest_plugins = ["tests.grpc_fixtures"]`.

The services start once per session (model loading dominates) and stop with SIGTERM at the
end, which must be clean: exit code 0 or -SIGTERM, no child left, the ports closed.
"""

from collections.abc import Iterator

import pytest

from services.engine import loader
from services.engine.tokenizer import Tokenizer
from tests.engine_reference import Reference
from tests.grpc_stack import (
    DECODE_KV_TOKENS,
    ENGINE_ARGS,
    MAX_BATCH,
    PREFILL_KV_TOKENS,
    Stack,
    running,
    start_service,
)


@pytest.fixture(scope="session")
def services_stack() -> Iterator[Stack]:
    kv = "--kv-cache-tokens"
    services = {
        "tokenizer": start_service("tokenizer", "--threads", "1"),
        "prefill": start_service("prefill", *ENGINE_ARGS, kv, str(PREFILL_KV_TOKENS)),
        "decode": start_service(
            "decode", *ENGINE_ARGS, kv, str(DECODE_KV_TOKENS), "--max-batch-size", str(MAX_BATCH)
        ),
        # Frees an unpulled handle after one second; queues at most 600 prompt tokens.
        "prefill_short": start_service(
            "prefill", *ENGINE_ARGS, kv, "512", "--kv-lease-s", "1", "--max-queued-tokens", "600"
        ),
    }
    with running(services):
        stack = Stack(services)
        yield stack
        stack.close()


@pytest.fixture(scope="session")
def engine_reference() -> Reference:
    return Reference()


@pytest.fixture(scope="session")
def default_tokenizer() -> Tokenizer:
    return loader.load_tokenizer("default")
