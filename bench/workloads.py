"""The rows of the benchmark: one callable per way of classifying a batch, and how each is measured.

A row is measured at batch 1 (a pass is a cycle of ``MIX_CYCLE`` single-image calls, so a forced exit mix is
exact) and at batch 32 (a pass is one call). Images/s is images per pass over the median pass time; latency
percentiles come from the single-image calls of every timed pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import open_clip
import torch

from lraee_core.config import FULL_OPERATING_POINT
from lraee_core.engine import EarlyExitClassifier, ExitResult
from lraee_core.exits import ExitRule

from .baselines import tower_classifier
from .exit_mix import MIX_CYCLE, PAPER_MIX_NOTE, ExitTarget, forced_exits, realized_shares
from .timing import PassTimes, RssProbe, percentile
from .under_test import SERVICE_ENGINE, BackboneUnderTest

LARGE_BATCH = 32
FEW_LABELS = 5  # labels per image of the "few labels" rows: the image's class and 4 others, drawn per image
# (images, forced exits or None, the images' indices in the bench's batch) -> results (LRA-EE rows) or None
Classify = Callable[[torch.Tensor, list[ExitTarget] | None, list[int]], list[ExitResult] | None]


@dataclass(frozen=True)
class Workload:
    """One row: a way to classify a batch of preprocessed images against the benchmark's label set."""

    key: str  # stable identifier, used in JSON and ratios
    title: str  # what the table prints
    classify: Classify  # (images, forced exits or None, image indices) -> per-image results (LRA-EE) or None
    forced_mix: bool = False  # feed the paper's exit mix as forced exits
    full_depth_reference: str | None = None  # key of the same engine at full depth (early-exit efficiency)
    notes: tuple[str, ...] = ()  # kept with the row in the JSON


@dataclass
class RowResult:
    """Medians of one row. Images/s = images per pass / median pass seconds."""

    key: str
    title: str
    batch1_images_per_s: float
    batch32_images_per_s: float
    latency_p50_ms: float  # batch-1 calls
    latency_p95_ms: float
    batch1_pass_s: list[float]  # the timed passes behind batch1_images_per_s (each MIX_CYCLE calls)
    batch32_pass_s: list[float]  # the timed passes behind batch32_images_per_s (each one call)
    run_rss_growth_mib: float | None  # resident memory a batch-32 call needed on top of what was loaded
    flops_saving_batch1: float | None = None  # mean engine-reported saving over the batch-1 cycle (LRA-EE rows)
    flops_saving_batch32: float | None = None  # the same over the batch of 32
    exit_shares_batch32: dict[str, float] | None = None  # where the 32 images left (layer or "full")
    full_depth_reference: str | None = None
    notes: list[str] = field(default_factory=list)


def imagenet_labels(count: int) -> list[str]:
    """The first ``count`` of open_clip's ImageNet-1k class names, made unique.

    open_clip's list names two classes twice ("missile", "sunglasses") and the engine refuses duplicate labels, so
    a repeated name gets its class index appended; the set keeps its size and its prompts' lengths.
    """
    labels: list[str] = []
    seen: set[str] = set()
    for index, name in enumerate(open_clip.IMAGENET_CLASSNAMES[:count]):
        labels.append(name if name not in seen else f"{name} {index}")
        seen.add(name)
    return labels


def _engine_call(engine: EarlyExitClassifier, labels: Sequence[str], **options: Any) -> Classify:
    def classify(images: torch.Tensor, forced: list[ExitTarget] | None, indices: list[int]) -> list[ExitResult]:
        rule = ExitRule.forced_mix(forced) if forced is not None else options.get("exit_rule")
        rest = {name: value for name, value in options.items() if name != "exit_rule"}
        return engine.classify(images, labels, exit_rule=rule, **rest)

    return classify


def _engine_rows_call(
    engine: EarlyExitClassifier, label_sets: Sequence[Sequence[str]], exit_rule: ExitRule | None = None
) -> Classify:
    """Image i against its own ``label_sets[i]`` (one request per image, as clients send them), at the default
    operating point or under ``exit_rule``: each call builds its rows' queries, as ``classify`` does."""

    def classify(images: torch.Tensor, forced: list[ExitTarget] | None, indices: list[int]) -> list[ExitResult]:
        queries = [engine.query(label_sets[index], exit_rule=exit_rule) for index in indices]
        return engine.classify_rows(images, queries)

    return classify


