"""X-Request-Id: every HTTP response carries one, the client's when it sent a usable one.

The id is also the suffix of a generation's body id (`chatcmpl-<id>`) and part of the id the
stages and every log line know the request by, so one value finds a request everywhere.
"""

import re
import uuid
from dataclasses import dataclass

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
# Visible ASCII without spaces, as ids are logged and sent back in headers and bodies.
_USABLE = re.compile(r"[\x21-\x7e]{1,128}")


@dataclass(frozen=True, slots=True)
class RequestIds:
    response: str  # the body's id
    # What the stages and logs know the request by: the body's id, made unique by a suffix
    # when the client chose the X-Request-Id (two clients may send the same one).
    stage: str


class RequestIdMiddleware:
    """Takes the client's X-Request-Id or makes one; puts it on the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = Headers(scope=scope).get(HEADER, "")
        client_chosen = _USABLE.fullmatch(sent) is not None
        request_id = sent if client_chosen else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["request_id_from_client"] = request_id, client_chosen

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


def request_ids(prefix: str, request: Request) -> RequestIds:
    response = f"{prefix}-{request.state.request_id}"
    if not request.state.request_id_from_client:
        return RequestIds(response, response)
    return RequestIds(response, f"{response}.{uuid.uuid4().hex[:8]}")
