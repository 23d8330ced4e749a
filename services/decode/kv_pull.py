"""Brings a prompt's KV into decode's pool, moving only the blocks decode does not hold.

Leading blocks found in decode's own prefix cache (same hash chain as prefill's) are
reused. The rest is copied straight out of prefill's pool when it is mapped in shared
memory on this host, else streamed over gRPC (PullKv).

A request waits for its place in the batch before anything moves, renewing the handle's lease
meanwhile. KV that is lost on the way (the lease ran out, the prefill instance went away) ends
that request with ABORTED; decode itself is fine, so nobody should take it for down.
"""

import asyncio
import time
from dataclasses import dataclass

import grpc
import torch

from services.decode.engine import DecodeEngine
from services.engine import shm_storage
from services.errors import AbortedError
from services.grpc_server import CHANNEL_OPTIONS
from services.rpc import common_pb2, prefill_pb2, prefill_pb2_grpc
from services.stage_auth import stage_channel

# A whole prompt's KV over gRPC: 128k tokens of this model are ~3 GB, some 30 s on loopback.
PULL_TIMEOUT_S = 120.0
# How often a pull waiting for a batch slot and free blocks looks again.
_BLOCK_WAIT_S = 0.005


@dataclass(slots=True)
class PulledKv:
    block_ids: list[int]
    num_reused_blocks: int
    num_bytes: int
    duration_ns: int
    transport: str  # "grpc", "shm" or "none"


