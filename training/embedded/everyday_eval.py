"""What a user sees: a checkpoint scored on real photos it was not built on, with the label sets users send.

Every image is decoded by the service's decoder (``lraee_core.images.load_image``), preprocessed by the backbone's
own transform and classified by the engine with the checkpoint's default templates, exactly as ``/classify`` does
without HTTP. No image below was seen by CLIP training or by the LRA-EE build (``training.embedded.everyday`` holds the
everyday sets' eval members out with the same seed; Tiny-ImageNet's val photos and the ILSVRC2012 val photos are
separate sets by construction). They are *validation* photos, not test photos: recipes and build settings were
chosen after reading these figures. The everyday sets also keep a sealed *test* split
(``everyday.everyday_validation_split``), read only with ``--test``, once per release, for its final figure.

Tasks:

* ``tiny-val-202`` / ``ilsvrc-202``: 202-way among the Tiny class names (10,100 Tiny val photos; the 259 ILSVRC2012
  val photos of those classes).
* ``tiny-names-10way``: the true Tiny class name + 9 seeded others, per image (ILSVRC photos + a Tiny val sample).
* ``everyday-5way``: photos whose class falls under exactly one everyday word (``captions.EVERYDAY_CONCEPTS``, by
  WordNet hypernyms), against that word + 4 seeded other everyday words that are neither above nor below it
  ("animal" is never a distractor for a dog). ILSVRC val photos of all 725 classes and a Tiny val sample.
* ``cifar10-10way``, ``intel-6way``, ``flowers-5way``: the validation part of the held-out members' evaluation half
  (``everyday.everyday_validation_split``; the build half calibrates the exits; with ``--test``, the sealed test
  part instead), their class names as labels.
* ``flickr8k-retrieval``: image -> text recall@5 among the 5 captions of each held-out Flickr8k photo of the same
  part (no exits: the gate needs a label set, so this row is full depth only).

Rows: FP32 full depth, INT8 full depth (``full``), and each stored operating point; per row top-1, agreement of the
top-1 with the same model's INT8 full depth, mean FLOPs saved and the exit-layer shares.

Run: ``python -m training.embedded.everyday_eval CHECKPOINT --out reports/everyday/NAME`` (``--test``: the sealed test
part, for a release's final figure only).
"""

from __future__ import annotations

import argparse
import json
import random
import tarfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lraee_core import EarlyExitClassifier, load_classifier
from lraee_core.images import load_image
from training.embedded.captions import everyday_word, unrelated_words, wordnet
from training.embedded.everyday import (
    FLICKR_CAPTIONS,
    FLICKR_TAR,
    SET_CLASSES,
    EverydayClipConfig,
    everyday_validation_split,
    read_flickr_captions,
)
from training.embedded.photo_clip import scan_photos
from training.embedded.photos import CLASSES_TSV
from training.embedded.photos import SOURCE_DIR as IMAGENET_DIR
from training.embedded.reports.summary_tables import EVERYDAY_EVAL_FILE
from training.embedded.reports.summary_tables import everyday_table as table
from training.pipeline.data import read_classes_tsv

REPORT_FILE = EVERYDAY_EVAL_FILE


@dataclass(frozen=True)
class Item:
    """One evaluation image with its label set."""

    image: bytes | Path  # encoded image or its file
    labels: tuple[str, ...]  # the label set sent with it
    truth: int  # index of the right label


def _sample(items: list[Any], count: int, seed: int) -> list[Any]:
    return items if len(items) <= count else random.Random(seed).sample(items, count)


def _tar_members(path: Path, wanted: set[str] | None = None) -> dict[str, bytes]:
    out = {}
    with tarfile.open(path) as archive:
        for member in archive:
            if member.isfile() and (wanted is None or member.name in wanted):
                handle = archive.extractfile(member)
                assert handle is not None
                out[member.name] = handle.read()
    return out


