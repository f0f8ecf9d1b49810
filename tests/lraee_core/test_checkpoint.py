from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lraee_core.assets import EMBEDDED_CHECKPOINTS, resolve_checkpoint
from lraee_core.backbone import build_backbone
from lraee_core.checkpoint import MANIFEST, TENSORS, load_classifier, read_manifest
from lraee_core.config import BackboneConfig
from lraee_core.errors import CheckpointError
from lraee_core.exits import ExitRule
from lraee_core.random_init import untrained_checkpoint


@pytest.fixture
def checkpoint(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    """A private copy each test may damage."""
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, target)
    return target


def _edit_manifest(directory: Path, **changes: object) -> None:
    data = json.loads((directory / MANIFEST).read_text())
    data.update(changes)
    (directory / MANIFEST).write_text(json.dumps(data))


def _edit_point(directory: Path, name: str, **fields: object) -> None:
    """Change fields of one operating point's record (format 4: promise, label_cap, thresholds)."""
    data = json.loads((directory / MANIFEST).read_text())
    data["operating_points"].setdefault(name, {"promise": None, "label_cap": None, "thresholds": {"1": {}}})
    data["operating_points"][name].update(fields)
    (directory / MANIFEST).write_text(json.dumps(data))


def test_round_trip_describes_itself(checkpoint: Path) -> None:
    manifest = read_manifest(checkpoint)
    assert manifest.backbone.model_name == "lraee-tiny-vit12"
    assert manifest.backbone.model_config_file == "lraee-tiny-vit12.json"  # travels with the checkpoint
    assert (checkpoint / "lraee-tiny-vit12.json").is_file()
    assert manifest.quant_mode == "paper" and manifest.quantized_modules == 24
    assert manifest.candidate_layers == (9, 11, 12)
    assert manifest.calibration["kind"] == "untrained"
    classifier = load_classifier(checkpoint)
    assert classifier.checkpoint_id == "untrained"
    assert set(classifier.policy.names) == {"half", "never", "always", "full"}  # `full` is built in


def test_a_stored_label_cap_applies_to_its_operating_point(checkpoint: Path) -> None:
    _edit_point(checkpoint, "always", label_cap=2)
    classifier = load_classifier(checkpoint)
    assert classifier.policy.label_cap("always") == 2 and classifier.policy.label_cap("half") is None
    assert classifier.policy.label_cap("full") is None
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    two = classifier.classify(images, ["cat", "dog"], operating_point="always")
    three = classifier.classify(images, ["cat", "dog", "car"], operating_point="always")
    full = classifier.classify(images, ["cat", "dog", "car"], operating_point="full")
    assert all(r.exit_path == "head" and r.exit_layer == 9 for r in two)  # "always" leaves at the first exit
    assert [(r.exit_path, r.flops, r.predictions) for r in three] == [
        (r.exit_path, r.flops, r.predictions) for r in full
    ]
    assert read_manifest(checkpoint).to_json()["operating_points"]["always"]["label_cap"] == 2


def test_thresholds_follow_the_label_count_between_calibrated_counts(checkpoint: Path) -> None:
    # "always" leaves at the first exit at K = 2 (threshold 0) and never at K = 8 (threshold 1); K = 4 sits halfway
    # in log K, threshold 0.5 at every layer. The gate probabilities are whatever the random gates say: the rows
    # leave exactly where a rule with those thresholds lets them.
    _edit_point(checkpoint, "always", thresholds={"2": {"9": 0.0, "11": 0.0}, "8": {"9": 1.0, "11": 1.0}})
    classifier = load_classifier(checkpoint)
    point = classifier.policy.point("always")
    assert point.thresholds_at(2) == {9: 0.0, 11: 0.0} and point.thresholds_at(8) == {9: 1.0, 11: 1.0}
    assert point.thresholds_at(4) == pytest.approx({9: 0.5, 11: 0.5})
    assert point.thresholds_at(1) == point.thresholds_at(2) and point.thresholds_at(50) == point.thresholds_at(8)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    labels = ["cat", "dog", "car", "bus", "tree", "ship", "cup", "hat"]
    two = classifier.classify(images, labels[:2], operating_point="always")
    assert all(r.exit_layer == 9 for r in two)
    eight = classifier.classify(images, labels, operating_point="always")
    assert all(r.exit_path == "full" for r in eight)
    four = classifier.classify(images, labels[:4], operating_point="always")
    halfway = classifier.classify(images, labels[:4], exit_rule=ExitRule.from_thresholds({9: 0.5, 11: 0.5}, "always"))
    assert [(r.exit_layer, r.predictions) for r in four] == [(r.exit_layer, r.predictions) for r in halfway]
    # Rows of requests with different K in one engine batch each follow their own K's thresholds.
    queries = [
        classifier.query(labels[:2], operating_point="always"),
        classifier.query(labels, operating_point="always"),
    ]
    mixed = classifier.classify_rows(images[:2], queries)
    assert (mixed[0].exit_layer, mixed[1].exit_path) == (9, "full")


