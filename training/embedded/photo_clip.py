"""Contrastive training of the tiny open_clip CLIP (``lraee-tiny-vit12``) on real ImageNet-class photos.

The photos are the Tiny-ImageNet training photos of ``../shared/data/imagenet-photos/`` (202 ImageNet-1k classes,
64×64): an ImageFolder tree of WordNet-id folders, named through ``classes.tsv`` as ``open_clip.IMAGENET_CLASSNAMES``.
Each image is paired with a caption made from its class name and one of open_clip's 80 OpenAI ImageNet templates,
drawn at random every time, so the text tower learns the wordings a user will send.

A batch of 128 over 202 classes holds repeated classes, so the loss is CLIP's symmetric InfoNCE with every
same-class pair counted as a positive (the target distribution of a row is uniform over its positives) instead of
treating a matching class as a negative.

``holdout_per_class`` photos of every class (seeded choice) never reach the contrastive training: they are written
to ``holdout.csv`` (path,label) for ``lraee-train build``, whose heads and gates must be fitted on images the
backbone has not memorised. Validation photos are never read during training; the final zero-shot accuracy in
``training_log.json`` is measured on them (and on the ILSVRC2012 photos of the 202 classes when given).

The loop, the optimizer, resumable state and the weights file are the shared ones of ``training.embedded.trainer``;
batches are a pure function of (seed, step).

Run: ``python -m training.embedded.photo_clip --train-dir data/imagenet-photos/train --classes-tsv .../classes.tsv``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torchvision.ops import roi_align
from torchvision.transforms import v2
from tqdm import tqdm

from lraee_core.images import load_image
from training.embedded.photos import CLASSES_TSV, SOURCE_DIR
from training.embedded.trainer import Preprocess, Tokenizer, TrainingRun, config_parser, image_size
from training.pipeline.data import IMAGE_SUFFIXES, disambiguate, read_classes_tsv

HOLDOUT_FILE = "holdout.csv"
# A resumed run must draw the same data as the run it continues (paths compare resolved).
_RESUME_MUST_MATCH = ("seed", "batch_size", "train_dir", "holdout_per_class", "classes_tsv")
_PATH_FIELDS = ("train_dir", "classes_tsv")
TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES)


@dataclass(frozen=True)
class PhotoClipConfig:
    """One contrastive training run of the tiny CLIP on labelled photos."""

    train_dir: str = "data/imagenet-photos/train"  # ImageFolder of WordNet-id folders (the extracted tiny-train tars)
    classes_tsv: str = str(SOURCE_DIR / CLASSES_TSV)  # wnid -> ImageNet-1k index (class names)
    output_dir: str = "runs/photo_clip"  # holds state.pt, weights.safetensors, holdout.csv, training_log.json
    holdout_per_class: int = 50  # photos per class kept out of training, for the LRA-EE build's splits
    steps: int = 1800  # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 128  # image-caption pairs per step
    lr: float = 1e-3  # peak learning rate after warmup, cosine decay to min_lr
    min_lr: float = 0.0  # learning rate at the last step
    warmup_steps: int = 100  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay of matrices only (open_clip's rule)
    beta2: float = 0.98  # AdamW second-moment decay, as CLIP
    grad_clip_norm: float | None = 1.0  # global gradient-norm clip; None: none
    crop_scale_min: float = 0.35  # RandomResizedCrop's smallest area fraction (augmentation)
    seed: int = 0  # model init, holdout choice and batch draws
    threads: int = 2  # torch.set_num_threads
    device: str = "cpu"  # torch device
    log_every: int = 20  # steps between log history entries
    checkpoint_every: int = 100  # steps between writes of state.pt (and at the last step)
    eval_dirs: str = ""  # comma-separated ImageFolder roots for the final zero-shot evaluation (e.g. val,acuity)
    half: bool = True  # store weights.safetensors in FP16
    progress: bool = True  # show a tqdm progress bar

    def __post_init__(self) -> None:
        if self.batch_size < 2 or self.steps < 1 or self.holdout_per_class < 0:
            raise ValueError("batch_size must be >= 2, steps >= 1, holdout_per_class >= 0")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError("crop_scale_min must lie in (0, 1]")


@dataclass(frozen=True)
class PhotoSet:
    """Labelled photos of an ImageFolder tree restricted to the classes of a wnid table."""

    paths: tuple[Path, ...]  # image files
    labels: tuple[int, ...]  # index into names
    wnids: tuple[str, ...]  # folder name per class index
    names: tuple[str, ...]  # class name per class index (ImageNet names, repeats disambiguated)


def scan_photos(root: str | Path, classes_tsv: str | Path, wnids: Sequence[str] | None = None) -> PhotoSet:
    """Photos under ``root/<wnid>/``; the class list is ``wnids`` when given (to score another set in the same
    label space), else the sorted folders of ``root``. Photos of folders outside that list are skipped."""
    root = Path(root)
    index = read_classes_tsv(classes_tsv)
    if wnids is None:
        wnids = sorted(d.name for d in root.iterdir() if d.is_dir())
    unknown = [w for w in wnids if w not in index]
    if unknown:
        raise ValueError(f"{root}: folders {unknown[:3]} are not wnids of {classes_tsv}")
    names = disambiguate([open_clip.IMAGENET_CLASSNAMES[index[w]] for w in wnids])
    paths: list[Path] = []
    labels: list[int] = []
    for label, wnid in enumerate(wnids):
        folder = root / wnid
        if not folder.is_dir():
            continue
        for image in sorted(folder.iterdir()):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(image)
                labels.append(label)
    if not paths:
        raise ValueError(f"{root}: no photos of the {len(wnids)} classes")
    return PhotoSet(tuple(paths), tuple(labels), tuple(wnids), names)


def split_holdout(photos: PhotoSet, per_class: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, holdout indices): ``per_class`` seeded photos of every class go to the holdout."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(photos.labels):
        by_class.setdefault(label, []).append(i)
    train: list[int] = []
    holdout: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        chosen = set(rng.permutation(len(members))[:per_class].tolist())
        for rank, i in enumerate(members):
            (holdout if rank in chosen else train).append(i)
    return sorted(train), sorted(holdout)


def write_holdout(photos: PhotoSet, indices: Sequence[int], path: Path) -> Path:
    """The held-out photos as a build's data list (``path,label`` CSV with wnid labels); returns ``path``."""
    with path.open("w") as handle:
        handle.write("path,label\n")
        for i in indices:
            handle.write(f"{photos.paths[i].resolve()},{photos.wnids[photos.labels[i]]}\n")
    return path


