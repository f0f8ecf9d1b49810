from __future__ import annotations

import torch

from lraee_core.gate import GateParams, exits, gate_features, spatial_activation_variance


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
    features = gate_features(logits, torch.randn(2, 5, 3))
    torch.testing.assert_close(features[:, 0], torch.tensor([0.7, 0.4]))
    torch.testing.assert_close(features[:, 1], torch.tensor([0.5, 0.0]))


def test_single_label_margin_is_confidence() -> None:
    features = gate_features(torch.zeros(3, 1), torch.randn(3, 5, 4))
    torch.testing.assert_close(features[:, 0], torch.ones(3))
    torch.testing.assert_close(features[:, 1], torch.ones(3))


def test_gate_probability_and_threshold_semantics() -> None:
    gate = GateParams(weight=(100.0, 0.0, 0.0), bias=-50.0)
    probability = gate.probability(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert probability[0] == 1.0 and probability[1] < 1e-6  # saturated sigmoid reaches exactly 1.0
    assert not exits(probability, 1.0).any()  # 1.0 disables the exit even then
    assert exits(torch.tensor([0.0, 0.3]), 0.0).all()  # 0.0 always exits
    assert exits(torch.tensor([0.49, 0.5]), 0.5).tolist() == [False, True]
