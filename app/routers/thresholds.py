"""``GET /thresholds``: what the threshold controllers (lraee_core/promises.py) believe and where they have moved each
operating point's thresholds; ``POST /thresholds/reset``: back to the calibrated thresholds.

Both are behind the API key like every route but the probes and the page. The state is per process (each replica
learns alone, a restart starts from the calibrated thresholds), so behind a load balancer these show one replica.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from ..deps import ModelsDep
from ..errors import InvalidInput
from ..models import ServedModel
from ..schemas import ThresholdStateOut, error_responses

router = APIRouter(tags=["operations"])

ModelQuery = Annotated[str | None, Query(description="a served model (default: the default model)")]


def _state(model: ServedModel) -> ThresholdStateOut:
    service = model.service
    keeper = service.promises
    shadow_rate = model.shadow.rate if model.shadow is not None else 0.0
    if keeper is None:
        return ThresholdStateOut(model=model.name, enabled=False, shadow_rate=shadow_rate)
    return ThresholdStateOut.model_validate(
        {"model": model.name, "enabled": True, "shadow_rate": shadow_rate, **keeper.state()}
    )


@router.get(
    "/thresholds", response_model=ThresholdStateOut, responses=error_responses(401, 404, 503), summary="Thresholds"
)
async def thresholds(models: ModelsDep, model: ModelQuery = None) -> ThresholdStateOut:
    """Each operating point's controller per band of label counts: the live agreement estimate and its bounds
    against the promise, how far its thresholds are raised, the thresholds now and calibrated, and the latest
    changes."""
    return _state(models.get(model))


@router.post(
    "/thresholds/reset",
    response_model=ThresholdStateOut,
    responses=error_responses(401, 404, 422, 503),
    summary="Reset thresholds",
)
async def reset(
    models: ModelsDep,
    model: ModelQuery = None,
    operating_point: Annotated[str | None, Query(description="only this point (default: every point)")] = None,
) -> ThresholdStateOut:
    """Put the thresholds (of one operating point, or all) back to the calibrated ones and forget the evidence;
    the reset is logged and counted like a correction."""
    served = models.get(model)
    keeper = served.service.promises
    names = served.service.classifier.policy.names
    if operating_point is not None and operating_point not in names:
        raise InvalidInput(
            f"unknown operating point {operating_point!r}; this model has {list(names)}", code="unknown_operating_point"
        )
    if keeper is not None:
        keeper.reset(operating_point)
    return _state(served)
