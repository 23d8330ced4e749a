"""What every route needs, built once per app: config, stage clients, pipeline, counters."""

import time
from dataclasses import dataclass, field

from fastapi import Request

from frontend.config import FrontendConfig
from frontend.errors import model_not_found
from frontend.metrics import InFlight
from frontend.pipeline import Pipeline
from frontend.server_metrics import ServerMetrics
from frontend.stages import StageClients

# Fireworks clients name models by their full resource path.
FIREWORKS_MODEL_PREFIX = "accounts/fireworks/models/"


@dataclass(slots=True)
class AppState:
    config: FrontendConfig
    stages: StageClients
    pipeline: Pipeline
    server_metrics: ServerMetrics
    in_flight: InFlight = field(default_factory=InFlight)
    created: int = field(default_factory=lambda: int(time.time()))

    async def model_name(self) -> str:
        if self.config.served_model_name:
            return self.config.served_model_name
        return (await self.stages.limits()).model_id

    async def check_model(self, requested: str) -> None:
        name = await self.model_name()
        if requested not in (name, FIREWORKS_MODEL_PREFIX + name):
            raise model_not_found(requested)


def build_state(config: FrontendConfig) -> AppState:
    stages = StageClients(config)
    server_metrics = ServerMetrics()
    return AppState(
        config=config,
        stages=stages,
        pipeline=Pipeline(stages, server_metrics),
        server_metrics=server_metrics,
    )


def get_state(request: Request) -> AppState:
    state = request.app.state.frontend
    assert isinstance(state, AppState)
    return state
