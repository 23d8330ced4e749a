"""GET /v1/models, and the open GET /health and GET /metrics."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from frontend.context import AppState, get_state
from frontend.errors import SERVER_ERROR, ApiError

router = APIRouter()
open_router = APIRouter()  # never behind an API key

OWNED_BY = "llmserve"
SERVING = "SERVING"


@router.get("/models")
async def list_models(request: Request) -> JSONResponse:
    model = await _model_object(get_state(request))
    return JSONResponse({"object": "list", "data": [model]})


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> JSONResponse:
    """The served model under its own id or the Fireworks-prefixed one; 404 for any other."""
    state = get_state(request)
    await state.check_model(model_id)
    return JSONResponse(await _model_object(state))


async def _model_object(state: AppState) -> dict[str, object]:
    return {
        "id": await state.model_name(),
        "object": "model",
        "created": state.created,
        "owned_by": OWNED_BY,
    }


@open_router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 when every stage has an instance answering grpc.health.v1 SERVING; else 503 naming
    the stages that have none. Lists each instance's status."""
    instances = await get_state(request).directory.health()
    stages = {
        stage: SERVING if SERVING in statuses.values() else _down_status(statuses)
        for stage, statuses in instances.items()
    }
    down = [stage for stage, status in stages.items() if status != SERVING]
    if not down:
        return JSONResponse({"status": "ok", "stages": stages, "instances": instances})
    error = ApiError(
        503, f"Stages not serving: {', '.join(down)}.", type=SERVER_ERROR, code="stage_unavailable"
    )
    body = {"status": "unavailable", "stages": stages, "instances": instances, **error.body()}
    return JSONResponse(body, status_code=503)


@open_router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text: this frontend's request metrics and the stages' load, polled now."""
    state = get_state(request)
    stats, down = await state.directory.stats()
    accept = request.headers.get("accept")
    body, content_type = state.server_metrics.exposition(stats, down, accept)
    return Response(body, media_type=content_type)


def _down_status(statuses: dict[str, str]) -> str:
    """A stage with no serving instance: the status of its first one, or why it has none."""
    return next(iter(statuses.values()), "NO_INSTANCES")
