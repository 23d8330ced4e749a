"""gRPC status -> ApiError, the one mapping for every stage call."""

import contextlib
import logging
from collections.abc import Iterator

import grpc

from frontend.errors import (
    SERVER_ERROR,
    ApiError,
    internal_error,
    invalid_request,
    overloaded,
    stage_unavailable,
)

logger = logging.getLogger(__name__)

_BAD_INPUT = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE)
# A poll (quiet) that times out finds the stage down too; a request's call, out of time.
_DOWN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# The stage that compiles a grammar names the field it came from first ("tools: ...").
_GRAMMAR_PARAMS = ("response_format", "tools")


def stage_error(
    stage: str, exc: grpc.aio.AioRpcError, param: str | None = None, quiet: bool = False
) -> ApiError:
    """`quiet`: a poll (health, Info), which logs a stage that is down at debug level and
    takes a timeout for the stage being down rather than for the request running late."""
    code, details = exc.code(), exc.details() or ""
    if param is None:
        param = next((p for p in _GRAMMAR_PARAMS if details.startswith(f"{p}:")), None)
    if code in _BAD_INPUT:
        return invalid_request(details or f"The {stage} stage rejected the request.", param)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not quiet:
        return ApiError(
            504,
            f"The request ran out of time in the {stage} stage; its work there was stopped.",
            type=SERVER_ERROR,
            code="request_timeout",
        )
    if code in _DOWN:
        logger.log(
            logging.DEBUG if quiet else logging.WARNING,
            "%s stage %s: %s",
            stage,
            code.name,
            details,
        )
        return stage_unavailable(stage)
    if code == grpc.StatusCode.ABORTED:
        # This request's own trouble (its KV was lost), not the stage's: never marks it down.
        logger.warning("%s stage aborted a request: %s", stage, details)
        message = details[:1].upper() + details[1:]
        return ApiError(503, message, type=SERVER_ERROR, code="request_aborted")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return overloaded(f"The {stage} stage is at capacity ({details}).")
    logger.error("%s stage failed with %s: %s", stage, code.name, details)
    return internal_error()


@contextlib.contextmanager
def rpc_errors(stage: str, param: str | None = None, quiet: bool = False) -> Iterator[None]:
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise stage_error(stage, exc, param, quiet) from None
