"""Step ``fit-gate``: per head set and layer, logistic regression of agreement with the full-depth answer.

The target of an (image, label set) row at layer l is "this exit's top-1 equals the full-depth top-1 for this
label set": the decision a client cares about (whether leaving early changes its answer) and one that needs no
ground truth. Rows are the gate split's images, each with ``label_sets_per_image`` label sets of a K drawn
log-uniform over 2..N (:mod:`training.pipeline.label_sets`), so one gate serves every label count.

Feature set: unless the config names one, each candidate set of :data:`FEATURE_SETS` is fitted on the gate split
(shipped heads, ``agree_prev`` read against the previous cached layer) and scored by its mean ROC AUC over layers on
the calib split (its own label sets); the best one wins (ties: fewer features). The paper's 3-feature gate stays a
baseline: fitted on its own terms (is the exit right, at K = N), as before.

Because ``agree_prev`` compares with the previous *candidate* layer, which calibration chooses later, a gate is
fitted for every (layer, previous candidate or none) pair a candidate subset can need.

The fit is Newton's method on the mean binary cross-entropy plus a small ridge penalty on the weights (data that a
line separates perfectly would otherwise drive them to infinity), on standardised features for conditioning; the
scaling is folded back so the stored :class:`lraee_core.gate.GateParams` act on raw features, as the engine feeds
them. A layer whose exit always agrees (or never) gets zero weights and the bias of that rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lraee_core.gate import PAPER_FEATURES, GateParams, validate_feature_names

from .config import ConfigError, GateFitConfig
from .features import FeatureStore
from .heads import SHIPPED_VARIANT, VARIANTS, load_heads, run_train_heads
from .jobs import Job, config_hash, read_json, step, write_json, write_record
from .label_sets import ExitView, auc, exit_view_with_client_rows, label_sets_for, log_uniform_counts

COSINE = ("cos_top1", "cos_gap", "entropy_norm", "log_k")
FEATURE_SETS: dict[str, tuple[str, ...]] = {  # candidates measured against each other; "paper" is the baseline
    "paper": PAPER_FEATURES,
    "cosine": COSINE,
    "cosine+sav": (*COSINE, "sav"),
    "cosine+prev": (*COSINE, "agree_prev"),
    "cosine+sav+prev": (*COSINE, "sav", "agree_prev"),
}
PAPER_GATE = "paper"  # the baseline gate's key in gates.json

GATES_FILE = "gates.json"
_RATE_CLIP = 1e-4  # keeps the bias of a one-class layer finite


@dataclass(frozen=True)
class GateFit:
    """A fitted gate and how well it fits its training data."""

    params: GateParams  # weights on raw features + bias
    bce: float  # mean binary cross-entropy on the fitting data
    accuracy: float  # share of images where (probability >= 0.5) equals the target
    positive_rate: float  # share of images whose head was right


def _bce(z: np.ndarray, theta: np.ndarray, y: np.ndarray, l2: float) -> float:
    margin = z @ theta
    # log(1 + e^m) - y m, computed stably; the ridge term leaves the bias (last entry) free.
    return float(np.mean(np.logaddexp(0.0, margin) - y * margin) + 0.5 * l2 * np.sum(theta[:-1] ** 2))


def fit_logistic(
    features: torch.Tensor, targets: torch.Tensor, config: GateFitConfig, names: Sequence[str] = PAPER_FEATURES
) -> GateFit:
    """Logistic regression of boolean ``targets`` [N] on ``features`` [N, F] named ``names`` (module docstring)."""
    x = features.double().numpy()
    y = targets.double().numpy()
    rate = float(y.mean()) if len(y) else 0.0
    mean, std = x.mean(axis=0), x.std(axis=0)
    constant = std < 1e-12
    if rate in (0.0, 1.0) or constant.all():
        clipped = min(max(rate, _RATE_CLIP), 1 - _RATE_CLIP)
        params = GateParams(
            weight=(0.0,) * x.shape[1], bias=float(np.log(clipped / (1 - clipped))), features=tuple(names)
        )
    else:
        z = np.where(constant, 0.0, (x - mean) / np.where(constant, 1.0, std))
        z = np.hstack([z, np.ones((len(z), 1))])
        ridge = np.diag([config.l2] * x.shape[1] + [0.0])
        theta = np.zeros(z.shape[1])
        loss = _bce(z, theta, y, config.l2)
        for _ in range(config.max_iter):
            p = 1.0 / (1.0 + np.exp(-(z @ theta)))
            gradient = z.T @ (p - y) / len(y) + ridge @ theta
            hessian = (z * (p * (1 - p))[:, None]).T @ z / len(y) + ridge + 1e-10 * np.eye(len(theta))
            direction = np.linalg.solve(hessian, gradient)
            step_size = 1.0
            while True:  # backtracking: Newton steps can overshoot where the data are nearly separable
                candidate = theta - step_size * direction
                candidate_loss = _bce(z, candidate, y, config.l2)
                if candidate_loss <= loss or step_size < 1e-6:
                    break
                step_size /= 2
            improvement = loss - candidate_loss
            theta, loss = candidate, min(loss, candidate_loss)
            if improvement < config.tol:
                break
        weight = np.where(constant, 0.0, theta[:-1] / np.where(constant, 1.0, std))
        bias = float(theta[-1] - np.sum(weight * mean))
        params = GateParams(weight=tuple(float(w) for w in weight), bias=bias, features=tuple(names))
    probability = params.probability(features.float()).double()
    bce = torch.nn.functional.binary_cross_entropy(probability.clamp(1e-12, 1 - 1e-12), targets.double())
    accuracy = float(((probability >= 0.5) == targets.bool()).double().mean()) if len(y) else 0.0
    return GateFit(params=params, bce=float(bce), accuracy=accuracy, positive_rate=rate)


def gate_key(layer: int, previous: int | None) -> str:
    """Key of the gate at ``layer`` whose ``agree_prev`` reads the ``previous`` candidate (None: the first one)."""
    return f"{layer}|{'none' if previous is None else previous}"


def pairs(layers: Sequence[int], features: Sequence[str]) -> list[tuple[int, int | None]]:
    """Every (layer, previous candidate) a candidate subset of ``layers`` can need with these features."""
    if "agree_prev" not in features:
        return [(layer, None) for layer in layers]
    return [(layer, previous) for layer in layers for previous in [None, *[p for p in layers if p < layer]]]


def fit_pair(
    view: ExitView, features: Sequence[str], layer: int, previous: int | None, config: GateFitConfig
) -> GateFit:
    """Fit one gate on a view's rows: agreement with full depth at ``layer``."""
    x = torch.from_numpy(view.feature_matrix(features, layer, previous))
    return fit_logistic(x, torch.from_numpy(view.agrees(layer)), config, features)


