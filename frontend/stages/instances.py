"""The instances of one stage: discovered from configuration, health-checked, marked down on
failure and back up once they answer again.

A stage is configured as comma-separated `host:port` targets. A host name may resolve to
several addresses (compose replicas, a Kubernetes headless Service): each address is an
instance, and names are resolved again on every refresh, so replicas that come and go are
followed. A name that does not resolve has no instances until it does.
"""

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.stage_auth import stage_channel
from services.targets import parse_targets, resolve

logger = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.ServingStatus.Name(health_pb2.HealthCheckResponse.SERVING)
_UNKNOWN = "UNKNOWN"


@dataclass(eq=False)
class Instance:
    """One stage process: its channel, the stage's service stub and a health stub on it."""

    address: str
    channel: grpc.aio.Channel
    stub: Any
    health: health_pb2_grpc.HealthStub
    healthy: bool = True
    # Requests this frontend has open on the instance, and (prefill) the prompt tokens they
    # still have to compute there.
    in_flight: int = 0
    queued_tokens: int = 0
    # From the last Info: requests running + waiting, and the KV pool size in blocks.
    reported_load: int = 0
    num_kv_blocks: int = 0
    status: str = _UNKNOWN
    missed_check: bool = False  # the last health check timed out
    # Bumped each time the instance comes back after being down: it may have restarted.
    epoch: int = 0


@dataclass(eq=False)
class StagePool:
    """The instances of `stage`; `make_stub(channel)` builds its service stub."""

    stage: str
    spec: str
    make_stub: Callable[[grpc.aio.Channel], Any]
    channel_options: list[tuple[str, int]]
    health_timeout_s: float
    instances: dict[str, Instance] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._targets = parse_targets(self.spec)

    async def discover(self) -> None:
        """Adds instances whose address appeared and drops those that went away."""
        addresses = await resolve(self._targets)
        if not addresses:
            if self.instances:
                logger.warning("%s: %s resolves to nothing now", self.stage, self.spec)
            return  # keep the last known instances: a resolver hiccup is not a removal
        for address in addresses:
            if address not in self.instances:
                channel = stage_channel(address, self.channel_options)
                self.instances[address] = Instance(
                    address,
                    channel,
                    self.make_stub(channel),
                    health_pb2_grpc.HealthStub(channel),
                )
                logger.info("%s instance %s added", self.stage, address)
        for address in [a for a in self.instances if a not in addresses]:
            instance = self.instances.pop(address)
            logger.info("%s instance %s removed", self.stage, address)
            if instance.in_flight == 0:
                await instance.channel.close(grace=1.0)

    async def check(self) -> None:
        """Asks every instance for its grpc.health.v1 status, marking it up or down."""
        instances = list(self.instances.values())
        await asyncio.gather(*(self._check(instance) for instance in instances))

    async def _check(self, instance: Instance) -> None:
        try:
            reply = await instance.health.Check(
                health_pb2.HealthCheckRequest(), timeout=self.health_timeout_s
            )
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as exc:
            status = exc.code().name
        # A serving instance too busy to answer one check in time (a loaded host) keeps its
        # traffic; one that misses the next check too, refuses, or says so goes down.
        slow = status == grpc.StatusCode.DEADLINE_EXCEEDED.name
        if slow and instance.healthy and instance.status == _SERVING and not instance.missed_check:
            instance.missed_check = True
            logger.info(
                "%s instance %s was slow to answer its health check", self.stage, instance.address
            )
            return
        instance.missed_check = slow
        starting = instance.status == _UNKNOWN  # not answered yet: still starting, not failed
        instance.status = status
        up = status == _SERVING
        if up != instance.healthy:
            level = logging.INFO if up or starting else logging.WARNING
            logger.log(level, "%s instance %s is %s", self.stage, instance.address, status)
            instance.epoch += up
        instance.healthy = up

    def mark_down(self, instance: Instance, reason: str) -> None:
        """Stops routing to `instance` until a later check finds it serving."""
        if instance.healthy:
            logger.warning("%s instance %s marked down: %s", self.stage, instance.address, reason)
        instance.healthy = False
        instance.status = reason

    def healthy(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.healthy]

    def get(self, address: str) -> Instance | None:
        return self.instances.get(address)

    async def close(self) -> None:
        for instance in self.instances.values():
            await instance.channel.close(grace=1.0)
        self.instances.clear()
