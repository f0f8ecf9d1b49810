"""The searches of the ``calibrate`` step: layer pruning, candidate layers, and each operating point's thresholds.

**Operating points are promises, kept at every label count.** ``accurate``, ``balanced`` and ``fast`` each promise a
share of images whose answer equals the full-depth answer (agreement: 99%, 97%, 93% by default), for the client's
own labels at any label count K. A request's K is known before its image runs, so each point holds one threshold
per calibrated K (every label count the calibration asks: ``label_counts`` and the K of every word set and class
group, so that no calibration row sits between two calibrated counts; shared by the candidate layers: an image
leaves at the first candidate layer whose gate probability reaches it), and the engine interpolates between
calibrated counts (:meth:`lraee_core.config.OperatingPoint.thresholds_at`: linear in log K). The search goes up
the calibrated K: at each, among ``threshold_candidates`` quantiles of the calib gate scores, the threshold that
maximises the objective (below) on the keys of that K, among those at which the calib split's agreement clears the
promise by ``promise_margin`` standard errors on every such key: the random label sets of that K (true class +
K - 1 others), and, when the build has word sets, the "words-K" and "group-NAME" keys of that K
(:mod:`training.pipeline.label_sets`). So no single worst K sets every
threshold, and each K's threshold is a one-dimensional search, too small to fit noise; the report then measures
the same thresholds on the evaluation split.

**Pruning.** A cached layer ``l`` is pruned when ``INR_l < prune_fraction x mean(INR of layers l-1 and l+1)``
(neighbouring *layers*: a noise spike is a property of the block against the blocks around it). If every candidate
were pruned, the one with the highest INR is kept.

**Candidate selection.** Every subset of the unpruned cached layers with 1..``max_candidates`` layers gets the
default point's thresholds as above; the subset with the largest objective wins (ties: fewer layers, each of which
costs a head and a gate). Baseline methods get the same treatment.

**Label caps.** Exits grow rarer as the label set grows, while every image still pays for the heads and gates it
runs. A calibrated K whose best threshold saves less than the heads cost (its objective is not positive) keeps that
best threshold when a larger K pays (one awkward label set, a small class group say, must not switch the exits off
for every larger request); the point's label cap is the largest calibrated K that pays, and a request with more
labels runs no head or gate and gets the full-depth answer (lraee_core.exits, ``ExitRule.for_labels``). When no K
pays, the cap is 1. Above the largest calibrated K nothing was measured, so the cap is at most that K.
``label_caps=False`` keeps every K's thresholds instead.

**What a saving is.** FLOPs saved, less each candidate layer's *charge* for every row that ran its head and gate, in
blocks' worth of FLOPs. The charge is what running that candidate costs in time on the service's backend (its head,
its gate and the span split it causes), in blocks: measured per layer by the build (``calibrate.charge =
"measured"``, :mod:`training.pipeline.head_cost`) or one constant ``head_cost_blocks`` for every layer. With a charge
of 0 the saving is the FLOPs saving, where a head and a gate cost a fraction of a block. Where they are served as one
more graph call of small ops, as on the tiny default at batch 1, they cost far more time than FLOPs, and an exit that
cannot pay for itself in time is worth keeping only by FLOPs; the charge lets the search see that. The *objective*
is the mean saving over the figures' keys; reports show FLOPs saved.

Every figure comes from the simulation of :mod:`training.pipeline.simulate`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from lraee_core.checkpoint import PrunedLayer
from lraee_core.config import OperatingPoint

from .config import CalibrateConfig
from .gate_fit import GateBank
from .label_sets import ExitView
from .simulate import Method, by_label_count, method_scores, simulate
from .simulate import per_row as per_row_figure

OPERATING_POINTS: tuple[str, ...] = ("accurate", "balanced", "fast")


Curve = tuple[tuple[int, float], ...]  # (K, shared threshold of every candidate layer) at each calibrated K


@dataclass(frozen=True)
class PointSetting:
    """One operating point's chosen thresholds (per calibrated K) and its calibration figures."""

    thresholds: Curve  # (K, shared gate threshold of every candidate layer) at each calibrated K, K ascending
    promise: float  # agreement promised
    promise_met: bool  # False only when even t = 1.0 (no exits) falls short, which cannot happen on agreement
    mean_saving: float  # calib FLOPs saving averaged over the figures' keys
    objective: float  # what the search maximised: mean_saving less the charge for heads (module docstring)
    calibration: dict[str, dict[str, Any]]  # key (K, words-K, group-NAME) -> calib figures
    label_cap: int | None = None  # the point's label cap (module docstring); None: none

    def operating_point(self, name: str, layers: Sequence[int]) -> OperatingPoint:
        """The engine's record of this setting on candidate ``layers``."""
        return curve_point(name, layers, self.thresholds, self.promise, self.label_cap)


