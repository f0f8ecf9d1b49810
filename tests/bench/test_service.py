"""bench.service's real-traffic run: each client its own label set, rounds interleaved with plain open_clip FP32;
and its batch-wait comparison: one request at a time against servers with different waits, rounds interleaved.
No timing thresholds: the numbers' presence and arithmetic are under test, not this machine's speed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.service import (
    CPU_GROUPS,
    VOCABULARY,
    SequentialResult,
    WaitSide,
    client_label_sets,
    cpu_ms_per_request,
    run_sequential_service,
    run_varied_service,
    sequential_report,
    thread_cpu_ticks,
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
    assert len(result.engine_images_per_s) == len(result.engine_ratios) == 2
    for ratio, service, engine in zip(
        result.engine_ratios, result.service_requests_per_s, result.engine_images_per_s, strict=True
    ):
        assert engine > 0 and ratio == pytest.approx(service / engine)
    assert result.mean_engine_batch >= 1.0 and result.model["model"] == "untrained"
    assert len(result.server_cpu_ms) == 2 and all(tuple(split) == CPU_GROUPS for split in result.server_cpu_ms)
    record = varied_report(result, "python -m bench.service --test", ["load average: x"], ["load average: y"])
    assert "service / open_clip (same round)" in record and "load average: y" in record
    assert "service / its own engine (same round)" in record
    assert "| phase | event loop | decode | text | inference | total |" in record


def test_the_sequential_report_compares_each_wait_with_the_reference_round_by_round() -> None:
    old = WaitSide(5.0, [16.0, 17.0, 18.0], [16.0, 20.0], {"queue": [5.3, 5.2]}, [100.0, 110.0], 10.0, 80.0)
    new = WaitSide(0.0, [11.0, 12.0, 13.0], [12.0, 14.0], {"queue": [0.3, 0.2]}, [100.0, 121.0], 10.0, 70.0)
    result = SequentialResult("everyday", 2, 5, 3, 16, 320, [old, new], {"model": "everyday"}, "onnxruntime", 0)
    record = sequential_report(result, "python -m bench.service --sequential", ["load average: x"], ["load: y"])
    assert "| 5 ms | 17.00 [16.00-20.00] |" in record and "| 0 ms | 12.00 [12.00-14.00] |" in record
    assert "5.25 / - / -" in record and "| 8.0 |" in record and "| 7.0 |" in record  # queue medians, mean batches
    # Round 1: 1 - 12/16 = 25%, round 2: 1 - 14/20 = 30%; load 1.0x and 1.1x.
    assert "p50: 27.5% lower (rounds: 25.0%, 30.0%); load requests/s 1.050x (rounds: 1.000, 1.100)" in record
    assert record.count("| batch wait | event loop | decode | text | inference | total |") == 2  # one per phase
    assert record.count("| 5 ms | not measured | not measured |") == 2  # these sides carry no CPU rounds


def test_the_sequential_report_gives_each_servers_cpu_split_as_median_and_spread_over_rounds() -> None:
    def split(loop: float, decode: float) -> dict[str, float]:
        return {"event loop": loop, "decode": decode, "text": 0.0, "inference": 10.0, "total": loop + decode + 10.0}

    side = WaitSide(0.0, [11.0], [11.0], {}, [100.0], 1.0, 1.0, [split(1.0, 0.5), split(3.0, 0.5), split(2.0, 0.5)])
    side.load_cpu_ms = [split(0.5, 0.25)]
    result = SequentialResult("everyday", 2, 5, 1, 16, 320, [side], {"model": "everyday"}, "onnxruntime", 0)
    record = sequential_report(result, "python -m bench.service --sequential", ["x"], ["y"])
    one_at_a_time, load = record.split("Server CPU per request, the load (ms):")
    assert (
        "| 0 ms | 2.00 [1.00-3.00] | 0.50 [0.50-0.50] | 0.00 [0.00-0.00] | 10.00 [10.00-10.00] | 12.50 [11.50-13.50] |"
        in one_at_a_time
    )
    assert (
        "| 0 ms | 0.50 [0.50-0.50] | 0.25 [0.25-0.25] |" in load
        and "*inference* = `lraee-infer*` and every other" in load
    )


def _task(proc: Path, pid: int, tid: int, name: str, utime: int, stime: int) -> None:
    """One thread in a fake /proc: its comm file and a stat line as proc(5) writes it (the name in parentheses)."""
    task = proc / str(pid) / "task" / str(tid)
    task.mkdir(parents=True)
    (task / "comm").write_text(name + "\n")
    (task / "stat").write_text(
        f"{tid} ({name}) S 1 {pid} {pid} 0 -1 4194368 120 0 3 0 {utime} {stime} 0 0 20 0 9 0 7\n"
    )


def test_thread_ticks_are_read_after_the_last_parenthesis_of_the_stat_line(tmp_path: Path) -> None:
    _task(tmp_path, 40, 40, "python", 300, 20)
    _task(tmp_path, 40, 41, "lraee-decode_0", 7, 3)
    _task(tmp_path, 40, 42, "odd) name (x y", 5, 1)  # a thread may call itself anything, spaces and ')' included
    assert thread_cpu_ticks(40, tmp_path) == {
        40: ("python", 320),
        41: ("lraee-decode_0", 10),
        42: ("odd) name (x y", 6),
    }
    assert thread_cpu_ticks(99, tmp_path) is None  # no such process, or no /proc: not measured


def test_the_cpu_split_groups_threads_by_role_and_counts_new_threads_from_zero(tmp_path: Path) -> None:
    before_proc, after_proc = tmp_path / "before", tmp_path / "after"
    for proc, grown in ((before_proc, 0), (after_proc, 1)):
        _task(proc, 40, 40, "python", 100 + 8 * grown, 0)  # the event loop: tid == pid
        _task(proc, 40, 41, "lraee-decode_0", 10 + 4 * grown, 0)
        _task(proc, 40, 42, "lraee-infer_0", 50 + 20 * grown, 0)
        _task(proc, 40, 43, "python", 70 + 12 * grown, 0)  # an unnamed runtime pool thread: inference
        _task(proc, 40, 44, "lraee-text_0", 5 + 2 * grown, 0)
    _task(before_proc, 40, 45, "lraee-decode_1", 30, 0)  # ended in between: counts nothing
    _task(after_proc, 40, 46, "a (b) c", 4, 0)  # started in between: counts from 0, an unnamed thread
    _task(before_proc, 40, 47, "python", 90, 0)  # the id reused by a new thread (fewer ticks): from 0
    _task(after_proc, 40, 47, "lraee-decode_2", 2, 0)
    before, after = thread_cpu_ticks(40, before_proc), thread_cpu_ticks(40, after_proc)
    split = cpu_ms_per_request(40, before, after, requests=4, ticks_per_s=100)
    # ms per request = ticks * 10 ms / 4 requests
    assert split == {"event loop": 20.0, "decode": 15.0, "text": 5.0, "inference": 90.0, "total": 130.0}
    assert tuple(split) == CPU_GROUPS
    assert cpu_ms_per_request(40, None, after, requests=4) is None and cpu_ms_per_request(40, before, after, 0) is None


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
        assert len(side.sequential_cpu_ms) == len(side.load_cpu_ms) == 2
        assert all(split["total"] >= split["event loop"] + split["decode"] for split in side.load_cpu_ms)
        assert len(side.server_timing_ms["queue"]) == 8 and side.load_images >= side.load_batches >= 1
    assert (tmp_path / "server-wait-5ms.log").exists() and (tmp_path / "server-wait-0ms.log").exists()
    record = sequential_report(result, "python -m bench.service --sequential --test", ["x"], ["y"])
    assert "0 ms vs 5 ms, the same round's p50" in record
