"""The learned exit gate: per-layer logistic regression on named per-image features.

A gate predicts whether an exit's top-1 equals the full-depth top-1 for the request's own label set (agreement), so
its inputs must mean the same thing whatever the number of labels K. The features, by name:

* ``cos_top1``: the largest cosine between the exit embedding and a label's text embedding;
* ``cos_gap``: top-1 minus top-2 cosine (with a single label: top-1 + 1, the gap to the lowest possible cosine);
* ``entropy_norm``: entropy of the softmax over the label set divided by log K (0 with a single label);
* ``log_k``: log K itself, so the gate can learn how much harder a larger label set is;
* ``sav`` (spatial-activation variance): the paper's formula was lost in extraction. We use the variance over the
  patch tokens of their L2 norms divided by the squared mean norm, Var_n(||x_n||) / Mean_n(||x_n||)^2 on the raw
  residual stream (patch tokens only, [CLS] excluded). It is scale-free and grows when a few tokens carry outsized
  activations, which is what quantization outliers do;
* ``agree_prev``: 1 when this exit's top-1 equals the previous candidate exit's top-1 (0 at the first candidate);
* ``confidence`` and ``margin``: the paper's largest softmax probability and top-1 minus top-2 probability. Both
  grow as K shrinks, so a gate fitted at one K misjudges every other K; kept for the paper's 3-feature baseline.

The gate is ``sigmoid(w . features + b)``. An image leaves at layer l when its gate probability is at least the
layer's threshold; a threshold of 1.0 or more disables the exit. The checkpoint stores the feature names, and the
engine computes exactly those.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

PAPER_FEATURES: tuple[str, ...] = ("confidence", "margin", "sav")
FEATURES: tuple[str, ...] = (
    "cos_top1",
    "cos_gap",
    "entropy_norm",
    "log_k",
    "sav",
    "agree_prev",
    "confidence",
    "margin",
)
# Backwards-compatible names: the paper's three features.
FEATURE_NAMES = PAPER_FEATURES
NUM_FEATURES = len(PAPER_FEATURES)


def validate_feature_names(names: Sequence[str]) -> tuple[str, ...]:
    """The names as a tuple; ``ValueError`` when empty, repeated or unknown."""
    names = tuple(names)
    unknown = [name for name in names if name not in FEATURES]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"gate features {list(names)} must be unique names from {list(FEATURES)}")
    return names


def spatial_activation_variance(hidden: torch.Tensor) -> torch.Tensor:
    """SAV per image from a layer's hidden state [B, T, D] -> [B] (see module docstring)."""
    norms = hidden[:, 1:].float().norm(dim=-1)  # [B, N]
    mean = norms.mean(dim=1)
    return norms.var(dim=1, unbiased=False) / mean.clamp_min(1e-12).square()


