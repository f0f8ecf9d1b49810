"""A checkpoint measured through the real engine, as a client uses it: photos of a folder, each classified against
its own label set (its true class + K - 1 other classes), at every operating point and at ``full``.

``python -m training.pipeline.engine_sweep --checkpoint photos --photos data/imagenet-photos/val
--classes-tsv ../shared/data/imagenet-photos/classes.tsv --per-class 10 --k 2,5,10,50 --out reports/x.json``

Per K and operating point: top-1, top-1 of ``full``, agreement with ``full``, mean FLOPs saved (the engine's own
per-image figure) and exit shares. Nothing here is simulated: every number is an :class:`ExitResult`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lraee_core.assets import resolve_checkpoint
from lraee_core.backends import BACKENDS
from lraee_core.checkpoint import load_classifier
from lraee_core.engine import EarlyExitClassifier
from lraee_core.images import load_image

from .data import IMAGE_SUFFIXES, class_name, read_classes_tsv


def photo_folder(
    root: Path, classes_tsv: Path | None, per_class: int | None
) -> tuple[list[Path], list[int], list[str]]:
    """(paths, labels, class names) of an ImageFolder; wnid folders are named through the ImageNet table."""
    wnids = read_classes_tsv(classes_tsv) if classes_tsv else None
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    names = [class_name(folder.name, wnids) for folder in folders]
    paths, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for path in files[:per_class]:
            paths.append(path)
            labels.append(label)
    return paths, labels, names


def label_set(truth: int, count: int, k: int, rng: np.random.Generator) -> list[int]:
    """The true class plus ``k - 1`` other classes, in random order."""
    others = rng.choice([i for i in range(count) if i != truth], size=min(k, count) - 1, replace=False)
    members = [truth, *others.tolist()]
    rng.shuffle(members)
    return members


def sweep(
    classifier: EarlyExitClassifier,
    images: torch.Tensor,
    labels: Sequence[int],
    names: Sequence[str],
    ks: Sequence[int],
    seed: int = 0,
) -> dict[str, Any]:
    """K -> operating point -> figures (module docstring)."""
    points = list(classifier.policy.names)  # the stored ones, then "full"
    result: dict[str, Any] = {}
    for k in ks:
        rng = np.random.default_rng(seed + k)
        answers: dict[str, list[tuple[str, int, float]]] = {point: [] for point in points}
        truths = []
        for row, truth in enumerate(labels):
            members = [names[i] for i in label_set(truth, len(names), k, rng)]
            truths.append(names[truth])
            for point in points:
                [answer] = classifier.classify(images[row : row + 1], members, top_k=1, operating_point=point)
                answers[point].append((answer.predictions[0].label, answer.exit_layer, answer.flops_saved))
        full = [label for label, _, _ in answers["full"]]
        count = len(truths)
        figures = {}
        for point in points:
            predicted = [label for label, _, _ in answers[point]]
            agreement = float(np.mean([a == b for a, b in zip(predicted, full, strict=True)]))
            exits = Counter(layer for _, layer, _ in answers[point])
            figures[point] = {
                "top1": float(np.mean([a == b for a, b in zip(predicted, truths, strict=True)])),
                "agreement": agreement,
                "agreement_se": math.sqrt(agreement * (1 - agreement) / count),
                "flops_saved": float(np.mean([saved for _, _, saved in answers[point]])),
                "exit_shares": {str(layer): n / count for layer, n in sorted(exits.items())},
            }
        result[str(k)] = {"images": count, "points": figures}
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Measure and print (and write ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="photos", help="checkpoint dir or embedded name")
    parser.add_argument("--photos", type=Path, required=True, help="ImageFolder of photos (wnid folders with a table)")
    parser.add_argument("--classes-tsv", type=Path, help="wnid -> ImageNet index table for wnid folders")
    parser.add_argument("--per-class", type=int, help="at most this many photos per class (first in name order)")
    parser.add_argument("--only-classes-of", type=Path, help="keep only folders that also exist in this folder")
    parser.add_argument("--k", default="2,3,5,10,20,50", help="label counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--backend",
        choices=("auto", *BACKENDS),
        default="torch",
        help="what runs the vision tower (auto: the service's default, LRAEE_BACKEND=auto)",
    )
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    directory = resolve_checkpoint(args.checkpoint)
    classifier = load_classifier(directory, backend=args.backend)
    paths, labels, names = photo_folder(args.photos, args.classes_tsv, args.per_class)
    if args.only_classes_of is not None:
        keep = {p.name for p in args.only_classes_of.iterdir() if p.is_dir()}
        chosen = [i for i, path in enumerate(paths) if path.parent.name in keep]
        folders = sorted({paths[i].parent.name for i in chosen})
        remap = {old: new for new, old in enumerate(sorted({labels[i] for i in chosen}))}
        names = [names[old] for old in sorted(remap)]
        paths, labels = [paths[i] for i in chosen], [remap[labels[i]] for i in chosen]
        assert len(folders) == len(names)
    started = time.perf_counter()
    images = torch.stack([classifier.backbone.preprocess(load_image(path)) for path in paths])
    ks = [int(k) for k in args.k.split(",")]
    result = {
        "checkpoint": classifier.checkpoint_id,
        "backend": classifier.backend,
        "photos": args.photos.name,
        "images": len(paths),
        "classes": len(names),
        "k": sweep(classifier, images, labels, names, ks, args.seed),
        "seconds": time.perf_counter() - started,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['checkpoint']}: {len(paths)} photos of {len(names)} classes from {args.photos.name}")
    print("| K | point | top-1 | full top-1 | agreement | FLOPs saved | exits |")
    print("|---|---|---|---|---|---|---|")
    for k, entry in result["k"].items():
        full = entry["points"]["full"]["top1"]
        for point, f in entry["points"].items():
            shares = ", ".join(f"{layer}: {100 * s:.0f}%" for layer, s in f["exit_shares"].items())
            print(
                f"| {k} | {point} | {100 * f['top1']:.1f} | {100 * full:.1f} | {100 * f['agreement']:.1f} "
                f"| {100 * f['flops_saved']:.1f} | {shares} |"
            )


if __name__ == "__main__":
    main()
