"""bench.service's real-traffic run: each client its own label set, rounds interleaved with plain open_clip FP32.
No timing thresholds: the numbers' presence and arithmetic are under test, not this machine's speed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.service import VOCABULARY, client_label_sets, run_varied_service, varied_report


def test_each_client_gets_its_own_seeded_label_set_of_2_to_20() -> None:
    sets = client_label_sets(16)
    assert sets == client_label_sets(16)  # the same traffic every run
    assert len(set(sets)) == 16 and all(2 <= len(labels) <= 20 for labels in sets)
    assert all(len(set(labels)) == len(labels) and set(labels) <= set(VOCABULARY) for labels in sets)


@pytest.mark.slow
def test_varied_run_on_the_tiny_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = run_varied_service(
        tiny_checkpoint,
        clients=3,
        threads=1,
        requests_per_round=12,
        baseline_batches=1,
        warmup=0,
        repeats=2,
        time_limit_s=240,
        log_path=tmp_path / "server.log",
    )
    assert result.errors == 0, result.error_samples
    assert len(result.service_requests_per_s) == len(result.baseline_images_per_s) == 2
    for ratio, service, baseline in zip(
        result.ratios, result.service_requests_per_s, result.baseline_images_per_s, strict=True
    ):
        assert service > 0 and baseline > 0 and ratio == pytest.approx(service / baseline)
    assert result.mean_engine_batch >= 1.0 and result.model["model"] == "untrained"
    record = varied_report(result, "python -m bench.service --test", ["load average: x"], ["load average: y"])
    assert "service / open_clip (same round)" in record and "load average: y" in record
