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
from .fetch import ImageFetcher
from .images import ImageDecoder
from .metrics import Metrics
from .models import ServedModels
from .service import ModelService, RowResult, WorkKey
from .settings import Settings

Phase = Literal["starting", "ready", "stopping"]


@dataclass
class Runtime:
    """Everything one app instance holds; the lifespan fills the model-side fields and flips ``phase``."""

    settings: Settings
    metrics: Metrics
    models: ServedModels | None = None
    fetcher: ImageFetcher | None = None
    phase: Phase = "starting"  # ready only between a finished warm-up and the start of shutdown

    @property
    def service(self) -> ModelService | None:
        """The default model's service (None before it is loaded)."""
        return None if self.models is None else self.models.default.service

    @property
    def batcher(self) -> MicroBatcher[WorkKey, RowResult] | None:
        """The default model's inference queue."""
        return None if self.models is None else self.models.default.batcher

    @property
    def decoder(self) -> ImageDecoder | None:
        """The default model's image decoder."""
        return None if self.models is None else self.models.default.decoder


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
    if runtime.phase == "starting" or runtime.models is None or runtime.fetcher is None:
        return "the model is not loaded yet"
    for model in runtime.models:
        if not model.batcher.running:
            return f"the inference worker has stopped (model {model.name!r})"
    return None


async def ready_runtime(runtime: RuntimeDep) -> Runtime:
    """The runtime, once ready; 503 (with the reason) otherwise."""
    reason = not_ready_reason(runtime)
    if reason is not None:
        raise ServiceUnavailable(reason)
    return runtime


ReadyRuntimeDep = Annotated[Runtime, Depends(ready_runtime)]


async def get_models(runtime: ReadyRuntimeDep) -> ServedModels:
    """The served models."""
    assert runtime.models is not None
    return runtime.models


async def get_fetcher(runtime: ReadyRuntimeDep) -> ImageFetcher:
    """The image URL fetcher."""
    assert runtime.fetcher is not None
    return runtime.fetcher


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ModelsDep = Annotated[ServedModels, Depends(get_models)]
FetcherDep = Annotated[ImageFetcher, Depends(get_fetcher)]
