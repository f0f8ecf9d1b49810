"""Real photos: extraction from the shared tars, the photo CLIP trainer, and a build on its held-out photos.

These need ``../shared/data/imagenet-photos/``; without it they skip, saying so. They run on a small slice
(4 classes) so they cost seconds, not hours.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lraee_core import load_classifier
from lraee_core.assets import MODEL_CONFIGS_DIR
from lraee_core.images import load_image
from training.embedded import photos
from training.embedded.photo_clip import (
    HOLDOUT_FILE,
    Augment,
    BatchAugment,
    PhotoClipConfig,
    multi_positive_loss,
    scan_photos,
    split_holdout,
    train_photo_clip,
)
from training.pipeline.cli import main as train_cli

CLASSES = 4
TRAIN_PER_CLASS = 16
VAL_PER_CLASS = 4

pytestmark = pytest.mark.photos


@pytest.fixture(scope="module")
def photo_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slice of the real photos: 4 Tiny-ImageNet classes, 16 training and 4 validation photos each."""
    try:
        photos.source_dir()
    except photos.PhotosUnavailable as error:
        pytest.skip(f"real photos absent: {error}")
    dest = tmp_path_factory.mktemp("photos")
    train = photos.extract("train", dest, per_class=TRAIN_PER_CLASS, max_classes=CLASSES)
    photos.extract("val", dest, per_class=VAL_PER_CLASS, wnids=sorted(p.name for p in train.iterdir()))
    return dest


def test_slice_is_an_imagefolder_of_real_jpegs(photo_slice: Path) -> None:
    folders = sorted((photo_slice / "train").iterdir())
    assert len(folders) == CLASSES
    assert all(len(list(folder.iterdir())) == TRAIN_PER_CLASS for folder in folders)
    assert sorted(p.name for p in (photo_slice / "val").iterdir()) == [f.name for f in folders]
    assert {p.name for p in folders} <= set(photos.tiny_wnids())
    with Image.open(next(folders[0].iterdir())) as image:
        assert image.format == "JPEG" and image.size == (64, 64)


def test_class_names_come_from_the_imagenet_table(photo_slice: Path) -> None:
    found = scan_photos(photo_slice / "train", photos.classes_tsv())
    index = {row.split("\t")[0]: int(row.split("\t")[1]) for row in photos.classes_tsv().read_text().splitlines()[1:]}
    assert found.names == tuple(open_clip.IMAGENET_CLASSNAMES[index[w]] for w in found.wnids)
    assert len(found.paths) == CLASSES * TRAIN_PER_CLASS


def test_holdout_takes_the_same_number_of_every_class_and_is_disjoint(photo_slice: Path) -> None:
    found = scan_photos(photo_slice / "train", photos.classes_tsv())
    train, holdout = split_holdout(found, per_class=5, seed=0)
    assert not set(train) & set(holdout)
    assert sorted(train + holdout) == list(range(len(found.paths)))
    per_class = [sum(found.labels[i] == c for i in holdout) for c in range(CLASSES)]
    assert per_class == [5] * CLASSES
    assert split_holdout(found, per_class=5, seed=0) == (train, holdout)  # a pure function of the seed


