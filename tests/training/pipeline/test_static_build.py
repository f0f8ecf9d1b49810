"""``lraee-train build --quant static`` end to end on the tiny random backbone: the ranges are calibrated on the
calib split, profiled, carried in the checkpoint, and the shipped engine reproduces the evaluation's exits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lraee_core import load_classifier
from lraee_core.assets import MODEL_CONFIGS_DIR
from lraee_core.checkpoint import read_manifest
from lraee_core.static_quant import RANGES_FILE, ActivationRanges
from training.pipeline.cli import main
from training.pipeline.jobs import read_record

CLASSES = {"red": (150, 90, 90), "green": (90, 140, 95), "blue": (90, 100, 150)}


@pytest.fixture(scope="module")
def static_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, colour in CLASSES.items():
        (images / name).mkdir()
        for index in range(10):
            pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 60, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(images / name / f"{index:03d}.png")
    work = tmp_path_factory.mktemp("work")
    status = main(
        [
            "build",
            "--work-dir", str(work),
            "--model", "lraee-tiny-vit12",
            "--model-config", str(MODEL_CONFIGS_DIR / "lraee-tiny-vit12.json"),
            "--quant", "static",
            "--data", str(images),
            "--profile-images", "8",
            "--epochs", "1",
            "--head-batch-size", "8",
            "--engine-check-images", "6",
            "--gate-label-sets", "2",
            "--candidate-layers", "11,12",  # two exits keep the build short; the paper-mode tests cover the rest
            "--label-counts", "2,0",
            "--calib-label-counts", "2,0",
            "--threads", "2",
        ]
    )  # fmt: skip
    assert status == 0
    return work


def test_ranges_come_from_the_calib_split_and_travel_in_the_checkpoint(static_build: Path) -> None:
    splits = json.loads((static_build / "split" / "splits.json").read_text())
    record = read_record(static_build / "ranges")
    assert record is not None and record.summary["modules"] == 48
    assert record.summary["images"] == len(splits["splits"]["calib"]["items"])  # the whole (small) calib split
    checkpoint = static_build / "checkpoint"
    manifest = read_manifest(checkpoint)
    assert manifest.quant_mode == "static" and manifest.quantized_modules == 48
    assert manifest.activation_ranges == RANGES_FILE
    built = ActivationRanges.load(static_build / "ranges" / RANGES_FILE)
    assert ActivationRanges.load(checkpoint / RANGES_FILE) == built


def test_static_checkpoint_serves_and_matches_its_evaluation(static_build: Path) -> None:
    report = json.loads((static_build / "checkpoint" / "report" / "report.json").read_text())
    assert report["engine_check"]["ok"]  # the engine loaded from the checkpoint reproduces the simulated exits
    profile = report["profile"]
    assert [p["layer"] for p in profile] == list(range(1, 13))
    assert all(p["nsr"] > 0 and 0 <= p["outlier_share"] < 1 for p in profile)
    classifier = load_classifier(static_build / "checkpoint")
    assert classifier.quant_report.mode == "static"
    image = Image.new("RGB", (64, 64), CLASSES["red"])
    [result] = classifier.classify(classifier.backbone.preprocess(image).unsqueeze(0), list(CLASSES), top_k=3)
    assert len(result.predictions) == 3


def test_quant_modes_summary_is_read_from_the_report(static_build: Path) -> None:
    from training.embedded.reports.quant_modes import mode_summary, render
    from training.embedded.reports.summary_tables import quant_modes_table

    report = json.loads((static_build / "checkpoint" / "report" / "report.json").read_text())
    summary = mode_summary(report)
    for k, row in summary["sweep"].items():
        counts = report["four_quadrants"][k]["counts"]
        assert (row["rescue"], row["loss"]) == (counts["rescue"], counts["loss"])
    assert summary["final_cosine"] == report["profile"][-1]["cosine"]
    table = quant_modes_table({"static": {"tiny-val": summary}})
    assert table.count("| `static` |") == 2  # K = 2 and K = all (3 labels: no K = 10)
    assert "Does LRA-EE beat its own full depth" in render({"static": {"tiny-val": summary}})


def test_quant_mode_builds_rerun_the_shipped_command() -> None:
    from training.embedded.reports.quant_modes import shipped_command

    options = shipped_command()
    assert "--quant" not in options and "--work-dir" not in options and "--eval-data" not in options
    assert options.count("--template") == 8 and not any("${" in option for option in options)


def test_sign_test_of_rescued_against_lost() -> None:
    from training.embedded.reports.quant_modes import sign_test

    assert sign_test(0, 5) == pytest.approx(2 / 32)  # all five disagreements one way: 2 x (1/2)^5
    assert sign_test(5, 0) == sign_test(0, 5)
    assert sign_test(2, 1) == 1.0 and sign_test(0, 0) == 1.0
