"""Activation ranges for the benchmark's ``static`` engine, calibrated at bench time on a few dozen real photos.

Neither benchmarked checkpoint is a static one (the default ships ``paper``; ViT-B-32's is generated), so the bench
observes ranges itself (:func:`lraee_core.static_quant.observe_ranges`, min/max) on :data:`PHOTOS` Tiny-ImageNet
*training* photos (one per class, read straight from the shared tar) and loads the checkpoint with
``quant_mode="static"`` and those ranges. Without the shared photos it falls back to seeded noise images and says
so: the speed of fixed-scale kernels does not depend on where their scales came from.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import torch

from lraee_core.backbone import ClipBackbone
from lraee_core.images import load_image
from lraee_core.paths import data_root
from lraee_core.static_quant import ActivationRanges, observe_ranges

PHOTOS = 48  # calibration photos (one per class)
TAR = Path("imagenet-photos") / "tiny-train-00.tar"  # under the shared data folder


def calibration_photos(backbone: ClipBackbone, count: int = PHOTOS) -> torch.Tensor | None:
    """``count`` preprocessed photos [N, 3, H, W], one per class, or None when the shared tar is absent."""
    path = data_root() / TAR
    if not path.is_file():
        return None
    images: list[torch.Tensor] = []
    seen: set[str] = set()
    with tarfile.open(path) as archive:
        for member in archive:
            wnid = member.name.split("/")[0]
            if not member.isfile() or wnid in seen:
                continue
            handle = archive.extractfile(member)
            if handle is None:
                continue
            seen.add(wnid)
            image = load_image(handle.read())
            images.append(backbone.preprocess(image))
            if len(images) == count:
                break
    return torch.stack(images) if images else None


def bench_ranges(backbone: ClipBackbone) -> tuple[ActivationRanges, str]:
    """Ranges observed on ``backbone``'s FP32 tower, and the note that says on what."""
    photos = calibration_photos(backbone)
    if photos is None:
        side = backbone.shape.image_size
        photos = torch.randn(PHOTOS, 3, side, side, generator=torch.Generator().manual_seed(1))
        note = f"static: ranges calibrated on {PHOTOS} seeded noise images ({data_root() / TAR} absent)"
    else:
        note = f"static: ranges calibrated at bench time on {len(photos)} Tiny-ImageNet training photos (min/max)"
    return observe_ranges(backbone.visual, photos.split(16)), note
