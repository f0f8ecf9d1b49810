"""The QIRC profile's statistics on hand-made hidden states, where every figure is known in advance."""

from __future__ import annotations

import pytest
import torch

from training.pipeline.profile import OUTLIER_RMS, ProfileAccumulator


def _states(layers: int, batch: int = 2, tokens: int = 5, width: int = 8) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, tokens, width, generator=generator) for _ in range(layers + 1)]


def test_noise_change_nsr_and_cosine_follow_their_definitions() -> None:
    fp32 = _states(2)
    offset = 0.1
    int8 = [state + offset for state in fp32]  # a uniform error: noise = offset^2 per element
    accumulator = ProfileAccumulator(num_layers=2)
    accumulator.update(fp32, int8)
    layers = accumulator.result()
    elements_per_image = 5 * 8
    for profile in layers:
        assert profile.noise == pytest.approx(offset**2 * elements_per_image)
        change = (fp32[profile.layer] - fp32[profile.layer - 1]).double().square().sum().item() / 2
        assert profile.change == pytest.approx(change)
        assert profile.nsr == pytest.approx(profile.noise / change) and profile.inr == pytest.approx(1 / profile.nsr)
        assert profile.mse == pytest.approx(offset**2)
        assert 0.99 < profile.cosine < 1.0


def test_outlier_share_counts_activations_beyond_six_rms() -> None:
    fp32 = [torch.ones(2, 10, 10) for _ in range(2)]  # RMS 1 everywhere: no outliers
    spiked = torch.ones(2, 10, 10)
    spiked[0, 0, 0] = spiked[1, 3, 4] = 100.0  # one huge activation per image
    fp32[1] = spiked
    accumulator = ProfileAccumulator(num_layers=1)
    accumulator.update(fp32, [state.clone() for state in fp32])
    [layer] = accumulator.result()
    rms = ((99 + 100**2) / 100) ** 0.5  # each image's RMS with its spike
    assert OUTLIER_RMS * rms < 100  # the spike stands out; the ones do not
    assert layer.outlier_share == pytest.approx(2 / 200)
    assert layer.noise == 0.0 and layer.inr == pytest.approx(1e12)
