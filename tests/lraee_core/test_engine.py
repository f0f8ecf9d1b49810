from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lraee_core.checkpoint import load_classifier
from lraee_core.engine import EarlyExitClassifier, ExitResult
from lraee_core.errors import InputError
from lraee_core.exits import ExitRule
from lraee_core.heads import class_logits

from ..decisions import BATCH_BAND, same_ranking
from .thresholds import split_thresholds

LABELS = ["cat", "dog", "car", "tree", "boat"]


@pytest.fixture(scope="module")
def classifier(tiny_checkpoint: Path) -> EarlyExitClassifier:
    return load_classifier(tiny_checkpoint)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def ranked(result: ExitResult) -> list[tuple[str, float]]:
    """A result's predictions as (label, score), highest first."""
    return [(p.label, p.score) for p in result.predictions]


def test_batch_gives_each_image_its_own_result(classifier: EarlyExitClassifier, images: torch.Tensor) -> None:
    """An image's exit, FLOPs and answer are the same alone and in a batch. The thresholds split the batch, each in
    a gap of the gate probabilities at least BATCH_BAND wide (tests/decisions.py: one backend, a row alone and in a
    batch), so no exit hangs on the last bits a batch size may change;
    scores agree within 1e-5, and so does the ranking wherever two scores are further apart than the tie band."""
    rule = ExitRule.from_thresholds(split_thresholds(classifier, images, LABELS, BATCH_BAND))
    batched = classifier.classify(images, LABELS, exit_rule=rule, top_k=5)
    paths = {(r.exit_layer, r.exit_path) for r in batched}
    assert len(paths) > 1, "the thresholds should split the batch across exits"
    for i, result in enumerate(batched):
        alone = classifier.classify(images[i : i + 1], LABELS, exit_rule=rule, top_k=5)[0]
        assert (alone.exit_layer, alone.exit_path, alone.flops) == (result.exit_layer, result.exit_path, result.flops)
        same_ranking(ranked(alone), ranked(result), atol=1e-5)


def test_thresholds_at_one_equal_the_full_depth_int8_model(
    classifier: EarlyExitClassifier, images: torch.Tensor
) -> None:
    results = classifier.classify(images, LABELS, operating_point="never", top_k=5)
    with torch.inference_mode():
        features = F.normalize(classifier.backbone.model.encode_image(images), dim=-1)  # quantized tower
        text = classifier.text_embeddings(LABELS)
        probs = class_logits(features, text, classifier.backbone.logit_scale).softmax(-1)
    for row, result in enumerate(results):
        assert result.exit_path == "full" and result.exit_layer == 12 and not result.exited_early
        assert result.gate_probability is None
        for prediction in result.predictions:
            assert prediction.score == pytest.approx(float(probs[row, LABELS.index(prediction.label)]), abs=1e-5)
        # every candidate head was evaluated on the way, so full depth costs a little more than plain CLIP
        assert result.flops_saved < 0


def test_thresholds_at_zero_leave_at_the_first_candidate(classifier: EarlyExitClassifier, images: torch.Tensor) -> None:
    first = classifier.policy.candidate_layers[0]
    cost = classifier.flops(len(LABELS))
    for result in classifier.classify(images, LABELS, operating_point="always"):
        assert result.exit_layer == first and result.exit_path == "head" and result.exited_early
        assert result.flops == cost.embed + first * cost.block + cost.head + cost.gate
        assert result.flops_saved == pytest.approx(1 - result.flops / cost.full_depth)
        assert result.gate_probability is not None


def test_forced_exits_follow_the_requested_layers(classifier: EarlyExitClassifier, images: torch.Tensor) -> None:
    layers = classifier.policy.candidate_layers
    plan = [layers[0], layers[1], layers[2], None] * 2
    results = classifier.classify(images, LABELS, exit_rule=ExitRule.forced_mix(plan))
    assert [r.exit_layer for r in results] == [layers[0], layers[1], layers[2], 12] * 2
    assert [r.exit_path for r in results] == ["head", "head", "head", "full"] * 2
    with pytest.raises(InputError, match="3 entries for 8 images"):
        classifier.classify(images, LABELS, exit_rule=ExitRule.forced_mix(plan[:3]))
    with pytest.raises(InputError, match="not candidate layers"):
        classifier.classify(images, LABELS, exit_rule=ExitRule.forced_mix([5] * 8))


