"""A training pack: the everyday CLIP's training photos as encoded files in a few part files, for a machine that
has no photo folders (a lent GPU machine gets the working tree and what it carries, nothing else).

A pack holds only training photos (held-out ones never enter it), so carrying one cannot leak evaluation images into
training. Layout of a pack folder:

* ``part-000.bin``, ``part-001.bin``, …: the encoded files back to back, each part at most ``part_bytes`` (so the
  parts can travel in several loads);
* ``index.json``: per source its name, per photo (part, offset, length) and class, the caption material
  (``ClassCaptions`` per class or human captions per photo), each part's SHA-256, and ``meta`` (what the trainer
  would otherwise read from the folders: the split's settings, ``holdout.csv``, the evaluation split, counts).

``read_pack`` checks every part against its hash, so a pack missing a part or holding a damaged one is an error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.embedded.captions import ClassCaptions

FORMAT = "lraee-training-pack/1"
INDEX_FILE = "index.json"


@dataclass
class EncodedSource:
    """The training photos of one source as encoded files (what a pack carries), with what captions them."""

    name: str  # tiny, cifar10, intel, flowers, flickr8k
    images: list[bytes]  # encoded image files, in training order
    classes: list[int]  # per photo: class index into captions (labelled sets) or photo index (flickr8k)
    captions: list[ClassCaptions] | None  # per class (labelled sets)
    texts: list[list[str]] | None  # per photo, its human captions (flickr8k)


@dataclass
class Pack:
    """What ``read_pack`` returns."""

    sources: list[EncodedSource]  # in the order they were written
    meta: dict[str, Any]  # the writer's own record (split settings, holdout.csv, evaluation split, counts)


def _captions_json(captions: ClassCaptions) -> dict[str, Any]:
    return {
        "concept": captions.concept,
        "names": list(captions.names),
        "everyday": list(captions.everyday),
        "image_concepts": sorted(captions.image_concepts),
    }


def _captions_from_json(data: dict[str, Any]) -> ClassCaptions:
    return ClassCaptions(
        data["concept"], tuple(data["names"]), tuple(data["everyday"]), frozenset(data["image_concepts"])
    )


def write_pack(
    sources: list[EncodedSource], meta: dict[str, Any], destination: Path, part_bytes: int = 20 << 20
) -> Path:
    """Write ``sources`` and ``meta`` as a pack in ``destination`` (created; must hold no pack yet); returns the
    index path."""
    destination.mkdir(parents=True, exist_ok=True)
    if (destination / INDEX_FILE).exists():
        raise FileExistsError(f"{destination} already holds a pack")
    parts: list[str] = []
    entries = []
    handle = None
    written = 0
    try:
        for source in sources:
            places = []
            for data in source.images:
                if handle is None or (written and written + len(data) > part_bytes):
                    if handle is not None:
                        handle.close()
                    parts.append(f"part-{len(parts):03d}.bin")
                    handle = (destination / parts[-1]).open("wb")
                    written = 0
                places.append([len(parts) - 1, written, len(data)])
                handle.write(data)
                written += len(data)
            entries.append(
                {
                    "name": source.name,
                    "images": places,
                    "classes": source.classes,
                    "captions": None if source.captions is None else [_captions_json(c) for c in source.captions],
                    "texts": source.texts,
                }
            )
    finally:
        if handle is not None:
            handle.close()
    hashes = {part: hashlib.sha256((destination / part).read_bytes()).hexdigest() for part in parts}
    index = {"format": FORMAT, "parts": hashes, "sources": entries, "meta": meta}
    path = destination / INDEX_FILE
    path.write_text(json.dumps(index) + "\n")
    return path


def read_pack(directory: Path) -> Pack:
    """The pack in ``directory``, every part checked against its recorded SHA-256."""
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(f"{directory} holds no {INDEX_FILE}: not a training pack")
    index = json.loads(index_path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{index_path}: format {index.get('format')!r}, expected {FORMAT!r}")
    blobs = []
    for part, digest in index["parts"].items():
        path = directory / part
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the pack is incomplete")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"{path} does not match its recorded SHA-256: the part is damaged")
        blobs.append(data)
    sources = []
    for entry in index["sources"]:
        images = [blobs[part][offset : offset + length] for part, offset, length in entry["images"]]
        captions = None if entry["captions"] is None else [_captions_from_json(c) for c in entry["captions"]]
        sources.append(EncodedSource(entry["name"], images, entry["classes"], captions, entry["texts"]))
    return Pack(sources, index["meta"])


def write_sample(pack: Pack, destination: Path, per_source: int) -> Path:
    """A small pack of the first ``per_source`` photos of every source of ``pack``, with its meta: enough for a
    smoke run that checks a machine and measures its steps per second before the whole pack travels."""
    sample = [
        EncodedSource(
            source.name,
            source.images[:per_source],
            source.classes[:per_source],
            source.captions,
            None if source.texts is None else source.texts[:per_source],
        )
        for source in pack.sources
    ]
    return write_pack(sample, pack.meta, destination)


def main(argv: list[str] | None = None) -> None:
    """``python -m training.embedded.pack SOURCE DESTINATION --per-source N``: write a sample pack of SOURCE's photos.
    (A whole pack is written by ``python -m training.embedded.everyday --write-pack DIR``.)"""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("source", type=Path, help="a pack folder")
    parser.add_argument("destination", type=Path, help="the sample pack's folder (must hold no pack yet)")
    parser.add_argument("--per-source", type=int, default=400, help="photos taken from every source")
    args = parser.parse_args(argv)
    print(write_sample(read_pack(args.source), args.destination, args.per_source))


if __name__ == "__main__":
    main()
