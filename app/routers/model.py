"""``GET /model``: what the loaded checkpoint is and how it was calibrated."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from ..deps import ServiceDep
from ..schemas import ModelSummary, error_responses

router = APIRouter(tags=["model"])


@router.get("/model", response_model=ModelSummary, responses=error_responses(401, 503), summary="Loaded model")
async def model(
    service: ServiceDep,
    full: Annotated[bool, Query(description="also return the checkpoint's whole manifest (tens of KB)")] = False,
) -> ModelSummary:
    """Backbone, quantization, exit heads and layers, operating points (thresholds, the agreement each promises and
    its measurement per label count on the build's validation images, and the built-in `full`), limits; with
    `?full=true` also the whole manifest (calibration, every figure the build measured)."""
    return service.summary(full=full)
