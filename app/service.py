"""The loaded model as the service sees it: loading with actionable errors, warm-up, request validation against
the checkpoint (labels, templates, operating points, the prompt budget), resolving a request's text embeddings
before it joins the inference queue (from the cache at once, or on the text worker when labels are new), the
blocking batch call the inference worker makes, and the summary ``GET /model`` shows. Knows nothing of HTTP
transport; raises the service's errors.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lraee_core.backends import BackendOptions, auto_backend
from lraee_core.checkpoint import MANIFEST, load_classifier, read_manifest
from lraee_core.config import FULL_OPERATING_POINT
from lraee_core.engine import EarlyExitClassifier, ExitResult, LabelQuery
from lraee_core.errors import InputError, LraeeError
from lraee_core.exits import ExitRule
from lraee_core.manifest import portable_paths
from lraee_core.text import validate_labels, validate_templates

from .errors import InvalidInput, StartupError
from .schemas import ClassifyOptions, ClassifyResponse, ModelSummary, OperatingPointOut, PredictionOut, PrunedLayerOut
from .schemas import Timing as TimingOut
from .settings import MAX_TEMPLATES, Settings
from .text_worker import TextWorker

log = logging.getLogger(__name__)

WARM_UP_LABELS = ("a photo",)
COMPACT_FIGURES = ("agreement", "flops_saved", "rows")  # per label count in GET /model's compact summary


@dataclass(frozen=True)
class BatchKey:
    """A request's question: its text side and thresholds. Requests with different keys share engine batches; the
    engine answers each image against its own key."""

    labels: tuple[str, ...]  # validated, stripped, in request order
    templates: tuple[str, ...] | None  # None: the engine's default templates
    operating_point: str  # resolved name (never None)
    # Each label's text embedding [E], once resolved (ModelService.resolve_text): the inference worker stacks them
    # and never encodes. Left out of equality and hashing, which stay those of the three fields above.
    text_rows: tuple[torch.Tensor, ...] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Query:
    """A validated request: its batch key and how many predictions it wants."""

    key: BatchKey
    top_k: int


class ModelService:
    """An :class:`EarlyExitClassifier` plus the service's limits."""

    def __init__(self, classifier: EarlyExitClassifier, settings: Settings) -> None:
        self.classifier = classifier
        self.settings = settings
        self.text_worker = TextWorker(capacity=settings.text_queue_capacity)
        if settings.max_labels > classifier.max_labels:
            raise StartupError(
                f"LRAEE_MAX_LABELS={settings.max_labels} exceeds the engine's limit of {classifier.max_labels}"
            )

    @classmethod
    def load(cls, settings: Settings) -> ModelService:
        """Load the configured checkpoint (blocking); :class:`StartupError` says what to fix."""
        path = settings.checkpoint
        if not (path / MANIFEST).is_file():
            raise StartupError(
                f"no LRA-EE checkpoint at {path} ({MANIFEST} not found). Set LRAEE_CHECKPOINT to a checkpoint "
                "directory (manifest.json + heads.safetensors), e.g. one written by `lraee-train`."
            )
        weights = settings.backbone_weights
        if weights is not None and not weights.is_file():
            raise StartupError(f"LRAEE_BACKBONE_WEIGHTS={weights} is not a file")
        try:
            backend = auto_backend(read_manifest(path).quant_mode) if settings.backend == "auto" else settings.backend
            classifier = load_classifier(
                path,
                weights=str(weights) if weights is not None else None,
                backend=backend,
                backend_options=BackendOptions(threads=settings.threads),
                text_cache_capacity=settings.text_cache_size,
                cache_dir=str(settings.open_clip_cache_dir) if settings.open_clip_cache_dir is not None else None,
            )
        except LraeeError as exc:
            raise StartupError(f"cannot load the checkpoint LRAEE_CHECKPOINT={path}: {exc}") from exc
        log.info(
            "loaded checkpoint %s: %s, quant %s (%d modules), candidate layers %s",
            classifier.checkpoint_id,
            classifier.backbone.name,
            classifier.quant_report.mode,
            len(classifier.quant_report.converted),
            list(classifier.policy.candidate_layers),
        )
        return cls(classifier, settings)

    def preprocess(self, image: Image.Image) -> Any:
        """The backbone's own transform: RGB PIL image -> [3, H, W] tensor."""
        return self.classifier.backbone.preprocess(image)

    def warm_up(self) -> None:
        """A grey image through every stage (blocking), so the first request pays no lazy initialisation: past every
        candidate head without leaving (each span a backend compiles, with its head) and at `full`, alone and in a
        batch of four (a backend may keep other sessions for small calls)."""
        classifier = self.classifier
        size = classifier.backbone.shape.image_size
        image = self.preprocess(Image.new("RGB", (size, size), (128, 128, 128))).unsqueeze(0)
        stay = ExitRule.from_thresholds({layer: 1.0 for layer in classifier.policy.candidate_layers}, name="warm-up")
        for batch in (image, image.expand(4, -1, -1, -1)):
            for rule in (stay, ExitRule.full()):
                classifier.classify(batch, WARM_UP_LABELS, top_k=1, exit_rule=rule)

    def prepare(self, options: ClassifyOptions) -> Query:
        """Validate a request's text side and options against the limits and the checkpoint."""
        settings = self.settings
        try:
            labels = validate_labels(options.labels, settings.max_labels, settings.max_label_chars)
        except InputError as exc:
            raise InvalidInput(str(exc), code="invalid_labels") from exc
        templates = None
        if options.templates is not None:
            if len(options.templates) > MAX_TEMPLATES:
                raise InvalidInput(
                    f"too many templates: {len(options.templates)} > {MAX_TEMPLATES}", code="invalid_templates"
                )
            if any(len(template) > settings.max_label_chars for template in options.templates):
                raise InvalidInput(
                    f"templates must be at most {settings.max_label_chars} characters", code="invalid_templates"
                )
            try:
                templates = validate_templates(options.templates)
            except InputError as exc:
                raise InvalidInput(str(exc), code="invalid_templates") from exc
        prompts = len(labels) * len(templates if templates is not None else self.classifier.default_templates)
        if prompts > settings.max_prompts:
            raise InvalidInput(
                f"{len(labels)} labels x {prompts // len(labels)} templates = {prompts} prompts; "
                f"the limit is {settings.max_prompts}",
                code="invalid_templates" if templates is not None else "invalid_labels",
            )
        policy = self.classifier.policy
        operating_point = options.operating_point or policy.default_operating_point
        if operating_point not in policy.names:
            raise InvalidInput(
                f"unknown operating point {operating_point!r}; this model has {list(policy.names)}",
                code="unknown_operating_point",
            )
        if not 1 <= options.top_k <= settings.max_labels:
            raise InvalidInput(f"top_k must be between 1 and {settings.max_labels}", code="invalid_top_k")
        return Query(BatchKey(labels, templates, operating_point), options.top_k)

    def with_cached_text(self, query: Query) -> Query | None:
        """``query`` with its text embeddings when every label is in the cache (no waiting, no torch op on the
        event loop), else None."""
        rows = self.classifier.cached_text_rows(query.key.labels, query.key.templates)
        return None if rows is None else replace(query, key=replace(query.key, text_rows=rows))

    async def resolve_text(self, query: Query) -> Query:
        """``query`` with its text embeddings resolved, before it may join the inference queue: from the cache at
        once when every label is there, else encoded on the text worker (:class:`TextQueueFull` when its queue is
        full). The inference worker never encodes a request's labels."""
        cached = self.with_cached_text(query)
        if cached is not None:
            return cached
        rows = await self.text_worker.run(self._encode, query.key)
        return replace(query, key=replace(query.key, text_rows=rows))

    def _encode(self, key: BatchKey) -> tuple[torch.Tensor, ...]:
        """Encode (what the cache lacks of) a label set; runs on the text worker."""
        return tuple(self.classifier.text_embeddings(key.labels, key.templates).unbind(0))

    def _question(self, key: BatchKey, top_k: int, rule: ExitRule | None = None) -> LabelQuery:
        """The engine's form of a key (on the inference worker): its resolved embeddings stacked, or, for a key
        that skipped :meth:`resolve_text`, the cache's."""
        text = torch.stack(key.text_rows) if key.text_rows is not None else None
        return self.classifier.query(
            key.labels,
            templates=key.templates,
            operating_point=key.operating_point,
            top_k=top_k,
            exit_rule=rule,
            text=text,
        )

    def run_batch(self, keys: Sequence[Hashable], images: torch.Tensor, top_ks: Sequence[int]) -> list[ExitResult]:
        """One engine call, each image against its own request's key (blocking; the batcher's worker thread makes
        it)."""
        questions: dict[int, LabelQuery] = {}
        try:
            for key, top_k in zip(keys, top_ks, strict=True):
                assert isinstance(key, BatchKey)
                if id(key) not in questions:
                    questions[id(key)] = self._question(key, top_k)
            return self.classifier.classify_rows(images, [questions[id(key)] for key in keys])
        except InputError as exc:  # prepare() checks all of this first; kept so a gap is a 422, not a 500
            raise InvalidInput(str(exc)) from exc

    def run_full_depth(self, key: BatchKey, images: torch.Tensor) -> list[ExitResult]:
        """``key``'s label set at full depth, no exit heads run (shadow checks; blocking, on the worker thread).
        Uses the key's resolved text embeddings, so a check never encodes labels on the inference worker."""
        query = self._question(key, 1, ExitRule.full())
        return self.classifier.classify_rows(images, [query] * images.shape[0])

    def close(self) -> None:
        """Stop the text worker (queued encodings are dropped)."""
        self.text_worker.close()

    def response(self, result: ExitResult, *, top_k: int, operating_point: str, timing: TimingOut) -> ClassifyResponse:
        """The API's view of one engine result (predictions cut to this request's ``top_k``)."""
        return ClassifyResponse(
            predictions=[PredictionOut(label=p.label, score=p.score) for p in result.predictions[:top_k]],
            exit_layer=result.exit_layer,
            num_layers=result.num_layers,
            exited_early=result.exited_early,
            exit_path=result.exit_path,
            gate_probability=result.gate_probability,
            flops=result.flops / 1e9,
            flops_saved=result.flops_saved,
            operating_point=operating_point,
            model=self.classifier.checkpoint_id,
            timing_ms=timing,
        )

    def _operating_points(self, full: bool) -> dict[str, OperatingPointOut]:
        """Stored points with their promises and held-out (validation) figures per label count, then the built-in
        ``full``; unless ``full``, each label count keeps only its agreement, FLOPs saved and rows."""
        policy = self.classifier.policy
        manifest = self.classifier.manifest
        held_out = manifest.metrics.get("held_out", {}) if manifest is not None else {}
        measured = held_out.get("operating_points", {})
        if not full:
            measured = {
                point: {k: {name: f[name] for name in COMPACT_FIGURES if name in f} for k, f in per_k.items()}
                for point, per_k in measured.items()
            }
        points = {
            point.name: OperatingPointOut(
                thresholds={str(layer): value for layer, value in sorted(point.thresholds.items())},
                promise=point.promise,
                label_cap=point.label_cap,
                held_out=measured.get(point.name),
            )
            for point in policy.operating_points
        }
        points[FULL_OPERATING_POINT] = OperatingPointOut(
            thresholds={}, promise=1.0, held_out=measured.get(FULL_OPERATING_POINT)
        )
        return points

    def summary(self, *, full: bool = False) -> ModelSummary:
        """Manifest summary for ``GET /model``; ``full`` adds the whole manifest and every measured figure."""
        classifier = self.classifier
        manifest = classifier.manifest
        policy = classifier.policy
        settings = self.settings
        return ModelSummary(
            model=classifier.checkpoint_id,
            backbone=classifier.backbone.config.model_name,
            backbone_source=self._backbone_source(),
            quant_mode=classifier.quant_report.mode,
            quantized_modules=len(classifier.quant_report.converted),
            num_layers=classifier.num_layers,
            image_size=classifier.backbone.shape.image_size,
            exit_heads=classifier.head_config.pooling,
            candidate_layers=list(policy.candidate_layers),
            pruned_layers=[
                PrunedLayerOut(layer=p.layer, inr=p.inr, reason=p.reason)
                for p in (manifest.pruned_layers if manifest is not None else ())
            ],
            operating_points=self._operating_points(full),
            default_operating_point=policy.default_operating_point,
            default_templates=list(classifier.default_templates),
            limits={
                "max_labels": settings.max_labels,
                "max_label_chars": settings.max_label_chars,
                "max_templates": MAX_TEMPLATES,
                "max_prompts": settings.max_prompts,
                "max_batch_images": settings.max_batch_images,
                "max_upload_bytes": settings.max_upload_bytes,
                "max_image_pixels": settings.max_image_pixels,
            },
            manifest=(
                portable_paths(manifest.to_json(), {"checkpoint": str(settings.checkpoint)})
                if full and manifest is not None
                else None
            ),
        )

    def _backbone_source(self) -> str:
        """Where the backbone's weights came from, without a directory of this machine."""
        if self.settings.backbone_weights is not None:
            return f"{self.settings.backbone_weights.name} (the backbone_weights setting)"
        manifest = self.classifier.manifest
        if manifest is None:
            return "unknown"
        ref = manifest.backbone
        if ref.pretrained_kind == "random" or ref.pretrained is None:
            return f"random init (seed {ref.random_init_seed})"
        if ref.pretrained_kind == "file":
            inside = not Path(ref.pretrained).is_absolute()
            return Path(ref.pretrained).name + (" (in the checkpoint)" if inside else "")
        return ref.pretrained  # an open_clip pretrained tag
