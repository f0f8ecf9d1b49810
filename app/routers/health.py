"""Probes and metrics: ``/healthz`` (alive), ``/readyz`` (model loaded and warm), ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import MetricsDep, ReadyRuntimeDep
from ..schemas import Status, error_responses

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Status, summary="Liveness")
async def healthz() -> Status:
    """The process is up and its event loop answers; says nothing about the model."""
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses=error_responses(503), summary="Readiness")
async def readyz(_: ReadyRuntimeDep) -> Status:
    """200 once the checkpoint is loaded and warmed up and the inference worker runs; 503 with the reason before
    that, if the worker has stopped, and from the start of shutdown."""
    return Status(status="ready")


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
async def metrics(metrics: MetricsDep) -> Response:
    """This app's registry in the Prometheus text format."""
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
