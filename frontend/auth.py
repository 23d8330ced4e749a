"""Optional bearer API keys: with none configured every request is let through.

With keys, each key's requests share prefix-cache entries only among themselves (unless the
operator shares the cache, `--shared-prompt-cache`): otherwise `cached_tokens` would let one
client learn whether another sent a prompt. Stored responses are always the key's own.
"""

import hashlib
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
    request.state.api_key_id = hashlib.sha256(given).hexdigest()[:32]
    if not get_state(request).config.shared_prompt_cache:
        request.state.prompt_cache_tenant = request.state.api_key_id


def api_key_id(request: Request) -> str:
    """Which key the request came with ("" without API keys): what it stores is its own."""
    return getattr(request.state, "api_key_id", "")


def prompt_cache_tenant(request: Request) -> str:
    """Whose prefix-cache entries the request may share ("" when everyone's)."""
    return getattr(request.state, "prompt_cache_tenant", "")
