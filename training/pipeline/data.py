"""Labelled image sources, the label set, and the four disjoint splits (head / gate / calib / eval).

Sources:

* an ImageFolder tree ``root/<class>/<image>``. With ``classes_tsv`` (columns wnid, ImageNet-1k index, name, ...)
  folder names are WordNet ids and each class is named ``open_clip.IMAGENET_CLASSNAMES[i]``, ``i`` being the wnid's
  position among the table's sorted wnids (a key that is not shaped like a wnid, ``n`` + 8 digits, is a class name
  itself, so a source may mix ImageNet classes with others such as CIFAR-10's); otherwise a class is named after its
  folder, underscores read as spaces;
* a manifest of ``path,label`` rows: ``.csv`` with that header, or ``.jsonl`` objects with those keys; relative
  paths are relative to the manifest's folder; labels are named like folders.

A data set made by a program (the embedded models' generated shape world) is exported to such a folder or manifest
first and read like any other.

The split is stratified: each class's images are shuffled (seeded) and spread evenly over [0, 1) by rank plus
jitter; all images are then sorted by that key and cut into consecutive head, gate, calib and eval runs of the
requested sizes. Every run therefore holds each class in proportion, sizes are exact, and the result is a pure
function of (file list, config). The file lists are written to ``splits/splits.json``; their hash and per-class
counts go into the checkpoint manifest.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image
from torch.utils.data import Dataset

from lraee_core.images import load_image

from .config import SPLIT_NAMES, ConfigError, DataConfig, SplitSize
from .jobs import Job, config_hash, read_json, step, write_json, write_record

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS_FILE = "splits.json"


class DataError(ConfigError):
    """The data source or split configuration cannot be used (the message says why)."""


@dataclass(frozen=True)
class RawSource:
    """Images of one source as (path relative to ``root``, class key) pairs, in a stable order."""

    root: Path  # folder the relative paths start from
    entries: tuple[tuple[str, str], ...]  # (relative path, class key: folder name or manifest label)


@dataclass(frozen=True)
class SplitItems:
    """The images of one split."""

    root: Path  # folder the relative paths start from
    items: tuple[tuple[str, int], ...]  # (relative path, label index into the label set)

    @property
    def paths(self) -> list[Path]:
        """Absolute image paths, in split order."""
        return [self.root / rel for rel, _ in self.items]

    @property
    def labels(self) -> list[int]:
        """Label indices, in split order."""
        return [label for _, label in self.items]


@dataclass(frozen=True)
class Splits:
    """The label set and the four disjoint splits."""

    labels: tuple[str, ...]  # class names, index = label
    splits: dict[str, SplitItems]  # split name -> images
    content_hash: str  # hash of the labels and every split's file list
    description: dict[str, Any]  # data source, sizes, per-class counts, hashes (for the manifest)


# ---- sources -----------------------------------------------------------------------------------------------------
def _scan_imagefolder(root: Path) -> RawSource:
    entries = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for image in sorted(class_dir.rglob("*")):
            if image.suffix.lower() in IMAGE_SUFFIXES and image.is_file():
                entries.append((image.relative_to(root).as_posix(), class_dir.name))
    return RawSource(root=root, entries=tuple(entries))


def _read_manifest(path: Path) -> RawSource:
    rows: list[tuple[str, str]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
                raise DataError(f"{path}: a CSV manifest needs a header with 'path' and 'label' columns")
            rows = [(row["path"], row["label"]) for row in reader]
    elif path.suffix.lower() == ".jsonl":
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                rows.append((str(record["path"]), str(record["label"])))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{number}: expected a JSON object with 'path' and 'label'") from exc
    else:
        raise DataError(f"{path}: manifests must be .csv or .jsonl")
    root = path.parent
    missing = [rel for rel, _ in rows if not (root / rel).is_file()]
    if missing:
        raise DataError(f"{path}: {len(missing)} listed images do not exist, e.g. {root / missing[0]}")
    return RawSource(root=root, entries=tuple(rows))


def scan_source(source: str) -> RawSource:
    """Read an ImageFolder root or a CSV/JSONL manifest into (path, class key) pairs."""
    path = Path(source)
    if path.is_dir():
        found = _scan_imagefolder(path)
    elif path.is_file():
        found = _read_manifest(path)
    elif source.startswith("world:"):  # a source spec older builds took; the generator is no part of the pipeline
        raise DataError(
            f"data source {source!r}: the generated world is exported to a folder first "
            "(python -m training.embedded.world DIR SPLIT LABEL_SET N), then read with "
            "--data DIR/labels.csv --classes-file DIR/classes.txt"
        )
    else:
        raise DataError(f"data source {source!r} is neither a folder nor a .csv/.jsonl manifest")
    if not found.entries:
        raise DataError(f"data source {source!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


# ---- labels ------------------------------------------------------------------------------------------------------
def read_classes_tsv(path: str | Path) -> dict[str, int]:
    """wnid -> ImageNet-1k index from a table whose rows start ``wnid<TAB>index``; a header row is allowed.

    With all 1000 wnids the index is each wnid's position in their sorted list, the order of
    ``open_clip.IMAGENET_CLASSNAMES``, and a table whose index column disagrees is refused rather than silently
    mislabelling. A partial table cannot be re-derived that way, so its index column is trusted.
    """
    rows = [line.split("\t") for line in Path(path).read_text().splitlines() if line.strip()]
    if rows and (len(rows[0]) < 2 or not rows[0][1].strip().isdigit()):
        rows = rows[1:]  # header, e.g. "wnid  imagenet_index  name  in_tiny_subset"
    try:
        table = {row[0].strip(): int(row[1]) for row in rows}
    except (IndexError, ValueError) as exc:
        raise DataError(f"{path}: expected rows 'wnid<TAB>index<TAB>name...'") from exc
    num_classes = len(open_clip.IMAGENET_CLASSNAMES)
    if len(table) == num_classes:
        for position, wnid in enumerate(sorted(table)):
            if table[wnid] != position:
                raise DataError(f"{path}: {wnid} has index {table[wnid]} but is number {position} of the sorted wnids")
    elif any(not 0 <= i < num_classes for i in table.values()):
        raise DataError(f"{path}: indices must lie in 0..{num_classes - 1}")
    return table


def is_wnid(key: str) -> bool:
    """Whether a class key is shaped like a WordNet noun id (``n`` + 8 digits)."""
    return len(key) == 9 and key[0] == "n" and key[1:].isdigit()


def class_name(key: str, wnid_index: dict[str, int] | None) -> str:
    """Display name (and prompt text) of a class key: ImageNet name for a wnid of the table, else underscores ->
    spaces; a wnid-shaped key missing from the table is refused (a typo must not become a class "n01443538")."""
    if wnid_index is not None and is_wnid(key):
        if key not in wnid_index:
            raise DataError(f"class {key!r} is not a wnid of the classes table")
        return str(open_clip.IMAGENET_CLASSNAMES[wnid_index[key]])
    return key.replace("_", " ").strip()


@dataclass(frozen=True)
class LabelSet:
    """The class names the classifier chooses among, and how a source's class keys map onto them."""

    names: tuple[str, ...]  # class names (the prompt text), index = label
    by_key: dict[str, int]  # class key (folder name, manifest label, wnid) -> label
    keys_only: bool  # True with a wnid table: a key is a wnid and nothing else may match it

    def label_of(self, key: str) -> int | None:
        """Label of a class key, or None when the class is outside the label set."""
        if key in self.by_key or self.keys_only:
            return self.by_key.get(key)
        name = class_name(key, None)
        return next((i for i, n in enumerate(self.names) if n == name), None)


