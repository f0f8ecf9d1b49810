"""The world recipe in miniature: ``python -m training.embedded.world_clip``, the world exported to folders, then
``lraee-train build`` on them.

The shipped checkpoints were made by these steps with large step counts; this runs them with tiny ones so the recipe
cannot rot (the test spends seconds, not the 30 minutes of the real run).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lraee_core import load_classifier
from lraee_core.assets import MODEL_CONFIGS_DIR
from lraee_core.checkpoint import read_manifest
from training.embedded import world_clip
from training.embedded.world import HELD_OUT_TEMPLATES, WorldSet, generate_labelled, label_names
from training.pipeline.cli import main
from training.pipeline.config import load_build_config
from training.pipeline.features import FeatureStore
from training.pipeline.jobs import Job
from training.pipeline.simulate import sweep_view

TEMPLATES = [t.format(what="a {}", be="is") for t in HELD_OUT_TEMPLATES]
# Coarse words for the shapes, as the everyday build gives WordNet's: "ring" is also a class name (so shares its
# label), the others are new words. The round shapes are also a class group, as the everyday build's CIFAR-10 is.
ROUNDISH, POINTY = ("circle", "ring", "heart"), ("square", "triangle", "star", "cross", "diamond")
WORD_SETS = {
    "classes": {
        **{name: {"word": "round shape", "others": ["pointy shape", "ring", "blob"]} for name in ROUNDISH[:1]},
        **{name: {"word": "round shape", "others": ["pointy shape", "blob"]} for name in ROUNDISH[2:]},
        **{name: {"word": "pointy shape", "others": ["round shape", "ring", "blob"]} for name in POINTY},
    },
    "groups": {"round": list(ROUNDISH)},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("embedded")
    common = ["--output-dir", str(root / "clip"), "--batch-size", "16", "--threads", "2", "--no-progress"]
    world_clip.main(["--steps", "3", "--warmup-steps", "1", "--eval-images", "8", "--half", *common])
    weights = root / "clip" / "weights.safetensors"
    assert weights.is_file()
    out = root / "checkpoint"
    out.mkdir()
    bundled = out / "weights.safetensors"  # weights inside the checkpoint travel with it (relative path)
    bundled.write_bytes(weights.read_bytes())
    (root / "word_sets.json").write_text(json.dumps(WORD_SETS))
    train, evaluation = WorldSet("train", "shapes", 48), WorldSet("test", "shapes", 16)
    work = root / "work"
    for world_set in (train, evaluation):
        world_set.export(work)
    status = main(
        [
            "build",
            "--work-dir", str(work),
            "--model", "lraee-tiny-vit12",
            "--model-config", str(MODEL_CONFIGS_DIR / "lraee-tiny-vit12.json"),
            "--pretrained", str(bundled),
            "--data", str(train.labels(work)),
            "--classes-file", str(train.classes(work)),
            "--eval-data", str(evaluation.labels(work)),
            *[arg for template in TEMPLATES for arg in ("--template", template)],
            "--word-sets", str(root / "word_sets.json"),
            "--word-label-counts", "2,3",
            "--profile-images", "8",
            "--epochs", "1",
            "--head-batch-size", "8",
            "--engine-check-images", "4",
            "--threads", "2",
            "--checkpoint-id", "world-smoke",
            "--out", str(out),
            "--report-dir", str(root / "report"),
        ]
    )  # fmt: skip
    assert status == 0
    return root


def test_build_records_how_the_checkpoint_was_made(built: Path) -> None:
    manifest = read_manifest(built / "checkpoint")
    assert manifest.checkpoint_id == "world-smoke"
    assert manifest.backbone.pretrained == "weights.safetensors" and manifest.backbone.pretrained_kind == "file"
    assert manifest.templates == tuple(TEMPLATES)
    assert manifest.calibration["kind"] == "lraee-train"
    assert manifest.calibration["command"][:2] == ["lraee-train", "build"]
    assert manifest.calibration["data"]["source"] == "${work}/world/train-shapes-48/labels.csv"
    report = json.loads((built / "report" / "report.json").read_text())
    assert report["eval_images"] == 16 and report["data"]["eval_source"] == "${work}/world/test-shapes-16/labels.csv"
    assert report["engine_check"]["ok"]  # the shipped engine reproduces the evaluation's exits
    log = json.loads((built / "clip" / "training_log.json").read_text())
    assert log["steps"] == 3 and log["weights_dtype"] == "float16"


def test_word_label_sets_are_calibrated_apart(built: Path) -> None:
    """With word sets the promises must also hold on label sets of words, kept apart per K ("words-K")."""
    calibration = json.loads((built / "work" / "calibrate" / "calibration.json").read_text())
    assert calibration["word_label_counts"] == [2, 3]
    figures = calibration["methods"]["lraee"]["operating_points"]["balanced"]["calibration"]
    assert {"words-2", "words-3"} <= set(figures) and {"2", "5"} <= set(figures)
    # Every calib image whose class has a word (all but the rings) gets one word row per K.
    store = FeatureStore(built / "work" / "extract")
    labels = store.load("calib", ["labels"])["labels"].tolist()
    with_a_word = sum(store.labels[label] != "ring" for label in labels)
    assert figures["words-2"]["rows"] == figures["words-3"]["rows"] == with_a_word > 0
    for point in ("accurate", "balanced", "fast"):
        setting = calibration["methods"]["lraee"]["operating_points"][point]
        for values in setting["calibration"].values():  # the promise held on every group, words included
            assert values["agreement"] - values["agreement_se"] >= setting["promise"]
    manifest = read_manifest(built / "checkpoint")
    assert manifest.calibration["word_sets"] == {
        "words": ["blob", "pointy shape", "ring", "round shape"],
        "classes_with_a_word": 7,
    }
    gates = json.loads((built / "work" / "fit-gate" / "gates.json").read_text())
    assert gates["label_sets"]["word_sets_k"] == [2, 3]


def _round_images(built: Path, split: str) -> int:
    store = FeatureStore(built / "work" / "extract")
    return sum(store.labels[label] in ROUNDISH for label in store.load(split, ["labels"])["labels"].tolist())


def test_class_groups_are_calibrated_and_reported_apart(built: Path) -> None:
    """A class group's images also get a row labelled with the whole group, kept apart ("group-NAME") in the
    calibration (where every promise must hold on it, checked above with the word rows) and the held-out report."""
    calibration = json.loads((built / "work" / "calibrate" / "calibration.json").read_text())
    for point in ("accurate", "balanced", "fast"):
        figures = calibration["methods"]["lraee"]["operating_points"][point]["calibration"]
        assert figures["group-round"]["rows"] == _round_images(built, "calib") > 0
    report = json.loads((built / "report" / "report.json").read_text())
    assert report["class_groups"] == ["round"]
    for point, values in report["methods"][report["shipped_method"]]["operating_points"].items():
        assert values["held_out"]["group-round"]["rows"] == _round_images(built, "eval") > 0, point
    assert report["baselines"]["int8_full_depth"]["group-round"]["agreement"] == 1.0
    held_out = read_manifest(built / "checkpoint").metrics["held_out"]["operating_points"]
    assert "group-round" in held_out["balanced"] and "group-round" in held_out["full"]
    assert "group round" in (built / "report" / "report.md").read_text()


def test_held_out_figures_have_word_rows_beside_the_class_name_rows(built: Path) -> None:
    """The evaluation measures the shipped points on held-out word label sets too, into the report and manifest."""
    report = json.loads((built / "report" / "report.json").read_text())
    assert report["word_label_counts"] == [2, 3]
    store = FeatureStore(built / "work" / "extract")
    labels = store.load("eval", ["labels"])["labels"].tolist()
    with_a_word = sum(store.labels[label] != "ring" for label in labels)
    points = report["methods"][report["shipped_method"]]["operating_points"]
    for point, values in points.items():
        held = values["held_out"]
        assert {"words-2", "words-3"} <= set(held) and {"2"} <= set(held), point
        assert held["words-2"]["rows"] == held["words-3"]["rows"] == with_a_word > 0
    full = report["baselines"]["int8_full_depth"]
    assert full["words-2"]["agreement"] == 1.0 and "words-3" in report["baselines"]["fp32_full_depth"]
    held_out = read_manifest(built / "checkpoint").metrics["held_out"]["operating_points"]
    assert {"words-2", "words-3"} <= set(held_out["balanced"]) and {"words-2", "words-3"} <= set(held_out["full"])
    assert "words, K=2" in (built / "report" / "report.md").read_text()


def test_a_words_only_view_is_the_word_rows_of_the_whole_view(built: Path) -> None:
    """The evaluation's word rows come from a view that skips the class-name rows: the same draws, rows and answers
    as the word part of the view that holds both."""
    work = built / "work"
    job = Job(config=load_build_config(work / "config.json"), work_dir=work)
    store = FeatureStore(work / "extract")
    args = (store, job, "eval", "ssa-embed", (2, 5), 1, 2, (2, 3))
    whole, alone = sweep_view(*args), sweep_view(*args, words_only=True)
    words = whole.word_rows() | (whole.group_rows() != "")  # the client rows: word and class-group label sets
    assert alone.size == int(words.sum()) > int(whole.word_rows().sum()) > 0
    assert np.array_equal(alone.word_rows() | (alone.group_rows() != ""), np.ones(alone.size, dtype=bool))
    assert np.array_equal(alone.group_rows(), whole.group_rows()[words])
    assert np.array_equal(alone.counts, whole.counts[words]) and np.array_equal(alone.truth, whole.truth[words])
    assert np.array_equal(alone.full_top1, whole.full_top1[words])
    for layer, top1 in alone.top1.items():
        assert np.array_equal(top1, whole.top1[layer][words])
        for name, values in alone.features[layer].items():
            assert np.array_equal(values, whole.features[layer][name][words])


def test_checkpoint_moved_elsewhere_still_loads_and_classifies(built: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    moved.mkdir()
    for item in (built / "checkpoint").iterdir():
        if item.is_file():
            (moved / item.name).write_bytes(item.read_bytes())
    classifier = load_classifier(moved)
    sample = generate_labelled(0, "test", "shapes")
    image = classifier.backbone.preprocess(sample.image).unsqueeze(0)
    [result] = classifier.classify(image, list(label_names("shapes")), top_k=3)
    assert len(result.predictions) == 3
    assert result.predictions[0].score >= result.predictions[-1].score
    assert 1 <= result.exit_layer <= classifier.num_layers


def test_summary_table_rows_are_read_from_the_report(built: Path) -> None:
    """The docs' table script renders a report's own figures (tests/test_docs.py checks the pages themselves)."""
    from training.embedded.reports.summary_tables import table

    report = json.loads((built / "report" / "report.json").read_text())
    fp32 = report["baselines"]["fp32_full_depth"]["2"]["top1"]
    rendered = table([built / "report"]).splitlines()
    rows = len(report["label_counts"]) + len(report["word_label_counts"]) + len(report["class_groups"])
    assert len(rendered) == 2 + rows and rendered[2].startswith("| report | 16 | 2 | ")
    assert f"| {100 * fp32:.1f}% |" in rendered[2]
    assert rendered[-4].startswith("| report | 16 | 8 (all) | ")
    words = report["baselines"]["fp32_full_depth"]["words-3"]["top1"]  # word label sets follow, one row per K
    assert rendered[-2].startswith(f"| report | 16 | words, 3 | {100 * words:.1f}% | ")
    group = report["baselines"]["fp32_full_depth"]["group-round"]  # then one row per class group, its image count
    assert rendered[-1].startswith(f"| report | {group['rows']} | group round | {100 * group['top1']:.1f}% | ")
