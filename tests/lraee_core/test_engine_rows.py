"""Joint batches of rows with different label sets, exit rules and top-k: each row gets what it gets alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lraee_core.checkpoint import load_classifier
from lraee_core.engine import EarlyExitClassifier, ExitResult, LabelQuery
from lraee_core.errors import InputError
from lraee_core.exits import ExitRule

from ..decisions import BATCH_BAND, same_ranking
from .test_engine import ranked
from .thresholds import near_thresholds, split_thresholds

LABEL_SETS = [
    ["cat"],
    ["cat", "dog"],
    ["cat", "dog", "car", "tree", "boat"],
    [f"thing {i}" for i in range(20)],
    ["apple", "banana", "cherry"],
]


@pytest.fixture(scope="module")
def classifier(tiny_checkpoint: Path) -> EarlyExitClassifier:
    return load_classifier(tiny_checkpoint)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(12, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def split_rule(classifier: EarlyExitClassifier, images: torch.Tensor, labels: list[str]) -> ExitRule:
    """Thresholds that split the batch at each candidate, none near a gate probability (tests/decisions.py: a row
    alone and in a batch, one backend, so BATCH_BAND)."""
    return ExitRule.from_thresholds(split_thresholds(classifier, images, labels, BATCH_BAND))


def assert_same(joint: ExitResult, alone: ExitResult) -> None:
    """One image's answer in a joint batch and alone: the same exit and cost; scores within 1e-5, and the same
    ranking wherever two scores are further apart than the tie band."""
    assert (joint.exit_layer, joint.exit_path, joint.flops, joint.flops_full) == (
        alone.exit_layer,
        alone.exit_path,
        alone.flops,
        alone.flops_full,
    )
    same_ranking(ranked(joint), ranked(alone), atol=1e-5)
    if alone.gate_probability is None:
        assert joint.gate_probability is None
    else:
        assert joint.gate_probability == pytest.approx(alone.gate_probability, abs=1e-5)


def test_rows_with_their_own_label_sets_and_rules_match_their_own_batches(
    classifier: EarlyExitClassifier, images: torch.Tensor
) -> None:
    # Five requests, each its own labels, rule and top-k, their images interleaved in one batch.
    # One label leaves the gate nothing to tell the images apart by (its probabilities differ by 1e-4): never.
    rules = [
        classifier.exit_rule("never"),
        split_rule(classifier, images, LABEL_SETS[1]),
        split_rule(classifier, images, LABEL_SETS[2]),
        split_rule(classifier, images, LABEL_SETS[3]),
        ExitRule.full(),
    ]
    top_ks = [1, 2, 3, 20, 5]
    queries = [
        classifier.query(labels, exit_rule=rule, top_k=top_k)
        for labels, rule, top_k in zip(LABEL_SETS, rules, top_ks, strict=True)
    ]
    owner = [row % len(queries) for row in range(images.shape[0])]
    joint = classifier.classify_rows(images, [queries[q] for q in owner])
    assert len({(r.exit_layer, r.exit_path) for r in joint}) > 2, "the rules should spread the rows over exits"
    for q in range(len(queries)):
        rows = [row for row in range(images.shape[0]) if owner[row] == q]
        alone = classifier.classify(images[rows], LABEL_SETS[q], exit_rule=rules[q], top_k=top_ks[q])
        for row, result in zip(rows, alone, strict=True):
            assert_same(joint[row], result)
            assert len(joint[row].predictions) == min(top_ks[q], len(LABEL_SETS[q]))
    assert all(joint[row].exit_path == "full" and joint[row].flops_saved == 0.0 for row in range(4, 12, 5))


def test_each_row_alone_equals_its_row_in_a_mixed_batch(classifier: EarlyExitClassifier, images: torch.Tensor) -> None:
    """The stored point `half` (0.5 at every candidate): rows whose gate probability lies within the tie band of
    0.5 are counted, not compared (at most one of the 12)."""
    queries = [classifier.query(labels, operating_point="half") for labels in LABEL_SETS]
    owner = [(row * 3) % len(queries) for row in range(images.shape[0])]
    joint = classifier.classify_rows(images, [queries[q] for q in owner])
    half = classifier.policy.point("half").thresholds
    in_band = [near_thresholds(classifier, images, labels, half) for labels in LABEL_SETS]
    assert sum(int(in_band[owner[row]][row]) for row in range(images.shape[0])) <= 1
    for row in range(images.shape[0]):
        if not in_band[owner[row]][row]:
            [alone] = classifier.classify_rows(images[row : row + 1], [queries[owner[row]]])
            assert_same(joint[row], alone)


def test_forced_mixes_apply_per_request(classifier: EarlyExitClassifier, images: torch.Tensor) -> None:
    layers = classifier.policy.candidate_layers
    forced = classifier.query(LABEL_SETS[2], exit_rule=ExitRule.forced_mix([layers[0], None, layers[1]]))
    gated = classifier.query(LABEL_SETS[1], operating_point="always")
    results = classifier.classify_rows(images[:5], [forced, gated, forced, gated, forced])
    assert [r.exit_layer for r in results] == [layers[0], layers[0], 12, layers[0], layers[1]]
    assert [r.exit_path for r in results] == ["head", "head", "full", "head", "head"]
    with pytest.raises(InputError, match="3 entries for 2 images"):
        classifier.classify_rows(images[:2], [forced, forced])


def test_a_label_cap_sends_larger_label_sets_the_full_way(
    classifier: EarlyExitClassifier, images: torch.Tensor
) -> None:
    thresholds = split_thresholds(classifier, images, LABEL_SETS[2], BATCH_BAND)
    capped = ExitRule.from_thresholds(thresholds, "capped", label_cap=3)
    free = ExitRule.from_thresholds(thresholds, "capped")
    small = classifier.query(LABEL_SETS[1], exit_rule=capped)
    large = classifier.query(LABEL_SETS[2], exit_rule=capped)
    assert small.rule is capped and not large.rule.evaluate_heads and large.rule.name == "capped"
    assert classifier.query(LABEL_SETS[3], exit_rule=capped).rule is large.rule  # one no-heads rule per cap
    joint = classifier.classify_rows(images, [small, large] * 6)
    # The thresholds split the 5-label probabilities; a 2-label row within the tie band of one is counted, not compared
    in_band = near_thresholds(classifier, images, LABEL_SETS[1], thresholds, BATCH_BAND)
    assert in_band[0::2].sum() <= 1
    for row in range(0, 12, 2):  # within the cap: the rule's own answer
        if not in_band[row]:
            assert_same(joint[row], classifier.classify(images[row : row + 1], LABEL_SETS[1], exit_rule=free)[0])
    full = classifier.classify(images[1::2], LABEL_SETS[2], exit_rule=ExitRule.full())
    for result, reference in zip(joint[1::2], full, strict=True):  # above it: the `full` answer and cost
        assert_same(result, reference)
        assert result.exit_path == "full" and result.flops_saved == 0.0
    uncapped = classifier.classify(images[1::2], LABEL_SETS[2], exit_rule=free)
    assert any(r.exit_path == "head" for r in uncapped), "without the cap some of these rows leave early"
    with pytest.raises(ValueError, match="label count >= 1"):
        ExitRule.from_thresholds(thresholds, label_cap=0)


def test_text_resolved_beforehand_and_bad_calls(classifier: EarlyExitClassifier, images: torch.Tensor) -> None:
    labels = LABEL_SETS[2]
    text = classifier.text_embeddings(labels)
    given = classifier.query(labels, text=text)
    cached = classifier.query(labels)
    assert torch.equal(given.text, cached.text) and isinstance(given, LabelQuery)
    a = classifier.classify_rows(images[:2], [given, given])
    b = classifier.classify(images[:2], labels)
    for x, y in zip(a, b, strict=True):
        assert_same(x, y)
    with pytest.raises(InputError, match="text embeddings of shape"):
        classifier.query(labels, text=text[:2])
    with pytest.raises(InputError, match="2 queries for 3 images"):
        classifier.classify_rows(images[:3], [given, given])
    with pytest.raises(InputError, match="non-empty image batch"):
        classifier.classify_rows(images[:0], [])
    with pytest.raises(InputError, match="unknown operating point"):
        classifier.query(labels, operating_point="turbo")
