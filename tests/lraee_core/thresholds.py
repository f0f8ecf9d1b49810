"""Exit thresholds that split a batch, for engine tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lraee_core.engine import EarlyExitClassifier
from lraee_core.gate import gate_features, spatial_activation_variance
from lraee_core.heads import class_logits


def median_thresholds(classifier: EarlyExitClassifier, images: torch.Tensor, labels: Sequence[str]) -> dict[int, float]:
    """Each candidate's median gate probability for these images and labels (just above it), so that at every
    candidate some images leave and some go on."""
    text = classifier.text_embeddings(labels)
    scale = classifier.backbone.logit_scale
    thresholds, previous = {}, None
    with torch.inference_mode():
        hidden = classifier.backbone.embed(images)
        for layer in range(1, classifier.num_layers + 1):
            hidden = classifier.backbone.block(layer, hidden)
            if layer in classifier.heads:
                head, gate = classifier.heads[layer], classifier.gates[layer]
                logits = class_logits(head(head.pool(hidden)), text, scale)
                sav = spatial_activation_variance(hidden)
                probability = gate.probability(gate_features(gate.features, logits, scale, sav, previous))
                previous = logits.argmax(-1)
                thresholds[layer] = float(probability.median()) + 1e-6
    return thresholds