def test_batch_augment_crops_inside_the_image_seeded_and_normalised_as_augment() -> None:
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model.visual.image_size = (64, 64)  # the crop size is all the augmenters read from the model
    batched, single = BatchAugment(model, 0.35), Augment(model, 0.35)
    flat = torch.full((6, 3, 72, 96), 128, dtype=torch.uint8)
    # A flat image stays flat: every box lies inside the image (a sample outside would read zeros).
    out = batched(flat, torch.Generator().manual_seed(0))
    assert out.shape == (6, 3, 64, 64)
    assert torch.allclose(out, single(flat, torch.Generator().manual_seed(0)), atol=1e-5)
    ramp = torch.arange(96, dtype=torch.uint8).expand(6, 3, 72, 96).contiguous()
    first = batched(ramp, torch.Generator().manual_seed(3))
    assert torch.equal(first, batched(ramp, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, batched(ramp, torch.Generator().manual_seed(4)))
    # Crops and flips vary per image: a left-to-right ramp comes out rising in some rows and falling in others.
    slopes = (first[:, 0, :, -1] - first[:, 0, :, 0]).mean(dim=1)
    assert (slopes > 0).any() and (slopes < 0).any()


def test_multi_positive_loss_is_clip_loss_when_classes_are_unique() -> None:
    torch.manual_seed(0)
    images, texts = F.normalize(torch.randn(6, 8), dim=1), F.normalize(torch.randn(6, 8), dim=1)
    scale = torch.tensor(10.0)
    expected = open_clip.ClipLoss()(images, texts, scale)
    assert multi_positive_loss(images, texts, scale, torch.arange(6)) == pytest.approx(expected.item(), rel=1e-5)


def test_multi_positive_loss_does_not_punish_a_same_class_caption() -> None:
    # Pairs 0 and 1 share a class and each image matches the other pair's caption: with classes known that is
    # no error (small loss), while plain CLIP loss, which counts them as negatives, calls it a mismatch.
    images = torch.eye(4)[[0, 1, 2, 3]]
    texts = torch.eye(4)[[1, 0, 2, 3]]
    scale = torch.tensor(10.0)
    shared = multi_positive_loss(images, texts, scale, torch.tensor([0, 0, 2, 3]))
    apart = multi_positive_loss(images, texts, scale, torch.tensor([0, 1, 2, 3]))
    assert apart.item() == pytest.approx(open_clip.ClipLoss()(images, texts, scale).item(), rel=1e-5)
    assert shared.item() < 0.6 * apart.item()  # half the pairs stop counting as errors


@pytest.fixture(scope="module")
def trained(photo_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("photo_clip")
    base = PhotoClipConfig(
        train_dir=str(photo_slice / "train"),
        classes_tsv=str(photos.classes_tsv()),
        output_dir=str(out),
        holdout_per_class=6,
        batch_size=16,
        warmup_steps=1,
        threads=2,
        log_every=1,
        checkpoint_every=2,
        progress=False,
    )
    train_photo_clip(replace(base, steps=2))
    # Resuming continues from the saved step instead of starting over.
    train_photo_clip(replace(base, steps=3, eval_dirs=str(photo_slice / "val")))
    return out


def test_trainer_resumes_logs_and_evaluates_on_validation_photos(trained: Path, photo_slice: Path) -> None:
    log = json.loads((trained / "training_log.json").read_text())
    assert [entry["step"] for entry in log["history"]] == [1, 2, 3]
    assert log["data"] == {"train_images": CLASSES * 10, "holdout_images": CLASSES * 6, "classes": CLASSES}
    zero_shot = log["zero_shot_fp32"][str(photo_slice / "val")]
    assert zero_shot["images"] == CLASSES * VAL_PER_CLASS and zero_shot["classes"] == CLASSES
    assert 0.0 <= zero_shot["top1"] <= zero_shot["top5"] == 1.0  # top-5 of 4 classes always holds the answer


def test_holdout_manifest_feeds_a_build_whose_checkpoint_loads(trained: Path, tmp_path: Path) -> None:
    rows = (trained / HOLDOUT_FILE).read_text().splitlines()
    assert rows[0] == "path,label" and len(rows) == 1 + CLASSES * 6
    assert all(Path(row.split(",")[0]).is_file() for row in rows[1:])
    weights = trained / "weights.safetensors"
    status = train_cli(
        [
            "build",
            "--work-dir", str(tmp_path / "work"),
            "--model", "lraee-tiny-vit12",
            "--model-config", str(MODEL_CONFIGS_DIR / "lraee-tiny-vit12.json"),
            "--pretrained", str(weights),
            "--data", str(trained / HOLDOUT_FILE),
            "--classes-tsv", str(photos.classes_tsv()),
            "--profile-images", "8",
            "--epochs", "1",
            "--head-batch-size", "8",
            "--engine-check-images", "4",
            "--threads", "2",
            "--out", str(tmp_path / "checkpoint"),
            "--report-dir", str(tmp_path / "report"),
        ]
    )  # fmt: skip
    assert status == 0
    classifier = load_classifier(tmp_path / "checkpoint")
    found = scan_photos(Path(rows[1].split(",")[0]).parents[1], photos.classes_tsv())
    image = classifier.backbone.preprocess(load_image(found.paths[0])).unsqueeze(0)
    [result] = classifier.classify(image, list(found.names))
    assert {p.label for p in result.predictions} <= set(found.names)
    assert (tmp_path / "report" / "report.md").is_file()
