"""The engine simulated over cached tensors, for every early-exit method the build compares.

Every decision of the ``calibrate`` step is taken on a simulation of :meth:`EarlyExitClassifier.classify` over the
feature cache: candidate layers are visited in ascending order; an image leaves at the first one whose score is
``>=`` the threshold (float32, as torch compares); the answer is that exit's top-1 over the row's label set; images
that never leave get the INT8 full-depth answer. FLOPs are :meth:`lraee_core.flops.FlopsModel.spent` at the row's
K. The ``evaluate`` step checks the simulation against the real engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from lraee_core.config import OperatingPoint
from lraee_core.gate import GateParams

from .features import FeatureStore
from .gate_fit import PAPER_GATE, GateBank
from .heads import VARIANTS, load_heads
from .jobs import Job
from .label_sets import ExitView, exit_view_with_client_rows, label_sets_for, resolve_counts

Scoring = Literal["gate", "confidence"]


@dataclass(frozen=True)
class Method:
    """An early-exit method the report compares: which heads, and what decides an exit."""

    variant: str  # head set (see training.pipeline.heads.VARIANTS)
    scoring: Scoring  # "gate": a learned gate's probability; "confidence": the head's top-1 probability
    gates: str  # which fitted gates: a head set's agreement gates, or "paper" (the 3-feature baseline)
    title: str  # row name in the report


METHODS: dict[str, Method] = {
    "lraee": Method("ssa-embed", "gate", "ssa-embed", "LRA-EE (label-free heads, agreement gate)"),
    "lraee-distilled": Method("ssa-distilled", "gate", "ssa-distilled", "LRA-EE, CE + cosine heads"),
    "lraee-hard": Method("ssa-hard", "gate", "ssa-hard", "LRA-EE, CE-only (hard) heads"),
    "paper": Method("ssa-distilled", "gate", PAPER_GATE, "Paper LRA-EE (CE + cosine heads, 3-feature gate at K=N)"),
    "cls-ee": Method("cls-embed", "gate", "cls-embed", "CLS-EE (label-free [CLS] heads, agreement gate)"),
    "confidence": Method("ssa-embed", "confidence", "ssa-embed", "Confidence-only EE (label-free heads)"),
}


CHECKPOINT_METHOD = "lraee"  # the method LRA-EE names; the checkpoint ships it or CLS-EE (CalibrateConfig.ship)
SHIPPABLE: tuple[str, ...] = ("lraee", "cls-ee")  # label-free heads + agreement gates, SSA or [CLS] pooling


@dataclass(frozen=True)
class Outcome:
    """The simulated engine's answer for every row of a view."""

    exit_layer: np.ndarray  # layer the answer came from; num_layers for the full-depth path
    exited: np.ndarray  # True where an exit head answered
    predictions: np.ndarray  # top-1 label
    agrees: np.ndarray  # prediction == full-depth prediction
    correct: np.ndarray  # prediction == true label
    flops: np.ndarray  # FLOPs spent per row
    full_depth: np.ndarray  # FLOPs of the plain full-depth path per row (its K)
    evaluated: np.ndarray  # exit heads and gates run per row
    reached: dict[int, np.ndarray] = field(default_factory=dict)  # candidate layer -> rows that ran its head

    @property
    def agreement(self) -> float:
        """Share of rows answered as full depth answers."""
        return float(self.agrees.mean()) if len(self.agrees) else 0.0

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy."""
        return float(self.correct.mean()) if len(self.correct) else 0.0

    @property
    def saving(self) -> float:
        """Mean over rows of 1 - FLOPs / full-depth FLOPs (one K: 1 - mean FLOPs / full-depth FLOPs)."""
        return float((1.0 - self.flops / self.full_depth).mean()) if len(self.flops) else 0.0


def per_row(view: ExitView, attribute: str) -> np.ndarray:
    """The FlopsModel figure ``attribute`` of every row of the view, at the row's K."""
    values = np.zeros(view.size, dtype=np.int64)
    for k, model in view.flops.items():
        values[view.counts == k] = getattr(model, attribute)
    return values


