"""The real ImageNet-class photos of ``../shared/data/imagenet-photos/``, extracted into ImageFolder trees.

The photos are never part of the project: they are read from the shared folder at run time (``LRAEE_PHOTOS_SRC``
overrides where) and extracted into a git-ignored directory (``data/imagenet-photos`` by default):

* ``train/``  Tiny-ImageNet training photos, 250 per class, 202 classes (``tiny-train-00..03.tar``)
* ``val/``    Tiny-ImageNet validation photos, 50 per class (``tiny-val.tar``)
* ``acuity/`` 1,300 real ILSVRC2012 validation photos of 725 classes (``imagenet-val-acuity.tar``); 259 of them
  belong to the 202 classes.

Every tar member is ``WNID/FILE.JPEG``. ``extract(..., per_class=k, max_classes=n)`` takes a slice (the first
``n`` classes met, ``k`` photos each), which is what the tests use.

Run: ``python -m training.embedded.photos [--dest data/imagenet-photos]``.
"""

from __future__ import annotations

import argparse
import tarfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from lraee_core.paths import REPO_ROOT, photos_root

SOURCE_DIR = photos_root()
DEFAULT_DEST = REPO_ROOT / "data" / "imagenet-photos"
CLASSES_TSV = "classes.tsv"
TARS: dict[str, tuple[str, ...]] = {
    "train": tuple(f"tiny-train-{i:02d}.tar" for i in range(4)),
    "val": ("tiny-val.tar",),
    "acuity": ("imagenet-val-acuity.tar",),
}


class PhotosUnavailable(RuntimeError):
    """The shared photo tars are not on this machine."""


def source_dir() -> Path:
    """The folder holding the tars and ``classes.tsv``; raises PhotosUnavailable when any is missing."""
    missing = [name for names in TARS.values() for name in names if not (SOURCE_DIR / name).is_file()]
    if not (SOURCE_DIR / CLASSES_TSV).is_file():
        missing.append(CLASSES_TSV)
    if missing:
        raise PhotosUnavailable(f"{SOURCE_DIR} lacks {', '.join(missing)} (set LRAEE_PHOTOS_SRC to the photo folder)")
    return SOURCE_DIR


def classes_tsv() -> Path:
    """The wnid → ImageNet-1k index table shipped with the photos."""
    return source_dir() / CLASSES_TSV


def tiny_wnids() -> list[str]:
    """Sorted wnids of the 202 classes with Tiny-ImageNet photos (``in_tiny_subset`` = 1)."""
    rows = [line.split("\t") for line in classes_tsv().read_text().splitlines()[1:] if line.strip()]
    return sorted(row[0] for row in rows if row[3].strip() == "1")


def extract(
    subset: str,
    dest: str | Path = DEFAULT_DEST,
    per_class: int | None = None,
    max_classes: int | None = None,
    wnids: Sequence[str] | None = None,
) -> Path:
    """Extract ``subset`` (train / val / acuity) into ``dest/subset`` and return that folder.

    ``per_class`` / ``max_classes`` take a slice; ``wnids`` keeps only those classes. A complete extraction is
    marked with ``.complete`` and not repeated; a slice always rewrites what it selects.
    """
    if subset not in TARS:
        raise ValueError(f"subset must be one of {sorted(TARS)}, got {subset!r}")
    out = Path(dest) / subset
    whole = per_class is None and max_classes is None and wnids is None
    marker = out / ".complete"
    if whole and marker.exists():
        return out
    keep = set(wnids) if wnids is not None else None
    counts: Counter[str] = Counter()
    classes: list[str] = []
    for name in TARS[subset]:
        with tarfile.open(source_dir() / name) as archive:
            for member in archive:
                if not member.isfile():
                    continue
                parts = Path(member.name).parts
                if len(parts) != 2 or parts[0].startswith(".") or ".." in parts:
                    continue  # only WNID/FILE members; never write outside dest
                wnid = parts[0]
                if keep is not None and wnid not in keep:
                    continue
                if wnid not in counts:
                    if max_classes is not None and len(classes) >= max_classes:
                        continue
                    classes.append(wnid)
                if per_class is not None and counts[wnid] >= per_class:
                    continue
                counts[wnid] += 1
                target = out / wnid / parts[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                assert source is not None  # a regular file member
                target.write_bytes(source.read())
    if whole:
        marker.touch()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Extract every subset (or those named) into ``--dest``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("subsets", nargs="*", default=list(TARS), help="train, val, acuity (default: all)")
    parser.add_argument("--dest", default=str(DEFAULT_DEST))
    args = parser.parse_args(argv)
    for subset in args.subsets:
        print(extract(subset, args.dest))


if __name__ == "__main__":
    main()