def label_set(config: DataConfig, source: RawSource, wnid_index: dict[str, int] | None) -> LabelSet:
    """The label set: a classes file, all 1000 ImageNet classes, or the classes present in ``source``."""
    if config.classes_file:
        raw = [line.strip() for line in Path(config.classes_file).read_text().splitlines() if line.strip()]
        names = disambiguate([class_name(key, None) for key in raw])
        return LabelSet(names, {key: i for i, key in enumerate(raw)}, keys_only=False)
    if config.label_space == "imagenet-1k":
        if wnid_index is None:
            raise DataError("label_space 'imagenet-1k' needs classes_tsv to map folders to ImageNet classes")
        return LabelSet(disambiguate([str(n) for n in open_clip.IMAGENET_CLASSNAMES]), dict(wnid_index), True)
    # Classes present in the training source, ordered by key (sorted wnids = ImageNet index order).
    keys = sorted({key for _, key in source.entries})
    names = disambiguate([class_name(key, wnid_index) for key in keys])
    return LabelSet(names, {key: i for i, key in enumerate(keys)}, keys_only=wnid_index is not None)


def disambiguate(names: Sequence[str]) -> tuple[str, ...]:
    """Make repeated class names unique: the 2nd, 3rd... occurrence gets " (2)", " (3)"...

    The engine refuses duplicate labels, and ImageNet has some: ``open_clip.IMAGENET_CLASSNAMES`` names classes 657
    and 744 both "missile", 836 and 837 both "sunglasses".
    """
    seen: Counter[str] = Counter()
    unique = []
    for name in names:
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    if len(set(unique)) != len(unique):
        raise DataError(f"class names stay ambiguous after numbering repeats: {sorted(unique)[:5]}...")
    return tuple(unique)