def _exits(scores: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """lraee_core.gate.exits on float32 scores: a Python threshold is compared in float32, as torch does; an array
    holds one float32 threshold per row (>= 1.0: the row stays)."""
    if isinstance(threshold, np.ndarray):
        return (threshold < 1.0) & (scores >= threshold)
    if threshold >= 1.0:
        return np.zeros(len(scores), dtype=bool)
    return scores >= np.float32(threshold)


def row_thresholds(
    view: ExitView, layers: Sequence[int], point: OperatingPoint
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Each row's float32 threshold at every layer of ``layers`` under ``point`` at the row's own K
    (:meth:`lraee_core.config.OperatingPoint.thresholds_at`, the engine's own function), and which rows run heads
    at all (not above the point's label cap)."""
    thresholds = {layer: np.ones(view.size, dtype=np.float32) for layer in layers}
    heads_run = np.zeros(view.size, dtype=bool)
    for count in np.unique(view.counts).tolist():
        rows = view.counts == count
        at_count = point.thresholds_at(int(count))
        if at_count is None:
            continue
        heads_run[rows] = True
        for layer in layers:
            thresholds[layer][rows] = np.float32(at_count.get(layer, 1.0))
    return thresholds, heads_run


def simulate(
    view: ExitView,
    layers: Sequence[int],
    scores: dict[int, np.ndarray],
    thresholds: Sequence[float] | OperatingPoint,
    label_cap: int | None = None,
) -> Outcome:
    """Mirror of EarlyExitClassifier.classify over ``layers`` (ascending): with per-layer ``thresholds`` for every
    row, rows whose K is above ``label_cap`` running no head (lraee_core.exits, ``ExitRule.for_labels``); or with
    an operating point, each row at its own K's thresholds and the point's own cap."""
    any_model = next(iter(view.flops.values()))
    if isinstance(thresholds, OperatingPoint):
        per_layer, heads_run = row_thresholds(view, layers, thresholds)
        layer_thresholds: list[float | np.ndarray] = [per_layer[layer] for layer in layers]
    else:
        heads_run = np.ones(view.size, dtype=bool) if label_cap is None else view.counts <= label_cap
        layer_thresholds = list(thresholds)
    alive = np.ones(view.size, dtype=bool)
    exit_layer = np.full(view.size, any_model.num_layers)
    predictions = view.full_top1.copy()
    evaluated = np.zeros(view.size, dtype=np.int64)
    reached_at = {}  # layer -> rows that ran its head and gate
    for layer, threshold in zip(layers, layer_thresholds, strict=True):
        reached = alive & heads_run
        evaluated[reached] += 1
        reached_at[layer] = reached
        leave = reached & _exits(scores[layer], threshold)
        exit_layer[leave] = layer
        predictions[leave] = view.top1[layer][leave]
        alive &= ~leave
    # FlopsModel.spent, vectorised: blocks run + one head and gate per candidate reached + the final path if taken.
    spent = (
        any_model.embed
        + exit_layer.astype(np.int64) * any_model.block
        + evaluated * (per_row(view, "head") + per_row(view, "gate"))
        + np.where(alive, per_row(view, "final"), 0)
    )
    return Outcome(
        exit_layer=exit_layer,
        exited=~alive,
        predictions=predictions,
        agrees=predictions == view.full_top1,
        correct=predictions == view.truth,
        flops=spent,
        full_depth=per_row(view, "full_depth"),
        evaluated=evaluated,
        reached=reached_at,
    )


def full_outcome(view: ExitView, fp32: bool = False) -> Outcome:
    """The `full` rule (no head evaluated) on the INT8 tower, or the FP32 tower's full-depth answer."""
    any_model = next(iter(view.flops.values()))
    predictions = view.fp32_top1 if fp32 else view.full_top1
    full_depth = per_row(view, "full_depth")
    return Outcome(
        exit_layer=np.full(view.size, any_model.num_layers),
        exited=np.zeros(view.size, dtype=bool),
        predictions=predictions,
        agrees=predictions == view.full_top1,
        correct=predictions == view.truth,
        flops=full_depth,
        full_depth=full_depth,
        evaluated=np.zeros(view.size, dtype=np.int64),
    )


def exit_shares(outcome: Outcome, layers: Sequence[int], rows: np.ndarray | None = None) -> dict[str, float]:
    """Share of rows answered at each candidate layer, and on the full-depth path ("full")."""
    exited, exit_layer = outcome.exited, outcome.exit_layer
    if rows is not None:
        exited, exit_layer = exited[rows], exit_layer[rows]
    size = max(1, len(exited))
    shares = {str(layer): float((exited & (exit_layer == layer)).sum()) / size for layer in layers}
    shares["full"] = float((~exited).sum()) / size
    return shares


def by_label_count(outcome: Outcome, view: ExitView, layers: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Agreement, top-1, FLOPs saved and exit shares of an outcome at each K of the view ("K" -> figures; word label
    sets apart, "words-K")."""
    figures = {}
    block = per_row(view, "block")  # what a head's time is charged in (search.py)
    for key, rows in view.groups().items():
        count = int(rows.sum())
        agreement = float(outcome.agrees[rows].mean())
        figures[key] = {
            "rows": count,
            "agreement": agreement,
            "agreement_se": math.sqrt(max(agreement * (1 - agreement), 0.0) / max(1, count)),
            "top1": float(outcome.correct[rows].mean()),
            "flops_saved": float(1.0 - outcome.flops[rows].mean() / outcome.full_depth[rows][0]),
            # heads and gates run per image, in blocks' FLOPs over the full depth's (what search.py charges)
            "heads_in_blocks": float((outcome.evaluated[rows] * block[rows]).mean() / outcome.full_depth[rows][0]),
            "block_share": float(block[rows][0] / outcome.full_depth[rows][0]),  # one block over the full depth
            # per candidate layer: the share of rows that ran its head and gate (per-layer charges, search.py)
            "reached": {str(layer): float(reached[rows].mean()) for layer, reached in outcome.reached.items()},
            "exit_shares": exit_shares(outcome, layers, rows),
        }
    return figures


def method_scores(view: ExitView, method: Method, bank: GateBank, layers: Sequence[int]) -> dict[int, np.ndarray]:
    """Exit score per row at each layer of a candidate subset: gate probability (float32) or confidence."""
    if method.scoring == "confidence":
        return {layer: view.features[layer]["confidence"] for layer in layers}
    gates: dict[int, GateParams] = bank.for_layers(layers)
    scores = {}
    for index, layer in enumerate(layers):
        previous = layers[index - 1] if index > 0 else None
        features = torch.from_numpy(view.feature_matrix(gates[layer].features, layer, previous))
        scores[layer] = gates[layer].probability(features).float().numpy()
    return scores


def sweep_view(
    store: FeatureStore,
    job: Job,
    split: str,
    variant: str,
    counts: Sequence[int],
    repeats: int,
    seed: int,
    word_counts: Sequence[int] = (),
    words_only: bool = False,
) -> ExitView:
    """A head set's view of a split: ``repeats`` label sets per image at each K of ``counts`` (0: every label),
    then, when the build has word sets, ``repeats`` word label sets per image at each K of ``word_counts``. With
    ``words_only`` the class-name sets are drawn (the word sets follow their draws) but the view holds the word rows
    alone."""
    _, heads = load_heads(job.step_dir("train-heads"), variant)
    truth = store.load(split, ["labels"])["labels"].numpy()
    ks = resolve_counts(counts, len(store.labels))
    rng = np.random.default_rng(seed)
    sets = label_sets_for(truth, len(store.labels), ks, repeats, rng)
    hidden = job.config.heads.hidden_dim or store.shape.width
    pooling = VARIANTS[variant].pooling
    chosen = None if words_only else sets
    return exit_view_with_client_rows(store, split, heads, pooling, chosen, hidden, word_counts, repeats, rng)
