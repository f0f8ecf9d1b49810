"""The learned exit gate: per-layer logistic regression on three per-image features.

Features of an image at a candidate layer, computed from that layer's class logits and hidden state:

* ``confidence``: the largest class probability (softmax of the logits over the request's label set);
* ``margin``: top-1 minus top-2 probability, separating sharp from flat distributions;
* ``sav`` (spatial-activation variance): the paper's formula was lost in extraction. We use the variance over the
  patch tokens of their L2 norms divided by the squared mean norm, Var_n(||x_n||) / Mean_n(||x_n||)^2 on the raw
  residual stream (patch tokens only, [CLS] excluded). It is scale-free, so one gate fits every layer's scale,
  and it grows when a few tokens carry outsized activations, which is what quantization outliers do.

The gate is ``sigmoid(w . features + b)``: 4 parameters per layer, as in the paper. An image leaves at layer l when
its gate probability is at least the layer's threshold; a threshold of 1.0 or more disables the exit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_FEATURES = 3
FEATURE_NAMES: tuple[str, ...] = ("confidence", "margin", "sav")


def spatial_activation_variance(hidden: torch.Tensor) -> torch.Tensor:
    """SAV per image from a layer's hidden state [B, T, D] -> [B] (see module docstring)."""
    norms = hidden[:, 1:].float().norm(dim=-1)  # [B, N]
    mean = norms.mean(dim=1)
    return norms.var(dim=1, unbiased=False) / mean.clamp_min(1e-12).square()


def gate_features(logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Gate features [B, 3] = (confidence, margin, sav) from class logits [B, K] and hidden state [B, T, D]."""
    return gate_features_from_sav(logits, spatial_activation_variance(hidden))


def gate_features_from_sav(logits: torch.Tensor, sav: torch.Tensor) -> torch.Tensor:
    """Gate features [B, 3] from class logits [B, K] and an already computed SAV [B] (e.g. a feature cache).

    With a single label the margin is the confidence itself (the runner-up probability is zero).
    """
    probs = logits.float().softmax(dim=-1)
    top = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    confidence = top[:, 0]
    margin = confidence - top[:, 1] if top.shape[-1] > 1 else confidence
    return torch.stack([confidence, margin, sav.float()], dim=-1)


@dataclass(frozen=True)
class GateParams:
    """Logistic-regression weights of one layer's gate."""

    weight: tuple[float, float, float]  # coefficient per feature, in FEATURE_NAMES order
    bias: float  # intercept

    def probability(self, features: torch.Tensor) -> torch.Tensor:
        """Gate probability [B] from features [B, 3]."""
        w = torch.tensor(self.weight, dtype=features.dtype, device=features.device)
        return torch.sigmoid(features @ w + self.bias)


def exits(probability: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask [B] of the images that leave at a layer with this threshold (>= 1.0 never leaves)."""
    if threshold >= 1.0:
        return torch.zeros_like(probability, dtype=torch.bool)
    return probability >= threshold