def _record(fit: GateFit) -> dict[str, Any]:
    return {
        "weight": list(fit.params.weight),
        "bias": fit.params.bias,
        "bce": fit.bce,
        "accuracy": fit.accuracy,
        "positive_rate": fit.positive_rate,
    }


def select_features(
    fit_view: ExitView, score_view: ExitView, layers: Sequence[int], config: GateFitConfig
) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The candidate feature set with the best mean held-out AUC (module docstring), and every set's scores."""
    scores: dict[str, Any] = {}
    for name, features in FEATURE_SETS.items():
        per_layer: dict[str, float | None] = {}
        for index, layer in enumerate(layers):
            previous = layers[index - 1] if index > 0 else None
            fit = fit_pair(fit_view, features, layer, previous, config)
            probability = fit.params.probability(torch.from_numpy(score_view.feature_matrix(features, layer, previous)))
            per_layer[str(layer)] = auc(probability.numpy(), score_view.agrees(layer))
        measured = [v for v in per_layer.values() if v is not None]
        scores[name] = {
            "features": list(features),
            "calib_auc_mean": float(np.mean(measured)) if measured else None,
            "calib_auc_per_layer": per_layer,
        }
    if config.features is not None:
        return validate_feature_names(config.features), scores
    ranked = sorted(
        (name for name in FEATURE_SETS if name != PAPER_GATE and scores[name]["calib_auc_mean"] is not None),
        key=lambda name: (-round(scores[name]["calib_auc_mean"], 4), len(FEATURE_SETS[name])),
    )
    return (FEATURE_SETS[ranked[0]] if ranked else FEATURE_SETS["cosine"]), scores


def gate_hash(job: Job, heads_hash: str) -> str:
    """Identity of the fitted gates."""
    return config_hash("fit-gate", heads_hash, job.config.gate)


