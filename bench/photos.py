"""The images the benchmark classifies: real everyday photos when the shared data folder has them, else noise.

An early-exit engine's speed depends on its inputs: on noise a trained gate rarely lets an image leave, so the
default model's operating points would be timed at full depth. The benchmark therefore feeds the default model the
shared everyday photos (Intel scenes, flowers and CIFAR-10 photos of the everyday sets' validation split: held out of
the CLIP's training and of the LRA-EE build, ``training.embedded.everyday.everyday_validation_split``; classes taken in
turn) against the 21 class names of those sets, a label set of the size real requests send. ``test=True`` takes
them from the sealed test split instead (a release's final figure). ViT-B-32 has random weights here, so its
rows keep seeded noise images and the 1,000 ImageNet class names (the paper's setting), and its early exits are
forced (the assumed paper mix).
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lraee_core.images import load_image
from lraee_core.paths import data_root

SETS = ("intel", "flowers", "cifar10")  # everyday sources (training.embedded.everyday.SET_CLASSES) the bench reads


@dataclass(frozen=True)
class BenchImages:
    """A batch of preprocessed images, the labels they are classified against, and where they came from."""

    images: torch.Tensor  # [N, 3, H, W]
    labels: tuple[str, ...] | None  # None: the caller's default label set
    note: str  # printed with the results
    classes: tuple[int, ...] | None = None  # each image's class, an index into labels (None: unknown)
    sources: tuple[str, ...] = ()  # each photo's origin, "set:tar member" (empty for generated images)


def everyday_dir() -> Path:
    """The shared everyday-photos folder (under :func:`lraee_core.paths.data_root`)."""
    return data_root() / "everyday-photos"


def _photos_by_class(path: Path, per_class: int, wanted: set[str]) -> dict[str, list[tuple[str, bytes]]]:
    """Class -> up to ``per_class`` (member name, bytes) of the ``wanted`` members of a tar, in tar order."""
    found: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(path) as archive:
        for member in archive:
            label = member.name.split("/")[0]
            if member.name not in wanted or len(found.setdefault(label, [])) >= per_class:
                continue
            handle = archive.extractfile(member)
            if handle is not None:
                found[label].append((member.name, handle.read()))
    return found


def everyday_photos(preprocess: Callable[[Any], torch.Tensor], count: int, test: bool = False) -> BenchImages | None:
    """``count`` preprocessed everyday photos of the validation split (``test``: the sealed test split), classes in
    turn, with the class names; None when absent."""
    from training.embedded.everyday import SET_CLASSES, EverydayClipConfig, everyday_validation_split

    folder = everyday_dir()
    paths = [folder / SET_CLASSES[name][0] for name in SETS]
    if not all(path.is_file() for path in paths):
        return None
    # Photos neither the everyday CLIP's training nor the LRA-EE build used (its recipe's seeds and fractions, the
    # config defaults), the validation part unless the test part is asked for.
    validation, sealed = everyday_validation_split(EverydayClipConfig(everyday_dir=str(folder)))
    held = sealed if test else validation
    split = "test" if test else "validation"
    by_class: dict[str, list[tuple[str, bytes]]] = {}
    for name, path in zip(SETS, paths, strict=True):
        for label, photos in _photos_by_class(path, per_class=count, wanted=set(held[name])).items():
            by_class.setdefault(label, []).extend((f"{name}:{member}", data) for member, data in photos)
    labels = sorted(by_class)
    in_turn = [
        (photos[index], number)
        for index in range(count)
        for number, label in enumerate(labels)
        if index < len(photos := by_class[label])
    ]
    chosen = in_turn[:count]
    if len(chosen) < count:
        return None
    images = torch.stack([preprocess(load_image(data)) for (_, data), _ in chosen])
    note = (
        f"images: {count} everyday photos of the {split} split, used by no build step ({', '.join(SETS)} under "
        f"{folder}, classes in turn) against their {len(labels)} class names"
    )
    classes = tuple(number for _, number in chosen)
    return BenchImages(images, tuple(labels), note, classes, tuple(source for (source, _), _ in chosen))


def noise_images(image_size: int, count: int, reason: str) -> BenchImages:
    """Seeded noise images [count, 3, S, S]; ``reason`` says why they are used."""
    images = torch.randn(count, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return BenchImages(images, None, f"images: {count} seeded noise images ({reason})")
