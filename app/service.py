"""The loaded model as the service sees it: loading with actionable errors, warm-up, request validation against
the checkpoint (labels, templates, operating points, the prompt budget), resolving a request's text embeddings
before it joins the inference queue (from the cache at once, or on the text worker when labels are new), the
blocking batch call the inference worker makes, and the summary ``GET /model`` shows. Knows nothing of HTTP
transport; raises the service's errors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lraee_core.assets import EMBEDDED_CHECKPOINTS
from lraee_core.backends import BackendOptions
from lraee_core.checkpoint import MANIFEST, load_classifier
from lraee_core.config import FULL_OPERATING_POINT
from lraee_core.engine import EarlyExitClassifier, ExitResult, LabelQuery
from lraee_core.errors import InputError, LraeeError
from lraee_core.exits import ExitRule
from lraee_core.manifest import portable_paths
from lraee_core.promises import PromiseKeeper
from lraee_core.text import validate_labels, validate_templates

from .errors import InvalidInput, StartupError
from .schemas import (
    ClassifyOptions,
    ClassifyResponse,
    ModelEntry,
    ModelSummary,
    OperatingPointOut,
    PredictionOut,
    PrunedLayerOut,
)
from .schemas import Timing as TimingOut
from .settings import MAX_TEMPLATES, Settings
from .text_worker import TextWorker

log = logging.getLogger(__name__)

WARM_UP_LABELS = ("a photo",)
COMPACT_FIGURES = ("agreement", "flops_saved", "rows")  # per label count in GET /model's compact summary


@dataclass(frozen=True)
class Question:
    """A request's text side and options, validated once against the limits and the checkpoint
    (:meth:`ModelService.question`); nothing after this checks them again."""

    labels: tuple[str, ...]  # stripped, unique, in request order
    templates: tuple[str, ...]  # the request's, or the checkpoint's default templates
    operating_point: str  # resolved name (never None)
    rule: ExitRule = field(compare=False, repr=False)  # the point's rule for this label count
    top_k: int  # predictions wanted, 1..len(labels)


@dataclass(frozen=True, eq=False)
class BatchKey:
    """What rides with each image of a request through the inference queue: its question and each label's text
    embedding, resolved before the request may join the queue (the inference worker stacks them and never encodes).
    Requests with different keys share engine batches; the engine answers each image against its own key."""

    question: Question
    text_rows: tuple[torch.Tensor, ...]  # each label's FP16 unit text embedding [E], in label order


@dataclass(frozen=True, eq=False)
class EmbeddingKey:
    """What rides with each image of a ``/v1/embeddings`` request: nothing to classify, the image's unit full-depth
    embedding is the answer. Its images share engine batches with classified ones."""


# A queued image's key and what the inference worker answers for it: an ExitResult for a BatchKey, the unit
# full-depth embedding [E] float32 for an EmbeddingKey.
WorkKey = BatchKey | EmbeddingKey
RowResult = ExitResult | torch.Tensor


def served_name(path: Path, checkpoint_id: str) -> str:
    """How requests name a checkpoint: an embedded one by its embedded name (``everyday``), any other by its
    manifest's checkpoint id."""
    for name, directory in EMBEDDED_CHECKPOINTS.items():
        if path.resolve() == directory.resolve():
            return name
    return checkpoint_id


