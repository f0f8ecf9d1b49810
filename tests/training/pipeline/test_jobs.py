"""The offline jobs end to end through the CLI, on the tiny random backbone and a generated ImageFolder."""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lraee_core.assets import MODEL_CONFIGS_DIR
from lraee_core.checkpoint import read_manifest
from training.pipeline.build import STEPS as BUILD_STEPS
from training.pipeline.cli import main
from training.pipeline.config import SPLIT_NAMES, load_build_config
from training.pipeline.data import load_splits
from training.pipeline.evaluate import _remapped, top1_gaps
from training.pipeline.features import FeatureStore
from training.pipeline.heads import VARIANTS, load_heads
from training.pipeline.jobs import Job, read_record
from training.pipeline.label_sets import ExitView, exit_view, label_sets_for
from training.pipeline.simulate import METHODS, Outcome, method_scores, simulate

from ... import engine_answers
from ...decisions import TIE_BAND, another_instruction_set, near, split_threshold

# The build's step order (written once, in training.pipeline.build); paper mode needs no activation ranges.
STEPS = tuple(name for name in BUILD_STEPS if name != "ranges")
CLASSES = {"red_square": (150, 90, 90), "green_thing": (90, 140, 95), "blue": (90, 100, 150), "grey": (115, 115, 115)}
IMAGES_PER_CLASS = 12
REPO = Path(__file__).resolve().parents[3]  # the project root (tests/training/pipeline/..)
# Engine checks compare decisions outside the tie band (tests/decisions.py); at most this many of the 7 evaluation
# images per setting may lie inside it (a deciding number within TIE_BAND of its boundary).
MAX_IN_BAND = 1


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
        "--engine-check-tolerance", str(TIE_BAND),
        "--gate-label-sets", "2",
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
        # each step is looked at once per build, however many later steps read its output (evaluate included)
        checks = [m for m in caplog.messages if m.startswith((f"{step}: up to date", f"{step}: running"))]
        assert len(checks) == 1 and checks[0].startswith(f"{step}: up to date"), (step, checks)


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


def _absolute_paths(value: object) -> list[str]:
    if isinstance(value, dict):
        return [p for item in value.values() for p in _absolute_paths(item)]
    if isinstance(value, list):
        return [p for item in value for p in _absolute_paths(item)]
    return [value] if isinstance(value, str) and value.startswith("/") else []


def test_manifest_describes_the_calibration(stepwise: Run) -> None:
    manifest = read_manifest(stepwise.checkpoint)
    calibration = json.loads((stepwise.work_dir / "calibrate" / "calibration.json").read_text())
    shipped = calibration["shipped_method"]
    assert shipped in ("lraee", "cls-ee") and calibration["ship_choice"]["rule"] == "auto"
    assert manifest.candidate_layers == tuple(calibration["methods"][shipped]["layers"])
    assert manifest.head.pooling == ("ssa" if shipped == "lraee" else "cls")
    assert 1 <= len(manifest.candidate_layers) <= 3
    assert set(manifest.candidate_layers) <= set(calibration["candidate_pool"]) <= set(range(3, 13))  # cached from 3
    assert set(manifest.operating_points) == {"accurate", "balanced", "fast"}
    assert manifest.promises == {"accurate": 0.99, "balanced": 0.97, "fast": 0.93}
    assert manifest.default_operating_point == "balanced"
    assert manifest.quantized_modules == 24  # the two MLP Linears of 12 blocks
    gates = json.loads((stepwise.work_dir / "fit-gate" / "gates.json").read_text())
    assert list(manifest.gate_features) == gates["features"]
    assert manifest.calibration["config"]["backbone"]["model_name"] == "lraee-tiny-vit12"
    # Figures: calibration (in-sample) and held-out, per K of the sweep, for every point and `full`.
    held_out = manifest.metrics["held_out"]["operating_points"]
    assert set(held_out) == {"accurate", "balanced", "fast", "full"}
    assert set(held_out["accurate"]) == {"2", "3", "4"}  # K=2, 3 and all (4 labels); K=5, 10, 20, 50 exceed the data
    assert all(held_out["full"][k]["agreement"] == 1.0 for k in held_out["full"])
    assert set(manifest.metrics["calibration"]["operating_points"]["fast"]) == {"2", "3", "4"}
    # Portable: no absolute path anywhere in what a checkpoint or report records.
    assert _absolute_paths(manifest.to_json()) == []
    assert _absolute_paths(json.loads((stepwise.checkpoint / "report" / "report.json").read_text())) == []
    assert manifest.calibration["command"][manifest.calibration["command"].index("--work-dir") + 1] == "${work}"