def gate_label_sets_view(
    store: FeatureStore, job: Job, split: str, variant: str, repeats: int, seed: int, fixed_k: int | None = None
) -> ExitView:
    """A head set's view of a split with ``repeats`` label sets per image, K log-uniform (or ``fixed_k``), and
    without ``fixed_k`` one word label set per image at each of calibration's word K (when the build has words)."""
    _, heads = load_heads(job.step_dir("train-heads"), variant)
    truth = store.load(split, ["labels"])["labels"].numpy()
    rng = np.random.default_rng(seed)
    num_labels = len(store.labels)
    rows = len(truth) * repeats
    counts = np.full(rows, fixed_k) if fixed_k is not None else log_uniform_counts(rng, rows, num_labels)
    sets = label_sets_for(truth, num_labels, counts, repeats, rng)
    hidden = job.config.heads.hidden_dim or store.shape.width
    # Word label sets too (one per image at each K calibration checks), so the gates learn them.
    word_counts = job.config.calibrate.word_label_counts if fixed_k is None else ()
    pooling = VARIANTS[variant].pooling
    return exit_view_with_client_rows(store, split, heads, pooling, sets, hidden, word_counts, 1, rng)


@step("fit-gate")
def run_fit_gate(job: Job) -> str:
    """Step ``fit-gate``: write ``fit-gate/gates.json`` for every head set and layer pair; returns the step hash."""
    wanted = gate_hash(job, run_train_heads(job))
    directory = job.step_dir("fit-gate")
    if job.should_skip("fit-gate", wanted):
        return wanted
    config = job.config.gate
    if config.label_sets_per_image < 1:
        raise ConfigError("label_sets_per_image must be at least 1")
    store = FeatureStore(job.step_dir("extract"))
    layers = list(store.layers)
    repeats = config.label_sets_per_image
    views = {variant: gate_label_sets_view(store, job, "gate", variant, repeats, config.seed) for variant in VARIANTS}
    calib_view = gate_label_sets_view(store, job, "calib", SHIPPED_VARIANT, 1, config.seed + 1)
    features, selection = select_features(views[SHIPPED_VARIANT], calib_view, layers, config)
    result: dict[str, Any] = {
        "gate_images": store.count("gate"),
        "rows": views[SHIPPED_VARIANT].size,
        "label_sets": {
            "per_image": repeats,
            "k": "log-uniform over 2..N",
            "seed": config.seed,
            "word_sets_k": list(job.config.calibrate.word_label_counts) if store.word_sets() is not None else [],
        },
        "features": list(features),
        "selection": selection,
        "variants": {},
    }
    for variant, view in views.items():
        result["variants"][variant] = {
            gate_key(layer, previous): _record(fit_pair(view, features, layer, previous, config))
            for layer, previous in pairs(layers, features)
        }
    # The paper's gate, on the paper's terms: is the distilled exit right, with every label of the data.
    paper_view = gate_label_sets_view(store, job, "gate", "ssa-distilled", 1, config.seed, fixed_k=len(store.labels))
    paper: dict[str, Any] = {}
    for layer in layers:
        x = torch.from_numpy(paper_view.feature_matrix(PAPER_FEATURES, layer, None))
        correct = torch.from_numpy(paper_view.top1[layer] == paper_view.truth)
        paper[gate_key(layer, None)] = _record(fit_logistic(x, correct, config, PAPER_FEATURES))
    result[PAPER_GATE] = {"features": list(PAPER_FEATURES), "variant": "ssa-distilled", "target": "correct at K=N"}
    result["variants"][PAPER_GATE] = paper
    write_json(directory / GATES_FILE, result)
    write_record(directory, "fit-gate", wanted, {"features": list(features)})
    return wanted


@dataclass(frozen=True)
class GateBank:
    """The fitted gates of one head set (or the paper baseline), by (layer, previous candidate)."""

    features: tuple[str, ...]  # input feature names
    fits: dict[str, GateParams]  # gate_key -> gate

    def for_layers(self, layers: Sequence[int]) -> dict[int, GateParams]:
        """The gate of every layer of a candidate subset (each reading agreement with the one before it)."""
        chosen = {}
        for index, layer in enumerate(layers):
            previous = layers[index - 1] if index > 0 and "agree_prev" in self.features else None
            chosen[layer] = self.fits[gate_key(layer, previous)]
        return chosen


def load_gates(directory: Path, name: str) -> GateBank:
    """The fitted gates of a head set (a VARIANTS name) or of the paper baseline (``"paper"``)."""
    data = read_json(directory / GATES_FILE)
    features = tuple(data[PAPER_GATE]["features"] if name == PAPER_GATE else data["features"])
    fits = {
        key: GateParams(weight=tuple(float(v) for v in fit["weight"]), bias=float(fit["bias"]), features=features)
        for key, fit in data["variants"][name].items()
    }
    return GateBank(features, fits)
