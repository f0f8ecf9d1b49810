from __future__ import annotations

import math

import pytest
import torch

from lraee_core.gate import (
    FEATURES,
    PAPER_FEATURES,
    GateParams,
    exits,
    gate_features,
    spatial_activation_variance,
    validate_feature_names,
)

SCALE = 10.0


def test_sav_is_variance_of_patch_norms_over_squared_mean_and_ignores_cls() -> None:
    hidden = torch.zeros(1, 4, 2)
    hidden[0, 0] = torch.tensor([100.0, 0.0])  # [CLS]: must not count
    hidden[0, 1] = torch.tensor([3.0, 4.0])  # norm 5
    hidden[0, 2] = torch.tensor([0.0, 1.0])  # norm 1
    hidden[0, 3] = torch.tensor([0.0, 3.0])  # norm 3
    norms = torch.tensor([5.0, 1.0, 3.0])
    expected = norms.var(unbiased=False) / norms.mean() ** 2
    torch.testing.assert_close(spatial_activation_variance(hidden), expected.reshape(1))
    # scale-free: multiplying the stream by 10 leaves it unchanged
    torch.testing.assert_close(spatial_activation_variance(hidden * 10), expected.reshape(1))


def test_confidence_and_margin() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]]))
    features = gate_features(PAPER_FEATURES, logits, SCALE, torch.zeros(2))
    torch.testing.assert_close(features[:, 0], torch.tensor([0.7, 0.4]))
    torch.testing.assert_close(features[:, 1], torch.tensor([0.5, 0.0]))


def test_single_label_features_are_finite_and_confident() -> None:
    features = gate_features(FEATURES, torch.full((3, 1), 4.0), SCALE, torch.zeros(3), torch.zeros(3, dtype=torch.long))
    assert torch.isfinite(features).all()
    named = dict(zip(FEATURES, features[0].tolist(), strict=True))
    assert named["confidence"] == 1.0 and named["margin"] == 1.0  # the runner-up probability is zero
    assert named["entropy_norm"] == 0.0 and named["log_k"] == 0.0
    assert named["cos_gap"] == pytest.approx(0.4 + 1.0)  # gap to the lowest possible cosine


def _cosines(k: int, seed: int) -> torch.Tensor:
    return torch.rand(4, k, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("k", [2, 5, 10, 50, 1000])
def test_cosine_features_read_the_cosines_at_every_label_count(k: int) -> None:
    cosines = _cosines(k, k)
    features = gate_features(("cos_top1", "cos_gap", "entropy_norm", "log_k"), SCALE * cosines, SCALE)
    ranked = cosines.sort(dim=-1, descending=True).values
    torch.testing.assert_close(features[:, 0], ranked[:, 0])
    torch.testing.assert_close(features[:, 1], ranked[:, 0] - ranked[:, 1])
    assert ((features[:, 2] > 0) & (features[:, 2] <= 1 + 1e-6)).all()  # entropy / log K lies in (0, 1]
    torch.testing.assert_close(features[:, 3], torch.full((4,), math.log(k)))


def test_normalised_entropy_is_one_for_uniform_scores_at_any_k() -> None:
    for k in (2, 7, 300):
        features = gate_features(("entropy_norm",), torch.zeros(2, k), SCALE)
        torch.testing.assert_close(features[:, 0], torch.ones(2))


def test_confidence_grows_as_k_shrinks_while_cosine_features_do_not() -> None:
    """The reason for the new features: the same image and top labels, fewer distractors."""
    cosines = 0.5 * _cosines(200, 0)  # distractors below 0.5
    cosines[:, 0], cosines[:, 1] = 0.9, 0.8  # the two best labels stay in every subset
    few = gate_features(("confidence", "cos_top1", "cos_gap"), SCALE * cosines[:, :2], SCALE)
    many = gate_features(("confidence", "cos_top1", "cos_gap"), SCALE * cosines, SCALE)
    assert (few[:, 0] > many[:, 0]).all()
    torch.testing.assert_close(few[:, 1:], many[:, 1:])


def test_agreement_with_the_previous_exit() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0]])
    first = gate_features(("agree_prev",), logits, SCALE, previous_top1=None)
    assert first[:, 0].tolist() == [0.0, 0.0]  # no previous candidate
    later = gate_features(("agree_prev",), logits, SCALE, previous_top1=torch.tensor([1, 2]))
    assert later[:, 0].tolist() == [1.0, 0.0]


def test_feature_names_are_checked() -> None:
    assert validate_feature_names(["cos_top1", "sav"]) == ("cos_top1", "sav")
    for bad in ([], ["cos_top1", "cos_top1"], ["mood"]):
        with pytest.raises(ValueError, match="gate features"):
            validate_feature_names(bad)
    with pytest.raises(ValueError, match="needs the layer's SAV"):
        gate_features(("sav",), torch.zeros(1, 2), SCALE)
    with pytest.raises(ValueError, match="2 gate weights for 3 features"):
        GateParams(weight=(1.0, 2.0), bias=0.0)


def test_gate_probability_and_threshold_semantics() -> None:
    gate = GateParams(weight=(100.0, 0.0, 0.0), bias=-50.0)
    probability = gate.probability(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert probability[0] == 1.0 and probability[1] < 1e-6  # saturated sigmoid reaches exactly 1.0
    assert not exits(probability, 1.0).any()  # 1.0 disables the exit even then
    assert exits(torch.tensor([0.0, 0.3]), 0.0).all()  # 0.0 always exits
    assert exits(torch.tensor([0.49, 0.5]), 0.5).tolist() == [False, True]


def test_padded_rows_with_their_own_label_counts_equal_each_row_alone() -> None:
    """The engine batches rows with different label sets as -inf-padded logits plus a label count per row."""
    counts = [1, 2, 5, 20]
    rows = [SCALE * _cosines(k, k)[:1] for k in counts]  # one row per label count, [1, K]
    padded = torch.full((len(counts), max(counts)), float("-inf"))
    for i, row in enumerate(rows):
        padded[i, : counts[i]] = row
    sav, previous = torch.rand(len(counts)), torch.tensor([0, 1, 3, 7])
    joint = gate_features(FEATURES, padded, SCALE, sav, previous, num_labels=torch.tensor(counts))
    assert torch.isfinite(joint).all()
    for i, row in enumerate(rows):
        alone = gate_features(FEATURES, row, SCALE, sav[i : i + 1], previous[i : i + 1])
        torch.testing.assert_close(joint[i : i + 1], alone, rtol=0, atol=1e-6)