def load_pixels(paths: Sequence[Path], size: int, progress: bool = True) -> torch.Tensor:
    """All photos decoded to RGB uint8 ``[N, 3, size, size]`` (resized, shorter side, centre crop if needed)."""
    resize = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for i, path in enumerate(tqdm(paths, desc="decode", disable=not progress, dynamic_ncols=True)):
        pixels = v2.functional.pil_to_tensor(load_image(path))
        out[i] = pixels if pixels.shape[-2:] == (size, size) else resize(pixels)
    return out


def multi_positive_loss(
    image_features: torch.Tensor,  # [B, D] normalised
    text_features: torch.Tensor,  # [B, D] normalised
    logit_scale: torch.Tensor,  # scalar, exp already applied
    labels: torch.Tensor,  # [B] class of each pair
) -> torch.Tensor:
    """Symmetric InfoNCE where every same-class pair is a positive (target uniform over a row's positives)."""
    logits = logit_scale * image_features @ text_features.T  # [B, B]
    positives = (labels[:, None] == labels[None, :]).float()  # [B, B], symmetric
    target = positives / positives.sum(dim=1, keepdim=True)
    image_loss = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    text_loss = -(target * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (image_loss + text_loss) / 2


class Augment:
    """RandomResizedCrop + horizontal flip on uint8 batches, then the model's normalisation; seeded per step."""

    def __init__(self, model: open_clip.CLIP, scale_min: float) -> None:
        self.crop = v2.RandomResizedCrop(image_size(model), scale=(scale_min, 1.0), antialias=True)
        mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            crops = torch.stack([self.crop(p) for p in pixels])  # [B, 3, S, S]
        flip = torch.rand(len(pixels), generator=generator) < 0.5
        crops[flip] = crops[flip].flip(-1)
        return (crops.float() / 255.0 - self.mean.to(crops.device)) / self.std.to(crops.device)


class BatchAugment:
    """:class:`Augment`'s crop and flip for the whole batch in one op on the batch's device
    (``torchvision.ops.roi_align``: bilinear, averaged over 2×2 samples per output pixel), then the model's
    normalisation. Areas, aspect ratios, offsets and flips are drawn from the step's CPU generator, so the draws do
    not depend on the device; a crop whose side would exceed the image is clipped to it (RandomResizedCrop retries)."""

    def __init__(self, model: open_clip.CLIP, scale_min: float) -> None:
        self.size = image_size(model)
        self.scale_min = scale_min
        mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count, _, height, width = pixels.shape
        area = height * width * torch.empty(count).uniform_(self.scale_min, 1.0, generator=generator)
        log_ratio = torch.empty(count).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
        crop_w = (area * log_ratio.exp()).sqrt().clamp(max=width)
        crop_h = (area / log_ratio.exp()).sqrt().clamp(max=height)
        left = torch.rand(count, generator=generator) * (width - crop_w)
        top = torch.rand(count, generator=generator) * (height - crop_h)
        flip = torch.rand(count, generator=generator) < 0.5
        boxes = torch.stack([torch.arange(count).float(), left, top, left + crop_w, top + crop_h], dim=1)
        device = pixels.device
        crops = roi_align(pixels.float(), boxes.to(device), self.size, sampling_ratio=2, aligned=True)
        crops = torch.where(flip.to(device).view(-1, 1, 1, 1), crops.flip(-1), crops)
        return (crops / 255.0 - self.mean.to(device)) / self.std.to(device)


@torch.no_grad()
def zero_shot_top1(
    model: open_clip.CLIP,
    tokenizer: Tokenizer,
    preprocess: Preprocess,
    photos: PhotoSet,
    templates: Sequence[str] = TEMPLATES,
    batch_size: int = 256,
) -> dict[str, float]:
    """FP32 zero-shot top-1 / top-5 over ``photos.names`` with prompt-ensembled class embeddings."""
    model.eval()
    weights = build_zero_shot_classifier(model, tokenizer, photos.names, list(templates), num_classes_per_batch=16)
    top1 = top5 = 0
    labels = torch.tensor(photos.labels)
    for start in range(0, len(photos.paths), batch_size):
        chunk = photos.paths[start : start + batch_size]
        images = torch.stack([preprocess(load_image(p)) for p in chunk])
        ranked = (model.encode_image(images, normalize=True) @ weights).topk(min(5, weights.shape[1]), dim=1).indices
        truth = labels[start : start + len(chunk), None]
        top1 += int((ranked[:, :1] == truth).sum())
        top5 += int((ranked == truth).any(dim=1).sum())
    n = len(photos.paths)
    return {"top1": top1 / n, "top5": top5 / n, "images": n, "classes": len(photos.names)}


def train_photo_clip(cfg: PhotoClipConfig) -> Path:
    """Train (or resume) the tiny CLIP on the photos; returns the path of ``weights.safetensors``."""
    run = TrainingRun(cfg, must_match=_RESUME_MUST_MATCH, path_fields=_PATH_FIELDS)
    model, tokenizer = run.model, run.tokenizer
    photos = scan_photos(cfg.train_dir, cfg.classes_tsv)
    train_idx, holdout_idx = split_holdout(photos, cfg.holdout_per_class, cfg.seed)
    write_holdout(photos, holdout_idx, run.output_dir / HOLDOUT_FILE)

    pixels = load_pixels([photos.paths[i] for i in train_idx], image_size(model), cfg.progress)  # [N, 3, S, S] uint8
    labels = torch.tensor([photos.labels[i] for i in train_idx])
    # Every (class, template) prompt tokenised once: [C, T, context]
    prompts = tokenizer([t.format(name) for name in photos.names for t in TEMPLATES])
    prompts = prompts.view(len(photos.names), len(TEMPLATES), -1)
    augment = Augment(model, cfg.crop_scale_min)

    def draw(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images [B, 3, S, S], tokenised captions [B, context] and classes [B] of step ``step``."""
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        rows = torch.randint(0, len(train_idx), (cfg.batch_size,), generator=generator)
        templates = torch.randint(0, len(TEMPLATES), (cfg.batch_size,), generator=generator)
        batch_labels = labels[rows]
        return augment(pixels[rows], generator), prompts[batch_labels, templates], batch_labels

    def batch_loss(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, texts, batch_labels = (part.to(run.device) for part in batch)
        output = model(images, texts)
        return multi_positive_loss(
            output["image_features"], output["text_features"], output["logit_scale"], batch_labels
        )

    run.train(map(draw, range(run.step, cfg.steps)), batch_loss, cfg.steps, desc="photo-clip")

    def evaluation() -> dict[str, object]:
        zero_shot = {}
        for root in filter(None, (d.strip() for d in cfg.eval_dirs.split(","))):
            found = scan_photos(root, cfg.classes_tsv, photos.wnids)
            zero_shot[root] = zero_shot_top1(model, tokenizer, run.preprocess, found)
        return {
            "data": {"train_images": len(train_idx), "holdout_images": len(holdout_idx), "classes": len(photos.names)},
            "zero_shot_fp32": zero_shot,  # {eval root: top1/top5}, 80 OpenAI templates, the training classes
        }

    return run.finish(evaluation)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: every scalar PhotoClipConfig field is a flag (``--steps 1200 --output-dir runs/x``)."""
    print(train_photo_clip(PhotoClipConfig(**vars(config_parser(__doc__, PhotoClipConfig()).parse_args(argv)))))


if __name__ == "__main__":
    main()
