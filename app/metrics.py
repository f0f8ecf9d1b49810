"""Prometheus metrics: one registry per app (tests build many apps), conventional names, bounded label values.

Label values stay bounded: ``route`` is a route template or ``other``, ``status`` an HTTP status code, ``layer`` a
candidate layer or ``full``, ``operating_point`` one of the checkpoint's (``full`` included), ``agree`` true/false.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lraee_core.engine import EarlyExitClassifier, ExitResult
from lraee_core.text import CacheStats

from .service import BatchKey

OTHER_ROUTE = "other"  # label of requests that match no route (404s, scanners): keeps the label set bounded
FULL_PATH = "full"  # exit-layer label of the full-depth CLIP path
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
FLOPS_SAVED_BUCKETS = (-0.1, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # < 0: heads cost > blocks skipped
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _TextCacheCollector(Collector):
    """Reads the engine's cumulative cache counters at scrape time, so they can never drift from the engine's."""

    def __init__(self) -> None:
        self.stats: Callable[[], CacheStats] | None = None

    def collect(self) -> Iterable[Metric]:
        stats = self.stats() if self.stats is not None else CacheStats()
        yield CounterMetricFamily(
            "lraee_text_cache_hits", "Labels whose text embedding came from the cache", value=stats.hits
        )
        yield CounterMetricFamily(
            "lraee_text_cache_misses", "Labels whose text embedding had to be encoded", value=stats.misses
        )


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
            "lraee_inference_seconds", "Engine time per batch", buckets=INFERENCE_BUCKETS, registry=registry
        )
        self.exit_layer = Counter(
            "lraee_exit_layer",
            "Images answered per exit: the candidate layer whose head answered, or 'full' for the full-depth path",
            ["layer"],
            registry=registry,
        )
        self.flops_saved = Histogram(
            "lraee_flops_saved_ratio",
            "Per-image fraction of full-depth FLOPs saved (heads and gates included)",
            buckets=FLOPS_SAVED_BUCKETS,
            registry=registry,
        )
        # Compute-weighted saving = 1 - rate(lraee_flops_total) / rate(lraee_flops_full_total); the histogram above
        # has a negative bucket (heads can cost more than they save), so it carries no usable _sum.
        self.flops_spent = Counter("lraee_flops", "FLOPs spent on images, heads and gates included", registry=registry)
        self.flops_full = Counter(
            "lraee_flops_full", "FLOPs the same images would have cost at full depth", registry=registry
        )
        self.batch_size = Histogram(
            "lraee_batch_size", "Images per engine batch", buckets=BATCH_SIZE_BUCKETS, registry=registry
        )
        self.queue_depth = Gauge("lraee_queue_depth", "Images waiting for the engine", registry=registry)
        self.answers = Counter(
            "lraee_answers",
            "Images answered per operating point and exit path ('head': an exit head, 'full': the full depth)",
            ["operating_point", "exit_path"],
            registry=registry,
        )
        self.shadow_checks = Counter(
            "lraee_shadow_checks",
            "Sampled early exits re-run at full depth: whether the exit's top-1 agreed with the full depth's",
            ["layer", "operating_point", "agree"],
            registry=registry,
        )
        self.shadow_dropped = Counter(
            "lraee_shadow_dropped", "Early exits sampled for a shadow check but dropped (queue full)", registry=registry
        )
        self.operating_point_promise = Gauge(
            "lraee_operating_point_promise",
            "Agreement with the full-depth top-1 the checkpoint promises per operating point (held-out)",
            ["operating_point"],
            registry=registry,
        )
        self.inflight_requests = Gauge(
            "lraee_inflight_requests", "Requests with a body admitted and not yet answered", registry=registry
        )
        self.inflight_bytes = Gauge(
            "lraee_inflight_bytes", "Request body bytes admitted and not yet released", registry=registry
        )
        self.model_info = Gauge(
            "lraee_model_info",
            "The loaded model (value 1)",
            ["backbone", "quant_mode", "checkpoint"],
            registry=registry,
        )
        self._text_cache = _TextCacheCollector()
        registry.register(self._text_cache)

    def bind_model(self, classifier: EarlyExitClassifier, *, shadow: bool = False) -> None:
        """Describe the loaded model and create every exit series at 0, so dashboards see them before traffic
        (the shadow series too when shadow sampling is on: absent series say it is off)."""
        self.model_info.labels(
            backbone=classifier.backbone.config.model_name,  # no weights path: /metrics names no machine path
            quant_mode=classifier.quant_report.mode,
            checkpoint=classifier.checkpoint_id,
        ).set(1)
        for layer in classifier.policy.candidate_layers:
            self.exit_layer.labels(layer=str(layer))
        self.exit_layer.labels(layer=FULL_PATH)
        policy = classifier.policy
        for point in policy.operating_points:
            if point.promise is not None:
                self.operating_point_promise.labels(operating_point=point.name).set(point.promise)
        for name in policy.names:
            for path in ("head", FULL_PATH):
                self.answers.labels(operating_point=name, exit_path=path)
            if shadow and name != FULL_PATH:
                for layer in policy.candidate_layers:
                    for agree in ("true", "false"):
                        self.shadow_checks.labels(layer=str(layer), operating_point=name, agree=agree)
        self._text_cache.stats = lambda: classifier.text_cache.stats

    def observe_shadow_check(self, layer: int, operating_point: str, agree: bool) -> None:
        """One shadow check's outcome (called from the inference worker; prometheus_client is thread-safe)."""
        self.shadow_checks.labels(layer=str(layer), operating_point=operating_point, agree=str(agree).lower()).inc()

    def observe_batch(self, keys: Sequence[Hashable], seconds: float, results: Sequence[ExitResult]) -> None:
        """Record one engine batch (each image's request key) and where each of its images left."""
        self.batch_size.observe(len(results))
        self.inference.observe(seconds)
        for key, result in zip(keys, results, strict=True):
            self.exit_layer.labels(layer=str(result.exit_layer) if result.exit_path == "head" else FULL_PATH).inc()
            if isinstance(key, BatchKey):
                self.answers.labels(operating_point=key.operating_point, exit_path=result.exit_path).inc()
            self.flops_saved.observe(result.flops_saved)
            self.flops_spent.inc(result.flops)
            self.flops_full.inc(result.flops_full)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


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
