"""What routes depend on, as ``Annotated`` aliases: the runtime state the lifespan builds on ``app.state``.

Every dependency here is ``async def`` although none awaits anything: FastAPI runs a plain ``def`` dependency on a
worker thread, so each request paid six thread hops for attribute look-ups. Under load, with the inference thread
holding the GIL between its ops, those hops were the event loop's largest cost (a py-spy profile of 16 clients:
half of the loop's GIL time in the thread pool's queue hand-off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Request

from .batching import MicroBatcher
from .errors import ServiceUnavailable
from .images import ImageDecoder
from .metrics import Metrics
from .service import BatchKey, ModelService
from .settings import Settings

Phase = Literal["starting", "ready", "stopping"]


@dataclass
class Runtime:
    """Everything one app instance holds; the lifespan fills the model-side fields and flips ``phase``."""

    settings: Settings
    metrics: Metrics
    service: ModelService | None = None
    batcher: MicroBatcher[BatchKey] | None = None
    decoder: ImageDecoder | None = None
    phase: Phase = "starting"  # ready only between a finished warm-up and the start of shutdown


async def get_runtime(request: Request) -> Runtime:
    """The app instance's runtime."""
    runtime = request.app.state.runtime
    assert isinstance(runtime, Runtime)
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_settings(runtime: RuntimeDep) -> Settings:
    """Validated settings of this app."""
    return runtime.settings


async def get_metrics(runtime: RuntimeDep) -> Metrics:
    """This app's metrics registry."""
    return runtime.metrics


def not_ready_reason(runtime: Runtime) -> str | None:
    """Why the app cannot serve classifications right now, or None when it can (the readiness definition)."""
    if runtime.phase == "stopping":
        return "the service is shutting down"
    if runtime.phase == "starting" or runtime.service is None or runtime.decoder is None:
        return "the model is not loaded yet"
    if runtime.batcher is None or not runtime.batcher.running:
        return "the inference worker has stopped"
    return None


async def ready_runtime(runtime: RuntimeDep) -> Runtime:
    """The runtime, once ready; 503 (with the reason) otherwise."""
    reason = not_ready_reason(runtime)
    if reason is not None:
        raise ServiceUnavailable(reason)
    return runtime


ReadyRuntimeDep = Annotated[Runtime, Depends(ready_runtime)]


async def get_service(runtime: ReadyRuntimeDep) -> ModelService:
    """The loaded model."""
    assert runtime.service is not None
    return runtime.service


async def get_batcher(runtime: ReadyRuntimeDep) -> MicroBatcher[BatchKey]:
    """The inference queue."""
    assert runtime.batcher is not None
    return runtime.batcher


async def get_decoder(runtime: ReadyRuntimeDep) -> ImageDecoder:
    """The image decoding pool."""
    assert runtime.decoder is not None
    return runtime.decoder


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ServiceDep = Annotated[ModelService, Depends(get_service)]
BatcherDep = Annotated[MicroBatcher[BatchKey], Depends(get_batcher)]
DecoderDep = Annotated[ImageDecoder, Depends(get_decoder)]
