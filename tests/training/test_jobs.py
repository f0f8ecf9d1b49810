"""The offline jobs end to end through the CLI, on the tiny random backbone and a generated ImageFolder."""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lraee_core import load_classifier
from lraee_core.assets import MODEL_CONFIGS_DIR
from lraee_core.checkpoint import read_manifest
from lraee_core.images import load_image
from training.pipeline.calibrate import METHODS, build_table, simulate
from training.pipeline.cli import main
from training.pipeline.config import SPLIT_NAMES, Job, load_build_config, read_record
from training.pipeline.data import load_splits

STEPS = ("split", "profile", "extract", "train-heads", "fit-gate", "calibrate", "evaluate")
CLASSES = {"red_square": (150, 90, 90), "green_thing": (90, 140, 95), "blue": (90, 100, 150), "grey": (115, 115, 115)}
IMAGES_PER_CLASS = 12


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 12 noisy 64x64 PNGs: close mean colours under heavy noise, so heads are right only sometimes."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, colour in CLASSES.items():
        (root / name).mkdir()
        for index in range(IMAGES_PER_CLASS):
            noise = rng.normal(0, 60, (64, 64, 3))
            pixels = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index:03d}.png")
    return root


@dataclass(frozen=True)
class Run:
    """A work dir every step has run in, and each step's record time right after it ran."""

    work_dir: Path
    finished: dict[str, float]

    @property
    def checkpoint(self) -> Path:
        return self.work_dir / "checkpoint"

    def job(self) -> Job:
        return Job(config=load_build_config(self.work_dir / "config.json"), work_dir=self.work_dir)


def _finished(work_dir: Path, step: str) -> float:
    record = read_record(work_dir / step)
    assert record is not None, f"{step} left no record"
    return record.finished_at


