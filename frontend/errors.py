"""The one error shape, `{"error": {"message", "type", "param", "code"}}`, and what raises it."""

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
# nginx's "client closed request": nobody reads it, but the access log says what happened.
CLIENT_CLOSED_REQUEST = 499
RETRY_AFTER_S = 2  # what a refused request is told to wait: a few steps and passes


class ApiError(Exception):
    """An error the client sees; raise it anywhere below a route."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{model}` does not exist.",
        param="model",
        code="model_not_found",
    )


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "Invalid or missing API key: send it as `Authorization: Bearer <key>`.",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def stage_unavailable(stage: str) -> ApiError:
    return ApiError(
        503,
        f"The {stage} stage is unavailable; try again later.",
        type=SERVER_ERROR,
        code="stage_unavailable",
    )


def overloaded(message: str) -> ApiError:
    """Too much work queued: refused before any token, to be retried after a moment."""
    return ApiError(
        429,
        f"{message} Retry after {RETRY_AFTER_S} s.",
        type=SERVER_ERROR,
        code="overloaded",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def internal_error() -> ApiError:
    return ApiError(
        500,
        "The server had an error while processing your request.",
        type=SERVER_ERROR,
        code="internal_error",
    )


class CatchAllMiddleware:
    """Turns any exception that escapes a route into the error shape.

    Starlette's own handler for `Exception` re-raises after answering, and BaseHTTPMiddleware
    breaks streaming cancellation, hence a plain ASGI middleware.
    """

    def __init__(self, app: ASGIApp, on_error: Callable[[ApiError], None]) -> None:
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            if not started:
                await _send_error(send, ApiError(CLIENT_CLOSED_REQUEST, "Client disconnected."))
        except Exception:
            request_id = scope.get("state", {}).get("request_id")
            logger.exception(
                "%s: unhandled error on %s %s", request_id, scope.get("method"), scope.get("path")
            )
            error = internal_error()
            self.on_error(error)
            if not started:
                await _send_error(send, error)


async def _send_error(send: Send, error: ApiError) -> None:
    response = error.response()
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        }
    )
    await send({"type": "http.response.body", "body": response.body})


async def _http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # Unknown routes (404) and wrong methods (405) answer in the same shape as everything else.
    assert isinstance(exc, StarletteHTTPException)
    return ApiError(exc.status_code, str(exc.detail)).response()


def install_error_handlers(app: FastAPI, on_error: Callable[[ApiError], None]) -> None:
    """`on_error` sees every error a request is answered with (for the metrics)."""

    async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        on_error(exc)
        return exc.response()

    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_middleware(CatchAllMiddleware, on_error=on_error)
