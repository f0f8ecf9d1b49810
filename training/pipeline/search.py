"""The searches of the ``calibrate`` step: layer pruning, candidate layers, and each operating point's threshold.

**Operating points are promises.** ``accurate``, ``balanced`` and ``fast`` each promise a share of images whose
answer equals the full-depth answer (agreement: 99%, 97%, 93% by default), for the client's own labels at any
label count. Each point is one shared gate threshold t (an image leaves at the first candidate layer whose gate
probability reaches t): the lowest t, among ``threshold_candidates`` quantiles of the calib split's gate scores, at
which the calib split's agreement clears the promise by ``promise_margin`` standard errors at *every* K of
``label_counts`` (label sets drawn per image: the true class plus K - 1 others), and, when the build has word sets,
on every "words-K" and "group-NAME" key too (:mod:`training.pipeline.label_sets`). A one-dimensional search per
point is too small to fit noise; the report then measures the same thresholds on the evaluation split.

**Pruning.** A cached layer ``l`` is pruned when ``INR_l < prune_fraction x mean(INR of layers l-1 and l+1)``
(neighbouring *layers*: a noise spike is a property of the block against the blocks around it). If every candidate
were pruned, the one with the highest INR is kept.

**Candidate selection.** Every subset of the unpruned cached layers with 1..``max_candidates`` layers gets the
default point's threshold as above; the subset with the largest mean calib saving over the K values wins (ties:
fewer layers, each of which costs a head and a gate). Baseline methods get the same treatment.

**Label caps.** Exits grow rarer as the label set grows (the gate is less sure among more labels), while every image
still pays for the heads and gates it runs. Each point therefore gets a *label cap*: the largest K of
``label_counts`` up to which every K's saving (below) is positive at the point's threshold. A request with more
labels runs no head or gate and gets the full-depth answer (lraee_core.exits, ``ExitRule.for_labels``); between two
calibrated K values the cap keeps the smaller, measured one. No cap when every K pays; a cap of 1 when even the
smallest does not. The cap is part of what each threshold is judged by: the figures, the promise check and the
objective of a threshold are those of its capped engine (rows above the cap answer as full depth, at no head cost).
Only the random label-set keys set the cap; word and class-group rows follow it by their own K.

**What a saving is.** FLOPs saved, less ``head_cost_blocks`` blocks' worth of FLOPs for every head and gate an image
runs (mean over the K values: the search's *objective*). With ``head_cost_blocks`` 0 it is the FLOPs saving, where a
head and a gate cost a fraction of a block. Where they are served as one more graph call of dozens of small ops, as
on the tiny default at batch 1, their time is more than a block's, and an exit that cannot pay for itself in time
(after block 11 of 12, say) is worth keeping only by FLOPs; the charge lets the search see that. The threshold of
every point maximises the same objective among the thresholds that keep its promise; reports show FLOPs saved.

Every figure comes from the simulation of :mod:`training.pipeline.simulate`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from lraee_core.checkpoint import PrunedLayer

from .config import CalibrateConfig
from .gate_fit import GateBank
from .label_sets import ExitView
from .simulate import Method, by_label_count, method_scores, simulate

OPERATING_POINTS: tuple[str, ...] = ("accurate", "balanced", "fast")


@dataclass(frozen=True)
class PointSetting:
    """One operating point's chosen threshold and its calibration figures."""

    threshold: float  # shared gate threshold of every candidate layer
    promise: float  # agreement promised
    promise_met: bool  # False only when even t = 1.0 (no exits) falls short, which cannot happen on agreement
    mean_saving: float  # calib FLOPs saving averaged over K
    objective: float  # what the search maximised: mean_saving less the charge for heads (module docstring)
    calibration: dict[str, dict[str, Any]]  # K -> calib figures (of the capped engine)
    label_cap: int | None = None  # the point's label cap (module docstring); None: none


def promises(config: CalibrateConfig) -> dict[str, float]:
    """Operating point name -> promised agreement with full depth."""
    return {"accurate": config.accurate_promise, "balanced": config.balanced_promise, "fast": config.fast_promise}


def candidate_thresholds(scores: dict[int, np.ndarray], count: int) -> np.ndarray:
    """``count`` quantiles of the scores (float32 values the engine could see) plus 1.0, ascending and unique."""
    pooled = np.concatenate(list(scores.values())).astype(np.float64)
    quantiles = np.quantile(pooled, np.linspace(0.0, 1.0, max(2, count))) if len(pooled) else np.array([])
    return np.unique(np.concatenate([quantiles.astype(np.float32).astype(np.float64), [1.0]]))


def saving(figures: dict[str, Any], config: CalibrateConfig) -> float:
    """One K's FLOPs saving less ``head_cost_blocks`` blocks per head and gate run."""
    return float(figures["flops_saved"] - config.head_cost_blocks * figures["heads_in_blocks"])


def objective(figures: dict[str, dict[str, Any]], config: CalibrateConfig) -> float:
    """Mean over the K values of :func:`saving`."""
    return float(np.mean([saving(f, config) for f in figures.values()]))


