"""Prometheus metrics: one registry per app (tests build many apps), conventional names, bounded label values.

Label values stay bounded: ``route`` is a route template or ``other``, ``status`` an HTTP status code, ``model`` a
served model's name (LRAEE_CHECKPOINT), ``layer`` a candidate layer or ``full``, ``operating_point`` one of the
model's (``full`` included), ``agree`` true/false, ``modality`` text/image, ``reason`` one of
app/body_deadline.py's, ``labels`` a label-count band of an operating point (between its calibrated label counts:
``2-4``, ``10+``), ``bound`` estimate/lower/upper, ``direction`` raise/relax/reset.
Everything an engine does carries its ``model``; what happens before a request reaches one (requests, latency,
bodies in flight, body timeouts) does not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lraee_core.engine import EarlyExitClassifier, ExitResult
from lraee_core.promises import DIRECTIONS, PromiseKeeper, ShadowOutcome
from lraee_core.text import CacheStats

from .body_deadline import TIMEOUT_REASONS, TimeoutReason
from .service import BatchKey, RowResult, WorkKey

OTHER_ROUTE = "other"  # label of requests that match no route (404s, scanners): keeps the label set bounded
FULL_PATH = "full"  # exit-layer label of the full-depth CLIP path
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
FLOPS_SAVED_BUCKETS = (-0.1, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # < 0: heads cost > blocks skipped
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MODEL = "model"


class _TextCacheCollector(Collector):
    """Reads each engine's cumulative cache counters at scrape time, so they can never drift from the engine's."""

    def __init__(self) -> None:
        self.stats: dict[str, Callable[[], CacheStats]] = {}  # served model -> its cache's counters

    def collect(self) -> Iterable[Metric]:
        hits = CounterMetricFamily(
            "lraee_text_cache_hits", "Labels whose text embedding came from the cache", labels=[MODEL]
        )
        misses = CounterMetricFamily(
            "lraee_text_cache_misses", "Labels whose text embedding had to be encoded", labels=[MODEL]
        )
        for model, stats in self.stats.items():
            counts = stats()
            hits.add_metric([model], counts.hits)
            misses.add_metric([model], counts.misses)
        yield hits
        yield misses


class _PromiseCollector(Collector):
    """Reads each model's threshold controllers at scrape time (lraee_core/promises.py): the live agreement estimate
    and its bounds, the threshold offset, whether a promise is estimated broken, the corrections made."""

    def __init__(self) -> None:
        self.keepers: dict[str, PromiseKeeper] = {}  # served model -> its controllers

    def collect(self) -> Iterable[Metric]:
        labels = [MODEL, "operating_point", "labels"]
        estimate = GaugeMetricFamily(
            "lraee_agreement_estimate",
            "Live agreement with the full-depth top-1 estimated at the current thresholds (1 - early-exit share x "
            "shadow-check disagreement), per operating point and label-count band; absent until answers arrive",
            labels=[*labels, "bound"],
        )
        offset = GaugeMetricFamily(
            "lraee_threshold_offset",
            "How far the thresholds are raised along the calibrated curve (0: calibrated; 1: the next stricter "
            "point's thresholds; the largest: never leave)",
            labels=labels,
        )
        broken = GaugeMetricFamily(
            "lraee_promise_broken",
            "1 from the moment the live agreement is estimated below the promise until a level is found that keeps it",
            labels=labels,
        )
        corrections = CounterMetricFamily(
            "lraee_threshold_corrections",
            "Threshold changes made by the controller (raise, relax) or asked for (reset)",
            labels=[*labels, "direction"],
        )
        for model, keeper in self.keepers.items():
            for band in keeper.bands():
                names = [model, band.point.name, band.band]
                bounds = band.bounds(keeper.config.z_raise)
                if bounds is not None:
                    for bound, value in zip(("estimate", "lower", "upper"), bounds, strict=True):
                        estimate.add_metric([*names, bound], value)
                offset.add_metric(names, band.offset)
                broken.add_metric(names, 1.0 if band.broken_since is not None else 0.0)
                for direction in DIRECTIONS:
                    corrections.add_metric([*names, direction], band.corrections[direction])
        yield estimate
        yield offset
        yield broken
        yield corrections


class Metrics:
    """Every metric the service exports, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "lraee_requests", "HTTP requests by route template and status", ["route", "status"], registry=registry
        )
        self.request_duration = Histogram(
            "lraee_request_duration_seconds", "HTTP request latency by route template", ["route"], registry=registry
        )
        self.inference = Histogram(
            "lraee_inference_seconds", "Engine time per batch", [MODEL], buckets=INFERENCE_BUCKETS, registry=registry
        )
        self.exit_layer = Counter(
            "lraee_exit_layer",
            "Images answered per exit: the candidate layer whose head answered, or 'full' for the full-depth path",
            [MODEL, "layer"],
            registry=registry,
        )
        self.flops_saved = Histogram(
            "lraee_flops_saved_ratio",
            "Per-image fraction of full-depth FLOPs saved (heads and gates included)",
            [MODEL],
            buckets=FLOPS_SAVED_BUCKETS,
            registry=registry,
        )
        # Compute-weighted saving = 1 - rate(lraee_flops_total) / rate(lraee_flops_full_total); the histogram above
        # has a negative bucket (heads can cost more than they save), so it carries no usable _sum.
        self.flops_spent = Counter(
            "lraee_flops", "FLOPs spent on classified images, heads and gates included", [MODEL], registry=registry
        )
        self.flops_full = Counter(
            "lraee_flops_full", "FLOPs the same images would have cost at full depth", [MODEL], registry=registry
        )
        self.batch_size = Histogram(
            "lraee_batch_size", "Images per engine batch", [MODEL], buckets=BATCH_SIZE_BUCKETS, registry=registry
        )
        self.queue_depth = Gauge("lraee_queue_depth", "Images waiting for the engine", [MODEL], registry=registry)
        self.answers = Counter(
            "lraee_answers",
            "Images answered per operating point and exit path ('head': an exit head, 'full': the full depth)",
            [MODEL, "operating_point", "exit_path"],
            registry=registry,
        )
        self.embedded = Counter(
            "lraee_embedded_inputs",
            "Inputs embedded by /v1/embeddings, per modality (text, image)",
            [MODEL, "modality"],
            registry=registry,
        )
        self.shadow_checks = Counter(
            "lraee_shadow_checks",
            "Sampled early exits re-run at full depth: whether the exit's top-1 agreed with the full depth's",
            [MODEL, "layer", "operating_point", "agree"],
            registry=registry,
        )
        self.shadow_dropped = Counter(
            "lraee_shadow_dropped",
            "Early exits sampled for a shadow check but dropped (queue full)",
            [MODEL],
            registry=registry,
        )
        self.operating_point_promise = Gauge(
            "lraee_operating_point_promise",
            "Agreement with the full-depth top-1 the checkpoint promises per operating point (held-out)",
            [MODEL, "operating_point"],
            registry=registry,
        )
        self.inflight_requests = Gauge(
            "lraee_inflight_requests", "Requests with a body admitted and not yet answered", registry=registry
        )
        self.inflight_bytes = Gauge(
            "lraee_inflight_bytes", "Request body bytes admitted and not yet released", registry=registry
        )
        self.body_timeouts = Counter(
            "lraee_body_timeouts",
            "Request bodies cut off with 408 for arriving too slowly: 'too_slow' (below LRAEE_BODY_MIN_RATE once its "
            "grace was spent), 'preempted' (fallen behind it, its place given to another request)",
            ["reason"],
            registry=registry,
        )
        for reason in TIMEOUT_REASONS:  # both series from the start: a dashboard sees 0, not "no data"
            self.body_timeouts.labels(reason=reason)
        self.model_info = Gauge(
            "lraee_model_info",
            "A served model (value 1): its name, backbone, quant mode and checkpoint id",
            [MODEL, "backbone", "quant_mode", "checkpoint"],
            registry=registry,
        )
        self._text_cache = _TextCacheCollector()
        registry.register(self._text_cache)
        self._promises = _PromiseCollector()
        registry.register(self._promises)

    def for_model(
        self,
        name: str,
        classifier: EarlyExitClassifier,
        *,
        shadow: bool = False,
        promises: PromiseKeeper | None = None,
    ) -> ModelMetrics:
        """Describe a served model and create its exit series at 0, so dashboards see them before traffic (the
        shadow series too when shadow sampling is on: absent series say it is off) and its threshold controllers
        (``promises``, read at scrape time); the observers of its engine."""
        self.model_info.labels(
            model=name,
            backbone=classifier.backbone.config.model_name,  # no weights path: /metrics names no machine path
            quant_mode=classifier.quant_report.mode,
            checkpoint=classifier.checkpoint_id,
        ).set(1)
        for layer in classifier.policy.candidate_layers:
            self.exit_layer.labels(model=name, layer=str(layer))
        self.exit_layer.labels(model=name, layer=FULL_PATH)
        policy = classifier.policy
        for point in policy.operating_points:
            if point.promise is not None:
                self.operating_point_promise.labels(model=name, operating_point=point.name).set(point.promise)
        for point_name in policy.names:
            for path in ("head", FULL_PATH):
                self.answers.labels(model=name, operating_point=point_name, exit_path=path)
            if shadow and point_name != FULL_PATH:
                for layer in policy.candidate_layers:
                    for agree in ("true", "false"):
                        self.shadow_checks.labels(model=name, layer=str(layer), operating_point=point_name, agree=agree)
        if shadow:
            self.shadow_dropped.labels(model=name)
        self.queue_depth.labels(model=name).set(0)
        self._text_cache.stats[name] = lambda: classifier.text_cache.stats
        if promises is not None:
            self._promises.keepers[name] = promises
        return ModelMetrics(self, name)

    def observe_body_timeout(self, reason: TimeoutReason) -> None:
        """One request body cut off for arriving too slowly."""
        self.body_timeouts.labels(reason=reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


class ModelMetrics:
    """The observers of one served model's engine, batcher and shadow sampler (each series labelled with it)."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.metrics = metrics
        self.name = name

    def observe_batch(self, keys: Sequence[WorkKey], seconds: float, results: Sequence[RowResult]) -> None:
        """Record one engine batch (each image's request key) and where each of its classified images left."""
        metrics, name = self.metrics, self.name
        metrics.batch_size.labels(model=name).observe(len(results))
        metrics.inference.labels(model=name).observe(seconds)
        for key, result in zip(keys, results, strict=True):
            if not isinstance(key, BatchKey) or not isinstance(result, ExitResult):
                continue  # an image embedded for /v1/embeddings: counted by observe_embedded
            layer = str(result.exit_layer) if result.exit_path == "head" else FULL_PATH
            metrics.exit_layer.labels(model=name, layer=layer).inc()
            metrics.answers.labels(
                model=name, operating_point=key.question.operating_point, exit_path=result.exit_path
            ).inc()
            metrics.flops_saved.labels(model=name).observe(result.flops_saved)
            metrics.flops_spent.labels(model=name).inc(result.flops)
            metrics.flops_full.labels(model=name).inc(result.flops_full)

    def set_queue_depth(self, depth: int) -> None:
        """Images waiting for this model's engine."""
        self.metrics.queue_depth.labels(model=self.name).set(depth)

    def observe_shadow_check(self, outcome: ShadowOutcome) -> None:
        """One shadow check's outcome (called from the inference worker; prometheus_client is thread-safe)."""
        self.metrics.shadow_checks.labels(
            model=self.name,
            layer=str(outcome.exit_layer),
            operating_point=outcome.operating_point,
            agree=str(outcome.agree).lower(),
        ).inc()

    def shadow_dropped(self) -> None:
        """One sampled early exit dropped (the shadow queue was full)."""
        self.metrics.shadow_dropped.labels(model=self.name).inc()

    def observe_embedded(self, modality: str, count: int) -> None:
        """``count`` inputs of one modality embedded."""
        self.metrics.embedded.labels(model=self.name, modality=modality).inc(count)


class RequestMetricsMiddleware:
    """Counts requests and their latency by route template (not raw path) and status code."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    @staticmethod
    def route_of(scope: Scope) -> str:
        """Template of the route that handled the request, read after routing (the router records the matched
        route in the scope); ``other`` when none did: unknown paths, and requests refused before routing (401)."""
        path = getattr(scope.get("route"), "path", None)
        return path if isinstance(path, str) else OTHER_ROUTE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before starting a response

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = self.route_of(scope)
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.request_duration.labels(route=route).observe(time.perf_counter() - start)