# ---- splitting ---------------------------------------------------------------------------------------------------
def _count(size: SplitSize, total: int, name: str) -> int:
    if isinstance(size, bool) or size < 0:
        raise DataError(f"{name} split size must be a fraction (float) or a count (int) >= 0, got {size!r}")
    return int(size) if isinstance(size, int) else round(float(size) * total)


def _counts(splits: Sequence[SplitSize], total: int, names: Sequence[str]) -> list[int]:
    """Image counts of the splits. Fractions are rounded cumulatively (each split gets round(cum * total) minus
    the previous cumulative round), so fractions summing to at most 1 never ask for more than ``total`` images."""
    sizes = [_count(size, total, name) for size, name in zip(splits, names, strict=True)]
    cumulative, previous = 0.0, 0
    for i, size in enumerate(splits):
        if isinstance(size, float):
            cumulative += size
            upto = round(cumulative * total)
            sizes[i], previous = upto - previous, upto
    return sizes


def stratified_order(labels: Sequence[int], seed: int) -> list[int]:
    """Indices ordered so that every prefix (and every consecutive run) holds each class in proportion."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    keyed: list[tuple[float, int, int]] = []
    for label in sorted(by_class):
        members = by_class[label]
        shuffled = rng.permutation(len(members))
        jitter = rng.random(len(members))
        for rank, (position, offset) in enumerate(zip(shuffled, jitter, strict=True)):
            keyed.append(((rank + offset) / len(members), label, members[position]))
    keyed.sort()
    return [index for _, _, index in keyed]


def _labelled(source: RawSource, labels: LabelSet) -> tuple[list[tuple[str, int]], int]:
    """(relative path, label) of every image whose class is in the label set, and how many were left out."""
    kept, dropped = [], 0
    for rel, key in source.entries:
        label = labels.label_of(key)
        if label is None:
            dropped += 1
        else:
            kept.append((rel, label))
    return kept, dropped


def _items_hash(items: Sequence[tuple[str, int]]) -> str:
    return hashlib.sha256(json.dumps(list(items)).encode()).hexdigest()[:16]


def make_splits(config: DataConfig) -> Splits:
    """Scan the sources, build the label set and cut the disjoint, stratified splits."""
    if not config.source:
        raise DataError("no data source given (--data): an ImageFolder or a .csv/.jsonl manifest")
    wnid_index = read_classes_tsv(config.classes_tsv) if config.classes_tsv else None
    source = scan_source(config.source)
    eval_source = scan_source(config.eval_source) if config.eval_source else None
    label_space = label_set(config, source, wnid_index)
    labels = label_space.names
    items, dropped = _labelled(source, label_space)
    order = stratified_order([label for _, label in items], config.seed)
    if config.per_class_limit is not None:
        # A class's first images in key order are a random sample of it; re-spread the capped set, since the kept
        # keys of a large class now bunch at the start of the order.
        seen: Counter[int] = Counter()
        capped = []
        for i in order:
            if seen[items[i][1]] < config.per_class_limit:
                seen[items[i][1]] += 1
                capped.append(i)
        items = [items[i] for i in sorted(capped)]
        order = stratified_order([label for _, label in items], config.seed)
    total = len(order)
    names = SPLIT_NAMES if eval_source is None else SPLIT_NAMES[:-1]
    sizes = _counts([getattr(config, f"{name}_split") for name in names], total, names)
    if sum(sizes) > total:
        raise DataError(f"split sizes {dict(zip(names, sizes, strict=True))} need {sum(sizes)} images; have {total}")
    result: dict[str, SplitItems] = {}
    start = 0
    for name, size in zip(names, sizes, strict=True):
        chosen = sorted(order[start : start + size])  # file order inside a split; membership is what matters
        result[name] = SplitItems(source.root, tuple(items[i] for i in chosen))
        start += size
    eval_dropped = 0
    if eval_source is not None:
        eval_items, eval_dropped = _labelled(eval_source, label_space)
        eval_order = stratified_order([label for _, label in eval_items], config.seed + 1)
        if config.eval_limit is not None:
            eval_order = eval_order[: config.eval_limit]
        result["eval"] = SplitItems(eval_source.root, tuple(eval_items[i] for i in sorted(eval_order)))
    elif config.eval_limit is not None:
        kept = stratified_order(result["eval"].labels, config.seed + 1)[: config.eval_limit]
        result["eval"] = SplitItems(source.root, tuple(result["eval"].items[i] for i in sorted(kept)))
    for name in SPLIT_NAMES:
        if not result[name].items:
            raise DataError(f"the {name} split is empty; give it a larger size or more images")
    hashes = {name: _items_hash(split.items) for name, split in result.items()}
    description = {
        "source": config.source,
        "eval_source": config.eval_source,
        "classes_tsv": config.classes_tsv,
        "classes_file": config.classes_file,
        "label_space": config.label_space,
        "num_labels": len(labels),
        "labels": list(labels),
        "templates": list(config.templates),
        "seed": config.seed,
        "requested": {name: getattr(config, f"{name}_split") for name in SPLIT_NAMES},
        "per_class_limit": config.per_class_limit,
        "eval_limit": config.eval_limit,
        "images_outside_label_set": {"source": dropped, "eval_source": eval_dropped},
        "splits": {
            name: {
                "root": str(split.root),
                "count": len(split.items),
                "classes": len(set(split.labels)),
                "sha256_16": hashes[name],
            }
            for name, split in result.items()
        },
    }
    return Splits(labels=labels, splits=result, content_hash=config_hash(list(labels), hashes), description=description)


def split_step_hash(config: DataConfig) -> str:
    """Identity of the split step's inputs (the templates do not change a split)."""
    return config_hash(replace(config, templates=()))