def few_label_sets(labels: Sequence[str], classes: Sequence[int], count: int = FEW_LABELS) -> list[list[str]]:
    """Per image: its class and ``count`` - 1 other labels, drawn with a fixed seed, in a shuffled order."""
    rng = np.random.default_rng(0)
    sets = []
    for truth in classes:
        others = rng.choice([i for i in range(len(labels)) if i != truth], size=count - 1, replace=False)
        chosen = [int(truth), *(int(i) for i in others)]
        rng.shuffle(chosen)
        sets.append([labels[i] for i in chosen])
    return sets


def _tower_call(encode: Callable[[torch.Tensor], torch.Tensor], text: torch.Tensor, scale: float) -> Classify:
    classify_tower = tower_classifier(encode, text, scale)

    def classify(images: torch.Tensor, forced: list[ExitTarget] | None, indices: list[int]) -> None:
        classify_tower(images)

    return classify


# What each LRA-EE engine of BackboneUnderTest.engines is, as the tables print it.
ENGINE_TITLES = {
    SERVICE_ENGINE: "LRA-EE {backend} {mode} (the service's engine)",
    "torch-paper": "LRA-EE torch INT8 paper (per-image scales: a loop over images)",
    "torch-full": "LRA-EE torch INT8 full (attention too; a loop over images)",
    "static": "LRA-EE torch INT8 static (W8A8, fixed calibrated scales)",
    "ort-full": "LRA-EE onnxruntime INT8 full (attention too), per-image scales",
    "ort-full-batch": "LRA-EE onnxruntime INT8 full, per-BATCH scales (not batch-invariant; diagnosis)",
}


# Engines whose paper-mix rows get a full-depth reference row (early-exit efficiency) on ViT-B-32.
MIX_REFERENCE_ENGINES = (SERVICE_ENGINE, "ort-full", "static")


def row_key(engine: str, what: str) -> str:
    """``lraee_<engine>_<what>``, e.g. ``lraee_service_paper_mix``."""
    return f"lraee_{engine.replace('-', '_')}_{what}"


