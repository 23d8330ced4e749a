"""The FastAPI app: `create_app(config)` wires routes, errors and the stage clients."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI

from frontend.auth import require_api_key
from frontend.config import FrontendConfig
from frontend.context import build_state
from frontend.errors import install_error_handlers
from frontend.metrics.spans import TELEMETRY
from frontend.request_id import RequestIdMiddleware
from frontend.routes import chat, completions, responses_api, system

# Fireworks serves the same API under /inference/v1 as well.
API_PREFIXES = ("/v1", "/inference/v1")


def create_app(config: FrontendConfig) -> FastAPI:
    state = build_state(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # grpc.aio channels bind to the loop that creates them: this one.
        state.directory.start()
        watch = asyncio.create_task(state.directory.watch())
        try:
            yield
        finally:
            watch.cancel()
            await state.stages.close()

    app = FastAPI(
        title="llmserve",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        telemetry=TELEMETRY,
    )
    app.state.frontend = state
    # With API keys configured, the API needs one; health and metrics stay open.
    authenticated = [Depends(require_api_key)]
    for prefix in API_PREFIXES:
        for router in (completions.router, chat.router, responses_api.router, system.router):
            app.include_router(router, prefix=prefix, dependencies=authenticated)
    app.include_router(system.open_router)
    install_error_handlers(app, state.server_metrics.observe_error)
    app.add_middleware(RequestIdMiddleware)
    return app
