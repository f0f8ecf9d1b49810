"""Gate probabilities of a batch, and exit thresholds that split it, for engine tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lraee_core.config import OperatingPoint
from lraee_core.engine import EarlyExitClassifier
from lraee_core.gate import gate_features, spatial_activation_variance
from lraee_core.heads import class_logits
from lraee_core.images import load_image

from ..decisions import TIE_BAND, near, split_threshold


def gate_probabilities(
    classifier: EarlyExitClassifier, images: torch.Tensor, labels: Sequence[str]
) -> dict[int, torch.Tensor]:
    """Each candidate's gate probability [N] for these images and labels, every image run to every candidate."""
    text = classifier.text_embeddings(labels)
    scale = classifier.backbone.logit_scale
    probabilities, previous = {}, None
    with torch.inference_mode():
        hidden = classifier.backbone.embed(images)
        for layer in range(1, classifier.num_layers + 1):
            hidden = classifier.backbone.block(layer, hidden)
            if layer in classifier.heads:
                head, gate = classifier.heads[layer], classifier.gates[layer]
                logits = class_logits(head(head.pool(hidden)), text, scale)
                sav = spatial_activation_variance(hidden)
                probabilities[layer] = gate.probability(gate_features(gate.features, logits, scale, sav, previous))
                previous = logits.argmax(-1)
    return probabilities


def split_thresholds(
    classifier: EarlyExitClassifier, images: torch.Tensor, labels: Sequence[str], band: float = TIE_BAND
) -> dict[int, float]:
    """A threshold per candidate that splits these images there (some leave, some go on), each in a gap of their
    gate probabilities at least ``band`` from each (``tests.decisions.split_threshold``): no image's exit hangs on
    the last bits of a kernel."""
    return {layer: split_threshold(p, band) for layer, p in gate_probabilities(classifier, images, labels).items()}


def near_thresholds(
    classifier: EarlyExitClassifier,
    images: torch.Tensor,
    labels: Sequence[str],
    thresholds: dict[int, float],
    band: float = TIE_BAND,
) -> np.ndarray:
    """[N] True for the images whose gate probability lies within the tie band of a threshold below 1 (one that
    can let an image leave): where two code paths may decide an exit either way."""
    probabilities = gate_probabilities(classifier, images, labels)
    flagged = np.zeros(images.shape[0], dtype=bool)
    for layer, threshold in thresholds.items():
        if threshold < 1.0:
            flagged |= near(probabilities[layer], threshold, band)
    return flagged


def assert_exits_clear_of_ties(
    classifier: EarlyExitClassifier,
    encoded: Sequence[bytes],
    label_sets: Sequence[Sequence[str]],
    point: OperatingPoint,
) -> None:
    """The precondition of a test that compares exits across batch shapes: no image (decoded and preprocessed as the
    service does) has a gate probability within the tie band of ``point``'s threshold at the label set's size, for
    any of the label sets, so the comparison does not hang on the last bits a batch shape may change
    (tests/decisions.py)."""
    images = torch.stack([classifier.backbone.preprocess(load_image(data)) for data in encoded])
    for labels in label_sets:
        thresholds = point.thresholds_at(len(labels))
        if thresholds is None:  # above the point's label cap: no exit head runs, nothing to decide
            continue
        flagged = near_thresholds(classifier, images, labels, thresholds)
        assert not flagged.any(), f"images {np.flatnonzero(flagged).tolist()} lie on a threshold for {list(labels)}"