def _shipped(job: Job) -> str:
    return str(json.loads((job.step_dir("calibrate") / "calibration.json").read_text())["shipped_method"])


def _engine_view(job: Job, k: int, rows: np.ndarray) -> tuple[FeatureStore, ExitView, np.ndarray]:
    """The shipped method's view of some eval images, each with its own label set of size k."""
    store = FeatureStore(job.step_dir("extract"))
    truth = store.load("eval", ["labels"])["labels"].numpy()[rows]
    sets = _remapped(label_sets_for(truth, len(store.labels), [k], 1, np.random.default_rng(k)), rows)
    variant = METHODS[_shipped(job)].variant
    _, heads = load_heads(job.step_dir("train-heads"), variant)
    view = exit_view(store, "eval", heads, VARIANTS[variant].pooling, sets, store.shape.width)
    label_rows = np.zeros((len(rows), k), dtype=np.int64)
    for positions, members in sets.groups.values():
        label_rows[positions] = members
    return store, view, label_rows


def decided_in_the_band(
    outcome: Outcome,
    layers: Sequence[int],
    scores: dict[int, np.ndarray],
    thresholds: Sequence[float],
    gaps: np.ndarray,
) -> np.ndarray:
    """[N] rows with a deciding number inside the tie band on their simulated path: a gate probability near a
    threshold that decides (strictly between 0 and 1), or a top-1 near a tie, at a candidate the row reaches, or at
    full depth when it gets there (``gaps``: [N, candidates + 1], ``top1_gaps``). Every other row's path does not
    hang on kernels, so the simulated path is the engine's and only these rows may differ."""
    flagged = np.zeros(len(gaps), dtype=bool)
    for column, (layer, threshold) in enumerate(zip(layers, thresholds, strict=True)):
        deciding = near(scores[layer], threshold) if 0.0 < threshold < 1.0 else np.zeros(len(gaps), dtype=bool)
        flagged |= (outcome.exit_layer >= layer) & (deciding | near(gaps[:, column], 0.0))
    return flagged | (~outcome.exited & near(gaps[:, -1], 0.0))


def _split_or_above(scores: np.ndarray) -> float:
    """A threshold in a gap of these gate scores that splits them (tests/decisions.py), or, where no gap of the tie
    band's width lies among the middle scores (a layer whose few scores all sit near 1, say), one above every score
    by the band (nobody leaves there; 1.0 at most): never a threshold a kernel's last bits could cross."""
    try:
        return split_threshold(scores)
    except AssertionError:
        return min(1.0, float(np.max(scores)) + 2 * TIE_BAND)


def _answers_elsewhere(request: dict[str, Any], environment: dict[str, str], folder: Path) -> dict[str, Any]:
    """``tests.engine_answers`` for ``request`` in a fresh process with ``environment`` added."""
    folder.mkdir()
    (folder / "in.json").write_text(json.dumps(request))
    command = [sys.executable, "-m", "tests.engine_answers", str(folder / "in.json"), str(folder / "out.json")]
    env = {**os.environ, **environment, "PYTHONPATH": str(REPO)}
    subprocess.run(command, env=env, cwd=REPO, check=True, timeout=600)
    answers: dict[str, Any] = json.loads((folder / "out.json").read_text())
    return answers