@pytest.fixture(scope="module")
def stepwise(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Run:
    """Every step called on its own through the CLI, in order; only the first call names the options."""
    work_dir = tmp_path_factory.mktemp("work")
    options = [
        "--model", "lraee-tiny-vit12",
        "--model-config", str(MODEL_CONFIGS_DIR / "lraee-tiny-vit12.json"),
        "--quant", "paper",
        "--data", str(image_folder),
        "--profile-images", "8",
        "--epochs", "2",
        "--head-batch-size", "8",
        "--engine-check-images", "8",
        "--threads", "2",
    ]  # fmt: skip
    finished: dict[str, float] = {}
    for number, step in enumerate(STEPS):
        assert main([step, "--work-dir", str(work_dir), *(options if number == 0 else [])]) == 0
        finished[step] = _finished(work_dir, step)
        for earlier in STEPS[:number]:
            assert _finished(work_dir, earlier) == finished[earlier], f"{step} redid {earlier}"
    return Run(work_dir, finished)


def test_build_after_the_steps_skips_every_one(stepwise: Run, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="training"):
        assert main(["build", "--work-dir", str(stepwise.work_dir)]) == 0
    for step in STEPS:
        assert _finished(stepwise.work_dir, step) == stepwise.finished[step]
        assert any(m.startswith(f"{step}: up to date") for m in caplog.messages), step


def test_splits_are_disjoint_stratified_and_recorded(stepwise: Run) -> None:
    splits = load_splits(stepwise.job())
    members = {name: {rel for rel, _ in splits.splits[name].items} for name in SPLIT_NAMES}
    for a, b in itertools.combinations(SPLIT_NAMES, 2):
        assert not members[a] & members[b], (a, b)
    total = len(CLASSES) * IMAGES_PER_CLASS
    sizes = {name: len(members[name]) for name in SPLIT_NAMES}
    assert sizes == {"head": round(0.5 * total), "gate": round(0.2 * total), "calib": 7, "eval": 7}
    head_labels = splits.splits["head"].labels
    assert sorted(np.bincount(head_labels).tolist()) == [6, 6, 6, 6]  # 50 % of 12 per class
    assert splits.labels == ("blue", "green thing", "grey", "red square")  # folder names, underscores as spaces
    manifest = read_manifest(stepwise.checkpoint)
    recorded = manifest.calibration["data"]["splits"]
    assert {name: recorded[name]["count"] for name in SPLIT_NAMES} == sizes
    assert all(len(recorded[name]["sha256_16"]) == 16 for name in SPLIT_NAMES)
    assert manifest.calibration["command"][:2] == ["lraee-train", "calibrate"]  # the call that wrote it


def test_manifest_describes_the_calibration(stepwise: Run) -> None:
    manifest = read_manifest(stepwise.checkpoint)
    calibration = json.loads((stepwise.work_dir / "calibrate" / "calibration.json").read_text())
    assert manifest.candidate_layers == tuple(calibration["methods"]["lraee-distilled"]["layers"])
    assert 1 <= len(manifest.candidate_layers) <= 3
    assert set(manifest.candidate_layers) <= set(calibration["candidate_pool"]) <= set(range(6, 13))
    assert set(manifest.operating_points) == {"accurate", "balanced", "fast"}
    assert manifest.default_operating_point == "balanced"
    assert manifest.quantized_modules == 24  # the two MLP Linears of 12 blocks
    assert manifest.calibration["config"]["backbone"]["model_name"] == "lraee-tiny-vit12"
    for name, point in manifest.metrics["operating_points"].items():
        if point["budget_met"]:
            assert point["saving"] >= point["budget"] - 1e-12, name


def _thresholds_with_mixed_exits(job: Job, layers: tuple[int, ...], rows: np.ndarray) -> list[float]:
    """A grid setting under which some images leave early and some go the full depth (as many exit layers as
    possible), so the comparison below exercises every path of the engine."""
    from training.pipeline.calibrate import threshold_grid
    from training.pipeline.features import FeatureStore

    table = build_table(FeatureStore(job.step_dir("extract")), job, "eval", METHODS["lraee-distilled"], layers)
    table = table.subset(rows)
    best: tuple[int, list[float]] = (-1, [])
    for combo in itertools.product(threshold_grid(9), repeat=len(layers)):
        outcome = simulate(table, layers, list(combo))
        if 0 < outcome.exited.sum() < len(rows):
            distinct = len(set(outcome.exit_layer.tolist()))
            if distinct > best[0]:
                best = (distinct, [float(t) for t in combo])
    assert best[1], "no threshold setting mixes early exits and full-depth images"
    return best[1]


def test_engine_from_checkpoint_matches_the_simulation(stepwise: Run) -> None:
    job = stepwise.job()
    classifier = load_classifier(stepwise.checkpoint)
    layers = classifier.policy.candidate_layers
    split = load_splits(job).splits["eval"]
    rows = np.arange(len(split.items))
    images = torch.stack([classifier.backbone.preprocess(load_image(path)) for path in split.paths])
    labels = list(load_splits(job).labels)
    from training.pipeline.features import FeatureStore

    table = build_table(FeatureStore(job.step_dir("extract")), job, "eval", METHODS["lraee-distilled"], layers)
    settings = {name: [classifier.policy.thresholds(name)[layer] for layer in layers] for name in ("fast", "balanced")}
    settings["mixed"] = _thresholds_with_mixed_exits(job, layers, rows)
    for name, thresholds in settings.items():
        results = classifier.classify(images, labels, top_k=1, thresholds=dict(zip(layers, thresholds, strict=True)))
        expected = simulate(table, layers, thresholds)
        assert [r.exit_layer for r in results] == expected.exit_layer.tolist(), name
        assert [r.exit_path == "head" for r in results] == expected.exited.tolist(), name
        assert [labels.index(r.predictions[0].label) for r in results] == expected.predictions.tolist(), name
        assert [r.flops for r in results] == expected.flops.tolist(), name
    mixed = simulate(table, layers, settings["mixed"])
    assert 0 < mixed.exited.sum() < len(rows)
    report = json.loads((stepwise.checkpoint / "report" / "report.json").read_text())
    assert report["engine_check"]["ok"] is True
    probe = report["engine_check"]["settings"]["probe-median"]
    assert probe["unexplained_disagreements"] == 0 and probe["images"] == 7


def test_report_holds_every_analysis(stepwise: Run) -> None:
    report_dir = stepwise.checkpoint / "report"
    for name in ("report.md", "report.json", "pareto.png", "exits.png", "profile.png"):
        assert (report_dir / name).stat().st_size > 0, name
    for name in ("pareto.png", "exits.png", "profile.png"):
        assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (stepwise.work_dir / "profile" / "profile.png").is_file()
    report = json.loads((report_dir / "report.json").read_text())
    methods = [row["method"] for row in report["comparison"]]
    for prefix in (
        "FP32 full depth",
        "INT8 full depth",
        "CLS-EE",
        "Confidence-only EE",
        "PABEE",
        "SSA-Last hard",
        "SSA-Last distilled",
        "LRA-EE hard",
        "LRA-EE distilled",
    ):
        assert sum(m.startswith(prefix) for m in methods) == 1, prefix
    quadrants = report["four_quadrants"]
    assert sum(quadrants["counts"].values()) == report["eval_images"] == 7
    assert abs(sum(quadrants["percent"].values()) - 100.0) < 1e-9
    selectivity = report["gate_selectivity"]
    assert selectivity["exited"]["images"] + selectivity["continued"]["images"] == 7
    assert abs(sum(report["exit_distribution"].values()) - 1.0) < 1e-9
    for curve in report["pareto"].values():
        savings = [s for s, _ in curve["front"]]
        accuracies = [a for _, a in curve["front"]]
        assert savings == sorted(savings) and accuracies == sorted(accuracies, reverse=True)
    assert [p["layer"] for p in report["profile"]] == list(range(1, 13))
    markdown = (report_dir / "report.md").read_text()
    assert "Four-quadrant" in markdown and "Rescue" in markdown and "![pareto](pareto.png)" in markdown


def test_profile_is_recorded_per_layer(stepwise: Run) -> None:
    profile = json.loads((stepwise.work_dir / "profile" / "profile.json").read_text())
    assert profile["images"] == 7  # capped by the calibration split
    for layer in profile["layers"]:
        assert layer["nsr"] > 0 and abs(layer["inr"] * layer["nsr"] - 1.0) < 1e-9
        assert 0.9 < layer["cosine"] <= 1.0 + 1e-9


def test_cli_reports_a_bad_data_source(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="training"):
        assert main(["split", "--work-dir", str(tmp_path), "--data", str(tmp_path / "missing")]) == 1
    assert any("neither a folder" in message for message in caplog.messages)


# Last in the file: it changes the work dir's config (the report dir) that the tests above read.
def test_changed_late_setting_reruns_only_downstream_steps(stepwise: Run, tmp_path: Path) -> None:
    report_dir = tmp_path / "report"
    assert main(["evaluate", "--work-dir", str(stepwise.work_dir), "--report-dir", str(report_dir)]) == 0
    assert _finished(stepwise.work_dir, "evaluate") > stepwise.finished["evaluate"]
    for step in STEPS[:-1]:
        assert _finished(stepwise.work_dir, step) == stepwise.finished[step]
    assert (report_dir / "report.md").is_file()