@step("split")
def run_split(job: Job) -> Splits:
    """Step ``split``: write ``splits/splits.json`` (file lists per split) unless it is up to date."""
    directory = job.step_dir("split")
    splits = make_splits(job.config.data)
    wanted = config_hash(split_step_hash(job.config.data), splits.content_hash)
    if job.should_skip("split", wanted):
        return splits
    per_class = {
        name: dict(sorted(Counter(splits.labels[label] for label in split.labels).items()))
        for name, split in splits.splits.items()
    }
    write_json(
        directory / SPLITS_FILE,
        {
            "content_hash": splits.content_hash,
            "labels": list(splits.labels),
            "description": splits.description,
            "per_class": per_class,
            "splits": {name: {"root": str(s.root), "items": list(s.items)} for name, s in splits.splits.items()},
        },
    )
    counts = {name: len(s.items) for name, s in splits.splits.items()}
    write_record(directory, "split", wanted, {"content_hash": splits.content_hash, "counts": counts})
    return splits


def load_splits(job: Job) -> Splits:
    """The splits the ``split`` step wrote."""
    data = read_json(job.step_dir("split") / SPLITS_FILE)
    splits = {
        name: SplitItems(Path(s["root"]), tuple((str(rel), int(label)) for rel, label in s["items"]))
        for name, s in data["splits"].items()
    }
    return Splits(tuple(data["labels"]), splits, data["content_hash"], data["description"])


# ---- loading images ----------------------------------------------------------------------------------------------
class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images of one split, decoded by the service's decoder (:func:`lraee_core.images.load_image`: heads, gates and
    calibration see the pixels the service sees) and preprocessed for the backbone: (image [3, H, W], label)."""

    def __init__(self, split: SplitItems, preprocess: Callable[[Image.Image], torch.Tensor]) -> None:
        self.split = split
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.split.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rel, label = self.split.items[index]
        return self.preprocess(load_image(self.split.root / rel)), label
