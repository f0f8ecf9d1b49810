"""Step ``fit-gate``: per head set and layer, logistic regression of "this layer's exit head is right".

Inputs are the engine's gate features (confidence, margin, SAV) computed from cached tensors of the gating split:
the head's logits over the label set give confidence and margin, SAV was cached by ``extract``. The fit is
Newton's method on the mean binary cross-entropy plus a small ridge penalty on the weights (data that a line
separates perfectly would otherwise drive them to infinity), on standardised features for conditioning; the
scaling is folded back so the stored :class:`lraee_core.gate.GateParams` act on raw features, as the engine feeds
them. A layer whose head is always right (or always wrong) gets zero weights and the bias of that rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lraee_core.gate import GateParams, gate_features_from_sav

from .config import GateFitConfig, Job, config_hash, read_json, step, write_json, write_record
from .features import FeatureStore
from .heads import VARIANTS, head_logits, load_heads, run_train_heads

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


def fit_logistic(features: torch.Tensor, targets: torch.Tensor, config: GateFitConfig) -> GateFit:
    """Logistic regression of boolean ``targets`` [N] on ``features`` [N, 3] (see module docstring)."""
    x = features.double().numpy()
    y = targets.double().numpy()
    rate = float(y.mean()) if len(y) else 0.0
    mean, std = x.mean(axis=0), x.std(axis=0)
    constant = std < 1e-12
    if rate in (0.0, 1.0) or constant.all():
        clipped = min(max(rate, _RATE_CLIP), 1 - _RATE_CLIP)
        params = GateParams(weight=(0.0, 0.0, 0.0), bias=float(np.log(clipped / (1 - clipped))))
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
        params = GateParams(weight=(float(weight[0]), float(weight[1]), float(weight[2])), bias=bias)
    probability = params.probability(features.float()).double()
    bce = torch.nn.functional.binary_cross_entropy(probability.clamp(1e-12, 1 - 1e-12), targets.double())
    accuracy = float(((probability >= 0.5) == targets.bool()).double().mean()) if len(y) else 0.0
    return GateFit(params=params, bce=float(bce), accuracy=accuracy, positive_rate=rate)


def gate_hash(job: Job, heads_hash: str) -> str:
    """Identity of the fitted gates."""
    return config_hash("fit-gate", heads_hash, job.config.gate)


@step("fit-gate")
def run_fit_gate(job: Job) -> str:
    """Step ``fit-gate``: write ``fit-gate/gates.json`` for every head set and layer; returns the step hash."""
    wanted = gate_hash(job, run_train_heads(job))
    directory = job.step_dir("fit-gate")
    if job.should_skip("fit-gate", wanted):
        return wanted
    store = FeatureStore(job.step_dir("extract"))
    text = store.text_embeddings()
    labels = store.load("gate", ["labels"])["labels"]
    result: dict[str, Any] = {"gate_images": len(labels), "variants": {}}
    for variant_name, variant in VARIANTS.items():
        _, heads = load_heads(job.step_dir("train-heads"), variant_name)
        per_layer = {}
        for layer, head in heads.items():
            cached = store.load("gate", [f"{variant.pooling}.{layer}", f"sav.{layer}"])
            logits = head_logits(head, cached[f"{variant.pooling}.{layer}"], text, store.logit_scale)
            targets = logits.argmax(-1) == labels
            fit = fit_logistic(gate_features_from_sav(logits, cached[f"sav.{layer}"]), targets, job.config.gate)
            per_layer[str(layer)] = {
                "weight": list(fit.params.weight),
                "bias": fit.params.bias,
                "bce": fit.bce,
                "accuracy": fit.accuracy,
                "positive_rate": fit.positive_rate,
            }
        result["variants"][variant_name] = per_layer
    write_json(directory / GATES_FILE, result)
    write_record(directory, "fit-gate", wanted, {"variants": list(VARIANTS)})
    return wanted


def load_gates(directory: Path, variant: str) -> dict[int, GateParams]:
    """The fitted gates of one head set, by layer."""
    layers = read_json(directory / GATES_FILE)["variants"][variant]
    gates = {}
    for layer, fit in layers.items():
        w = [float(v) for v in fit["weight"]]
        gates[int(layer)] = GateParams(weight=(w[0], w[1], w[2]), bias=float(fit["bias"]))
    return gates