class ModelService:
    """An :class:`EarlyExitClassifier` plus the service's limits, served under ``name``."""

    def __init__(
        self,
        classifier: EarlyExitClassifier,
        settings: Settings,
        name: str | None = None,
        *,
        path: Path | None = None,
        weights: Path | None = None,
    ) -> None:
        self.classifier = classifier
        self.settings = settings
        self.name = name if name is not None else classifier.checkpoint_id  # what requests call it
        self.path = path  # the checkpoint directory it was loaded from (None: built in memory)
        self.weights = weights  # the local backbone weights it was loaded with (None: the checkpoint's own)
        self.text_worker = TextWorker(capacity=settings.text_queue_capacity)
        # The threshold controllers (None: the calibrated thresholds always); see :meth:`keep_promises`.
        self.promises: PromiseKeeper | None = None
        if settings.max_labels > classifier.max_labels:
            raise StartupError(
                f"LRAEE_MAX_LABELS={settings.max_labels} exceeds the engine's limit of {classifier.max_labels}"
            )

    @classmethod
    def load(cls, settings: Settings, path: Path, *, weights: Path | None = None) -> ModelService:
        """Load the checkpoint at ``path`` (blocking; ``weights``: a local copy of its backbone weights);
        :class:`StartupError` says what to fix."""
        if not (path / MANIFEST).is_file():
            raise StartupError(
                f"no LRA-EE checkpoint at {path} ({MANIFEST} not found). Set LRAEE_CHECKPOINT to a checkpoint "
                "directory (manifest.json + heads.safetensors), e.g. one written by `lraee-train`."
            )
        if weights is not None and not weights.is_file():
            raise StartupError(f"LRAEE_BACKBONE_WEIGHTS={weights} is not a file")
        try:
            classifier = load_classifier(
                path,
                weights=str(weights) if weights is not None else None,
                backend=settings.backend,
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
        return cls(classifier, settings, served_name(path, classifier.checkpoint_id), path=path, weights=weights)

    def keep_promises(self) -> PromiseKeeper:
        """Start controlling this model's thresholds (lraee_core/promises.py): from now on requests follow the
        controllers' rules, which start at the calibrated ones."""
        classifier = self.classifier
        self.promises = PromiseKeeper(
            classifier.policy, lambda point, count: classifier.exit_rule(point).for_labels(count), name=self.name
        )
        return self.promises

    def rule(self, operating_point: str, count: int) -> ExitRule:
        """The rule a request at ``operating_point`` with ``count`` labels follows now (the controllers' when they
        run, else the calibrated one)."""
        if self.promises is not None:
            return self.promises.rule(operating_point, count)
        return self.classifier.exit_rule(operating_point).for_labels(count)

    def observe_answers(self, keys: Sequence[WorkKey], results: Sequence[RowResult]) -> None:
        """Tell the controllers where a finished batch's classified images left (on the event loop; no torch)."""
        if self.promises is None:
            return
        self.promises.observe_answers(
            (key.question.operating_point, len(key.question.labels), key.question.rule, result.exit_path == "head")
            for key, result in zip(keys, results, strict=True)
            if isinstance(key, BatchKey) and isinstance(result, ExitResult)
        )

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

    def question(self, options: ClassifyOptions) -> Question:
        """Validate a request's text side and options against the limits and the checkpoint, once: the labels,
        the templates (the checkpoint's defaults when none), the prompt budget, the operating point (its rule for
        this label count) and ``top_k``."""
        settings = self.settings
        try:
            labels = validate_labels(options.labels, settings.max_labels, settings.max_label_chars)
        except InputError as exc:
            raise InvalidInput(str(exc), code="invalid_labels") from exc
        templates = self.classifier.default_templates
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
        prompts = len(labels) * len(templates)
        if prompts > settings.max_prompts:
            raise InvalidInput(
                f"{len(labels)} labels x {len(templates)} templates = {prompts} prompts; "
                f"the limit is {settings.max_prompts}",
                code="invalid_templates" if options.templates is not None else "invalid_labels",
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
        rule = self.rule(operating_point, len(labels))
        return Question(labels, templates, operating_point, rule, min(options.top_k, len(labels)))

    def cached_key(self, question: Question) -> BatchKey | None:
        """``question`` with its text embeddings when every label is in the cache (no waiting, no torch op on the
        event loop), else None."""
        rows = self.classifier.text_cache.lookup_rows(question.labels, question.templates)
        return None if rows is None else BatchKey(question, rows)

    async def encoded_key(self, question: Question) -> BatchKey:
        """``question`` with its text embeddings encoded on the text worker (what the cache lacks;
        :class:`TextQueueFull` when the worker's queue is full), for a question :meth:`cached_key` could not answer."""
        return BatchKey(question, await self.text_worker.run(self._encode, question))

    def _encode(self, question: Question) -> tuple[torch.Tensor, ...]:
        """Encode (what the cache lacks of) a label set; runs on the text worker."""
        return tuple(self.classifier.text_cache.get(question.labels, question.templates).unbind(0))

    @staticmethod
    def _label_query(key: BatchKey, rule: ExitRule | None = None) -> LabelQuery:
        """The engine's form of a key (on the inference worker): its validated question with its embeddings
        stacked [K, E]; ``rule`` replaces the question's."""
        question = key.question
        return LabelQuery(question.labels, torch.stack(key.text_rows), rule or question.rule, question.top_k)

    def run_batch(self, keys: Sequence[WorkKey], images: torch.Tensor) -> list[RowResult]:
        """One engine batch, each image against its own request's key (blocking; the batcher's worker thread makes
        it): the classified images in one engine call, the images to embed in one more."""
        classified = [row for row, key in enumerate(keys) if isinstance(key, BatchKey)]
        results: list[RowResult] = []
        if len(classified) == len(keys):
            results.extend(self._classify(keys, images))
            return results
        answers: dict[int, RowResult] = {}
        if classified:
            results_of_classified = self._classify([keys[row] for row in classified], images[torch.tensor(classified)])
            answers.update(zip(classified, results_of_classified, strict=True))
        embedded = [row for row in range(len(keys)) if row not in answers]
        vectors = self.classifier.embed_images(images[torch.tensor(embedded)])  # [n, E]
        answers.update(zip(embedded, vectors.unbind(0), strict=True))
        return [answers[row] for row in range(len(keys))]

    def _classify(self, keys: Sequence[WorkKey], images: torch.Tensor) -> list[ExitResult]:
        queries: dict[int, LabelQuery] = {}
        for key in keys:
            assert isinstance(key, BatchKey)  # run_batch hands only classified rows here
            if id(key) not in queries:
                queries[id(key)] = self._label_query(key)
        try:
            return self.classifier.classify_rows(images, [queries[id(key)] for key in keys])
        except InputError as exc:  # question() checks all of this first; kept so a gap is a 422, not a 500
            raise InvalidInput(str(exc)) from exc

    async def embed_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """Unit text embeddings [N, E] float32 of ``texts`` as given (no template), with each text's token count
        (its start and end tokens included, at most CLIP's context), encoded on the text worker
        (:class:`TextQueueFull` when its queue is full)."""
        return await self.text_worker.run(self._embed_texts, texts)

    def _embed_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        tokens = self.classifier.backbone.tokenizer(list(texts))  # [N, context], 0-padded
        counts = (tokens != 0).sum(dim=-1).tolist()
        return self.classifier.embed_texts(texts), counts

    def run_full_depth(self, key: BatchKey, images: torch.Tensor) -> list[ExitResult]:
        """``key``'s label set at full depth, no exit heads run (shadow checks; blocking, on the worker thread).
        Uses the key's resolved text embeddings, so a check never encodes labels on the inference worker."""
        query = self._label_query(key, ExitRule.full())
        return self.classifier.classify_rows(images, [query] * images.shape[0])

    def close(self) -> None:
        """Stop the text worker (queued encodings are dropped)."""
        self.text_worker.close()

    def response(self, result: ExitResult, question: Question, timing: TimingOut) -> ClassifyResponse:
        """The API's view of one engine result for ``question``."""
        return ClassifyResponse(
            predictions=[PredictionOut(label=p.label, score=p.score) for p in result.predictions[: question.top_k]],
            exit_layer=result.exit_layer,
            num_layers=result.num_layers,
            exited_early=result.exited_early,
            exit_path=result.exit_path,
            gate_probability=result.gate_probability,
            flops=result.flops / 1e9,
            flops_saved=result.flops_saved,
            operating_point=question.operating_point,
            model=self.name,
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
                thresholds={
                    str(count): {str(layer): value for layer, value in sorted(thresholds.items())}
                    for count, thresholds in point.by_label_count
                },
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

    def entry(self, *, default: bool) -> ModelEntry:
        """This model in ``GET /models``."""
        classifier = self.classifier
        return ModelEntry(
            model=self.name,
            default=default,
            checkpoint_id=classifier.checkpoint_id,
            backbone=classifier.backbone.config.model_name,
            quant_mode=classifier.quant_report.mode,
            embedding_dimensions=classifier.backbone.shape.embed_dim,
            operating_points=list(classifier.policy.names),
            default_operating_point=classifier.policy.default_operating_point,
        )

    def summary(self, *, full: bool = False) -> ModelSummary:
        """Manifest summary for ``GET /model``; ``full`` adds the whole manifest and every measured figure."""
        classifier = self.classifier
        manifest = classifier.manifest
        policy = classifier.policy
        settings = self.settings
        return ModelSummary(
            model=self.name,
            checkpoint_id=classifier.checkpoint_id,
            backbone=classifier.backbone.config.model_name,
            backbone_source=self._backbone_source(),
            quant_mode=classifier.quant_report.mode,
            quantized_modules=len(classifier.quant_report.converted),
            num_layers=classifier.num_layers,
            image_size=classifier.backbone.shape.image_size,
            embedding_dimensions=classifier.backbone.shape.embed_dim,
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
                portable_paths(manifest.to_json(), {} if self.path is None else {"checkpoint": str(self.path)})
                if full and manifest is not None
                else None
            ),
        )

    def _backbone_source(self) -> str:
        """Where the backbone's weights came from, without a directory of this machine."""
        if self.weights is not None:
            return f"{self.weights.name} (the backbone_weights setting)"
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