def curve_point(
    name: str,
    layers: Sequence[int],
    curve: Sequence[Sequence[float]],
    promise: float | None = None,
    label_cap: int | None = None,
) -> OperatingPoint:
    """An operating point whose layers share one threshold per calibrated K (``curve``: (K, threshold) pairs, as
    :class:`PointSetting` holds them and ``calibration.json`` records them)."""
    by_count = tuple((int(count), dict.fromkeys(layers, float(threshold))) for count, threshold in curve)
    return OperatingPoint(name, by_count, promise, label_cap)


def recorded_point(name: str, layers: Sequence[int], record: Mapping[str, Any]) -> OperatingPoint:
    """A point from its ``calibration.json`` record (``dataclasses.asdict`` of a :class:`PointSetting`)."""
    return curve_point(name, layers, record["thresholds"], record.get("promise"), record.get("label_cap"))


def promises(config: CalibrateConfig) -> dict[str, float]:
    """Operating point name -> promised agreement with full depth."""
    return {"accurate": config.accurate_promise, "balanced": config.balanced_promise, "fast": config.fast_promise}


def candidate_thresholds(scores: dict[int, np.ndarray], count: int) -> np.ndarray:
    """``count`` quantiles of the scores (float32 values the engine could see) plus 1.0, ascending and unique."""
    pooled = np.concatenate(list(scores.values())).astype(np.float64)
    quantiles = np.quantile(pooled, np.linspace(0.0, 1.0, max(2, count))) if len(pooled) else np.array([])
    return np.unique(np.concatenate([quantiles.astype(np.float32).astype(np.float64), [1.0]]))


Charges = Mapping[int, float]  # candidate layer -> what running its head and gate costs, in blocks of time


def uniform_charges(config: CalibrateConfig, layers: Sequence[int]) -> dict[int, float]:
    """Every layer charged ``head_cost_blocks``."""
    return dict.fromkeys(layers, config.head_cost_blocks)


def saving(figures: dict[str, Any], charges: Charges) -> float:
    """One key's FLOPs saving less each candidate's charge (in blocks) for every row that ran its head and gate."""
    reached = figures.get("reached", {})
    charged = sum(charges.get(int(layer), 0.0) * share for layer, share in reached.items())
    return float(figures["flops_saved"] - charged * figures["block_share"])


def objective(figures: dict[str, dict[str, Any]], charges: Charges) -> float:
    """Mean over the keys of :func:`saving`."""
    return float(np.mean([saving(f, charges) for f in figures.values()])) if figures else 0.0


def _feasible(figures: dict[str, dict[str, Any]], promise: float, margin: float) -> bool:
    return all(f["agreement"] - margin * f["agreement_se"] >= promise for f in figures.values())


def _key_counts(view: ExitView) -> dict[str, int]:
    """Each figures key's label count (every key's rows share one K)."""
    return {key: int(view.counts[rows][0]) for key, rows in view.groups().items()}