def test_full_rule_runs_no_head_and_costs_exactly_plain_clip(
    classifier: EarlyExitClassifier, images: torch.Tensor
) -> None:
    assert "full" in classifier.policy.names
    full = classifier.classify(images, LABELS, operating_point="full", top_k=5)
    never = classifier.classify(images, LABELS, operating_point="never", top_k=5)
    cost = classifier.flops(len(LABELS))
    for a, b in zip(full, never, strict=True):
        assert a.exit_path == "full" and a.gate_probability is None
        assert a.flops == cost.full_depth and a.flops_saved == 0.0  # no head or gate was evaluated
        assert b.flops > a.flops  # `never` still pays for every head on the way
        same_ranking(ranked(a), ranked(b), atol=1e-6)
    assert [r.exit_path for r in classifier.classify(images, LABELS, exit_rule=ExitRule.full())] == ["full"] * 8


def test_custom_thresholds_move_the_exits(classifier: EarlyExitClassifier, images: torch.Tensor) -> None:
    layers = classifier.policy.candidate_layers
    first = classifier.classify(images, LABELS, exit_rule=ExitRule.from_thresholds(dict.fromkeys(layers, 0.0)))
    assert {r.exit_layer for r in first} == {layers[0]}
    last_only = {layers[0]: 1.0, layers[1]: 1.0, layers[2]: 0.0}
    late = classifier.classify(images, LABELS, exit_rule=ExitRule.from_thresholds(last_only))
    assert {r.exit_layer for r in late} == {layers[2]}


def test_predictions_are_sorted_top_k_probabilities(classifier: EarlyExitClassifier, images: torch.Tensor) -> None:
    result = classifier.classify(images[:1], LABELS, top_k=3)[0]
    scores = [p.score for p in result.predictions]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    full = classifier.classify(images[:1], LABELS, top_k=100)[0]
    assert sum(p.score for p in full.predictions) == pytest.approx(1.0, abs=1e-5)


def test_custom_templates_and_bad_requests(classifier: EarlyExitClassifier, images: torch.Tensor) -> None:
    a = classifier.classify(images[:1], LABELS, templates=["a drawing of a {}"])[0]
    b = classifier.classify(images[:1], LABELS)[0]
    assert a.predictions != b.predictions
    with pytest.raises(InputError, match="unknown operating point 'turbo'; this model has"):
        classifier.classify(images[:1], LABELS, operating_point="turbo")
    with pytest.raises(InputError, match="must contain"):
        classifier.classify(images[:1], LABELS, templates=["no slot"])
    with pytest.raises(InputError, match="duplicate label"):
        classifier.classify(images[:1], ["cat", "cat"])
    with pytest.raises(InputError, match="non-empty image batch"):
        classifier.classify(images[:0], LABELS)


def test_embeddings_are_the_full_depth_paths_in_the_classifiers_space(
    classifier: EarlyExitClassifier, images: torch.Tensor
) -> None:
    embeddings = classifier.embed_images(images)
    with torch.inference_mode():
        expected = F.normalize(classifier.backbone.model.encode_image(images), dim=-1)  # the (quantized) tower
    assert embeddings.shape == (8, classifier.backbone.shape.embed_dim) and embeddings.dtype == torch.float32
    assert torch.allclose(embeddings, expected, atol=1e-5)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(8), atol=1e-5)
    # One template, one text per label: the texts' embeddings are the labels' and rank them as `full` does.
    texts = classifier.embed_texts([f"a photo of a {label}." for label in LABELS])
    assert torch.allclose(texts, classifier.text_embeddings(LABELS, ["a photo of a {}."]).float(), atol=2e-3)
    results = classifier.classify(images, LABELS, templates=["a photo of a {}."], operating_point="full", top_k=1)
    best = (embeddings @ texts.T).argmax(dim=-1).tolist()
    assert [LABELS[index] for index in best] == [result.predictions[0].label for result in results]
    with pytest.raises(InputError):
        classifier.embed_texts([])
