"""Step ``calibrate``: pathological-layer pruning, candidate selection, per-layer thresholds, and the checkpoint.

**Simulation.** Every decision here is taken on a simulation of :meth:`EarlyExitClassifier.classify` over cached
tensors: candidate layers are visited in ascending order; an image leaves at the first one whose gate probability
is ``>=`` that layer's threshold (a threshold ``>= 1.0`` never lets anyone leave); the answer is that layer's head
top-1; images that never leave get the INT8 full-depth answer. FLOPs are :meth:`lraee_core.flops.FlopsModel.spent`
of the simulated exit (blocks run, one head + gate per candidate layer the image reached, the final projection
when it went the full depth). ``evaluate`` checks the simulation against the real engine.

**Pruning.** A cached layer ``l`` is pruned when ``INR_l < prune_fraction x mean(INR of layers l-1 and l+1)``
(only the neighbours that exist in 1..L; INR from the ``profile`` step). Neighbouring *layers* rather than
neighbouring candidates, because a noise spike is a property of the block against the blocks around it; with the
default contiguous candidates (L/2..L) the two readings coincide. If every candidate were pruned, the one with the
highest INR is kept. Smooth super-linear noise growth leaves every ratio near 1, so only spikes go.

**Thresholds.** Each layer's threshold comes from a grid of ``grid_points`` values evenly spaced in [0, 1]. With
at most ``joint_search_max_layers`` candidates the whole joint grid is evaluated at once: an image's behaviour at a
layer depends only on how many grid values its probability reaches, so one histogram of those counts plus prefix
and suffix sums gives accuracy and FLOPs of all ``grid_points ** k`` combinations exactly. With more candidates,
coordinate descent: start from the best uniform threshold, then repeatedly re-pick one layer's threshold with the
others fixed, for up to ``coordinate_rounds`` passes or until nothing improves.

**Operating points.** ``accurate``, ``balanced``, ``fast``: the best calibration accuracy among settings whose
FLOPs saving is at least the point's budget (ties: more saving, then lower thresholds). When no setting reaches a
budget, the point takes the best accuracy among the settings with the largest achievable saving and records
``budget_met: false``.

**Candidate selection.** Every subset of the unpruned cached layers with 1..``max_candidates`` layers is searched
as above; the subset whose default operating point is best (budget met, then accuracy, then saving, then fewer
layers: each layer costs a head and a gate) is kept. Selection and thresholds both use the calibration split; the
report measures them on the separate evaluation split.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from lraee_core.backbone import build_backbone
from lraee_core.checkpoint import MANIFEST, Manifest, PrunedLayer, backbone_ref, save_checkpoint
from lraee_core.flops import FlopsModel, flops_model
from lraee_core.gate import GateParams, gate_features_from_sav
from lraee_core.heads import ExitHead, class_logits

from .config import (
    CalibrateConfig,
    ConfigError,
    Job,
    config_hash,
    read_json,
    step,
    to_jsonable,
    write_json,
    write_record,
)
from .features import FeatureStore
from .gate_fit import load_gates, run_fit_gate
from .heads import VARIANTS, head_logits, load_heads
from .profile import LayerProfile, load_profile, run_profile

CALIBRATION_FILE = "calibration.json"
OPERATING_POINTS: tuple[str, ...] = ("accurate", "balanced", "fast")
_EPS = 1e-12

Scoring = Literal["gate", "confidence"]


@dataclass(frozen=True)
class Method:
    """An early-exit method the report compares: which heads, and what decides an exit."""

    variant: str  # head set (see training.pipeline.heads.VARIANTS)
    scoring: Scoring  # "gate": the learned gate's probability; "confidence": the head's top-1 probability
    title: str  # row name in the report


METHODS: dict[str, Method] = {
    "lraee-distilled": Method("ssa-distilled", "gate", "LRA-EE (distilled)"),
    "lraee-hard": Method("ssa-hard", "gate", "LRA-EE (hard)"),
    "cls-ee": Method("cls-distilled", "gate", "CLS-EE"),
    "confidence": Method("ssa-distilled", "confidence", "Confidence-only EE"),
}
CHECKPOINT_METHOD = "lraee-distilled"


# ---- per-image outcomes ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExitTable:
    """What every candidate exit would do to every image of one split, for one method."""

    scores: dict[int, np.ndarray]  # layer -> exit score per image (float32: the engine's gate probability)
    predictions: dict[int, np.ndarray]  # layer -> the head's top-1 label per image
    full_predictions: np.ndarray  # INT8 full-depth top-1 label per image
    labels: np.ndarray  # true label per image
    flops: FlopsModel  # FLOPs per stage for this label-set size

    @property
    def size(self) -> int:
        """Images in the table."""
        return len(self.labels)

    def subset(self, rows: np.ndarray) -> ExitTable:
        """The same table restricted to some images."""
        return ExitTable(
            scores={layer: s[rows] for layer, s in self.scores.items()},
            predictions={layer: p[rows] for layer, p in self.predictions.items()},
            full_predictions=self.full_predictions[rows],
            labels=self.labels[rows],
            flops=self.flops,
        )


@dataclass(frozen=True)
class Outcome:
    """The simulated engine's answer for every image of a table."""

    exit_layer: np.ndarray  # layer the answer came from; num_layers for the full-depth path
    exited: np.ndarray  # True where an exit head answered
    predictions: np.ndarray  # top-1 label
    correct: np.ndarray  # prediction == label
    flops: np.ndarray  # FLOPs spent per image
    saving: float  # 1 - mean FLOPs / full-depth FLOPs

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy."""
        return float(self.correct.mean()) if len(self.correct) else 0.0


def _exits(scores: np.ndarray, threshold: float) -> np.ndarray:
    """lraee_core.gate.exits on float32 scores: a Python threshold is compared in float32, as torch does."""
    if threshold >= 1.0:
        return np.zeros(len(scores), dtype=bool)
    return scores >= np.float32(threshold)


def simulate(table: ExitTable, layers: Sequence[int], thresholds: Sequence[float]) -> Outcome:
    """Mirror of EarlyExitClassifier.classify over ``layers`` (ascending) with these per-layer thresholds."""
    size, flops = table.size, table.flops
    alive = np.ones(size, dtype=bool)
    exit_layer = np.full(size, flops.num_layers)
    predictions = table.full_predictions.copy()
    evaluated = np.zeros(size, dtype=np.int64)
    for layer, threshold in zip(layers, thresholds, strict=True):
        evaluated[alive] += 1
        leave = alive & _exits(table.scores[layer], threshold)
        exit_layer[leave] = layer
        predictions[leave] = table.predictions[layer][leave]
        alive &= ~leave
    # FlopsModel.spent, vectorised: blocks run + one head and gate per candidate reached + the final path if taken.
    spent = (
        flops.embed
        + exit_layer.astype(np.int64) * flops.block
        + evaluated * (flops.head + flops.gate)
        + np.where(alive, flops.final, 0)
    )
    correct = predictions == table.labels
    saving = 1.0 - float(spent.mean()) / flops.full_depth if size else 0.0
    return Outcome(exit_layer, ~alive, predictions, correct, spent, saving)


# ---- the joint threshold sweep -----------------------------------------------------------------------------------
def threshold_grid(points: int) -> np.ndarray:
    """``points`` thresholds evenly spaced in [0, 1]; the last (1.0) disables a layer's exit."""
    if points < 2:
        raise ConfigError("the threshold grid needs at least 2 points")
    return np.linspace(0.0, 1.0, points)


