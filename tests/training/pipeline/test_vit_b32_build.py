"""``lraee-train build`` end to end on ViT-B-32 with random weights, 1,000 ImageNet labels and a few images: the
build runs, the engine reproduces its simulation, and exit shares respond to thresholds at K = 2 and K = 1000."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from lraee_core.checkpoint import load_classifier, read_manifest
from lraee_core.exits import ExitRule
from lraee_core.images import load_image
from training.pipeline.cli import main
from training.pipeline.data import disambiguate

CLASSES = 4
PER_CLASS = 8


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vitb32")
    wnids = [f"n{i:08d}" for i in range(1000)]
    table = ["wnid\timagenet_index\tname\tin_tiny_subset"]
    table += [f"{w}\t{i}\t{open_clip.IMAGENET_CLASSNAMES[i]}\t0" for i, w in enumerate(wnids)]
    (root / "classes.tsv").write_text("\n".join(table) + "\n")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        folder = root / "images" / wnids[100 * c + 1]
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = np.clip(rng.normal(60 * c + 40, 50, (96, 96, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    status = main(
        [
            "build",
            "--work-dir", str(root / "work"),
            "--model", "ViT-B-32",
            "--data", str(root / "images"),
            "--classes-tsv", str(root / "classes.tsv"),
            "--label-space", "imagenet-1k",
            "--template", "a photo of a {}.",
            "--candidate-layers", "9,11,12",
            "--profile-images", "4",
            "--epochs", "1",
            "--head-batch-size", "8",
            "--gate-label-sets", "2",
            "--calib-label-counts", "2,0",
            "--label-counts", "2,0",
            "--engine-check-images", "3",
            "--threads", "2",
        ]
    )  # fmt: skip
    assert status == 0
    return root


@pytest.mark.slow
def test_vit_b32_build_runs_and_exit_shares_respond_to_thresholds(built: Path) -> None:
    checkpoint = built / "work" / "checkpoint"
    manifest = read_manifest(checkpoint)
    assert manifest.backbone.model_name == "ViT-B-32" and manifest.num_layers == 12
    report = json.loads((checkpoint / "report" / "report.json").read_text())
    assert report["num_labels"] == 1000 and report["label_counts"] == [2, 1000]
    assert report["engine_check"]["ok"]
    classifier = load_classifier(checkpoint)
    layers = classifier.policy.candidate_layers
    folders = sorted((built / "images").iterdir())
    paths = [path for folder in folders for path in sorted(folder.iterdir())][::3]
    images = torch.stack([classifier.backbone.preprocess(load_image(path)) for path in paths])
    names = list(disambiguate([str(name) for name in open_clip.IMAGENET_CLASSNAMES]))  # the build's label set
    for labels in (names[:2], names):
        first = classifier.classify(images, labels, exit_rule=ExitRule.from_thresholds(dict.fromkeys(layers, 0.0)))
        assert all(r.exit_layer == layers[0] for r in first)  # threshold 0: every image leaves at the first exit
        probabilities = [r.gate_probability for r in first if r.gate_probability is not None]
        assert min(probabilities) < max(probabilities)
        middle = (min(probabilities) + max(probabilities)) / 2
        rule = ExitRule.from_thresholds({layers[0]: middle, **dict.fromkeys(layers[1:], 1.0)})
        split = classifier.classify(images, labels, exit_rule=rule)
        exited = sum(r.exit_path == "head" for r in split)
        assert 0 < exited < len(paths), (len(labels), exited)  # a threshold inside their range splits the images
        never = classifier.classify(images, labels, exit_rule=ExitRule.from_thresholds(dict.fromkeys(layers, 1.0)))
        assert not any(r.exit_path == "head" for r in never)
