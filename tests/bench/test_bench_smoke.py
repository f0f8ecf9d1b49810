"""The benchmark end to end in --quick mode on the tiny model: every row present and positive, every ratio the
quotient of the medians stored beside it. No timing thresholds: this machine's speed is not under test."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.run import main
from bench.workloads import FEW_LABELS, few_label_sets

BASELINES = {"openclip_fp32", "torch_int8", "ort_int8"}
# The default model's engines: the service's, torch paper and static, and the onnxruntime full mode unless that is
# the checkpoint's own (the service's engine then runs it); ViT-B-32 adds ort_full_batch.
ENGINES = ("service", "torch_paper", "static", "ort_full")


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench-results")
    # One thread: two OpenMP threads on a 2-core machine shared with other work stall at every barrier (50x slower
    # on the tiny model), and this test checks the result's structure, not its speed.
    threads = torch.get_num_threads()
    try:
        code = main(["--quick", "--backbones", "default", "--skip-service", "--threads", "1", "--output-dir", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return json.loads((out / "latest.json").read_text()), out


@pytest.mark.slow
def test_every_row_is_measured_with_positive_numbers(result: tuple[dict[str, Any], Path]) -> None:
    data, out = result
    backbone = data["backbones"]["default"]
    keys = [row["key"] for row in backbone["rows"]]
    default = backbone["default_operating_point"]
    engines = [e for e in ENGINES if not (e == "ort_full" and backbone["quant_mode"] == "full")]
    expected = BASELINES | {f"lraee_{engine}_full_depth" for engine in engines}
    expected |= {f"lraee_service_op_{point}" for point in backbone["operating_points"] if point != "full"}
    expected |= {f"lraee_{engine}_op_{default}" for engine in engines}
    expected.add("lraee_service_heads_no_exit")  # what the heads cost, beside the plain full-depth path
    if any(note.startswith("few-labels rows") for note in backbone["notes"]):  # the photos' classes are known
        expected |= {f"lraee_service_few_labels_op_{default}", "lraee_service_few_labels_full_depth"}
        few = by_key_of(backbone)[f"lraee_service_few_labels_op_{default}"]
        assert few["full_depth_reference"] == "lraee_service_few_labels_full_depth"
    caps = backbone["label_caps"]
    assert all(isinstance(cap, int) and cap >= 1 for cap in caps.values())
    assert any(note.startswith("label caps") for note in backbone["notes"]) == bool(caps)
    assert backbone["service_backend"] == "onnxruntime"  # what LRAEE_BACKEND=auto picks for a paper or full checkpoint
    assert set(keys) == expected
    assert len(keys) == len(set(keys))
    for row in backbone["rows"]:
        for metric in ("batch1_images_per_s", "batch32_images_per_s", "latency_p50_ms", "latency_p95_ms"):
            assert row[metric] > 0, (row["key"], metric)
        assert row["latency_p95_ms"] >= row["latency_p50_ms"]
        assert len(row["batch1_pass_s"]) == data["meta"]["repeats"] == len(row["batch32_pass_s"])
    assert_engine_rows_account_for_every_image(backbone)
    targets = {
        (r["numerator"], r["metric"]): r["target"] for r in backbone["ratios"] if r["denominator"] == "openclip_fp32"
    }
    assert targets[(f"lraee_service_op_{default}", "batch32_images_per_s")] == 1.5
    by_key = by_key_of(backbone)
    for item in backbone["early_exit_efficiency"]:  # time saved is paired round by round with its reference
        assert item["time_saving_min"] <= item["time_saving"] <= item["time_saving_max"]
        assert by_key[item["reference"]]["key"].endswith("_full_depth")
    text = backbone["text"]
    assert text["labels"] == 1000 and text["cold_s"] > 0 and text["cached_s"] > 0
    assert 0 < backbone["flops"]["head_plus_gate_share"] < 1
    assert backbone["service"] is None
    assert all(
        t["batch1_ms_per_image"] > 0 and t["batch32_ms_per_image"] > 0 for t in backbone["block_anatomy"]["timings"]
    )
    by_rows = backbone["block_anatomy"]["by_rows"]  # the service's engine is onnxruntime: it is timed by rows
    assert by_rows and all(t["rows"] == [32, 18, 10, 5] and min(t["ms_per_image"]) > 0 for t in by_rows)
    assert "by the rows in the call" in (out / "latest.md").read_text()
    assert data["peak_rss_mib"] > 0
    assert (out / "latest.md").is_file() and len(list(out.glob("bench-*.json"))) == 1


def by_key_of(backbone: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["key"]: row for row in backbone["rows"]}


def assert_engine_rows_account_for_every_image(backbone: dict[str, Any]) -> None:
    """Every LRA-EE engine row has a FLOPs saving and exit shares that add up to all of its images."""
    engine_rows = [row for row in backbone["rows"] if row["key"].startswith("lraee_")]
    assert engine_rows
    for row in engine_rows:
        assert row["flops_saving_batch32"] is not None, row["key"]
        assert sum(row["exit_shares_batch32"].values()) == pytest.approx(1.0), row["key"]


def test_few_label_sets_hold_each_image_s_class_and_others() -> None:
    labels = [f"class {i}" for i in range(21)]
    classes = [i % 21 for i in range(32)]
    sets = few_label_sets(labels, classes)
    assert sets == few_label_sets(labels, classes)  # seeded
    for truth, chosen in zip(classes, sets, strict=True):
        assert len(chosen) == FEW_LABELS == len(set(chosen)) and labels[truth] in chosen
    assert len({tuple(s) for s in sets}) > 1 and any(s[0] != labels[t] for t, s in zip(classes, sets, strict=True))


@pytest.mark.slow
def test_ratios_are_quotients_of_the_stored_medians(result: tuple[dict[str, Any], Path]) -> None:
    backbone = result[0]["backbones"]["default"]
    rows = by_key_of(backbone)
    assert backbone["ratios"]
    for ratio in backbone["ratios"]:
        metric = ratio["metric"]
        assert ratio["value"] == pytest.approx(rows[ratio["numerator"]][metric] / rows[ratio["denominator"]][metric])
    targeted = {r["numerator"] for r in backbone["ratios"] if r["target"] is not None}
    default_point = f"lraee_service_op_{backbone['default_operating_point']}"
    assert targeted == {default_point} | {key for key in rows if key.endswith("_paper_mix")}
    assert backbone["early_exit_efficiency"]
    for item in backbone["early_exit_efficiency"]:
        row, reference = rows[item["row"]], rows[item["reference"]]
        passes = "batch1_pass_s" if item["metric"] == "batch1_images_per_s" else "batch32_pass_s"
        per_round = sorted(1 - a / b for a, b in zip(row[passes], reference[passes], strict=True))
        assert item["time_saving"] == pytest.approx(statistics.median(per_round))
        assert (item["time_saving_min"], item["time_saving_max"]) == pytest.approx((per_round[0], per_round[-1]))
        if item["ratio"] is not None:
            assert item["ratio"] == pytest.approx(item["time_saving"] / item["flops_saving"])
