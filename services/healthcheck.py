"""Health probes of the stages: grpc.health.v1 for tokenizer, prefill and decode, GET /health
for the frontend. Used by the launcher and, from the command line, by container health checks:

    python -m services.healthcheck grpc 127.0.0.1:50052
    python -m services.healthcheck http 127.0.0.1:8000

exits 0 when the target is serving, 1 otherwise.
"""

import json
import sys
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def grpc_healthy(address: str, timeout_s: float = 1.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_health(address: str, timeout_s: float = 1.0) -> dict | None:
    """The frontend's /health body when it answers 200 (every stage has an instance serving);
    None otherwise."""
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=timeout_s) as reply:
            return json.load(reply) if reply.status == 200 else None
    except (OSError, ValueError):
        return None


def http_healthy(address: str, timeout_s: float = 1.0) -> bool:
    return http_health(address, timeout_s) is not None


def http_all_serving(address: str, timeout_s: float = 1.0) -> bool:
    """The frontend is healthy and sees every instance it was given serving."""
    body = http_health(address, timeout_s)
    if body is None:
        return False
    statuses = [status for stage in body["instances"].values() for status in stage.values()]
    return all(status == "SERVING" for status in statuses)


PROBES = {"grpc": grpc_healthy, "http": http_healthy}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in PROBES:
        print("usage: python -m services.healthcheck grpc|http HOST:PORT", file=sys.stderr)
        return 2
    return 0 if PROBES[argv[0]](argv[1], timeout_s=3.0) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