def workloads(
    under_test: BackboneUnderTest, labels: Sequence[str], classes: Sequence[int] | None = None
) -> list[Workload]:
    """Every row of one backbone, baselines first: the service's engine at each operating point (trained
    checkpoints), the torch engine at the default one, and every engine at full depth and under the paper mix.
    With the images' ``classes`` (indices into ``labels``), a trained checkpoint's service engine also runs each
    image against :data:`FEW_LABELS` labels of its own (:func:`few_label_sets`), at the default point and at full
    depth: where its exits are taken (a label cap may send larger label sets the full way)."""
    engines = under_test.engines
    fp32 = under_test.fp32
    text = engines["none"].text_embeddings(labels)  # fills the shared cache if it is cold
    scale = fp32.logit_scale
    rows = [
        Workload(
            "openclip_fp32",
            "open_clip FP32, full depth (encode_image + logits)",
            _tower_call(fp32.model.encode_image, text, scale),
        ),
        Workload(
            "torch_int8",
            "torch INT8 quantize_dynamic (paper mode), full depth",
            _tower_call(under_test.torch_int8_tower, text, scale),
        ),
        Workload(
            "ort_int8",
            "ONNX Runtime INT8 quantize_dynamic (every matmul, per-batch scales), full depth",
            _tower_call(under_test.ort_tower, text, scale),
        ),
    ]
    service = engines[SERVICE_ENGINE]
    measured = [name for name in ENGINE_TITLES if name in engines]
    titles = dict(ENGINE_TITLES)
    titles[SERVICE_ENGINE] = titles[SERVICE_ENGINE].format(backend=under_test.service_backend, mode=under_test.own_mode)
    if not under_test.mix_applies:  # a trained checkpoint: its operating points are what users run
        default = service.policy.default_operating_point
        for point in service.policy.names:
            if point == FULL_OPERATING_POINT:  # the same rule as the full-depth row below
                continue
            rows.append(
                Workload(
                    row_key(SERVICE_ENGINE, f"op_{point}"),
                    f"{titles[SERVICE_ENGINE]} @ operating point {point!r}"
                    + (" (default)" if point == default else ""),
                    _engine_call(service, labels, operating_point=point),
                    full_depth_reference=row_key(SERVICE_ENGINE, "full_depth"),
                )
            )
        for name in measured:
            if name != SERVICE_ENGINE:
                rows.append(
                    Workload(
                        row_key(name, f"op_{default}"),
                        f"{titles[name]} @ operating point {default!r} (default)",
                        _engine_call(engines[name], labels, operating_point=default),
                        full_depth_reference=row_key(name, "full_depth"),
                    )
                )
    for name in measured:
        # ViT-B-32's passes take seconds, so its diagnosis engines get the mix row only.
        with_reference = not under_test.mix_applies or name in MIX_REFERENCE_ENGINES
        if not with_reference:
            rows.append(_paper_mix_row(name, titles[name], engines[name], labels, reference=None))
            continue
        # The plain full-depth CLIP path (the `full` rule: no heads), the path each image's flops_saved is measured
        # against, so time saved and FLOPs saved share their reference.
        rows.append(
            Workload(
                row_key(name, "full_depth"),
                f"{titles[name]}, full depth (`full` rule: no heads)",
                _engine_call(engines[name], labels, exit_rule=ExitRule.full()),
            )
        )
        if name == SERVICE_ENGINE and not under_test.mix_applies:
            # Every head evaluated, nobody leaves: beside the row above, what the heads and gates cost in time.
            never = dict.fromkeys(engines[name].policy.candidate_layers, 1.0)
            rows.append(
                Workload(
                    row_key(name, "heads_no_exit"),
                    f"{titles[name]}, every head and gate evaluated, nobody leaves (thresholds 1.0)",
                    _engine_call(engines[name], labels, exit_rule=ExitRule.from_thresholds(never, "never")),
                    full_depth_reference=row_key(name, "full_depth"),
                )
            )
        if under_test.mix_applies:
            rows.append(_paper_mix_row(name, titles[name], engines[name], labels, row_key(name, "full_depth")))
    if classes is not None and not under_test.mix_applies:
        sets = few_label_sets(labels, classes)
        default = service.policy.default_operating_point
        few = f"{FEW_LABELS} labels per image (its class and {FEW_LABELS - 1} others of the {len(labels)})"
        rows += [
            Workload(
                row_key(SERVICE_ENGINE, f"few_labels_op_{default}"),
                f"{titles[SERVICE_ENGINE]} @ operating point {default!r} (default), {few}",
                _engine_rows_call(service, sets),
                full_depth_reference=row_key(SERVICE_ENGINE, "few_labels_full_depth"),
            ),
            Workload(
                row_key(SERVICE_ENGINE, "few_labels_full_depth"),
                f"{titles[SERVICE_ENGINE]}, full depth (`full` rule: no heads), {few}",
                _engine_rows_call(service, sets, ExitRule.full()),
            ),
        ]
    return rows


def _paper_mix_row(
    name: str, title: str, engine: EarlyExitClassifier, labels: Sequence[str], reference: str | None
) -> Workload:
    """An engine under the forced, ASSUMED paper exit mix; ``reference``: its full-depth row, if it has one."""
    return Workload(
        row_key(name, "paper_mix"),
        f"{title}, ASSUMED paper exit mix*",
        _engine_call(engine, labels),
        forced_mix=True,
        full_depth_reference=reference,
        notes=(PAPER_MIX_NOTE,),
    )


def _mean_saving(results: list[ExitResult] | None) -> float | None:
    return None if not results else sum(r.flops_saved for r in results) / len(results)


