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
from services.engine import loader
from services.engine.tokenizer import Tokenizer
from services.engine.worker import PoolSizeError, Worker
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
    (from `cli.engine_parser`) say; `address` is where other processes reach this one."""
    cli.setup(name, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        worker = Worker(cli.worker_options(args, shared_kv=shared_kv))
    except PoolSizeError as exc:
        raise SystemExit(f"{name}: {exc}") from None
    tokenizer = loader.load_tokenizer(args.model)
    loader.release_load_memory()
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