def reached(scores: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """How many grid thresholds (below 1.0) each score reaches: the image leaves at grid index j iff j < count."""
    usable = grid < 1.0
    return ((scores[:, None] >= grid.astype(np.float32)[None, :]) & usable[None, :]).sum(axis=1)


@dataclass(frozen=True)
class Sweep:
    """Accuracy and FLOPs saving of every combination of grid thresholds, shape (G,) * k."""

    layers: tuple[int, ...]  # candidate layers, ascending
    grid: np.ndarray  # threshold values [G]
    accuracy: np.ndarray  # [G] * k
    saving: np.ndarray  # [G] * k

    def thresholds(self, flat_index: int) -> tuple[float, ...]:
        """Per-layer thresholds of a combination given by its flat (C-order) index."""
        indices = np.unravel_index(flat_index, self.accuracy.shape)
        return tuple(float(self.grid[i]) for i in indices)


def _exit_term(histogram: np.ndarray, m: int, points: int) -> np.ndarray:
    """Sum of ``histogram`` over images that pass layers 0..m-1 and leave at layer m, per combination."""
    k = histogram.ndim
    x = histogram.sum(axis=tuple(range(m + 1, k)), keepdims=True) if m + 1 < k else histogram
    for axis in range(m):
        x = np.cumsum(x, axis=axis)  # stays at earlier layers: reached count <= threshold index
    x = x.sum(axis=m, keepdims=True) - np.cumsum(x, axis=m)  # leaves here: reached count > threshold index
    index = tuple(slice(0, points) if axis <= m else slice(None) for axis in range(k))
    return np.broadcast_to(x[index], (points,) * k)


def _full_term(histogram: np.ndarray, points: int) -> np.ndarray:
    """Sum of ``histogram`` over images that pass every layer, per combination."""
    x = histogram
    for axis in range(histogram.ndim):
        x = np.cumsum(x, axis=axis)
    return x[(slice(0, points),) * histogram.ndim]


def sweep(table: ExitTable, layers: Sequence[int], grid: np.ndarray) -> Sweep:
    """Exact accuracy and FLOPs saving of all ``len(grid) ** len(layers)`` threshold combinations."""
    k, points, flops = len(layers), len(grid), table.flops
    counts = np.stack([reached(table.scores[layer], grid) for layer in layers])  # [k, N]
    shape = (points + 1,) * k
    cell = np.ravel_multi_index(tuple(counts), shape)

    def histogram(weights: np.ndarray | None) -> np.ndarray:
        return np.bincount(cell, weights=weights, minlength=int(np.prod(shape))).astype(np.float64).reshape(shape)

    images = histogram(None)
    correct = np.zeros((points,) * k)
    spent = np.zeros((points,) * k)
    for m, layer in enumerate(layers):
        hits = (table.predictions[layer] == table.labels).astype(np.float64)
        correct = correct + _exit_term(histogram(hits), m, points)
        spent = spent + _exit_term(images, m, points) * flops.spent(layer, m + 1, False)
    full_hits = (table.full_predictions == table.labels).astype(np.float64)
    correct = correct + _full_term(histogram(full_hits), points)
    spent = spent + _full_term(images, points) * flops.spent(flops.num_layers, k, True)
    size = max(1, table.size)
    return Sweep(tuple(layers), grid, correct / size, 1.0 - (spent / size) / flops.full_depth)


def best_setting(accuracy: np.ndarray, saving: np.ndarray, budget: float) -> tuple[int, bool]:
    """Flat index of the best accuracy with saving >= budget (or the most saving achievable), and budget_met."""
    acc, sav = accuracy.ravel(), saving.ravel()
    feasible = np.flatnonzero(sav >= budget - _EPS)
    met = feasible.size > 0
    pool = feasible if met else np.flatnonzero(sav >= sav.max() - _EPS)
    order = np.lexsort((pool, -sav[pool], -acc[pool]))  # accuracy, then saving, then lower thresholds
    return int(pool[order[0]]), met


def pareto_front(accuracy: np.ndarray, saving: np.ndarray) -> list[tuple[float, float]]:
    """(saving, accuracy) points not beaten on both axes by another setting, by increasing saving."""
    acc, sav = accuracy.ravel(), saving.ravel()
    front: list[tuple[float, float]] = []
    best = -np.inf
    for index in np.lexsort((-acc, -sav)):  # most saving first, ties by accuracy
        if acc[index] > best + _EPS:
            front.append((float(sav[index]), float(acc[index])))
            best = acc[index]
    return front[::-1]


# ---- search ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchPoint:
    """One chosen threshold setting."""

    thresholds: tuple[float, ...]  # per candidate layer
    accuracy: float  # on the split searched
    saving: float  # FLOPs saving on the split searched
    budget: float  # the saving it had to reach
    budget_met: bool  # False when no setting reaches the budget (then: the most saving achievable)

    def key(self) -> tuple[bool, float, float]:
        """Ordering of settings: budget met, then accuracy, then saving."""
        return (self.budget_met, round(self.accuracy, 12), round(self.saving, 12))


def budgets(config: CalibrateConfig) -> dict[str, float]:
    """Operating point name -> minimum FLOPs saving."""
    return {"accurate": config.accurate_budget, "balanced": config.balanced_budget, "fast": config.fast_budget}


def _coordinate_search(
    table: ExitTable, layers: Sequence[int], grid: np.ndarray, budget: float, rounds: int
) -> SearchPoint:
    def point(indices: Sequence[int]) -> SearchPoint:
        thresholds = tuple(float(grid[i]) for i in indices)
        outcome = simulate(table, layers, thresholds)
        met = outcome.saving >= budget - _EPS
        return SearchPoint(thresholds, outcome.accuracy, outcome.saving, budget, met)

    def rank(p: SearchPoint) -> tuple[bool, float, float]:
        # Infeasible settings compete on how close they come to the budget, feasible ones on accuracy.
        return p.key() if p.budget_met else (False, round(p.saving, 12), round(p.accuracy, 12))

    uniform = [point([g] * len(layers)) for g in range(len(grid))]
    best_index = max(range(len(grid)), key=lambda g: rank(uniform[g]))
    current, best = [best_index] * len(layers), uniform[best_index]
    for _ in range(rounds):
        improved = False
        for m in range(len(layers)):
            for g in range(len(grid)):
                trial = [*current[:m], g, *current[m + 1 :]]
                candidate = point(trial)
                if rank(candidate) > rank(best):
                    current, best, improved = trial, candidate, True
        if not improved:
            break
    return best


def search(
    table: ExitTable, layers: Sequence[int], config: CalibrateConfig, grid: np.ndarray
) -> dict[str, SearchPoint]:
    """The thresholds of every operating point for this candidate set (see module docstring)."""
    if len(layers) <= config.joint_search_max_layers:
        result = sweep(table, layers, grid)
        points = {}
        for name, budget in budgets(config).items():
            index, met = best_setting(result.accuracy, result.saving, budget)
            points[name] = SearchPoint(
                result.thresholds(index),
                float(result.accuracy.ravel()[index]),
                float(result.saving.ravel()[index]),
                budget,
                met,
            )
        return points
    return {
        name: _coordinate_search(table, layers, grid, budget, config.coordinate_rounds)
        for name, budget in budgets(config).items()
    }


@dataclass(frozen=True)
class Selection:
    """The chosen candidate layers of one method and their operating points."""

    layers: tuple[int, ...]  # chosen candidate layers, ascending
    points: dict[str, SearchPoint]  # operating point name -> setting
    ranking: list[dict[str, Any]]  # the best few subsets tried, best first


def select_candidates(
    table: ExitTable, pool: Sequence[int], config: CalibrateConfig, grid: np.ndarray, desc: str = ""
) -> Selection:
    """Search every subset of ``pool`` with up to ``max_candidates`` layers; keep the best (module docstring)."""
    subsets = [
        subset
        for size in range(1, min(config.max_candidates, len(pool)) + 1)
        for subset in itertools.combinations(pool, size)
    ]
    tried = []
    for subset in tqdm(subsets, desc=f"candidates {desc}".strip(), leave=False):
        points = search(table, subset, config, grid)
        objective = points[config.default_operating_point]
        tried.append((*objective.key(), -len(subset), subset, points))
    tried.sort(key=lambda entry: entry[:4], reverse=True)
    ranking = [{"layers": list(entry[4]), **asdict(entry[5][config.default_operating_point])} for entry in tried[:10]]
    return Selection(layers=tuple(tried[0][4]), points=tried[0][5], ranking=ranking)


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


# ---- building tables from the cache ------------------------------------------------------------------------------
def method_parts(job: Job, method: Method) -> tuple[dict[int, ExitHead], dict[int, GateParams]]:
    """Trained heads and fitted gates of a method's head set."""
    _, heads = load_heads(job.step_dir("train-heads"), method.variant)
    gates = load_gates(job.step_dir("fit-gate"), method.variant)
    return heads, gates


def flops_for(store: FeatureStore, job: Job) -> FlopsModel:
    """The engine's FLOPs model for this backbone, head width and label set."""
    hidden = job.config.heads.hidden_dim or store.shape.width
    return flops_model(store.shape, hidden, len(store.labels))


def full_depth_predictions(store: FeatureStore, split: str, key: str = "int8_final") -> np.ndarray:
    """Top-1 of the full-depth CLIP path (``int8_final`` or ``fp32_final``), as the engine scores it."""
    embeddings = store.load(split, [key])[key]
    with torch.inference_mode():
        return class_logits(embeddings, store.text_embeddings(), store.logit_scale).argmax(-1).numpy()


def build_table(store: FeatureStore, job: Job, split: str, method: Method, layers: Sequence[int]) -> ExitTable:
    """Exit table of ``method`` over ``layers`` on a split of the cache."""
    heads, gates = method_parts(job, method)
    text = store.text_embeddings()
    pooling = VARIANTS[method.variant].pooling
    names = [f"{pooling}.{layer}" for layer in layers] + [f"sav.{layer}" for layer in layers] + ["labels"]
    cached = store.load(split, names)
    scores, predictions = {}, {}
    for layer in layers:
        logits = head_logits(heads[layer], cached[f"{pooling}.{layer}"], text, store.logit_scale)
        features = gate_features_from_sav(logits, cached[f"sav.{layer}"])
        # Confidence-only scores an image by the head's top-1 probability instead of the gate.
        score = gates[layer].probability(features) if method.scoring == "gate" else features[:, 0]
        scores[layer] = score.float().numpy()
        predictions[layer] = logits.argmax(-1).numpy()
    return ExitTable(
        scores=scores,
        predictions=predictions,
        full_predictions=full_depth_predictions(store, split),
        labels=cached["labels"].numpy(),
        flops=flops_for(store, job),
    )


# ---- the step ----------------------------------------------------------------------------------------------------
def calibrate_hash(job: Job, gate_hash: str, profile_hash: str) -> str:
    """Identity of the calibration and checkpoint."""
    return config_hash("calibrate", gate_hash, profile_hash, job.config.calibrate, str(job.checkpoint_dir))


def exit_shares(outcome: Outcome, layers: Sequence[int]) -> dict[str, float]:
    """Share of images answered at each candidate layer, and on the full-depth path ("full")."""
    size = max(1, len(outcome.exit_layer))
    shares = {str(layer): float((outcome.exited & (outcome.exit_layer == layer)).sum()) / size for layer in layers}
    shares["full"] = float((~outcome.exited).sum()) / size
    return shares


def _validate(config: CalibrateConfig) -> None:
    if config.default_operating_point not in OPERATING_POINTS:
        raise ConfigError(f"default operating point must be one of {OPERATING_POINTS}")
    if config.max_candidates < 1:
        raise ConfigError("max_candidates must be at least 1")


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
    grid = threshold_grid(config.grid_points)
    labels = store.load("calib", ["labels"])["labels"].numpy()
    methods: dict[str, Any] = {}
    selections: dict[str, Selection] = {}
    for name, method in METHODS.items():
        table = build_table(store, job, "calib", method, pool)
        selection = select_candidates(table, pool, config, grid, desc=name)
        selections[name] = selection
        methods[name] = {
            "variant": method.variant,
            "scoring": method.scoring,
            "layers": list(selection.layers),
            "operating_points": {
                point: {
                    **asdict(setting),
                    "exit_shares": exit_shares(simulate(table, selection.layers, setting.thresholds), selection.layers),
                }
                for point, setting in selection.points.items()
            },
            "subset_ranking": selection.ranking,
        }
    baselines = {
        "int8_full_depth_accuracy": float((full_depth_predictions(store, "calib") == labels).mean()),
        "fp32_full_depth_accuracy": float((full_depth_predictions(store, "calib", "fp32_final") == labels).mean()),
    }
    calibration = {
        "calib_images": len(labels),
        "grid": grid.tolist(),
        "cached_layers": list(store.layers),
        "candidate_pool": list(pool),
        "pruned_layers": [asdict(p) for p in pruned],
        "profile": {str(p.layer): {"nsr": p.nsr, "inr": p.inr} for p in profile},
        "baselines": baselines,
        "methods": methods,
    }
    write_json(directory / CALIBRATION_FILE, calibration)
    write_checkpoint(job, store, selections[CHECKPOINT_METHOD], pruned, profile, calibration)
    write_record(directory, "calibrate", wanted, {"layers": list(selections[CHECKPOINT_METHOD].layers)})
    return wanted


def write_checkpoint(
    job: Job,
    store: FeatureStore,
    selection: Selection,
    pruned: Sequence[PrunedLayer],
    profile: Sequence[LayerProfile],
    calibration: dict[str, Any],
) -> Manifest:
    """Save the LRA-EE (distilled) heads and gates of the chosen layers with a manifest saying how they were made."""
    from .data import load_splits

    config = job.config
    method = METHODS[CHECKPOINT_METHOD]
    head_config, heads = load_heads(job.step_dir("train-heads"), method.variant)
    gates = load_gates(job.step_dir("fit-gate"), method.variant)
    layers = selection.layers
    directory = job.checkpoint_dir
    backbone = build_backbone(config.backbone)
    splits = load_splits(job)
    shape = store.shape
    operating_points = {
        name: dict(zip(layers, point.thresholds, strict=True)) for name, point in selection.points.items()
    }
    method_record = calibration["methods"][CHECKPOINT_METHOD]
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
        operating_points=operating_points,
        default_operating_point=config.calibrate.default_operating_point,
        pruned_layers=tuple(pruned),
        templates=tuple(config.data.templates),
        calibration={
            "kind": "lraee-train",
            "command": list(job.argv),
            "data": splits.description,
            "templates": list(config.data.templates),
            "seeds": {"split": config.data.seed, "heads": config.heads.seed},
            "budgets": budgets(config.calibrate),
            "grid": calibration["grid"],
            "candidate_pool": calibration["candidate_pool"],
            "profile": calibration["profile"],
            "config": to_jsonable(config),
        },
        metrics={
            "split": "calib",
            "images": calibration["calib_images"],
            **calibration["baselines"],
            "operating_points": {
                name: {k: v for k, v in point.items() if k != "thresholds"}
                for name, point in method_record["operating_points"].items()
            },
            "flops_full_depth": flops_for(store, job).full_depth,
        },
    )
    return save_checkpoint(
        directory, manifest, {layer: heads[layer] for layer in layers}, {layer: gates[layer] for layer in layers}
    )


def load_calibration(job: Job) -> dict[str, Any]:
    """What the ``calibrate`` step wrote."""
    result: dict[str, Any] = read_json(job.step_dir("calibrate") / CALIBRATION_FILE)
    return result
