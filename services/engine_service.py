"""What the prefill and decode services share: a process that serves one engine.

Each service brings its engine and its servicer; `run` loads the model and the tokenizer,
starts the engine, serves until SIGINT/SIGTERM and then stops the engine.
"""

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import grpc
import torch
from google.protobuf.descriptor import ServiceDescriptor

from services import cli
from services.engine import allocator, loader
from services.engine.quantization import QUANTIZATIONS
from services.engine.tokenizer import Tokenizer
from services.engine.worker import PoolSizeError, Worker, WorkerOptions
from services.grpc_server import serve
from services.rpc import common_pb2
from services.wire import model_info


class Engine(Protocol):
    """An engine thread over a worker; `start` is called on the event loop."""

    worker: Worker

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def stats(self) -> dict[str, int]: ...

    def healthy(self) -> bool: ...


E = TypeVar("E", bound=Engine)
# How often a draining service looks whether its open work is done.
DRAIN_POLL_S = 0.1


class Drainable(Protocol):
    """A servicer that can stop taking work and wait for what it has (SIGTERM)."""

    async def drain(self, deadline: float) -> None: ...


async def wait_until(done: Callable[[], bool], deadline: float) -> None:
    """Returns once `done()` holds or at `deadline` (time.monotonic())."""
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(DRAIN_POLL_S)


def engine_parser(
    description: str, default_port: int, kv_cache_share: float, max_kv_cache_tokens: int
) -> argparse.ArgumentParser:
    parser = cli.base_parser(description, default_port)
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
        "--kv-cache-memory", type=cli.byte_size, metavar="BYTES", help="KV pool size in bytes (4G)"
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
    parser.add_argument(
        "--compute-nice",
        type=int,
        choices=range(20),
        metavar="0..19",
        default=10,
        help="nice levels the compute threads (the engine's and the CPU kernels') run below "
        "the process's others, so that streaming and new requests preempt a step (Linux; 0: "
        "same priority)",
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
        compute_nice=args.compute_nice,
    )


def run(
    name: str,
    args: argparse.Namespace,
    make_engine: Callable[[Worker], E],
    servicer: Callable[[E, str, Tokenizer], Drainable],
    add_servicer: Callable[[Any, grpc.aio.Server], None],
    service: ServiceDescriptor,
    shared_kv: bool = False,
) -> None:
    """Serves `service`, answered by `servicer(engine, address, tokenizer)`, where `args`
    (from `engine_parser`) say; `address` is where other processes reach this one."""
    cli.setup(name, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    with loader.loading():
        try:
            worker = Worker(worker_options(args, shared_kv=shared_kv))
        except PoolSizeError as exc:
            raise SystemExit(f"{name}: {exc}") from None
        tokenizer = loader.load_tokenizer(args.model)
    allocator.keep_freed_memory()
    engine = make_engine(worker)

    servicers: list[Drainable] = []

    def register(server: grpc.aio.Server, address: str) -> list[str]:
        engine.start()
        servicers.append(servicer(engine, address, tokenizer))
        add_servicer(servicers[0], server)
        return [service.full_name]

    async def drain(deadline: float) -> None:
        await servicers[0].drain(deadline)

    async def stop() -> None:
        engine.stop()

    address = f"{args.host}:{args.port}"
    asyncio.run(
        serve(
            name,
            address,
            register,
            on_stop=stop,
            healthy=engine.healthy,
            drain=drain,
            drain_s=args.drain_s,
        )
    )


def info_response(
    name: str, address: str, engine: Engine, **limits: int
) -> common_pb2.InfoResponse:
    """An engine service's `Info`; `limits` are the ones particular to the service."""
    worker = engine.worker
    return common_pb2.InfoResponse(
        service=name,
        instance=address,
        model=model_info(worker.config, worker.info, worker.pool.block_size),
        limits=common_pb2.Limits(
            num_kv_blocks=worker.pool.num_blocks,
            max_model_len=worker.config.max_position_embeddings,
            **limits,
        ),
        stats=common_pb2.Stats(
            **engine.stats(), kv_cache_bytes=worker.kv_cache_bytes, weight_bytes=worker.weight_bytes
        ),
    )
