"""Tokenizer service: text and chat messages to token ids, and back. Its only state is a cache
of recent encodings (`EncodeCache`)."""

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from services import cli
from services.engine import loader
from services.engine.config import ModelConfig
from services.engine.tokenizer import Tokenizer
from services.errors import InvalidArgumentError
from services.grpc_server import serve
from services.rpc import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from services.tokenizer.encode_cache import EncodeCache
from services.wire import model_info

CHAT_ROLES = ("system", "user", "assistant", "tool")


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(
        self,
        tokenizer: Tokenizer,
        config: ModelConfig,
        address: str,
        threads: int,
        encode_cache_tokens: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.encoder = EncodeCache(tokenizer, encode_cache_tokens)
        self.config = config
        self.address = address
        # The tokenizers library releases the GIL, so a few threads tokenize in parallel.
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenize")

    async def _run(self, fn, *args) -> tuple[object, int, int]:
        """Runs fn off the event loop; returns (result, queue_ns, duration_ns)."""
        submitted = time.monotonic_ns()
        started = 0

        def timed():
            nonlocal started
            started = time.monotonic_ns()
            return fn(*args)

        result = await asyncio.get_running_loop().run_in_executor(self._pool, timed)
        return result, started - submitted, time.monotonic_ns() - started

    async def Tokenize(self, request, context):
        if request.WhichOneof("input") == "token_ids":
            ids = list(request.token_ids.ids)
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise InvalidArgumentError(
                    f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})"
                )
            return tokenizer_pb2.TokenizeResponse(token_ids=ids)
        ids, queue_ns, duration_ns = await self._encode(request.text, request.add_special_tokens)
        return tokenizer_pb2.TokenizeResponse(
            token_ids=ids, prompt=request.text, queue_ns=queue_ns, duration_ns=duration_ns
        )

    async def RenderChat(self, request, context):
        if not request.messages:
            raise InvalidArgumentError("messages must not be empty")
        messages = [_message_dict(i, message) for i, message in enumerate(request.messages)]
        tools = _json_list(request.tools_json, "tools_json") if request.tools_json else None
        # Rendering holds the GIL throughout: a thread would not run it any sooner.
        started = time.monotonic_ns()
        try:
            prompt = self.tokenizer.render_chat(
                messages, request.add_generation_prompt, tools=tools
            )
        except Exception as exc:  # the template may raise on what it cannot render
            raise InvalidArgumentError(f"chat template failed: {exc}") from exc
        render_ns = time.monotonic_ns() - started
        ids, queue_ns, duration_ns = await self._encode(prompt, False)
        return tokenizer_pb2.TokenizeResponse(
            token_ids=ids, prompt=prompt, queue_ns=queue_ns, duration_ns=render_ns + duration_ns
        )

    async def _encode(self, text: str, add_special_tokens: bool) -> tuple[list[int], int, int]:
        """(ids, queue_ns, duration_ns): from the cache, here, when it holds all of the text;
        else encoded in a thread, so that other calls go on meanwhile."""
        started = time.monotonic_ns()
        ids = self.encoder.cached(text, add_special_tokens)
        if ids is not None:
            return ids, 0, time.monotonic_ns() - started
        return await self._run(self.encoder.encode, text, add_special_tokens)

    async def Detokenize(self, request, context):
        ids = list(request.token_ids)
        if any(not 0 <= t < self.config.vocab_size for t in ids):
            raise InvalidArgumentError(f"token ids must be in [0, {self.config.vocab_size})")
        text = self.tokenizer.decode(ids, skip_special_tokens=request.skip_special_tokens)
        return tokenizer_pb2.DetokenizeResponse(text=text)

    async def Info(self, request, context):
        return common_pb2.InfoResponse(
            service="tokenizer",
            instance=self.address,
            model=model_info(self.config, None, block_size=0),
            limits=common_pb2.Limits(max_model_len=self.config.max_position_embeddings),
        )


def _message_dict(index: int, message: tokenizer_pb2.ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it (transformers' form)."""
    if message.role not in CHAT_ROLES:
        raise InvalidArgumentError(f"messages[{index}].role must be one of {CHAT_ROLES}")
    entry: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name:
        entry["name"] = message.name
    if message.tool_call_id:
        entry["tool_call_id"] = message.tool_call_id
    if message.tool_calls_json:
        calls = _json_list(message.tool_calls_json, f"messages[{index}].tool_calls_json")
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise InvalidArgumentError(
                    f"messages[{index}].tool_calls_json: each call needs a function name"
                )
            # The API's form: arguments as JSON text.
            arguments = function.get("arguments", {})
            if not isinstance(arguments, str):
                function["arguments"] = json.dumps(arguments, ensure_ascii=False)
        entry["tool_calls"] = calls
    return entry


def _json_list(text: str, field: str) -> list[Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidArgumentError(f"{field} is not valid JSON: {exc}") from exc
    if not isinstance(value, list):
        raise InvalidArgumentError(f"{field} must be a JSON list")
    return value


def main() -> None:
    parser = cli.base_parser("Tokenizer service", default_port=50051)
    parser.add_argument("--threads", type=int, default=2, help="tokenizing threads")
    parser.add_argument(
        "--encode-cache-tokens",
        type=int,
        default=1 << 18,
        help="tokens of recently encoded text between added tokens (a chat's messages) kept "
        "to encode the same text again without the tokenizer: a conversation's next turn "
        "encodes only its new messages (0: encode every text whole)",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=256,
        help="requests in flight beyond which a new one is refused (RESOURCE_EXHAUSTED, HTTP "
        "429): a prompt takes milliseconds, so these are seconds of work",
    )
    args = parser.parse_args()
    cli.setup("tokenizer", args)
    with loader.loading():
        tokenizer = loader.load_tokenizer(args.model)
        config = loader.load_config(args.model)

    def register(server: grpc.aio.Server, address: str) -> list[str]:
        servicer = TokenizerServicer(
            tokenizer, config, address, args.threads, args.encode_cache_tokens
        )
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(servicer, server)
        return [tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name]

    # Tokenizing takes milliseconds: the server's grace on stopping is drain enough.
    address = f"{args.host}:{args.port}"
    asyncio.run(serve("tokenizer", address, register, max_requests=args.max_requests))


if __name__ == "__main__":
    main()