def search_point(
    view: ExitView,
    layers: Sequence[int],
    scores: dict[int, np.ndarray],
    promise: float,
    config: CalibrateConfig,
    charges: Charges | None = None,
    thresholds: np.ndarray | None = None,
) -> PointSetting:
    """Thresholds per calibrated K that keep the promise (module docstring), searched K by K upward: at each
    calibrated K the threshold (shared by the layers) that maximises the objective on the keys whose K lies
    between the previous calibrated K (excluded) and this one, among those whose agreement keeps the promise there
    (rows between two calibrated K follow the interpolated thresholds, so the previous K's threshold is fixed
    first). The label cap is the largest calibrated K whose best saving pays for its heads (module docstring)."""
    charges = uniform_charges(config, layers) if charges is None else charges
    if thresholds is None:
        thresholds = candidate_thresholds(scores, config.threshold_candidates)
    key_counts = _key_counts(view)
    calibrated = sorted(set(key_counts.values()))  # every K asked: no row between two calibrated counts
    curve: list[tuple[int, float]] = []
    paying: list[int] = []
    previous = 0
    groups = view.groups()
    for count in calibrated:
        keys = [key for key, k in key_counts.items() if previous < k <= count]
        rows = np.zeros(view.size, dtype=bool)
        for key in keys:
            rows |= groups[key]
        part, part_scores = view.subset(rows), {layer: scores[layer][rows] for layer in layers}
        descending = thresholds[::-1]  # from no exits down; agreement only falls as more images leave
        per_row = _band_thresholds(part, curve, count, descending)
        feasible, values = _sweep(part, layers, part_scores, per_row, promise, config.promise_margin, charges)
        # the thresholds tried in turn until the first that breaks the promise, the best of them kept (ties: the
        # higher threshold, met first)
        stop = int(np.argmin(feasible)) if not feasible.all() else len(feasible)
        best = None if stop == 0 else (float(values[:stop].max()), float(descending[int(values[:stop].argmax())]))
        assert best is not None  # threshold 1.0 (nobody leaves) keeps the promise: every row of the band is at K
        if best[0] > 0.0:
            paying.append(count)
        curve.append((count, best[1]))
        previous = count
    cap: int | None = None
    if config.label_caps:
        cap = paying[-1] if paying else 1  # no head runs above the last K that pays (none measured above it)
        curve = [(count, threshold) for count, threshold in curve if count <= cap]
    if not curve:  # not even the smallest K pays: a cap of 1, and thresholds that would let nobody leave
        curve = [(calibrated[0] if calibrated else 1, 1.0)]
    return _setting(view, layers, scores, tuple(curve), cap, promise, charges, config.promise_margin)


def _band_thresholds(
    part: ExitView, curve: Sequence[tuple[int, float]], count: int, candidates: np.ndarray
) -> np.ndarray:
    """[rows, T] float32: the threshold each row of a K band sees when ``count``'s threshold is each of
    ``candidates`` and the smaller calibrated K keep ``curve``: the candidate itself at ``count``, between the
    previous calibrated K and ``count`` the log-K interpolation (the engine's arithmetic: a Python float weight
    per K, lraee_core.config.interpolate_thresholds), below the first calibrated K the first's."""
    table = np.empty((part.size, len(candidates)), dtype=np.float32)
    for k in np.unique(part.counts).tolist():
        rows = part.counts == k
        if not curve or k >= count:
            table[rows] = candidates.astype(np.float32)
            continue
        low_k, low = curve[-1]
        weight = (math.log(k) - math.log(low_k)) / (math.log(count) - math.log(low_k))
        table[rows] = (low + weight * (candidates - low)).astype(np.float32)
    return table


