"""The rows of the benchmark: one callable per way of classifying a batch, and how each is measured.

A row is measured at batch 1 (a pass is a cycle of ``MIX_CYCLE`` single-image calls, so a forced exit mix is
exact) and at batch 32 (a pass is one call). Images/s is images per pass over the median pass time; latency
percentiles come from the single-image calls of every timed pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import open_clip
import torch

from lraee_core.engine import EarlyExitClassifier, ExitResult
from lraee_core.exits import ExitRule

from .baselines import tower_classifier
from .exit_mix import MIX_CYCLE, PAPER_MIX_NOTE, ExitTarget, forced_exits, realized_shares
from .timing import PassTimes, RssProbe, percentile, time_passes, timed_calls
from .under_test import BackboneUnderTest

LARGE_BATCH = 32
Classify = Callable[[torch.Tensor, list[ExitTarget] | None], list[ExitResult] | None]


@dataclass(frozen=True)
class Workload:
    """One row: a way to classify a batch of preprocessed images against the benchmark's label set."""

    key: str  # stable identifier, used in JSON and ratios
    title: str  # what the table prints
    classify: Classify  # (images, forced exits or None) -> per-image results (LRA-EE) or None (baselines)
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
    def classify(images: torch.Tensor, forced: list[ExitTarget] | None) -> list[ExitResult]:
        rule = ExitRule.forced_mix(forced) if forced is not None else options.get("exit_rule")
        rest = {name: value for name, value in options.items() if name != "exit_rule"}
        return engine.classify(images, labels, exit_rule=rule, **rest)

    return classify


def _tower_call(encode: Callable[[torch.Tensor], torch.Tensor], text: torch.Tensor, scale: float) -> Classify:
    classify_tower = tower_classifier(encode, text, scale)

    def classify(images: torch.Tensor, forced: list[ExitTarget] | None) -> None:
        classify_tower(images)

    return classify


def workloads(under_test: BackboneUnderTest, labels: Sequence[str]) -> list[Workload]:
    """Every row of one backbone, baselines first."""
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
            "ONNX Runtime INT8 quantize_dynamic, full depth",
            _tower_call(under_test.ort_tower, text, scale),
        ),
    ]
    own = engines[under_test.own_mode]
    engine_titles = {
        "paper": "LRA-EE torch INT8 paper",
        "full": "LRA-EE torch INT8 full (attention too)",
        "ort-image": "LRA-EE ORT INT8 per-block, per-image scales",
        "ort-batch": "LRA-EE ORT INT8 per-block, per-batch scales",
    }
    reference_of = {mode: f"lraee_{mode.replace('-', '_')}_full_depth" for mode in engine_titles}
    for point in own.policy.names:
        rows.append(
            Workload(
                f"lraee_{under_test.own_mode}_op_{point}",
                f"{engine_titles.get(under_test.own_mode, 'LRA-EE torch FP32')} @ operating point {point!r}",
                _engine_call(own, labels, operating_point=point),
                full_depth_reference=reference_of.get(under_test.own_mode),
            )
        )
    for mode, title in engine_titles.items():
        # Every head evaluated, nobody leaves: the reference that shows what the heads cost (not the `full` rule).
        never = dict.fromkeys(engines[mode].policy.candidate_layers, 1.0)
        rows.append(
            Workload(
                reference_of[mode],
                f"{title}, full depth (thresholds 1.0)",
                _engine_call(engines[mode], labels, exit_rule=ExitRule.from_thresholds(never, "never")),
            )
        )
        if under_test.mix_applies:
            rows.append(
                Workload(
                    f"lraee_{mode.replace('-', '_')}_paper_mix",
                    f"{title}, ASSUMED paper exit mix*",
                    _engine_call(engines[mode], labels),
                    forced_mix=True,
                    full_depth_reference=reference_of[mode],
                    notes=(PAPER_MIX_NOTE,),
                )
            )
    return rows


def _mean_saving(results: list[ExitResult] | None) -> float | None:
    return None if not results else sum(r.flops_saved for r in results) / len(results)


def measure(workload: Workload, images: torch.Tensor, *, warmup: int, repeats: int) -> RowResult:
    """Time ``workload`` at batch 1 and batch 32 on ``images`` [>= 32, 3, H, W]."""
    cycle_targets = forced_exits(MIX_CYCLE) if workload.forced_mix else [None] * MIX_CYCLE
    batch_targets = forced_exits(LARGE_BATCH) if workload.forced_mix else None
    singles = [images[i % images.shape[0]].unsqueeze(0) for i in range(MIX_CYCLE)]
    batch = images[:LARGE_BATCH]
    last_cycle: list[ExitResult] = []

    def cycle_pass() -> list[float]:
        last_cycle.clear()

        def call(index: int) -> Callable[[], None]:
            def run() -> None:
                forced = [cycle_targets[index]] if workload.forced_mix else None
                last_cycle.extend(workload.classify(singles[index], forced) or [])

            return run

        return timed_calls([call(i) for i in range(MIX_CYCLE)])

    batch1: PassTimes = time_passes(cycle_pass, warmup=warmup, repeats=repeats)
    with RssProbe() as probe:
        batch_results = workload.classify(batch, batch_targets)
    batch32 = time_passes(
        lambda: timed_calls([lambda: workload.classify(batch, batch_targets)]),
        warmup=max(0, warmup - 1),
        repeats=repeats,
    )
    shares = None
    if batch_results:
        shares = realized_shares([None if r.exit_path == "full" else r.exit_layer for r in batch_results])
    return RowResult(
        key=workload.key,
        title=workload.title,
        batch1_images_per_s=MIX_CYCLE / batch1.median_pass,
        batch32_images_per_s=LARGE_BATCH / batch32.median_pass,
        latency_p50_ms=percentile(batch1.calls, 50) * 1e3,
        latency_p95_ms=percentile(batch1.calls, 95) * 1e3,
        batch1_pass_s=batch1.passes,
        batch32_pass_s=batch32.passes,
        run_rss_growth_mib=probe.growth_mib,
        flops_saving_batch1=_mean_saving(last_cycle),
        flops_saving_batch32=_mean_saving(batch_results),
        exit_shares_batch32=shares,
        full_depth_reference=workload.full_depth_reference,
        notes=list(workload.notes),
    )