def test_a_format_3_manifest_reads_as_one_threshold_set_for_every_label_count(checkpoint: Path) -> None:
    data = json.loads((checkpoint / MANIFEST).read_text())
    points = data["operating_points"]
    data["operating_points"] = {name: record["thresholds"]["1"] for name, record in points.items()}
    data |= {"format_version": 3, "promises": {"half": 0.9}, "label_caps": {"always": 3}}
    (checkpoint / MANIFEST).write_text(json.dumps(data))
    manifest = read_manifest(checkpoint)
    half = manifest.operating_points["half"]
    assert half.promise == 0.9 and half.label_cap is None and half.by_label_count == ((1, {9: 0.5, 11: 0.5, 12: 0.5}),)
    assert manifest.operating_points["always"].label_cap == 3
    assert manifest.to_json()["format_version"] == 4


def test_calibration_templates_are_the_default_prompts(checkpoint: Path) -> None:
    untrained = load_classifier(checkpoint)
    labels = ["red circle", "blue square"]
    _edit_manifest(checkpoint, templates=["a rendering of a {}.", "a snapshot of a {}"])
    classifier = load_classifier(checkpoint)
    assert classifier.default_templates == ("a rendering of a {}.", "a snapshot of a {}")
    assert untrained.default_templates != classifier.default_templates  # none stored: the engine's defaults
    assert torch.equal(
        classifier.text_embeddings(labels),
        classifier.text_embeddings(labels, ["a rendering of a {}.", "a snapshot of a {}"]),
    )
    assert not torch.equal(classifier.text_embeddings(labels), untrained.text_embeddings(labels))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / MANIFEST).unlink(), "no manifest.json"),
        (lambda d: (d / MANIFEST).write_text("{not json"), "unreadable"),
        (lambda d: (d / MANIFEST).write_text("[1, 2]"), "JSON object"),
        (lambda d: _edit_manifest(d, format_version=99), "format 99 is not supported"),
        (lambda d: _edit_manifest(d, candidate_layers=[11, 9]), "ascending"),
        (lambda d: _edit_manifest(d, candidate_layers=[9, 11, 13]), "within 1..12"),
        (lambda d: _edit_manifest(d, default_operating_point="turbo"), "default operating point 'turbo'"),
        (lambda d: _edit_point(d, "half", thresholds={"1": {"9": 1.5}}), "outside \\[0, 1\\]"),
        (lambda d: _edit_point(d, "half", thresholds={"5": {"9": 0.5}, "2": {"9": 0.5}, "0": {}}), "label counts"),
        (lambda d: _edit_point(d, "half", thresholds={"1": {"10": 0.5}}), "outside the candidates"),
        (lambda d: _edit_manifest(d, quant_mode="int4"), "unknown quant mode"),
        (lambda d: _edit_manifest(d, quantized_modules=48), "converted 24 modules here but 48"),
        (lambda d: _edit_manifest(d, num_layers=24, candidate_layers=[9, 11, 12]), "the checkpoint expects"),
        (lambda d: _edit_manifest(d, heads_sha256="0" * 64), "does not match the SHA-256"),
        (lambda d: (d / TENSORS).write_bytes(b"garbage"), "does not match the SHA-256"),
        (lambda d: (d / TENSORS).unlink(), "missing"),
        (lambda d: (d / "lraee-tiny-vit12.json").unlink(), "model config file not found"),
        (lambda d: _edit_manifest(d, backbone=None), "malformed manifest"),
        (lambda d: _edit_manifest(d, templates=["no placeholder"]), "manifest templates"),
        (lambda d: _edit_manifest(d, gate_features=["confidence", "mood", "sav"]), "gate features"),
        (lambda d: _edit_manifest(d, gate_features=["cos_top1", "log_k", "sav"]), "read features"),
        (lambda d: _edit_point(d, "full", thresholds={"1": {"9": 0.5}}), "built in"),
        (lambda d: _edit_point(d, "half", promise=1.5), "promise of 'half'"),
        (lambda d: _edit_point(d, "half", label_cap=0), "label cap of 'half'"),
        (lambda d: _edit_point(d, "half", label_cap=2.5), "label cap of 'half'"),
        (lambda d: _edit_point(d, "half", label_cap="5"), "label cap of 'half'"),
        (lambda d: _edit_point(d, "half", thresholds={}), "must carry its name and thresholds"),
    ],
)
def test_damaged_checkpoints_fail_with_the_reason(
    checkpoint: Path, damage: Callable[[Path], object], message: str
) -> None:
    damage(checkpoint)
    with pytest.raises(CheckpointError, match=message):
        load_classifier(checkpoint)


