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
    _edit_manifest(checkpoint, label_caps={"always": 2})
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
    assert read_manifest(checkpoint).to_json()["label_caps"] == {"always": 2}


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
        (lambda d: _edit_manifest(d, operating_points={"half": {"9": 1.5}}), "outside \\[0, 1\\]"),
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
        (lambda d: _edit_manifest(d, operating_points={"full": {"9": 0.5}}), "built in"),
        (lambda d: _edit_manifest(d, promises={"half": 1.5}), "promise 'half'"),
        (lambda d: _edit_manifest(d, promises={"turbo": 0.9}), "promise 'turbo'"),
        (lambda d: _edit_manifest(d, label_caps={"turbo": 5}), "label cap 'turbo'"),
        (lambda d: _edit_manifest(d, label_caps={"half": 0}), "label cap 'half'"),
        (lambda d: _edit_manifest(d, label_caps={"half": 2.5}), "label cap 'half'"),
        (lambda d: _edit_manifest(d, label_caps={"half": "5"}), "label cap 'half'"),
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
