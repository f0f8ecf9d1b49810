"""bench.service's real-traffic run: each client its own label set, rounds interleaved with plain open_clip FP32;
and its batch-wait comparison: one request at a time against servers with different waits, rounds interleaved.
No timing thresholds: the numbers' presence and arithmetic are under test, not this machine's speed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.service import (
    VOCABULARY,
    SequentialResult,
    WaitSide,
    client_label_sets,
    run_sequential_service,
    run_varied_service,
    sequential_report,
    varied_report,
)


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


def test_the_sequential_report_compares_each_wait_with_the_reference_round_by_round() -> None:
    old = WaitSide(5.0, [16.0, 17.0, 18.0], [16.0, 20.0], {"queue": [5.3, 5.2]}, [100.0, 110.0], 10.0, 80.0)
    new = WaitSide(0.0, [11.0, 12.0, 13.0], [12.0, 14.0], {"queue": [0.3, 0.2]}, [100.0, 121.0], 10.0, 70.0)
    result = SequentialResult("everyday", 2, 5, 3, 16, 320, [old, new], {"model": "everyday"}, "onnxruntime", 0)
    record = sequential_report(result, "python -m bench.service --sequential", ["load average: x"], ["load: y"])
    assert "| 5 ms | 17.00 [16.00-20.00] |" in record and "| 0 ms | 12.00 [12.00-14.00] |" in record
    assert "5.25 / - / -" in record and "| 8.0 |" in record and "| 7.0 |" in record  # queue medians, mean batches
    # Round 1: 1 - 12/16 = 25%, round 2: 1 - 14/20 = 30%; load 1.0x and 1.1x.
    assert "p50: 27.5% lower (rounds: 25.0%, 30.0%); load requests/s 1.050x (rounds: 1.000, 1.100)" in record


@pytest.mark.slow
def test_sequential_run_on_the_tiny_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = run_sequential_service(
        tiny_checkpoint,
        waits_ms=[5.0, 0.0],
        requests_per_round=4,
        clients=2,
        load_requests_per_round=4,
        threads=1,
        repeats=2,
        time_limit_s=240,
        log_dir=tmp_path,
    )
    assert result.errors == 0, result.error_samples
    assert [side.batch_wait_ms for side in result.sides] == [5.0, 0.0]
    for side in result.sides:
        assert len(side.sequential_ms) == 8 and len(side.round_p50_ms) == len(side.load_requests_per_s) == 2
        assert len(side.server_timing_ms["queue"]) == 8 and side.load_images >= side.load_batches >= 1
    assert (tmp_path / "server-wait-5ms.log").exists() and (tmp_path / "server-wait-0ms.log").exists()
    record = sequential_report(result, "python -m bench.service --sequential --test", ["x"], ["y"])
    assert "0 ms vs 5 ms, the same round's p50" in record
