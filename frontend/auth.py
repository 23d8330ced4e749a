"""Optional bearer API keys: with none configured every request is let through."""

import hmac

from fastapi import Request

from frontend.context import get_state
from frontend.errors import unauthorized

BEARER = "bearer "


async def require_api_key(request: Request) -> None:
    """A route dependency; health and metrics routes do not take it."""
    keys = get_state(request).config.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    if header[: len(BEARER)].lower() != BEARER:
        raise unauthorized()
    given = header[len(BEARER) :].strip().encode()
    # Every key is compared, in constant time, so timing tells nothing about which matched.
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]
    if not any(matches):
        raise unauthorized()
