"""Errors a servicer raises on purpose; the interceptor maps each to its gRPC status."""

import grpc


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgumentError(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhaustedError(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class AbortedError(ServiceError):
    """This request cannot go on (its prompt's KV was lost), while the service is fine."""

    code = grpc.StatusCode.ABORTED
