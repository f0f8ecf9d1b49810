"""Probes and metrics: ``/healthz`` (alive), ``/readyz`` (model loaded, warm and making progress), ``/metrics``.

Liveness and readiness answer different questions on purpose. A worker stuck on one long engine call (a huge new
label set to encode, a pathological batch) makes the replica useless for new work, so readiness takes it out of the
load balancer, but restarting it would throw away the work in progress, so liveness stays 200; both recover by
themselves when the call finishes.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import MetricsDep, ReadyRuntimeDep
from ..errors import ServiceUnavailable
from ..schemas import Status, error_responses

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Status, summary="Liveness")
async def healthz() -> Status:
    """The process is up and its event loop answers; says nothing about the model."""
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses=error_responses(503), summary="Readiness")
async def readyz(runtime: ReadyRuntimeDep) -> Status:
    """200 once the checkpoint is loaded and warmed up and the inference worker runs; 503 with the reason before
    that, if the worker has stopped, from the start of shutdown, and while images wait behind one engine call that
    has run longer than ``LRAEE_STALL_SECONDS``."""
    assert runtime.models is not None
    for model in runtime.models:
        stalled = model.batcher.stalled_seconds()
        if stalled > runtime.settings.stall_seconds:
            raise ServiceUnavailable(
                f"the inference worker of model {model.name!r} has made no progress for {stalled:.1f} s with "
                f"{model.batcher.depth} images waiting"
            )
    return Status(status="ready")


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
async def metrics(metrics: MetricsDep) -> Response:
    """This app's registry in the Prometheus text format."""
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