class KvPuller:
    def __init__(self, engine: DecodeEngine) -> None:
        self.engine = engine
        self.blocks = engine.blocks
        self.cache = engine.worker.pool.cache
        self._stubs: dict[str, prefill_pb2_grpc.PrefillStub] = {}
        # Per prefill address, the pool it last reported (id, mapping or None): a restarted
        # instance's new pool replaces its old one, whose mapping then goes.
        self._shared_pools: dict[str, tuple[str, torch.Tensor | None]] = {}
        # Release calls made for requests that are going away, held until they finish.
        self._releases: set[asyncio.Task[None]] = set()

    def stub(self, address: str) -> prefill_pb2_grpc.PrefillStub:
        if address not in self._stubs:
            channel = stage_channel(address, CHANNEL_OPTIONS)
            self._stubs[address] = prefill_pb2_grpc.PrefillStub(channel)
        return self._stubs[address]

    def release_later(self, handle: common_pb2.KvHandle) -> None:
        """Frees a handle that will not be pulled, without making the caller wait: it is
        often being cancelled, and an await would be cancelled with it. Its lease frees the
        handle if this fails; a handle already gone is no harm."""
        task = asyncio.get_running_loop().create_task(self._release_pinned(handle))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def pull(
        self, handle: common_pb2.KvHandle, prompt_ids: list[int], block_hashes: list[bytes]
    ) -> PulledKv:
        """The prompt's KV in decode's pool, once the sequence can join the batch; its full
        blocks are found in and offered to decode's prefix cache under `block_hashes` (the
        request's chain, as decode computed it). The caller must end the pull with
        `engine.end_pull(seq)` (failures here end it themselves)."""
        start = time.monotonic_ns()
        try:
            reused, new_blocks = await self._reserve(handle, prompt_ids, block_hashes)
        except BaseException:
            self.release_later(handle)
            raise
        try:
            if not new_blocks:
                self.release_later(handle)
                num_bytes, transport = 0, "none"
            elif (shared := await self._shared_blocks(handle, len(reused), new_blocks)) is not None:
                num_bytes = await self._copy_shared(handle, *shared, new_blocks)
                transport = "shm"
            else:
                num_bytes = await self._stream(handle, len(reused), new_blocks)
                transport = "grpc"
        except BaseException:
            self.engine.end_pull(None, reused + new_blocks)
            self.release_later(handle)
            raise
        block_ids = reused + new_blocks
        self._register(block_hashes, prompt_ids, block_ids, len(reused))
        duration = time.monotonic_ns() - start
        return PulledKv(block_ids, len(reused), num_bytes, duration, transport)

    def _register(
        self, block_hashes: list[bytes], prompt_ids: list[int], block_ids: list[int], start: int
    ) -> None:
        size = self.blocks.block_size
        with self.engine.lock:
            for i in range(start, len(block_hashes)):
                tokens = prompt_ids[i * size : (i + 1) * size]
                self.blocks.register(block_ids[i], block_hashes[i], tokens)

    async def _reserve(
        self, handle: common_pb2.KvHandle, prompt_ids: list[int], hashes: list[bytes]
    ) -> tuple[list[int], list[int]]:
        """Waits for a batch slot and free blocks (running sequences finish and free both),
        renewing the handle's lease every third of it."""
        renew_every_s = handle.lease_ms / 3000
        renewed_at = time.monotonic()
        while True:
            blocks = self.engine.begin_pull(hashes, prompt_ids, handle.num_blocks)
            if blocks is not None:
                return blocks
            if time.monotonic() - renewed_at >= renew_every_s:
                await self._renew(handle)
                renewed_at = time.monotonic()
            await asyncio.sleep(_BLOCK_WAIT_S)

    async def _renew(self, handle: common_pb2.KvHandle) -> prefill_pb2.RenewResponse:
        """Renews the lease; the reply says where the handle's blocks are."""
        request = prefill_pb2.RenewRequest(handle_id=handle.handle_id)
        try:
            reply = await self.stub(handle.prefill_address).Renew(request, timeout=5)
        except grpc.aio.AioRpcError as exc:
            raise _lost(handle, f"renewing its lease failed: {exc.details()}") from exc
        if not reply.renewed:
            raise _lost(handle, "the handle is unknown or expired")
        return reply

    async def _shared_blocks(
        self, handle: common_pb2.KvHandle, first: int, dst_blocks: list[int]
    ) -> tuple[torch.Tensor, list[int]] | None:
        """The prefill pool to copy from and the blocks there, as the prefill instance that
        issued the handle tells them (the handle's own fields only say whether to try), or
        None: pull over gRPC (another host or PID namespace, a CUDA pool, no shared pool)."""
        if not handle.shm_path or self.cache.device.type != "cpu":
            return None
        location = await self._renew(handle)
        src_blocks = list(location.block_ids)[first:]
        if not location.shm_path or len(src_blocks) != len(dst_blocks):
            return None
        address = handle.prefill_address
        known = self._shared_pools.get(address)
        if known is None or known[0] != location.shm_pool_id:
            pool = shm_storage.open_readonly(location.shm_path, location.shm_pool_id)
            known = self._shared_pools[address] = (location.shm_pool_id, pool)
        pool = known[1]
        if pool is None or max(src_blocks, default=0) >= pool.shape[2]:
            return None
        return pool, src_blocks

    async def _copy_shared(
        self,
        handle: common_pb2.KvHandle,
        source: torch.Tensor,
        src_blocks: list[int],
        dst_blocks: list[int],
    ) -> int:
        src = torch.tensor(src_blocks, dtype=torch.long)
        dst = torch.tensor(dst_blocks, dtype=torch.long)

        def copy() -> int:
            # Layer by layer, so the staging copy of the picked blocks stays cache-sized.
            # [layers, 2, blocks, block_size, kv_heads, head_dim], blocks picked on dim 2
            for layer in range(source.shape[0]):
                moved = source[layer].index_select(1, src)
                self.cache[layer].index_copy_(1, dst, moved.to(self.cache.dtype))
            return source[:, :, :1].numel() * source.element_size() * len(src)

        # Shielded: if the request is cancelled mid-copy, its blocks are freed only after the
        # thread has stopped writing into them.
        task = asyncio.ensure_future(asyncio.to_thread(copy))
        try:
            num_bytes = await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task])
            await self._release_pinned(handle)
            raise
        except BaseException:
            await self._release_pinned(handle)
            raise
        # The blocks were pinned from the handle's creation until this Release: if it
        # finds the handle, nothing overwrote them while they were copied.
        if not await self._release_pinned(handle):
            raise _lost(handle, "the handle is unknown or expired")
        return num_bytes

    async def _release_pinned(self, handle: common_pb2.KvHandle) -> bool:
        request = prefill_pb2.ReleaseRequest(handle_id=handle.handle_id)
        try:
            reply = await self.stub(handle.prefill_address).Release(request, timeout=5)
        except grpc.aio.AioRpcError:
            return False
        return reply.released

    async def _stream(self, handle: common_pb2.KvHandle, first: int, dst_blocks: list[int]) -> int:
        num_bytes = 0
        index = torch.tensor(dst_blocks, device=self.cache.device)
        request = prefill_pb2.PullKvRequest(handle_id=handle.handle_id, first_block=first)
        try:
            pull = self.stub(handle.prefill_address).PullKv(request, timeout=PULL_TIMEOUT_S)
            async for chunk in pull:
                dtype = getattr(torch, chunk.dtype)
                shape = tuple(chunk.shape)
                offset = chunk.block_offset - first
                ids = index[offset : offset + chunk.num_blocks]
                for kv, data in ((0, chunk.k), (1, chunk.v)):
                    tensor = torch.frombuffer(bytearray(data), dtype=dtype).view(shape)
                    tensor = tensor.to(self.cache.device, self.cache.dtype)
                    self.cache[chunk.layer, kv, ids] = tensor
                num_bytes += len(chunk.k) + len(chunk.v)
        except grpc.aio.AioRpcError as exc:
            raise _lost(handle, f"pulling it failed: {exc.details()}") from exc
        return num_bytes


def _lost(handle: common_pb2.KvHandle, why: str) -> AbortedError:
    return AbortedError(
        f"the prompt's KV (handle {handle.handle_id!r} on prefill instance "
        f"{handle.prefill_address}) was lost before decode took it ({why}); retry the request"
    )
