"""GET /v1/models and GET /health."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from frontend.context import get_state
from frontend.errors import SERVER_ERROR, ApiError

router = APIRouter()
health_router = APIRouter()

OWNED_BY = "llmserve"
SERVING = "SERVING"


@router.get("/models")
async def list_models(request: Request) -> JSONResponse:
    state = get_state(request)
    model = {
        "id": await state.model_name(),
        "object": "model",
        "created": state.created,
        "owned_by": OWNED_BY,
    }
    return JSONResponse({"object": "list", "data": [model]})


@health_router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 when every stage answers grpc.health.v1 SERVING; else 503 naming the ones down."""
    stages = await get_state(request).stages.health()
    down = [stage for stage, status in stages.items() if status != SERVING]
    if not down:
        return JSONResponse({"status": "ok", "stages": stages})
    error = ApiError(
        503, f"Stages not serving: {', '.join(down)}.", type=SERVER_ERROR, code="stage_unavailable"
    )
    body = {"status": "unavailable", "stages": stages, **error.body()}
    return JSONResponse(body, status_code=503)
