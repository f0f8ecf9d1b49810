"""The FastAPI application: ``create_app`` wires settings, routes, errors and metrics; the lifespan loads the model.

Readiness: the lifespan loads every checkpoint and runs warm-up batches before the server accepts connections;
``/readyz`` is 200 from then until shutdown begins. A checkpoint that cannot be loaded stops start-up (uvicorn exits
non-zero) with a message naming LRAEE_CHECKPOINT; there is no half-started state serving 503s forever.

Run: ``uvicorn app.main:create_app --factory`` (``make serve``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from lraee_core.images import set_pil_pixel_limit
from lraee_core.promises import ShadowOutcome

from .auth import ApiKeyMiddleware
from .batching import MicroBatcher
from .body_deadline import BodyRate
from .deps import Runtime
from .errors import StartupError, install_error_handlers
from .fetch import ImageFetcher
from .images import ImageDecoder
from .limits import BodyLimitMiddleware, InFlight
from .metrics import Metrics, RequestMetricsMiddleware
from .models import ServedModel, ServedModels
from .routers import classify, compat, embeddings, health, model, page, thresholds
from .service import ModelService, RowResult, WorkKey
from .settings import Settings
from .shadow import ShadowSampler

log = logging.getLogger(__name__)


async def _load(
    settings: Settings, metrics: Metrics, path: Path, weights: Path | None, decoder: ImageDecoder | None
) -> ServedModel:
    """Load, warm and start one served model: its batcher (inference worker), engine, text worker and shadow sampler;
    ``decoder``: the shared decoding pool (None: this model's decoder makes it)."""
    batcher = MicroBatcher[WorkKey, RowResult](
        max_batch_size=settings.max_batch_size,
        max_wait_seconds=settings.max_batch_wait_seconds,
        capacity=settings.queue_capacity,
        threads=settings.threads,
    )
    try:
        # Loading happens on the inference worker too: nothing blocks the loop, and warm-up initialises the very
        # thread (and its torch thread pool) that serves requests.
        service = await batcher.run_in_worker(lambda: ModelService.load(settings, path, weights=weights))
        await batcher.run_in_worker(service.warm_up)
    except BaseException:
        await batcher.stop()
        raise
    promises = None
    if settings.threshold_control and any(p.promise is not None for p in service.classifier.policy.operating_points):
        promises = service.keep_promises()
        if settings.shadow_rate <= 0:
            log.warning("LRAEE_SHADOW_RATE=0: the threshold controller sees no shadow checks and can only relax")
    observers = metrics.for_model(service.name, service.classifier, shadow=settings.shadow_rate > 0, promises=promises)

    def on_check(outcome: ShadowOutcome) -> None:  # on the inference worker
        observers.observe_shadow_check(outcome)
        if promises is not None:
            promises.observe_check(outcome)

    shadow = None
    if settings.shadow_rate > 0:
        shadow = ShadowSampler(settings.shadow_rate, service.run_full_depth, on_check, on_drop=observers.shadow_dropped)

    def on_batch(keys: Sequence[WorkKey], seconds: float, results: Sequence[RowResult]) -> None:
        observers.observe_batch(keys, seconds, results)
        service.observe_answers(keys, results)

    batcher.start(
        service.run_batch,
        background=shadow,
        on_batch=on_batch,
        on_depth=observers.set_queue_depth,
        background_budget=settings.shadow_load_budget,
    )
    if decoder is None:
        decoder = ImageDecoder(service.preprocess, max_pixels=settings.max_image_pixels)
    else:
        decoder = decoder.with_preprocess(service.preprocess)
    log.info("ready: %s (checkpoint %s)", service.name, service.classifier.checkpoint_id)
    return ServedModel(service, batcher, decoder, observers, shadow)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load and warm every model, start their batchers, the decoder and the fetcher; on shutdown stop taking work
    and drain."""
    runtime: Runtime = app.state.runtime
    settings = runtime.settings
    set_pil_pixel_limit(settings.max_image_pixels)
    loaded: list[ServedModel] = []
    fetcher: ImageFetcher | None = None
    try:
        for index, path in enumerate(settings.checkpoint):
            weights = settings.backbone_weights if index == 0 else None  # LRAEE_BACKBONE_WEIGHTS: the default's
            loaded.append(await _load(settings, runtime.metrics, path, weights, loaded[0].decoder if loaded else None))
        names = [model.name for model in loaded]
        if len(set(names)) != len(names):
            raise StartupError(f"LRAEE_CHECKPOINT serves two models under one name: {names}")
        fetcher = ImageFetcher(settings)
        runtime.models, runtime.fetcher = ServedModels(loaded), fetcher
        runtime.phase = "ready"
        yield
    finally:
        runtime.phase = "stopping"
        for model in loaded:
            await model.batcher.stop()
        for model in reversed(loaded):  # the first model's decoder owns the shared pool: closed last
            model.decoder.close()
            model.service.close()
        if fetcher is not None:
            await fetcher.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; settings come from ``LRAEE_*`` environment variables unless given."""
    settings = settings if settings is not None else Settings()
    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from the installed package, not from a CDN, so
    # they work where the service has no internet access.
    app = FastAPIOffline(
        title="LRA-EE zero-shot classification",
        summary="Zero-shot image classification on an INT8 CLIP with layer-wise early exit",
        version="0.1.0",
        lifespan=lifespan,
        static_url=page.DOCS_ASSETS_URL,
    )
    metrics = Metrics()
    app.state.runtime = Runtime(settings=settings, metrics=metrics)
    install_error_handlers(app)
    app.include_router(classify.router)
    app.include_router(compat.router)
    app.include_router(embeddings.router)
    app.include_router(model.router)
    app.include_router(health.router)
    app.include_router(thresholds.router)
    app.include_router(page.router)
    app.mount(page.STATIC_URL, StaticFiles(directory=page.STATIC_DIR), name="static")
    # Innermost: bodies are bounded whoever reads them, after the key check has refused strangers for free.
    app.add_middleware(
        BodyLimitMiddleware,
        limits={
            "/classify": settings.body_limit(1),
            "/classify/batch": settings.body_limit(settings.max_batch_images),
            "/v1/embeddings": settings.body_limit(settings.max_embedding_images),
        },
        default_limit=settings.body_limit(1),
        in_flight=InFlight(
            max_requests=settings.max_inflight_requests,
            max_bytes=settings.max_inflight_bytes,
            max_per_client=settings.max_inflight_per_client,
            on_requests=metrics.inflight_requests.set,
            on_bytes=metrics.inflight_bytes.set,
        ),
        body_rate=(
            BodyRate(settings.body_min_rate, settings.body_grace_seconds, settings.body_max_pause_seconds)
            if settings.body_min_rate > 0
            else None
        ),
        on_timeout=metrics.observe_body_timeout,
    )
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value())
    if settings.cors_origins:
        # Outside the key check: preflights carry no key, and a 401 must reach the other origin's script readably.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
            expose_headers=["Retry-After"],
        )
    # Added last, so outermost: it also counts what the key check refuses.
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app