def _sweep(
    part: ExitView,
    layers: Sequence[int],
    scores: dict[int, np.ndarray],
    per_row: np.ndarray,  # [rows, T] float32 thresholds
    promise: float,
    margin: float,
    charges: Charges,
) -> tuple[np.ndarray, np.ndarray]:
    """For each of T threshold settings at once: whether every key keeps the promise ([T] bool) and the
    objective ([T]); the figures :func:`simulate` and :func:`by_label_count` would give, vectorised over T."""
    stacked = np.stack([scores[layer] for layer in layers], axis=1)  # [R, L]
    leave = (stacked[:, :, None] >= per_row[:, None, :]) & (per_row[:, None, :] < 1.0)  # [R, L, T]
    exited = leave.any(axis=1)  # [R, T]
    first = leave.argmax(axis=1)  # [R, T] index of the first layer left at (0 where none)
    agree_at = np.stack([part.agrees(layer) for layer in layers], axis=1)  # [R, L]
    agrees = np.where(exited, np.take_along_axis(agree_at, first, axis=1), True)
    evaluated = np.where(exited, first + 1, len(layers))  # heads and gates run per row
    any_model = next(iter(part.flops.values()))
    depth = np.where(exited, np.asarray(layers)[first], any_model.num_layers)
    per_head = (per_row_figure(part, "head") + per_row_figure(part, "gate"))[:, None]
    spent = (
        any_model.embed
        + depth.astype(np.int64) * any_model.block
        + evaluated * per_head
        + np.where(exited, 0, per_row_figure(part, "final")[:, None])
    )
    full_depth = per_row_figure(part, "full_depth")
    block = per_row_figure(part, "block")
    feasible = np.ones(per_row.shape[1], dtype=bool)
    savings = []
    for rows in part.groups().values():
        n = int(rows.sum())
        agreement = agrees[rows].mean(axis=0)
        se = np.sqrt(np.maximum(agreement * (1 - agreement), 0.0) / max(1, n))
        feasible &= agreement - margin * se >= promise
        saved = 1.0 - spent[rows].mean(axis=0) / full_depth[rows][0]
        charged = sum(
            charges.get(layer, 0.0) * (evaluated[rows] > index).mean(axis=0) for index, layer in enumerate(layers)
        )
        savings.append(saved - charged * (block[rows][0] / full_depth[rows][0]))
    return feasible, np.mean(savings, axis=0)


def _setting(
    view: ExitView,
    layers: Sequence[int],
    scores: dict[int, np.ndarray],
    curve: Curve,
    cap: int | None,
    promise: float,
    charges: Charges,
    margin: float,
) -> PointSetting:
    """The figures of a chosen curve and cap over every key of the view."""
    point = curve_point("search", layers, curve, promise, cap)
    figures = by_label_count(simulate(view, layers, scores, point), view, layers)
    mean_saving = float(np.mean([f["flops_saved"] for f in figures.values()])) if figures else 0.0
    met = _feasible(figures, promise, margin)
    return PointSetting(curve, promise, met, mean_saving, objective(figures, charges), figures, cap)


@dataclass(frozen=True)
class Selection:
    """The chosen candidate layers of one method and their operating points."""

    layers: tuple[int, ...]  # chosen candidate layers, ascending
    points: dict[str, PointSetting]  # operating point name -> setting
    ranking: list[dict[str, Any]]  # the best few subsets tried, best first


def select_candidates(
    view: ExitView,
    method: Method,
    bank: GateBank,
    pool: Sequence[int],
    config: CalibrateConfig,
    desc: str = "",
    charges: Charges | None = None,
) -> Selection:
    """Search every subset of ``pool`` with up to ``max_candidates`` layers; keep the best (module docstring).
    ``charges``: each pool layer's time charge in blocks (default: ``head_cost_blocks`` for every layer)."""
    charges = uniform_charges(config, pool) if charges is None else charges
    subsets = [
        subset
        for size in range(1, min(config.max_candidates, len(pool)) + 1)
        for subset in itertools.combinations(pool, size)
    ]
    default_promise = promises(config)[config.default_operating_point]
    tried = []
    for subset in tqdm(subsets, desc=f"candidates {desc}".strip(), leave=False):
        scores = method_scores(view, method, bank, subset)
        setting = search_point(view, subset, scores, default_promise, config, charges)
        tried.append((round(setting.objective, 9), -len(subset), subset, setting.thresholds, setting.mean_saving))
    tried.sort(key=lambda entry: entry[:2], reverse=True)
    layers = tuple(tried[0][2])
    scores = method_scores(view, method, bank, layers)
    points = {
        name: search_point(view, layers, scores, promise, config, charges) for name, promise in promises(config).items()
    }
    ranking = [
        {"layers": list(subset), "objective": value, "mean_saving": saving, "thresholds": [list(t) for t in curve]}
        for value, _, subset, curve, saving in tried[:10]
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