def gate_features(
    names: Sequence[str],
    logits: torch.Tensor,
    logit_scale: float,
    sav: torch.Tensor | None = None,
    previous_top1: torch.Tensor | None = None,
    num_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gate features [B, F] in ``names`` order from an exit's class logits [B, K] (``logit_scale`` x cosine).

    ``sav`` [B] is needed when "sav" is named; ``previous_top1`` [B] (label indices of the previous candidate
    exit's answer, None at the first candidate) when "agree_prev" is named. ``num_labels`` [B] lets every row have
    its own label set: row i's logits are its first ``num_labels[i]`` columns and the rest are ``-inf`` padding
    (the engine batches requests with different label sets this way); None: every row has all K columns.
    """
    logits = logits.float()
    batch, width = logits.shape
    # One K for every row (the common case: a single label set) keeps every feature a scalar op; only a batch whose
    # rows have different label-set sizes needs the per-row forms (``counts``).
    k, counts = width, None
    if num_labels is not None:
        smallest, largest = (int(v) for v in num_labels.aminmax())
        k, counts = (smallest, None) if smallest == largest else (largest, num_labels)
    columns: dict[str, torch.Tensor] = {}
    top = logits.topk(min(2, width), dim=-1).values / logit_scale  # [B, <=2] cosines (padding is -inf, never top)
    probs = logits.softmax(dim=-1)  # padding gets probability 0
    for name in names:
        if name == "cos_top1":
            columns[name] = top[:, 0]
        elif name == "cos_gap":
            # With a single label the gap is to the lowest possible cosine, -1.
            if counts is not None:
                columns[name] = torch.where(counts > 1, top[:, 0] - top[:, -1], top[:, 0] + 1.0)
            else:
                columns[name] = top[:, 0] - top[:, 1] if k > 1 else top[:, 0] + 1.0
        elif name == "entropy_norm":
            if k > 1:
                entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)
                if counts is None:
                    columns[name] = entropy / math.log(k)
                else:
                    columns[name] = torch.where(counts > 1, entropy / _log_per_row(counts), 0.0)
            else:
                columns[name] = torch.zeros(batch)
        elif name == "log_k":
            columns[name] = _log_per_row(counts) if counts is not None else torch.full((batch,), math.log(k))
        elif name == "sav":
            if sav is None:
                raise ValueError("the 'sav' feature needs the layer's SAV")
            columns[name] = sav.float()
        elif name == "agree_prev":
            if previous_top1 is None:
                columns[name] = torch.zeros(batch)
            else:
                columns[name] = (logits.argmax(dim=-1) == previous_top1).float()
        elif name in ("confidence", "margin"):
            ranked = probs.topk(min(2, width), dim=-1).values
            confidence = ranked[:, 0]
            # With a single label the runner-up probability is zero, so the margin is the confidence itself (the
            # padding's zero gives the same for a single-label row in a padded batch).
            columns[name] = confidence if name == "confidence" or width == 1 else confidence - ranked[:, 1]
        else:
            raise ValueError(f"unknown gate feature {name!r}; known: {list(FEATURES)}")
    return torch.stack([columns[name] for name in names], dim=-1)


def _log_per_row(counts: torch.Tensor) -> torch.Tensor:
    """log K per row [B] as the gate sees it: ``math.log(K)`` rounded to float32 (float64 log, then float32, gives
    exactly that for every K up to 200,000, checked)."""
    return counts.double().log().float()


@dataclass(frozen=True)
class GateParams:
    """Logistic-regression weights of one layer's gate."""

    weight: tuple[float, ...]  # coefficient per feature, in ``features`` order
    bias: float  # intercept
    features: tuple[str, ...] = PAPER_FEATURES  # names of the inputs the weights act on
    # ``weight`` as a float32 tensor, made once (the engine calls ``probability`` at every candidate layer)
    _weights: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.weight) != len(self.features):
            raise ValueError(f"{len(self.weight)} gate weights for {len(self.features)} features {self.features}")
        object.__setattr__(self, "_weights", torch.tensor(self.weight, dtype=torch.float32))

    def probability(self, features: torch.Tensor) -> torch.Tensor:
        """Gate probability [B] from features [B, F]."""
        w = self._weights.to(dtype=features.dtype, device=features.device)  # no copy for float32 on CPU
        return torch.sigmoid(features @ w + self.bias)


def class_logits(embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Zero-shot logits: logit_scale x cosine of unit image embeddings [B, E] with unit text embeddings [K, E].

    Text embeddings are stored FP16; they are upcast to the image dtype only for this matmul.
    """
    return logit_scale * embeddings @ text_embeddings.to(embeddings.dtype).T


def row_logits(
    embeddings: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float,
    columns: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each row's logits [b, W] against its own labels from unit embeddings [b, E] and the text matrix [S, E].

    ``columns`` [b, W] says where each row's labels sit in ``text`` (padding repeats its last label) and ``counts``
    [b] how many it has; the columns past a row's count are -inf. None: every row has all S labels, in order.
    """
    every = class_logits(embeddings, text, logit_scale)  # [b, S]
    if columns is None or counts is None:
        return every
    padding = torch.arange(columns.shape[1]) >= counts.unsqueeze(1)
    return every.gather(1, columns).masked_fill(padding, float("-inf"))


@dataclass(frozen=True)
class GateQuestion:
    """What one candidate layer's gate reads besides the layer itself, for the rows of one span call (the engine
    builds it; a backend answers it with the span, :meth:`lraee_core.backbone.ClipBackbone.span`)."""

    params: GateParams  # the layer's gate
    logit_scale: float  # CLIP's temperature, exp(logit_scale)
    text: torch.Tensor  # [S, E] float32 unit text embeddings: every label set of the batch side by side
    columns: torch.Tensor | None  # [b, W] long: where each row's labels sit in ``text`` (None: one label set)
    counts: torch.Tensor | None  # [b] long: each row's K (None: one label set, K = S)
    previous_top1: torch.Tensor  # [b] long: each row's answer at the previous candidate layer (-1 before the first)


@dataclass(frozen=True)
class GateAnswer:
    """The gate's verdict on the rows of one span call."""

    logits: torch.Tensor  # [b, W] each row's exit logits against its own labels (-inf past its K)
    probability: torch.Tensor  # [b] float32 gate probability
    top1: torch.Tensor  # [b] long: each row's top-1 label index


def answer_gate(question: GateQuestion, exit_embedding: torch.Tensor, hidden: torch.Tensor) -> GateAnswer:
    """The gate in PyTorch (the reference a backend's compiled gate is checked against): logits, features and
    probability from an exit head's unit embeddings [b, E] and the layer's hidden state [b, T, D] (read for "sav")."""
    logits = row_logits(exit_embedding, question.text, question.logit_scale, question.columns, question.counts)
    params = question.params
    sav = spatial_activation_variance(hidden) if "sav" in params.features else None
    features = gate_features(
        params.features, logits, question.logit_scale, sav, question.previous_top1, question.counts
    )
    return GateAnswer(logits, params.probability(features), logits.argmax(dim=-1))


def exits(probability: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask [B] of the images that leave at a layer with this threshold (>= 1.0 never leaves)."""
    if threshold >= 1.0:
        return torch.zeros_like(probability, dtype=torch.bool)
    return probability >= threshold
