"""What the prefill and decode services share: a process that serves one engine.

Each service brings its engine and its servicer; `run` loads the model and the tokenizer,
starts the engine, serves until SIGINT/SIGTERM and then stops the engine.
"""

import argparse
import asyncio
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import grpc
import torch
from google.protobuf.descriptor import ServiceDescriptor

from services import cli
from services.engine import loader
from services.engine.tokenizer import Tokenizer
from services.engine.worker import Worker
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


def run(
    name: str,
    args: argparse.Namespace,
    make_engine: Callable[[Worker], E],
    servicer: Callable[[E, str, Tokenizer], Any],
    add_servicer: Callable[[Any, grpc.aio.Server], None],
    service: ServiceDescriptor,
    shared_kv: bool = False,
) -> None:
    """Serves `service`, answered by `servicer(engine, address, tokenizer)`, where `args`
    (from `cli.engine_parser`) say; `address` is where other processes reach this one."""
    cli.setup_logging(args.log_level)
    if args.threads:
        torch.set_num_threads(args.threads)
    worker = Worker(cli.worker_options(args, shared_kv=shared_kv))
    tokenizer = loader.load_tokenizer(args.model)
    engine = make_engine(worker)

    def register(server: grpc.aio.Server, address: str) -> list[str]:
        engine.start()
        add_servicer(servicer(engine, address, tokenizer), server)
        return [service.full_name]

    async def stop() -> None:
        engine.stop()

    address = f"{args.host}:{args.port}"
    asyncio.run(serve(name, address, register, on_stop=stop, healthy=engine.healthy))


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
        stats=common_pb2.Stats(**engine.stats()),
    )
