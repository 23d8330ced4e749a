"""Pulls a prompt's KV blocks from the prefill instance named in its handle."""

import asyncio
import time
from dataclasses import dataclass

import grpc
import torch

from services.decode.engine import DecodeEngine
from services.errors import UnavailableError
from services.grpc_server import CHANNEL_OPTIONS
from services.rpc import common_pb2, prefill_pb2, prefill_pb2_grpc

# How often a pull waiting for free blocks looks again.
_BLOCK_WAIT_S = 0.005


@dataclass(slots=True)
class PulledKv:
    block_ids: list[int]
    num_bytes: int
    duration_ns: int


class KvPuller:
    def __init__(self, engine: DecodeEngine) -> None:
        self.engine = engine
        self.cache = engine.worker.pool.cache
        self._stubs: dict[str, prefill_pb2_grpc.PrefillStub] = {}

    def stub(self, address: str) -> prefill_pb2_grpc.PrefillStub:
        if address not in self._stubs:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._stubs[address] = prefill_pb2_grpc.PrefillStub(channel)
        return self._stubs[address]

    async def release(self, handle: common_pb2.KvHandle) -> None:
        """Frees a handle that will not be pulled; its lease frees it if this fails."""
        try:
            await self.stub(handle.prefill_address).Release(
                prefill_pb2.ReleaseRequest(handle_id=handle.handle_id), timeout=5
            )
        except grpc.aio.AioRpcError:
            pass

    async def pull(self, handle: common_pb2.KvHandle) -> PulledKv:
        block_ids = await self._allocate(handle.num_blocks)
        start = time.monotonic_ns()
        try:
            num_bytes = await self._receive(handle, block_ids)
        except BaseException:
            with self.engine.lock:
                self.engine.blocks.free(block_ids)
            raise
        return PulledKv(block_ids, num_bytes, time.monotonic_ns() - start)

    async def _allocate(self, num_blocks: int) -> list[int]:
        # Waits while the pool is full; running sequences finish and free blocks.
        while True:
            with self.engine.lock:
                if self.engine.blocks.can_allocate(num_blocks):
                    return self.engine.blocks.allocate(num_blocks)
            await asyncio.sleep(_BLOCK_WAIT_S)

    async def _receive(self, handle: common_pb2.KvHandle, block_ids: list[int]) -> int:
        num_bytes = 0
        index = torch.tensor(block_ids, device=self.cache.device)
        request = prefill_pb2.PullKvRequest(handle_id=handle.handle_id)
        try:
            async for chunk in self.stub(handle.prefill_address).PullKv(request):
                dtype = getattr(torch, chunk.dtype)
                shape = tuple(chunk.shape)
                ids = index[chunk.block_offset : chunk.block_offset + chunk.num_blocks]
                for kv, data in ((0, chunk.k), (1, chunk.v)):
                    tensor = torch.frombuffer(bytearray(data), dtype=dtype).view(shape)
                    self.cache[chunk.layer, kv, ids] = tensor.to(
                        self.cache.device, self.cache.dtype
                    )
                num_bytes += len(chunk.k) + len(chunk.v)
        except grpc.aio.AioRpcError as exc:
            raise UnavailableError(
                f"KV pull from {handle.prefill_address} failed: {exc.details()}"
            ) from exc
        return num_bytes