class _Row:
    """One workload's state while the rows are timed in interleaved rounds."""

    def __init__(self, workload: Workload, images: torch.Tensor) -> None:
        self.workload = workload
        self.cycle_targets = forced_exits(MIX_CYCLE) if workload.forced_mix else [None] * MIX_CYCLE
        self.batch_targets = forced_exits(LARGE_BATCH) if workload.forced_mix else None
        self.indices = [i % images.shape[0] for i in range(MIX_CYCLE)]  # the image of each batch-1 call
        self.singles = [images[i].unsqueeze(0) for i in self.indices]
        self.batch = images[:LARGE_BATCH]
        self.batch_indices = list(range(self.batch.shape[0]))
        self.batch1 = PassTimes()
        self.batch32 = PassTimes()
        self.last_cycle: list[ExitResult] = []
        self.batch_results: list[ExitResult] | None = None
        self.rss_growth_mib: float | None = None

    def cycle(self) -> list[float]:
        """One batch-1 pass: MIX_CYCLE single-image calls; returns each call's seconds."""
        self.last_cycle.clear()
        seconds = []
        for index, single in enumerate(self.singles):
            forced = [self.cycle_targets[index]] if self.workload.forced_mix else None
            start = time.perf_counter()
            results = self.workload.classify(single, forced, [self.indices[index]])
            seconds.append(time.perf_counter() - start)
            self.last_cycle.extend(results or [])
        return seconds

    def batch_call(self) -> list[float]:
        """One batch-32 pass: one call."""
        start = time.perf_counter()
        self.workload.classify(self.batch, self.batch_targets, self.batch_indices)
        return [time.perf_counter() - start]

    def warm_up(self, passes: int) -> None:
        """Untimed calls: ``passes`` single-image calls and batch calls (the first also measures the resident
        memory a batch needs). A call, not a whole cycle: every lazy set-up happens on the first call."""
        for index in range(passes):
            forced = [self.cycle_targets[index % MIX_CYCLE]] if self.workload.forced_mix else None
            self.workload.classify(self.singles[index % MIX_CYCLE], forced, [self.indices[index % MIX_CYCLE]])
        with RssProbe() as probe:
            self.batch_results = self.workload.classify(self.batch, self.batch_targets, self.batch_indices)
        self.rss_growth_mib = probe.growth_mib
        for _ in range(max(0, passes - 1)):
            self.batch_call()

    def result(self) -> RowResult:
        shares = None
        if self.batch_results:
            shares = realized_shares([None if r.exit_path == "full" else r.exit_layer for r in self.batch_results])
        return RowResult(
            key=self.workload.key,
            title=self.workload.title,
            batch1_images_per_s=MIX_CYCLE / self.batch1.median_pass,
            batch32_images_per_s=LARGE_BATCH / self.batch32.median_pass,
            latency_p50_ms=percentile(self.batch1.calls, 50) * 1e3,
            latency_p95_ms=percentile(self.batch1.calls, 95) * 1e3,
            batch1_pass_s=self.batch1.passes,
            batch32_pass_s=self.batch32.passes,
            run_rss_growth_mib=self.rss_growth_mib,
            flops_saving_batch1=_mean_saving(self.last_cycle),
            flops_saving_batch32=_mean_saving(self.batch_results),
            exit_shares_batch32=shares,
            full_depth_reference=self.workload.full_depth_reference,
            notes=list(self.workload.notes),
        )


def measure_interleaved(
    rows: Sequence[Workload],
    images: torch.Tensor,
    *,
    warmup: int,
    repeats: int,
    progress: Callable[[str], None] | None = None,
) -> list[RowResult]:
    """Time every row at batch 1 and batch 32 on ``images`` [>= 32, 3, H, W] in ``repeats`` interleaved rounds.

    Each round times one batch-1 pass and one batch-32 pass of every row in turn, so a stretch of load from other
    processes on this shared machine hits every row alike instead of one row's whole measurement: the medians and
    the per-round comparisons (early-exit efficiency) then compare like with like.
    """
    states = [_Row(workload, images) for workload in rows]
    for state in states:
        if progress is not None:
            progress(f"warm-up: {state.workload.title}")
        state.warm_up(warmup)
    for round_index in range(repeats):
        if progress is not None:
            progress(f"round {round_index + 1}/{repeats}")
        for state in states:
            _time_pass(state.batch1, state.cycle)
            _time_pass(state.batch32, state.batch_call)
    return [state.result() for state in states]


def _time_pass(times: PassTimes, run_pass: Callable[[], list[float]]) -> None:
    start = time.perf_counter()
    calls = run_pass()
    times.passes.append(time.perf_counter() - start)
    times.calls.extend(calls)
