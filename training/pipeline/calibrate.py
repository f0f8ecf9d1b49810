"""Step ``calibrate``: pathological-layer pruning, candidate selection, operating points as promises, checkpoint.

**Operating points are promises.** ``accurate``, ``balanced`` and ``fast`` each promise a share of images whose
answer equals the full-depth answer (agreement: 99%, 97%, 93% by default), for the client's own labels at any
label count. Each point is one shared gate threshold t (an image leaves at the first candidate layer whose gate
probability reaches t): the lowest t, among ``threshold_candidates`` quantiles of the calib split's gate scores, at
which the calib split's agreement clears the promise by ``promise_margin`` standard errors at *every* K of
``label_counts`` (label sets drawn per image: the true class plus K - 1 others). A one-dimensional search per point
is too small to fit noise; the report then measures the same thresholds on the evaluation split.

**Simulation.** Every decision is taken on a simulation of :meth:`EarlyExitClassifier.classify` over cached tensors:
candidate layers are visited in ascending order; an image leaves at the first one whose score is ``>=`` the
threshold (float32, as torch compares); the answer is that exit's top-1 over the row's label set; images that never
leave get the INT8 full-depth answer. FLOPs are :meth:`lraee_core.flops.FlopsModel.spent` at the row's K. The
``evaluate`` step checks the simulation against the real engine.

**Pruning.** A cached layer ``l`` is pruned when ``INR_l < prune_fraction x mean(INR of layers l-1 and l+1)``
(neighbouring *layers*: a noise spike is a property of the block against the blocks around it). If every candidate
were pruned, the one with the highest INR is kept.

**Candidate selection.** Every subset of the unpruned cached layers with 1..``max_candidates`` layers gets the
default point's threshold as above; the subset with the largest mean calib FLOPs saving over the K values wins
(ties: fewer layers, each of which costs a head and a gate). Baseline methods get the same treatment.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from lraee_core.backbone import build_backbone
from lraee_core.checkpoint import MANIFEST, Manifest, PrunedLayer, backbone_ref, save_checkpoint
from lraee_core.gate import GateParams

from .config import (
    CalibrateConfig,
    ConfigError,
    Job,
    config_hash,
    portable_paths,
    read_json,
    step,
    to_jsonable,
    write_json,
    write_record,
)
from .features import FeatureStore
from .gate_fit import PAPER_GATE, GateBank, load_gates, run_fit_gate
from .heads import VARIANTS, load_heads
from .label_sets import ExitView, exit_view, label_sets_for, resolve_counts
from .profile import LayerProfile, load_profile, run_profile
from .ranges import activation_ranges

CALIBRATION_FILE = "calibration.json"
OPERATING_POINTS: tuple[str, ...] = ("accurate", "balanced", "fast")

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


def shipped_method(selections: dict[str, Selection], config: CalibrateConfig) -> str:
    """The method the checkpoint ships: ``config.ship``, or with "auto" the shippable method whose default point
    saves the most FLOPs on the calib split (mean over K; ties: SSA, the paper's head)."""
    if config.ship != "auto":
        return config.ship
    return max(
        SHIPPABLE, key=lambda name: round(selections[name].points[config.default_operating_point].mean_saving, 6)
    )


# ---- simulation --------------------------------------------------------------------------------------------------
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


def _per_row(view: ExitView, attribute: str) -> np.ndarray:
    values = np.zeros(view.size, dtype=np.int64)
    for k, model in view.flops.items():
        values[view.counts == k] = getattr(model, attribute)
    return values


def _exits(scores: np.ndarray, threshold: float) -> np.ndarray:
    """lraee_core.gate.exits on float32 scores: a Python threshold is compared in float32, as torch does."""
    if threshold >= 1.0:
        return np.zeros(len(scores), dtype=bool)
    return scores >= np.float32(threshold)


def simulate(
    view: ExitView, layers: Sequence[int], scores: dict[int, np.ndarray], thresholds: Sequence[float]
) -> Outcome:
    """Mirror of EarlyExitClassifier.classify over ``layers`` (ascending) with these per-layer thresholds."""
    any_model = next(iter(view.flops.values()))
    alive = np.ones(view.size, dtype=bool)
    exit_layer = np.full(view.size, any_model.num_layers)
    predictions = view.full_top1.copy()
    evaluated = np.zeros(view.size, dtype=np.int64)
    for layer, threshold in zip(layers, thresholds, strict=True):
        evaluated[alive] += 1
        leave = alive & _exits(scores[layer], threshold)
        exit_layer[leave] = layer
        predictions[leave] = view.top1[layer][leave]
        alive &= ~leave
    # FlopsModel.spent, vectorised: blocks run + one head and gate per candidate reached + the final path if taken.
    spent = (
        any_model.embed
        + exit_layer.astype(np.int64) * any_model.block
        + evaluated * (_per_row(view, "head") + _per_row(view, "gate"))
        + np.where(alive, _per_row(view, "final"), 0)
    )
    return Outcome(
        exit_layer=exit_layer,
        exited=~alive,
        predictions=predictions,
        agrees=predictions == view.full_top1,
        correct=predictions == view.truth,
        flops=spent,
        full_depth=_per_row(view, "full_depth"),
    )


def full_outcome(view: ExitView, fp32: bool = False) -> Outcome:
    """The `full` rule (no head evaluated) on the INT8 tower, or the FP32 tower's full-depth answer."""
    any_model = next(iter(view.flops.values()))
    predictions = view.fp32_top1 if fp32 else view.full_top1
    full_depth = _per_row(view, "full_depth")
    return Outcome(
        exit_layer=np.full(view.size, any_model.num_layers),
        exited=np.zeros(view.size, dtype=bool),
        predictions=predictions,
        agrees=predictions == view.full_top1,
        correct=predictions == view.truth,
        flops=full_depth,
        full_depth=full_depth,
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
    """Agreement, top-1, FLOPs saved and exit shares of an outcome at each K of the view ("K" -> figures)."""
    figures = {}
    for k in sorted(view.flops):
        rows = view.counts == k
        count = int(rows.sum())
        agreement = float(outcome.agrees[rows].mean())
        figures[str(k)] = {
            "rows": count,
            "agreement": agreement,
            "agreement_se": math.sqrt(max(agreement * (1 - agreement), 0.0) / max(1, count)),
            "top1": float(outcome.correct[rows].mean()),
            "flops_saved": float(1.0 - outcome.flops[rows].mean() / outcome.full_depth[rows][0]),
            "exit_shares": exit_shares(outcome, layers, rows),
        }
    return figures


# ---- scores of a method ------------------------------------------------------------------------------------------
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


# ---- the promise search ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PointSetting:
    """One operating point's chosen threshold and its calibration figures."""

    threshold: float  # shared gate threshold of every candidate layer
    promise: float  # agreement promised
    promise_met: bool  # False only when even t = 1.0 (no exits) falls short, which cannot happen on agreement
    mean_saving: float  # calib FLOPs saving averaged over K
    calibration: dict[str, dict[str, Any]]  # K -> calib figures


def promises(config: CalibrateConfig) -> dict[str, float]:
    """Operating point name -> promised agreement with full depth."""
    return {"accurate": config.accurate_promise, "balanced": config.balanced_promise, "fast": config.fast_promise}


def candidate_thresholds(scores: dict[int, np.ndarray], count: int) -> np.ndarray:
    """``count`` quantiles of the scores (float32 values the engine could see) plus 1.0, ascending and unique."""
    pooled = np.concatenate(list(scores.values())).astype(np.float64)
    quantiles = np.quantile(pooled, np.linspace(0.0, 1.0, max(2, count))) if len(pooled) else np.array([])
    return np.unique(np.concatenate([quantiles.astype(np.float32).astype(np.float64), [1.0]]))


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
        outcome = simulate(view, layers, scores, [float(threshold)] * len(layers))
        figures = by_label_count(outcome, view, layers)
        if not _feasible(figures, promise, config.promise_margin):
            break
        saving = float(np.mean([f["flops_saved"] for f in figures.values()]))
        if best is None or saving > best.mean_saving:
            best = PointSetting(float(threshold), promise, True, saving, figures)
    if best is None:  # unreachable in practice: t = 1.0 answers every row as full depth does
        outcome = simulate(view, layers, scores, [1.0] * len(layers))
        figures = by_label_count(outcome, view, layers)
        saving = float(np.mean([f["flops_saved"] for f in figures.values()]))
        best = PointSetting(1.0, promise, False, saving, figures)
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
        tried.append((round(setting.mean_saving, 9), -len(subset), subset, setting.threshold))
    tried.sort(key=lambda entry: entry[:2], reverse=True)
    layers = tuple(tried[0][2])
    scores = method_scores(view, method, bank, layers)
    points = {name: search_point(view, layers, scores, promise, config) for name, promise in promises(config).items()}
    ranking = [
        {"layers": list(subset), "mean_saving": saving, "threshold": threshold}
        for saving, _, subset, threshold in tried[:10]
    ]
    return Selection(layers=layers, points=points, ranking=ranking)


# ---- pruning -----------------------------------------------------------------------------------------------------
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


# ---- views of the cache ------------------------------------------------------------------------------------------
def sweep_view(
    store: FeatureStore, job: Job, split: str, variant: str, counts: Sequence[int], repeats: int, seed: int
) -> ExitView:
    """A head set's view of a split: ``repeats`` label sets per image at each K of ``counts`` (0: every label)."""
    _, heads = load_heads(job.step_dir("train-heads"), variant)
    truth = store.load(split, ["labels"])["labels"].numpy()
    ks = resolve_counts(counts, len(store.labels))
    sets = label_sets_for(truth, len(store.labels), ks, repeats, np.random.default_rng(seed))
    hidden = job.config.heads.hidden_dim or store.shape.width
    return exit_view(store, split, heads, VARIANTS[variant].pooling, sets, hidden)


# ---- the step ----------------------------------------------------------------------------------------------------
def calibrate_hash(job: Job, gate_hash: str, profile_hash: str) -> str:
    """Identity of the calibration and checkpoint."""
    return config_hash("calibrate", gate_hash, profile_hash, job.config.calibrate, str(job.checkpoint_dir))


def _validate(config: CalibrateConfig) -> None:
    if config.default_operating_point not in OPERATING_POINTS:
        raise ConfigError(f"default operating point must be one of {OPERATING_POINTS}")
    if config.max_candidates < 1:
        raise ConfigError("max_candidates must be at least 1")
    if not all(0.0 <= p <= 1.0 for p in promises(config).values()):
        raise ConfigError("promises are agreement fractions in [0, 1]")
    if not config.label_counts:
        raise ConfigError("calibration needs at least one label count")
    if config.ship not in (*SHIPPABLE, "auto"):
        raise ConfigError(f"ship must be one of {(*SHIPPABLE, 'auto')}")


def method_record(selection: Selection, method: Method) -> dict[str, Any]:
    """What calibration.json says about one method."""
    return {
        "variant": method.variant,
        "scoring": method.scoring,
        "gates": method.gates,
        "layers": list(selection.layers),
        "operating_points": {name: asdict(setting) for name, setting in selection.points.items()},
        "subset_ranking": selection.ranking,
    }


@step("calibrate")
def run_calibrate(job: Job) -> str:
    """Step ``calibrate``: write ``calibrate/calibration.json`` and the checkpoint; returns the step hash."""
    config = job.config.calibrate
    _validate(config)
    wanted = calibrate_hash(job, run_fit_gate(job), run_profile(job))
    directory = job.step_dir("calibrate")
    if job.should_skip("calibrate", wanted, outputs=[job.checkpoint_dir / MANIFEST]):
        return wanted
    store = FeatureStore(job.step_dir("extract"))
    profile = load_profile(job)
    inr = {p.layer: p.inr for p in profile}
    pool, pruned = prune_layers(inr, store.layers, config.prune_fraction)
    views: dict[str, ExitView] = {}
    methods: dict[str, Any] = {}
    selections: dict[str, Selection] = {}
    for name, method in METHODS.items():
        if method.variant not in views:
            views[method.variant] = sweep_view(
                store, job, "calib", method.variant, config.label_counts, config.label_sets_per_image, config.seed
            )
        bank = load_gates(job.step_dir("fit-gate"), method.gates)
        selection = select_candidates(views[method.variant], method, bank, pool, config, desc=name)
        selections[name] = selection
        methods[name] = method_record(selection, method)
    any_view = next(iter(views.values()))
    calibration = {
        "calib_images": store.count("calib"),
        "label_counts": sorted(int(k) for k in any_view.flops),
        "label_sets_per_image": config.label_sets_per_image,
        "cached_layers": list(store.layers),
        "candidate_pool": list(pool),
        "pruned_layers": [asdict(p) for p in pruned],
        "profile": {str(p.layer): {"nsr": p.nsr, "inr": p.inr} for p in profile},
        "full_depth": {
            "int8": by_label_count(full_outcome(any_view), any_view, []),
            "fp32": by_label_count(full_outcome(any_view, fp32=True), any_view, []),
        },
        "methods": methods,
    }
    shipped = shipped_method(selections, config)
    calibration["shipped_method"] = shipped
    calibration["ship_choice"] = {
        "rule": config.ship,
        "calib_mean_saving_at_default_point": {
            name: selections[name].points[config.default_operating_point].mean_saving for name in SHIPPABLE
        },
    }
    write_json(directory / CALIBRATION_FILE, calibration)
    write_checkpoint(job, store, selections[shipped], pruned, profile, calibration, shipped)
    write_record(directory, "calibrate", wanted, {"layers": list(selections[shipped].layers), "shipped": shipped})
    return wanted


def path_roots(job: Job) -> dict[str, str]:
    """Named roots that make recorded paths portable (longest match wins)."""
    from .config import REPO_ROOT, data_root

    return {
        "checkpoint": str(job.checkpoint_dir),
        "work": str(job.work_dir),
        "repo": str(REPO_ROOT),
        "data": data_root(),
    }


def write_checkpoint(
    job: Job,
    store: FeatureStore,
    selection: Selection,
    pruned: Sequence[PrunedLayer],
    profile: Sequence[LayerProfile],
    calibration: dict[str, Any],
    shipped: str = CHECKPOINT_METHOD,
) -> Manifest:
    """Save the shipped method's heads and gates of the chosen layers with a manifest saying how they were made."""
    from .data import load_splits

    config = job.config
    method = METHODS[shipped]
    head_config, heads = load_heads(job.step_dir("train-heads"), method.variant)
    bank = load_gates(job.step_dir("fit-gate"), method.gates)
    layers = selection.layers
    gates = bank.for_layers(layers)
    directory = job.checkpoint_dir
    backbone = build_backbone(config.backbone)
    splits = load_splits(job)
    shape = store.shape
    roots = path_roots(job)
    manifest = Manifest(
        checkpoint_id=config.calibrate.checkpoint_id,
        backbone=backbone_ref(backbone, directory),
        quant_mode=config.quant_mode,
        quantized_modules=int(store.meta["quantized_modules"]),
        image_size=shape.image_size,
        num_layers=shape.num_layers,
        width=shape.width,
        embed_dim=shape.embed_dim,
        head=head_config,
        candidate_layers=tuple(layers),
        operating_points={name: dict.fromkeys(layers, point.threshold) for name, point in selection.points.items()},
        default_operating_point=config.calibrate.default_operating_point,
        pruned_layers=tuple(pruned),
        gate_features=bank.features,
        promises={name: point.promise for name, point in selection.points.items()},
        templates=tuple(config.data.templates),
        calibration=portable_paths(
            {
                "kind": "lraee-train",
                "command": list(job.argv),
                "path_roots": {
                    "checkpoint": "this checkpoint's directory",
                    "work": "the build's work directory",
                    "repo": "the project's root",
                    "data": "the shared data folder (LRAEE_DATA_ROOT, default ../shared/data from the project)",
                },
                "data": splits.description,
                "templates": list(config.data.templates),
                "seeds": {"split": config.data.seed, "heads": config.heads.seed, "gate": config.gate.seed},
                "shipped_method": {"name": shipped, "title": method.title, **calibration["ship_choice"]},
                "head_loss": "label-free: 1 - cos to the served model's full-depth image embedding",
                "gate": {
                    "target": "exit top-1 == full-depth top-1 for the row's label set",
                    "label_sets": "true class + K-1 others, K log-uniform over 2..N",
                    "features": list(bank.features),
                },
                "search": "one shared threshold per point: the lowest calib quantile keeping the promise at every K",
                "promise_margin_se": config.calibrate.promise_margin,
                "candidate_pool": calibration["candidate_pool"],
                "profile": calibration["profile"],
                "config": to_jsonable(config),
            },
            roots,
        ),
        metrics={
            "calibration": {
                "split": "calib",
                "note": "in-sample: these images chose the thresholds",
                "images": calibration["calib_images"],
                "operating_points": {name: point.calibration for name, point in selection.points.items()},
            },
        },
    )
    kept = {layer: heads[layer] for layer in layers}
    return save_checkpoint(directory, manifest, kept, gates, activation_ranges(job))  # ranges: static modes only


def load_calibration(job: Job) -> dict[str, Any]:
    """What the ``calibrate`` step wrote."""
    result: dict[str, Any] = read_json(job.step_dir("calibrate") / CALIBRATION_FILE)
    return result
