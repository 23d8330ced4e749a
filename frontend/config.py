"""Frontend settings and the command line that fills them."""

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from frontend.stages.routing import PREFILL_POLICIES

API_KEYS_ENV = "API_KEYS"


@dataclass(slots=True, frozen=True)
class FrontendConfig:
    tokenizer_address: str = "127.0.0.1:50051"
    prefill_address: str = "127.0.0.1:50052"
    decode_address: str = "127.0.0.1:50053"
    # None: use the model_id that the stages report in Info.
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    # Open streams get this long to finish on SIGTERM before they are cut.
    graceful_shutdown_s: int = 30
    info_timeout_s: float = 5.0
    health_timeout_s: float = 2.0
    # Tokenizing is cheap; a stage that takes this long is stuck, not busy.
    tokenize_timeout_s: float = 60.0
    release_timeout_s: float = 5.0
    # Empty: no authentication. Else every API request needs `Authorization: Bearer <key>`.
    api_keys: tuple[str, ...] = ()
    metrics_timeout_s: float = 1.0  # for the stages' Info on a /metrics scrape
    # Stage instances are re-resolved and health-checked this often.
    health_interval_s: float = 2.0
    prefill_routing: str = "cache_aware"  # or "round_robin"
    # Conditional disaggregation: a prompt that leaves at most this many tokens to compute on
    # the decode instance chosen for it (given what that instance caches) is computed there,
    # without a prefill call or a KV handoff; 0: prefill computes every prompt.
    local_prefill_tokens: int = 256
    # Requests in flight beyond which a new one is refused (429): the stages' own queues
    # refuse sooner when they are the bottleneck; this bounds the frontend's memory.
    max_requests: int = 1024
    # A request still running this long after it arrived ends with a 504 (or an SSE error)
    # and frees its KV: every stage call carries the deadline.
    request_timeout_s: float = 600.0
    # A stream still without its first token this long after it started sends its status line
    # and headers: by then a stage that refuses it has said so (429, 503, 400), so such
    # refusals still get their own status; later failures become an SSE error event.
    sse_headers_after_s: float = 0.5
    # Until its first event, a stream sends an SSE comment this often, so that clients and
    # proxies with idle timeouts keep a queued request open.
    sse_keepalive_s: float = 5.0
    # With API keys: share prefix-cache entries across keys (else each key has its own).
    shared_prompt_cache: bool = False
    # Responses API: keep up to this many responses in memory (previous_response_id, GET);
    # 0 stores none.
    store_responses: int = 0
    # OTLP/gRPC collector that receives trace spans (services.tracing); None: no tracing.
    otlp_traces_endpoint: str | None = None


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> FrontendConfig:
    """Command line over defaults; API keys from --api-key and the API_KEYS variable."""
    parser = argparse.ArgumentParser(
        prog="python -m frontend",
        description="HTTP frontend (OpenAI/Fireworks API) over the tokenizer, prefill and "
        "decode gRPC stages.",
    )
    defaults = FrontendConfig()
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    instances = (
        "host:port, or several comma-separated; a name resolving to several addresses "
        "(compose replicas, a headless Service) gives one instance per address"
    )
    parser.add_argument("--tokenizer", default=defaults.tokenizer_address, help=instances)
    parser.add_argument("--prefill", default=defaults.prefill_address, help=instances)
    parser.add_argument("--decode", default=defaults.decode_address, help=instances)
    parser.add_argument(
        "--prefill-routing",
        choices=PREFILL_POLICIES,
        default=defaults.prefill_routing,
        help="cache_aware: the instance with the least prompt left to compute given what it "
        "caches and has queued; round_robin: in turn",
    )
    parser.add_argument(
        "--local-prefill-tokens",
        type=int,
        default=defaults.local_prefill_tokens,
        metavar="N",
        help="decode computes a prompt itself, with no prefill call or KV handoff, when at "
        "most N of its tokens are missing from that decode instance's prefix cache (short "
        "prompts, a conversation's next turn); 0: always prefill",
    )
    parser.add_argument(
        "--health-interval-s",
        type=float,
        default=defaults.health_interval_s,
        help="seconds between re-resolving and health-checking the stage instances",
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="model name clients send; defaults to the model_id the stages report",
    )
    parser.add_argument("--log-level", default=defaults.log_level)
    parser.add_argument(
        "--shared-prompt-cache",
        action="store_true",
        help="with API keys, let requests of different keys share prefix-cache entries "
        "(by default each key's are its own, so cached_tokens reveals nothing across keys)",
    )
    parser.add_argument(
        "--store-responses",
        type=int,
        default=defaults.store_responses,
        metavar="N",
        help="Responses API: keep the last N responses in memory (least recently used "
        "forgotten first), each for its own API key, for previous_response_id and GET "
        "/v1/responses/{id}; 0 (default) stores none",
    )
    parser.add_argument(
        "--request-timeout-s",
        type=float,
        default=defaults.request_timeout_s,
        help="a request still running this long after it arrived ends with an error (504) and "
        "frees its KV",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=defaults.max_requests,
        help="requests in flight beyond which a new one gets 429 with Retry-After",
    )
    parser.add_argument(
        "--graceful-shutdown-s",
        type=int,
        default=defaults.graceful_shutdown_s,
        help="seconds open requests get to finish after SIGTERM",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        dest="api_keys",
        help=f"accepted bearer key (repeatable; also ${API_KEYS_ENV}, comma-separated); "
        "without any, requests need no key",
    )
    parser.add_argument(
        "--otlp-traces-endpoint",
        metavar="URL",
        help="export trace spans over OTLP/gRPC to this collector (e.g. http://collector:4317): "
        "a span per request, continuing a client's W3C traceparent, and one per stage call; "
        "off by default",
    )
    args = parser.parse_args(argv)
    if args.store_responses < 0:
        parser.error("--store-responses must be 0 or more")
    if args.local_prefill_tokens < 0:
        parser.error("--local-prefill-tokens must be 0 or more")
    env_keys = (os.environ if environ is None else environ).get(API_KEYS_ENV, "")
    keys = [*args.api_keys, *env_keys.split(",")]
    return FrontendConfig(
        tokenizer_address=args.tokenizer,
        prefill_address=args.prefill,
        decode_address=args.decode,
        prefill_routing=args.prefill_routing,
        local_prefill_tokens=args.local_prefill_tokens,
        health_interval_s=args.health_interval_s,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        graceful_shutdown_s=args.graceful_shutdown_s,
        max_requests=args.max_requests,
        request_timeout_s=args.request_timeout_s,
        shared_prompt_cache=args.shared_prompt_cache,
        store_responses=args.store_responses,
        otlp_traces_endpoint=args.otlp_traces_endpoint,
        api_keys=tuple(dict.fromkeys(k.strip() for k in keys if k.strip())),
    )