def test_gate_tensors_of_the_wrong_shape_are_refused(checkpoint: Path) -> None:
    from safetensors.torch import load_file

    from lraee_core.backbone import sha256_of_file

    tensors = load_file(str(checkpoint / TENSORS))
    tensors["gates.9.weight"] = torch.zeros(4)
    save_file(tensors, str(checkpoint / TENSORS))
    _edit_manifest(checkpoint, heads_sha256=sha256_of_file(checkpoint / TENSORS))
    with pytest.raises(CheckpointError, match="layer 9 gate"):
        load_classifier(checkpoint)


@pytest.mark.slow
def test_vit_b32_local_weights_checkpoint_end_to_end(tmp_path: Path) -> None:
    """The real path: ViT-B-32 weights in a local file -> checkpoint -> classifier; swapped weights are refused."""
    backbone = build_backbone(BackboneConfig("ViT-B-32"))
    weights = tmp_path / "vit-b-32.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(weights))
    config = BackboneConfig("ViT-B-32", pretrained=str(weights))
    manifest = untrained_checkpoint(tmp_path / "ckpt", config, hidden_dim=256)
    assert manifest.backbone.pretrained_kind == "file" and manifest.backbone.weights_sha256
    assert manifest.quantized_modules == 24
    classifier = load_classifier(tmp_path / "ckpt")
    image = torch.randn(2, 3, 224, 224)
    results = classifier.classify(image, ["cat", "dog"], operating_point="always")
    assert [r.exit_layer for r in results] == [9, 9]
    # other weights of the same shape under the recorded path: refused by hash
    other = build_backbone(BackboneConfig("ViT-B-32", random_init_seed=1))
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(weights))
    with pytest.raises(CheckpointError, match="not the ones this checkpoint was calibrated on"):
        load_classifier(tmp_path / "ckpt")


@pytest.mark.parametrize("name", sorted(EMBEDDED_CHECKPOINTS))
def test_every_embedded_checkpoint_loads_under_its_own_id(name: str) -> None:
    """Each embedded checkpoint loads by name and answers; no two share a checkpoint id (the id labels the metrics
    and the text cache, so two models under one id could not be told apart on a dashboard)."""
    ids = {read_manifest(directory).checkpoint_id for directory in EMBEDDED_CHECKPOINTS.values()}
    assert len(ids) == len(EMBEDDED_CHECKPOINTS)
    classifier = load_classifier(resolve_checkpoint(name))
    assert classifier.checkpoint_id == read_manifest(EMBEDDED_CHECKPOINTS[name]).checkpoint_id
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    [first, second] = classifier.classify(images, ["cat", "dog", "car"])
    assert first.predictions[0].label in {"cat", "dog", "car"} and 1 <= second.exit_layer <= classifier.num_layers