def imagenet_tasks(
    val_dir: Path, acuity_dir: Path, sample: int, seed: int, per_class: int = 15
) -> dict[str, list[Item]]:
    """The Tiny-name and everyday-word tasks on the Tiny val photos and the ILSVRC2012 val photos; the 202-way task
    takes ``per_class`` seeded Tiny val photos of every class (15 of 50: 3,030 photos, +-0.9 points at 10% top-1)."""
    classes_tsv = IMAGENET_DIR / CLASSES_TSV
    val = scan_photos(val_dir, classes_tsv)
    names = val.names
    by_class: dict[int, list[Path]] = {}
    for path, label in zip(val.paths, val.labels, strict=True):
        by_class.setdefault(label, []).append(path)
    tasks: dict[str, list[Item]] = {
        "tiny-val-202": [
            Item(p, names, label) for label in sorted(by_class) for p in _sample(by_class[label], per_class, seed)
        ]
    }
    acuity_tiny = scan_photos(acuity_dir, classes_tsv, val.wnids)
    tasks["ilsvrc-202"] = [Item(p, names, lab) for p, lab in zip(acuity_tiny.paths, acuity_tiny.labels, strict=True)]
    rng = random.Random(seed)
    ten_way = list(zip(acuity_tiny.paths, acuity_tiny.labels, strict=True))
    ten_way += _sample(list(zip(val.paths, val.labels, strict=True)), sample, seed)
    tasks["tiny-names-10way"] = []
    for path, label in ten_way:
        others = rng.sample([n for i, n in enumerate(names) if i != label], 9)
        labels = [names[label], *others]
        rng.shuffle(labels)
        tasks["tiny-names-10way"].append(Item(path, tuple(labels), labels.index(names[label])))

    net = wordnet()
    index = read_classes_tsv(classes_tsv)
    every_items: list[tuple[Path, str, str]] = []  # (photo, wnid, word)
    for wnid in sorted(index):
        folder = acuity_dir / wnid
        word = everyday_word(wnid, net)
        if word is not None and folder.is_dir():
            every_items += [(p, wnid, word) for p in sorted(folder.iterdir())]
    tiny_items = [
        (p, val.wnids[lab], everyday_word(val.wnids[lab], net)) for p, lab in zip(val.paths, val.labels, strict=True)
    ]
    every_items += _sample([(p, w, word) for p, w, word in tiny_items if word is not None], sample, seed)
    tasks["everyday-5way"] = []
    for path, wnid, word in every_items:
        labels = [word, *rng.sample(unrelated_words(wnid, word, net), 4)]
        rng.shuffle(labels)
        tasks["everyday-5way"].append(Item(path, tuple(labels), labels.index(word)))
    return tasks


def everyday_tasks(
    cfg: EverydayClipConfig, test: bool = False
) -> tuple[dict[str, list[Item]], list[tuple[bytes, list[str]]]]:
    """The CIFAR-10 / Intel / flowers tasks on the validation part of their held-out members' evaluation half (the
    other half is the LRA-EE build's), and those Flickr8k photos with their captions; ``test``: the sealed test part
    instead (a release's final figure)."""
    validation, sealed = everyday_validation_split(cfg)
    held = sealed if test else validation
    root = Path(cfg.everyday_dir)
    tasks: dict[str, list[Item]] = {}
    for name, (tar, classes) in SET_CLASSES.items():
        labels = tuple(sorted(classes))
        members = _tar_members(root / tar, set(held[name]))
        key = {"cifar10": "cifar10-10way", "intel": "intel-6way", "flowers": "flowers-5way"}[name]
        tasks[key] = [Item(data, labels, labels.index(m.split("/")[0])) for m, data in sorted(members.items())]
    captions = read_flickr_captions(root / FLICKR_CAPTIONS)
    photos = _tar_members(root / FLICKR_TAR, set(held["flickr8k"]))
    flickr = [(data, captions[Path(m).name]) for m, data in sorted(photos.items())]
    return tasks, flickr


def preprocess(classifier: EarlyExitClassifier, items: Sequence[Item]) -> torch.Tensor:
    """Every item decoded and preprocessed once: [N, 3, H, W]."""
    return torch.stack([classifier.backbone.preprocess(load_image(item.image)) for item in items])


def score(
    classifier: EarlyExitClassifier,
    items: Sequence[Item],
    pixels: torch.Tensor,  # [N, 3, H, W], preprocessed items
    operating_point: str,
    batch: int = 64,
) -> list[Any]:
    """Engine results of every item (consecutive items sharing a label set share an engine batch)."""
    results: list[Any] = []
    start = 0
    while start < len(items):
        end = start + 1
        while end < len(items) and end - start < batch and items[end].labels == items[start].labels:
            end += 1
        labels = list(items[start].labels)
        results += classifier.classify(pixels[start:end], labels, operating_point=operating_point)
        start = end
    return results


def summarise(items: Sequence[Item], results: Sequence[Any], reference: Sequence[Any] | None) -> dict[str, Any]:
    """Top-1, agreement with the reference row's top-1, FLOPs saved and exit shares of one row."""
    correct = sum(r.predictions[0].label == it.labels[it.truth] for it, r in zip(items, results, strict=True))
    out: dict[str, Any] = {
        "images": len(items),
        "top1": correct / len(items),
        "flops_saved": sum(r.flops_saved for r in results) / len(results),
        "exit_shares": {str(k): v / len(results) for k, v in sorted(Counter(r.exit_layer for r in results).items())},
    }
    if reference is not None:
        same = sum(a.predictions[0].label == b.predictions[0].label for a, b in zip(results, reference, strict=True))
        out["agreement_with_full"] = same / len(results)
    return out


