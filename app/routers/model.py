"""``GET /model``: what a served checkpoint is and how it was calibrated; ``GET /models``: every served model."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from ..deps import ModelsDep
from ..schemas import ModelList, ModelSummary, error_responses

router = APIRouter(tags=["model"])


@router.get("/model", response_model=ModelSummary, responses=error_responses(401, 404, 503), summary="Loaded model")
async def model(
    models: ModelsDep,
    model: str | None = None,
    full: Annotated[bool, Query(description="also return the checkpoint's whole manifest (tens of KB)")] = False,
) -> ModelSummary:
    """Backbone, quantization, exit heads and layers, operating points (thresholds, the agreement each promises and
    its measurement per label count on the build's validation images, and the built-in `full`), limits: of the
    default model, or of ``?model=``; with `?full=true` also the whole manifest (calibration, every figure the build
    measured)."""
    return models.get(model).service.summary(full=full)


@router.get("/models", response_model=ModelList, responses=error_responses(401, 503), summary="Served models")
async def served_models(models: ModelsDep) -> ModelList:
    """Every served model (LRAEE_CHECKPOINT), the default first: what `model` may name on each route."""
    default = models.default
    return ModelList(
        default=default.name, models=[served.service.entry(default=served is default) for served in models]
    )
