"""Every stage's instances: discovery, health, load and the model's limits.

Each stage may run as several instances (frontend.stages.instances), one grpc.aio channel
each, created inside the running event loop.
"""

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc

from frontend.config import FrontendConfig
from frontend.errors import ApiError, internal_error, stage_unavailable
from frontend.stages.instances import Instance, StagePool
from frontend.stages.rpc_errors import rpc_errors
from frontend.stages.types import STAGE_NAMES, ModelLimits, StageStats
from frontend.stages.wire import limits_from_infos, stats_from_info
from services.rpc import common_pb2, decode_pb2_grpc, prefill_pb2_grpc, tokenizer_pb2_grpc

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # gRPC's default reconnect backoff grows to 120 s: a stage that took a minute to load its
    # model would then stay unreachable long after it came up. Reconnecting is cheap here.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
_STUBS: dict[str, Callable[[grpc.aio.Channel], Any]] = {
    "tokenizer": tokenizer_pb2_grpc.TokenizerStub,
    "prefill": prefill_pb2_grpc.PrefillStub,
    "decode": decode_pb2_grpc.DecodeStub,
}


class StageDirectory:
    """The pools of every stage, kept discovered and checked, and the limits they serve."""

    def __init__(self, config: FrontendConfig) -> None:
        self._config = config
        self._pools: dict[str, StagePool] = {}
        self._limits: ModelLimits | None = None
        self._limits_lock = asyncio.Lock()
        self._refresh_lock = asyncio.Lock()
        self._specs = {
            "tokenizer": config.tokenizer_address,
            "prefill": config.prefill_address,
            "decode": config.decode_address,
        }

    def start(self) -> None:
        """Creates the pools; must run inside the event loop that will use them."""
        if self._pools:
            return
        for stage, spec in self._specs.items():
            self._pools[stage] = StagePool(
                stage, spec, _STUBS[stage], _CHANNEL_OPTIONS, self._config.health_timeout_s
            )

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()

    async def pool(self, stage: str) -> StagePool:
        """The stage's pool, discovered and checked at least once."""
        self.start()
        pool = self._pools[stage]
        if not pool.instances:
            await self.refresh()
        return pool

    async def refresh(self) -> None:
        """Resolves every stage's targets, checks each instance's health, and reads the load
        of each healthy prefill and decode instance from its Info."""
        self.start()
        async with self._refresh_lock:
            pools = list(self._pools.values())
            await asyncio.gather(*(pool.discover() for pool in pools))
            await asyncio.gather(*(pool.check() for pool in pools))
            for stage in ("prefill", "decode"):
                healthy = self._pools[stage].healthy()
                replies = await asyncio.gather(
                    *(self._info(i, self._config.metrics_timeout_s) for i in healthy),
                    return_exceptions=True,
                )
                for instance, reply in zip(healthy, replies, strict=True):
                    if isinstance(reply, common_pb2.InfoResponse):
                        instance.reported_load = reply.stats.num_running + reply.stats.num_waiting
                        instance.num_kv_blocks = reply.limits.num_kv_blocks

    async def watch(self) -> None:
        """Refreshes the instances every `health_interval_s`, forever; fetches the model's
        limits as soon as every stage answers, so that requests need not."""
        delay = self._config.health_interval_s
        while True:
            try:
                await self.refresh()
                if self._limits is None:
                    limits = await self.limits()
                    logger.info(
                        "stages ready: model %s, context %d", limits.model_id, limits.max_model_len
                    )
            except ApiError:
                pass  # a stage is still loading, or down: the next round tries again
            except Exception:  # noqa: BLE001 - watching must outlive any one bad round
                logger.exception("refreshing the stage instances failed")
            await asyncio.sleep(delay)

    async def limits(self) -> ModelLimits:
        """Model name and context length from the stages' Info, fetched once they answer."""
        if self._limits is None:
            async with self._limits_lock:
                if self._limits is None:
                    self._limits = await self._fetch_limits()
        return self._limits

    async def _fetch_limits(self) -> ModelLimits:
        infos = {}
        for stage in STAGE_NAMES:
            pool = await self.pool(stage)
            instances = pool.healthy()
            if not instances:
                raise no_instance(stage)
            with rpc_errors(stage, quiet=True):
                infos[stage] = await self._info(instances[0])
        limits = limits_from_infos(infos)
        if limits is None:
            logger.error("no stage reports a context length")
            raise internal_error()
        return limits

    async def _info(
        self, instance: Instance, timeout_s: float | None = None
    ) -> common_pb2.InfoResponse:
        return await instance.stub.Info(
            common_pb2.InfoRequest(), timeout=timeout_s or self._config.info_timeout_s
        )

    async def stats(self) -> tuple[list[StageStats], list[str]]:
        """Each answering instance's load from its Info, and the stages none of whose
        instances answered."""
        self.start()
        pairs = [(stage, i) for stage, pool in self._pools.items() for i in pool.instances.values()]
        replies = await asyncio.gather(
            *(self._info(i, self._config.metrics_timeout_s) for _, i in pairs),
            return_exceptions=True,
        )
        stats, up = [], set()
        for (stage, instance), reply in zip(pairs, replies, strict=True):
            if isinstance(reply, grpc.aio.AioRpcError):
                continue
            if isinstance(reply, BaseException):
                raise reply
            up.add(stage)
            stats.append(stats_from_info(stage, reply, instance.address))
        return stats, [stage for stage in STAGE_NAMES if stage not in up]

    async def health(self) -> dict[str, dict[str, str]]:
        """Per stage, each instance's grpc.health.v1 status name (or the gRPC code it failed
        with), checked now."""
        await self.refresh()
        return {
            stage: {i.address: i.status for i in pool.instances.values()}
            for stage, pool in self._pools.items()
        }


def no_instance(stage: str) -> ApiError:
    """No instance of `stage` is serving (each one's going down was logged)."""
    return stage_unavailable(stage)
