"""`host:port` targets (names or addresses, comma-separated) and the addresses they name now.

Shared by the frontend (each stage's instances) and decode (the prefill instances it may dial).
"""

import asyncio
import ipaddress
import logging
import socket

logger = logging.getLogger(__name__)


def parse_targets(spec: str) -> list[tuple[str, int]]:
    """'a:1,b:2' -> [('a', 1), ('b', 2)]; IPv6 literals in brackets ('[::1]:50051')."""
    targets = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"{item!r} is not host:port")
        targets.append((host.strip("[]"), int(port)))
    if not targets:
        raise ValueError(f"{spec!r} names no host:port")
    return targets


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve(targets: list[tuple[str, int]]) -> list[str]:
    """Every address the targets name now, in order, without repeats. A name with IPv4
    addresses gives those only (a host's `localhost` must not count twice)."""
    loop = asyncio.get_running_loop()
    addresses: dict[str, None] = {}
    for host, port in targets:
        try:
            ipaddress.ip_address(host)
            addresses[_join(host, port)] = None
            continue
        except ValueError:
            pass
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            logger.debug("cannot resolve %s: %s", host, exc)
            continue
        ipv4 = [info for info in infos if info[0] == socket.AF_INET]
        for info in ipv4 or infos:
            addresses[_join(info[4][0], port)] = None
    return list(addresses)


def is_loopback(address: str) -> bool:
    """Whether a `host:port` address is on this host's loopback interface."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