def label_cap(figures: dict[str, dict[str, Any]], config: CalibrateConfig) -> int | None:
    """The largest random-label-set K up to which every K's :func:`saving` is positive (module docstring); None when
    every K pays, 1 when the smallest does not."""
    counts = sorted(int(key) for key in figures if key.isdigit())
    cap = None
    for count in counts:
        if saving(figures[str(count)], config) <= 0.0:
            return cap if cap is not None else 1
        cap = count
    return None


def capped_figures(
    view: ExitView, layers: Sequence[int], scores: dict[int, np.ndarray], threshold: float, config: CalibrateConfig
) -> tuple[dict[str, dict[str, Any]], int | None]:
    """The calib figures per K of one shared threshold under its label cap, and the cap (None without caps)."""
    thresholds = [threshold] * len(layers)
    figures = by_label_count(simulate(view, layers, scores, thresholds), view, layers)
    cap = label_cap(figures, config) if config.label_caps else None
    if cap is None:
        return figures, None
    return by_label_count(simulate(view, layers, scores, thresholds, label_cap=cap), view, layers), cap


def _feasible(figures: dict[str, dict[str, Any]], promise: float, margin: float) -> bool:
    return all(f["agreement"] - margin * f["agreement_se"] >= promise for f in figures.values())


def search_point(
    view: ExitView,
    layers: Sequence[int],
    scores: dict[int, np.ndarray],
    promise: float,
    config: CalibrateConfig,
    thresholds: np.ndarray | None = None,
) -> PointSetting:
    """The lowest shared threshold whose calib agreement keeps the promise at every K (module docstring)."""
    if thresholds is None:
        thresholds = candidate_thresholds(scores, config.threshold_candidates)
    best: PointSetting | None = None
    for threshold in thresholds[::-1]:  # from no exits down; agreement only falls as more images leave
        figures, cap = capped_figures(view, layers, scores, float(threshold), config)
        if not _feasible(figures, promise, config.promise_margin):
            break
        mean_saving = float(np.mean([f["flops_saved"] for f in figures.values()]))
        value = objective(figures, config)
        if best is None or value > best.objective:
            best = PointSetting(float(threshold), promise, True, mean_saving, value, figures, cap)
    if best is None:  # unreachable in practice: t = 1.0 answers every row as full depth does
        figures, cap = capped_figures(view, layers, scores, 1.0, config)
        mean_saving = float(np.mean([f["flops_saved"] for f in figures.values()]))
        best = PointSetting(1.0, promise, False, mean_saving, objective(figures, config), figures, cap)
    return best


@dataclass(frozen=True)
class Selection:
    """The chosen candidate layers of one method and their operating points."""

    layers: tuple[int, ...]  # chosen candidate layers, ascending
    points: dict[str, PointSetting]  # operating point name -> setting
    ranking: list[dict[str, Any]]  # the best few subsets tried, best first


def select_candidates(
    view: ExitView, method: Method, bank: GateBank, pool: Sequence[int], config: CalibrateConfig, desc: str = ""
) -> Selection:
    """Search every subset of ``pool`` with up to ``max_candidates`` layers; keep the best (module docstring)."""
    subsets = [
        subset
        for size in range(1, min(config.max_candidates, len(pool)) + 1)
        for subset in itertools.combinations(pool, size)
    ]
    default_promise = promises(config)[config.default_operating_point]
    tried = []
    for subset in tqdm(subsets, desc=f"candidates {desc}".strip(), leave=False):
        scores = method_scores(view, method, bank, subset)
        setting = search_point(view, subset, scores, default_promise, config)
        tried.append((round(setting.objective, 9), -len(subset), subset, setting.threshold, setting.mean_saving))
    tried.sort(key=lambda entry: entry[:2], reverse=True)
    layers = tuple(tried[0][2])
    scores = method_scores(view, method, bank, layers)
    points = {name: search_point(view, layers, scores, promise, config) for name, promise in promises(config).items()}
    ranking = [
        {"layers": list(subset), "objective": value, "mean_saving": saving, "threshold": threshold}
        for value, _, subset, threshold, saving in tried[:10]
    ]
    return Selection(layers=layers, points=points, ranking=ranking)


def prune_layers(
    inr: dict[int, float], candidates: Sequence[int], fraction: float
) -> tuple[tuple[int, ...], tuple[PrunedLayer, ...]]:
    """(kept, pruned) candidates under the neighbour-INR rule of the module docstring; ``inr`` covers 1..L."""
    pruned = []
    for layer in candidates:
        neighbours = [n for n in (layer - 1, layer + 1) if n in inr]
        if fraction <= 0 or not neighbours:
            continue
        reference = float(np.mean([inr[n] for n in neighbours]))
        if inr[layer] < fraction * reference:
            reason = (
                f"INR {inr[layer]:.4g} < {fraction:g} x {reference:.4g}, the mean INR of layers "
                f"{' and '.join(map(str, neighbours))}"
            )
            pruned.append(PrunedLayer(layer=layer, inr=float(inr[layer]), reason=reason))
    kept = tuple(layer for layer in candidates if layer not in {p.layer for p in pruned})
    if not kept:
        survivor = max(candidates, key=lambda layer: inr[layer])
        kept = (survivor,)
        pruned = [p for p in pruned if p.layer != survivor]
    return kept, tuple(pruned)
