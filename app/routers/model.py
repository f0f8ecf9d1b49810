"""``GET /model``: what the loaded checkpoint is and how it was calibrated."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import ServiceDep
from ..schemas import ModelSummary, error_responses

router = APIRouter(tags=["model"])


@router.get("/model", response_model=ModelSummary, responses=error_responses(401, 503), summary="Loaded model")
async def model(service: ServiceDep) -> ModelSummary:
    """Backbone, quantization, layers, operating points (thresholds, the agreement each promises and its held-out
    measurement per label count, and the built-in `full`), calibration."""
    return service.summary()