def test_engine_from_checkpoint_matches_the_simulation_at_every_label_count(stepwise: Run, tmp_path: Path) -> None:
    """The engine answers every image alone as the simulation says it would, here and with torch's kernels on another
    instruction set (tests/decisions.py): compared outside the tie band, where no kernel decides; the rows inside
    it are counted, at most MAX_IN_BAND per setting."""
    from training.pipeline.gate_fit import load_gates

    job = stepwise.job()
    policy = read_manifest(stepwise.checkpoint).policy()
    layers = policy.candidate_layers
    split = load_splits(job).splits["eval"]
    rows = np.arange(len(split.items))
    method = METHODS[_shipped(job)]
    bank = load_gates(job.step_dir("fit-gate"), method.gates)
    for k in (2, 4):
        store, view, label_rows = _engine_view(job, k, rows)
        scores = method_scores(view, method, bank, layers)
        settings = {
            "split": [_split_or_above(scores[layer]) for layer in layers],  # some leave, some go on
            "zero": [0.0] * len(layers),
        }
        at_k = policy.point("fast").thresholds_at(k) or {}  # the engine's own thresholds of this K
        settings["fast"] = [at_k.get(layer, 1.0) for layer in layers]
        request = {
            "checkpoint": str(stepwise.checkpoint),
            "images": [str(path) for path in split.paths],
            "labels": [[store.labels[int(i)] for i in label_rows[row]] for row in rows],
            "templates": None,
            "rules": {name: dict(zip(map(str, layers), values, strict=True)) for name, values in settings.items()},
        }
        engines = {
            "this process": engine_answers.answers(request),
            "another instruction set": _answers_elsewhere(request, another_instruction_set(), tmp_path / f"k{k}"),
        }
        gaps = top1_gaps(store, "eval", view, rows, label_rows, layers)
        compared = 0
        for name, thresholds in settings.items():
            expected = simulate(view, layers, scores, thresholds)
            in_band = decided_in_the_band(expected, layers, scores, thresholds, gaps)
            # the thresholds placed here clear of the gate scores: at most MAX_IN_BAND exits hang on a kernel's bits
            # (fast's are the calibration's, quantiles of scores, and this weak test model's gate scores crowd near
            # 1: they are compared where clear); top-1 near-ties are the model's own and are only left uncompared
            gate_band = decided_in_the_band(expected, layers, scores, thresholds, np.full_like(gaps, np.inf))
            assert name == "fast" or gate_band.sum() <= MAX_IN_BAND, (k, name, int(gate_band.sum()))
            compared += int((~in_band).sum())
            outside = ~in_band
            for engine, answers in engines.items():
                exit_layer, exit_path, label, flops = (np.array(column) for column in zip(*answers[name], strict=True))
                where = (k, name, engine)
                assert exit_layer[outside].tolist() == expected.exit_layer[outside].tolist(), where
                assert (exit_path == "head")[outside].tolist() == expected.exited[outside].tolist(), where
                predictions = [store.labels.index(answer) for answer in label[outside]]
                assert predictions == expected.predictions[outside].tolist(), where
                assert flops.astype(np.int64)[outside].tolist() == expected.flops[outside].tolist(), where
        assert compared >= len(rows), (k, compared)  # the comparisons above compared something
        assert simulate(view, layers, scores, settings["zero"]).exited.all()
    report = json.loads((stepwise.checkpoint / "report" / "report.json").read_text())
    assert report["engine_check"]["ok"] is True
    probe = report["engine_check"]["settings"]["K=2 probe-median"]
    assert probe["unexplained_disagreements"] == 0 and probe["images"] == 7
    full = report["engine_check"]["settings"]["K=4 full"]
    assert full["unexplained_disagreements"] == 0 and full["near_threshold"] <= MAX_IN_BAND
    assert full["flops_agree"] == full["agree"] >= 7 - full["near_threshold"]


def test_report_holds_every_analysis(stepwise: Run) -> None:
    report_dir = stepwise.checkpoint / "report"
    for name in ("report.md", "report.json", "agreement_vs_flops.png", "exits.png", "profile.png"):
        assert (report_dir / name).stat().st_size > 0, name
    for name in ("agreement_vs_flops.png", "exits.png", "profile.png"):
        assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (stepwise.work_dir / "profile" / "profile.png").is_file()
    report = json.loads((report_dir / "report.json").read_text())
    assert report["label_counts"] == [2, 3, 4]
    assert set(report["methods"]) == {"lraee", "lraee-distilled", "lraee-hard", "paper", "cls-ee", "confidence"}
    assert set(report["baselines"]) == {
        "int8_full_depth",
        "fp32_full_depth",
        "pabee_patience_2",
        "ssa_last_ssa-embed",
        "ssa_last_ssa-distilled",
        "ssa_last_ssa-hard",
    }
    for method in report["methods"].values():
        for point in method["operating_points"].values():
            for k in ("2", "4"):
                held = point["held_out"][k]
                assert held["rows"] == 7 and abs(sum(held["exit_shares"].values()) - 1.0) < 1e-9
                assert 0.0 <= held["agreement"] <= 1.0
    for k, quadrants in report["four_quadrants"].items():
        assert sum(quadrants["counts"].values()) == 7, k
    for name, curve in report["curves"].items():
        assert set(curve) == {"2", "3", "4"}, name
    assert set(report["gate_features"]["selection_calib_auc"]) >= {"paper", "cosine"}
    assert [p["layer"] for p in report["profile"]] == list(range(1, 13))
    markdown = (report_dir / "report.md").read_text()
    assert "Four-quadrant" in markdown and "Rescue" in markdown and "agreement_vs_flops.png" in markdown
    assert "K=4 (all)" in markdown and "Agreement held-out" in markdown and "Agreement calib" in markdown


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
