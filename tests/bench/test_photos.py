"""The benchmark's everyday photos come from the validation split: no build step used them, and the sealed test
split stays unread unless a release's final figure asks for it."""

from __future__ import annotations

import pytest
import torch

from bench.photos import SETS, everyday_dir, everyday_photos
from training.embedded.everyday import EverydayClipConfig, everyday_build_split, everyday_validation_split


def preprocess(image: object) -> torch.Tensor:
    """Decoding is not under test here: a placeholder tensor per photo."""
    return torch.zeros(3, 2, 2)


@pytest.mark.parametrize("split", ["validation", "test"])
def test_the_bench_photos_come_from_the_split_asked_for(split: str) -> None:
    photos = everyday_photos(preprocess, 32, test=split == "test")
    if photos is None:
        pytest.skip(f"the everyday photos are not at {everyday_dir()}")
    cfg = EverydayClipConfig(everyday_dir=str(everyday_dir()))
    build, _ = everyday_build_split(cfg)
    validation, test = everyday_validation_split(cfg)
    wanted, other = (validation, test) if split == "validation" else (test, validation)
    assert len(photos.sources) == 32 == len(set(photos.sources)) and f"the {split} split" in photos.note
    for source in photos.sources:
        name, member = source.split(":", 1)
        assert name in SETS and member in wanted[name], source
        assert member not in build[name] and member not in other[name], source
    assert photos.labels is not None and photos.classes is not None  # classes in turn: every class of the 3 sets
    assert len(set(photos.classes)) == len(photos.labels) == 21
