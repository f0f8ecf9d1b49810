"""``GET /model``: what a served checkpoint is and how it was calibrated; ``GET /models``: every served model."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import ModelsDep
from ..schemas import ModelList, ModelSummary, error_responses

router = APIRouter(tags=["model"])


@router.get("/model", response_model=ModelSummary, responses=error_responses(401, 404, 503), summary="Loaded model")
async def model(models: ModelsDep, model: str | None = None) -> ModelSummary:
    """Backbone, quantization, layers, operating points (thresholds, the agreement each promises and its held-out
    measurement per label count, and the built-in `full`), calibration: of the default model, or of ``?model=``."""
    return models.get(model).service.summary()


@router.get("/models", response_model=ModelList, responses=error_responses(401, 503), summary="Served models")
async def served_models(models: ModelsDep) -> ModelList:
    """Every served model (LRAEE_CHECKPOINT), the default first: what `model` may name on each route."""
    default = models.default
    return ModelList(
        default=default.name, models=[served.service.entry(default=served is default) for served in models]
    )
