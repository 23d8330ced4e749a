"""What every route needs, built once per app: config, stages, pipeline, counters."""

import time
from dataclasses import dataclass, field

from fastapi import Request

from frontend.config import FrontendConfig
from frontend.errors import model_not_found
from frontend.metrics.request import InFlight
from frontend.metrics.server import ServerMetrics
from frontend.responses_store import ResponseStore
from frontend.run.pipeline import Pipeline
from frontend.stages.clients import StageClients
from frontend.stages.directory import StageDirectory

# Fireworks clients name models by their full resource path.
FIREWORKS_MODEL_PREFIX = "accounts/fireworks/models/"


@dataclass(slots=True)
class AppState:
    config: FrontendConfig
    directory: StageDirectory
    stages: StageClients
    pipeline: Pipeline
    server_metrics: ServerMetrics
    in_flight: InFlight
    response_store: ResponseStore | None  # None: responses are not stored
    created: int = field(default_factory=lambda: int(time.time()))

    async def model_name(self) -> str:
        if self.config.served_model_name:
            return self.config.served_model_name
        return (await self.directory.limits()).model_id

    async def check_model(self, requested: str) -> None:
        name = await self.model_name()
        if requested not in (name, FIREWORKS_MODEL_PREFIX + name):
            raise model_not_found(requested)


def build_state(config: FrontendConfig) -> AppState:
    directory = StageDirectory(config)
    stages = StageClients(config, directory)
    in_flight = InFlight()
    server_metrics = ServerMetrics(in_flight)
    return AppState(
        config=config,
        directory=directory,
        stages=stages,
        pipeline=Pipeline(stages, server_metrics, config.request_timeout_s),
        server_metrics=server_metrics,
        in_flight=in_flight,
        response_store=ResponseStore(config.store_responses) if config.store_responses else None,
    )


def get_state(request: Request) -> AppState:
    state = request.app.state.frontend
    assert isinstance(state, AppState)
    return state