@torch.inference_mode()
def retrieval_recall_at_5(classifier: EarlyExitClassifier, photos: Sequence[tuple[bytes, list[str]]]) -> float:
    """Image -> text recall@5 at full depth: the share of photos with one of their own captions in the top 5 of all
    held-out captions."""
    texts = [c for _, captions in photos for c in captions]
    owner = torch.tensor([i for i, (_, captions) in enumerate(photos) for _ in captions])
    text = torch.cat(
        [classifier.text_embeddings(texts[s : s + 256], ["{}"]).float() for s in range(0, len(texts), 256)]
    )  # [T, E]
    hits = 0
    for start in range(0, len(photos), 64):
        chunk = photos[start : start + 64]
        pixels = torch.stack([classifier.backbone.preprocess(load_image(data)) for data, _ in chunk])
        hidden = classifier.backbone.embed(pixels)
        for layer in range(1, classifier.num_layers + 1):
            hidden = classifier.backbone.block(layer, hidden)
        image = classifier.backbone.final_embedding(hidden)  # [b, E]
        top = (image @ text.T).topk(5, dim=1).indices  # [b, 5]
        rows = torch.arange(start, start + len(chunk))[:, None]
        hits += int((owner[top] == rows).any(dim=1).sum())
    return hits / len(photos)


def evaluate(
    checkpoint: str | Path, cfg: EverydayClipConfig, sample: int, seed: int, test: bool = False
) -> dict[str, Any]:
    """Every task under every row; see the module docstring (``test``: the everyday sets' sealed test part)."""
    int8 = load_classifier(checkpoint)
    fp32 = load_classifier(checkpoint, quant_mode="none")
    points = [p for p in int8.policy.names if p != "full"]
    tasks = imagenet_tasks(Path(cfg.train_dir).parent / "val", Path(cfg.train_dir).parent / "acuity", sample, seed)
    everyday, flickr = everyday_tasks(cfg, test)
    tasks |= everyday
    report: dict[str, Any] = {
        "checkpoint": int8.checkpoint_id,
        "templates": list(int8.default_templates),
        "everyday_split": "test" if test else "validation",
        "tasks": {},
    }
    for name, items in tasks.items():
        started = time.perf_counter()
        pixels = preprocess(int8, items)  # one preprocessing for both (same backbone transform)
        reference = score(int8, items, pixels, "full")
        rows = {"fp32-full": summarise(items, score(fp32, items, pixels, "full"), reference)}
        rows["int8-full"] = summarise(items, reference, reference)
        for point in points:
            rows[point] = summarise(items, score(int8, items, pixels, point), reference)
        report["tasks"][name] = {"rows": rows, "seconds": round(time.perf_counter() - started, 1)}
        print(name, {k: round(v["top1"], 4) for k, v in rows.items()}, flush=True)
    report["tasks"]["flickr8k-retrieval"] = {
        "rows": {
            "fp32-full": {"images": len(flickr), "recall_at_5": retrieval_recall_at_5(fp32, flickr)},
            "int8-full": {"images": len(flickr), "recall_at_5": retrieval_recall_at_5(int8, flickr)},
        }
    }
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """Evaluate a checkpoint and write ``everyday_eval.json`` into ``--out``; or, with ``--table``, print the
    markdown table of reports given as ``NAME=FOLDER``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="checkpoint directory or embedded name")
    parser.add_argument("--out", help="report folder")
    parser.add_argument("--table", nargs="+", metavar="NAME=FOLDER", help="print the table of these reports")
    parser.add_argument("--train-dir", default=EverydayClipConfig().train_dir, help="extracted Tiny train photos")
    parser.add_argument("--sample", type=int, default=500, help="Tiny val photos sampled for the k-way tasks")
    parser.add_argument("--seed", type=int, default=0, help="label-set and sample draws")
    parser.add_argument(
        "--test",
        action="store_true",
        help="score the everyday sets' sealed test part instead of validation: once per release, for its final "
        "figure, never while choosing anything",
    )
    args = parser.parse_args(argv)
    if args.table:
        named = (entry.split("=", 1) for entry in args.table)
        print(table({name: json.loads((Path(folder) / REPORT_FILE).read_text()) for name, folder in named}))
        return
    if not args.checkpoint or not args.out:
        parser.error("give a checkpoint and --out (or --table)")
    from lraee_core.assets import resolve_checkpoint

    cfg = EverydayClipConfig(train_dir=args.train_dir)
    report = evaluate(resolve_checkpoint(args.checkpoint), cfg, args.sample, args.seed, args.test)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
