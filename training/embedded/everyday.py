"""The everyday tiny CLIP: Tiny-ImageNet photos with WordNet captions, plus CIFAR-10, Intel scenes, flowers and
Flickr8k's human captions, trained with a loss that understands captions shared by many classes.

Sources (read at run time, never committed):

* ``tiny``: the Tiny-ImageNet training photos (``../shared/data/imagenet-photos``, extracted by
  ``python -m training.embedded.photos`` into ``data/imagenet-photos/train``), 202 classes. ``holdout_per_class`` photos
  of every class (the same seeded choice as ``training.embedded.photo_clip``) never reach training: they are the LRA-EE
  build's images, written to ``holdout.csv``.
* ``cifar10``, ``intel``, ``flowers``: ``../shared/data/everyday-photos/*-train.tar`` (``<class>/<file>`` members).
  A seeded ``eval_fraction`` of every class is held out and never trained on (``everyday_eval_split``). Half of it
  builds the exits (``everyday_build_split``); the other half is cut into validation, which tuning reads, and a
  sealed test split read once per release (``everyday_validation_split``).
* ``flickr8k``: photos with five human captions each; ``flickr_eval_images`` photos are held out for retrieval
  (validation and test halves as above).

Captions: every labelled class is a WordNet synset (ImageNet wnids are synset offsets; the other sets' class names are
pinned to synsets in ``SET_CLASSES``). A caption is drawn per image and step (``training.embedded.captions``): the class
name or a WordNet synonym in a template, "a photo of a Chihuahua, a kind of dog", or an everyday word above the class
("a photo of a dog"). Each caption means one *concept*; each image belongs to its class's concept and to every
everyday concept above it. ``concept_loss`` counts an (image, caption) pair as positive when the caption's concept is
one of the image's, in both directions of CLIP's symmetric InfoNCE, so a caption shared by many classes is a positive
for all of their images and a negative for none.

The loop, the optimizer, resumable state and the weights file are the shared ones of ``training.embedded.trainer``;
batches and captions are a pure function of (seed, step). ``init_weights`` warm-starts from a trained tiny CLIP (the
shipped ``photos`` weights), which the recipe records.

Run: ``python -m training.embedded.everyday --output-dir runs/everyday_clip --steps 1500 --init-weights ...``. On a
machine without the photo folders (a lent GPU), train from a pack: ``python -m training.embedded.everyday
--write-pack DIR`` here, carry DIR there, and give the run ``--pack-dir DIR`` (``training.embedded.pack``: training
photos only).
"""

from __future__ import annotations

import csv
import json
import random
import tarfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from tqdm import tqdm

from lraee_core.images import load_image
from lraee_core.paths import data_root
from training.embedded.captions import (
    EVERYDAY_CONCEPTS,
    NAME_TEMPLATES,
    ClassCaptions,
    class_captions,
    concept_key,
    draw_caption,
)
from training.embedded.exit_training import ExitTraining, encode_image_with_exits, exit_heads, exit_loss
from training.embedded.pack import INDEX_FILE, EncodedSource, Pack, read_pack, write_pack
from training.embedded.photo_clip import HOLDOUT_FILE, Augment, BatchAugment, scan_photos, split_holdout, write_holdout
from training.embedded.photos import CLASSES_TSV
from training.embedded.photos import SOURCE_DIR as IMAGENET_DIR
from training.embedded.trainer import (
    LOG_FILE,
    CachedTokenizer,
    TrainingRun,
    build_model,
    config_parser,
    finished_elsewhere,
    image_size,
    prefetched,
    salvaged_log,
)

EVERYDAY_DIR = data_root() / "everyday-photos"
FLICKR_TAR = "flickr8k-train.tar"
FLICKR_CAPTIONS = "flickr8k-captions.tsv"
# The labelled everyday sets: tar file and class name -> WordNet synset.
SET_CLASSES: dict[str, tuple[str, dict[str, str]]] = {
    "cifar10": (
        "cifar10-train.tar",
        {
            "airplane": "n02691156",
            "automobile": "n02958343",
            "bird": "n01503061",
            "cat": "n02121808",
            "deer": "n02430045",
            "dog": "n02084071",
            "frog": "n01639765",
            "horse": "n02374451",
            "ship": "n04194289",
            "truck": "n04490091",
        },
    ),
    "intel": (
        "intel-scenes-train.tar",
        {
            "buildings": "n02913152",
            "forest": "n08438533",
            "glacier": "n09289331",
            "mountain": "n09359803",
            "sea": "n09426788",
            "street": "n04334599",
        },
    ),
    "flowers": (
        "flowers-train.tar",
        {
            "daisy": "n11939491",
            "dandelion": "n12024176",
            "rose": "n12620196",
            "sunflower": "n11978233",
            "tulip": "n12454159",
        },
    ),
}
# Every flower species is a flower to a client, whatever WordNet's botany says (roses are shrubs there).
EXTRA_EVERYDAY = {"flowers": ("flower",)}
# A resumed run must draw the same data as the run it continues.
_RESUME_MUST_MATCH = (
    "seed",
    "draw_seed",
    "batch_size",
    "train_dir",
    "holdout_per_class",
    "eval_fraction",
    "flickr_eval_images",
    "exit_layers",
    "exit_pooling",
    "exit_distill",
    "exit_contrastive",
    "exit_into_backbone",
)


@dataclass(frozen=True)
class EverydayClipConfig:
    """One contrastive training run of the tiny CLIP on the everyday mixture."""

    train_dir: str = "data/imagenet-photos/train"  # extracted Tiny-ImageNet training photos (wnid folders)
    classes_tsv: str = str(IMAGENET_DIR / CLASSES_TSV)  # wnid -> ImageNet-1k index (class names)
    everyday_dir: str = str(EVERYDAY_DIR)  # the everyday-photos tars and Flickr8k captions
    output_dir: str = "runs/everyday_clip"  # state.pt, weights.safetensors, holdout.csv, eval_split.json, log
    init_weights: str = ""  # tiny-CLIP weights to start from (safetensors); "" = random init
    holdout_per_class: int = 50  # Tiny photos per class kept out of training for the LRA-EE build
    eval_fraction: float = 0.1  # share of every CIFAR / Intel / flowers class held out for evaluation
    flickr_eval_images: int = 1000  # Flickr8k photos held out for retrieval evaluation
    mix: str = "tiny:0.42,cifar10:0.2,flickr8k:0.16,intel:0.11,flowers:0.11"  # share of each source in a batch
    everyday_share: float = 0.3  # probability that a labelled photo's caption is an everyday word above its class
    steps: int = 1500  # optimizer steps the learning-rate schedule spans (a resumed run continues up to this)
    stop_step: int = 0  # end the run at this step instead (0: at ``steps``); the schedule still spans ``steps``
    batch_size: int = 128  # image-caption pairs per step
    lr: float = 5e-4  # peak learning rate after warmup, cosine decay to min_lr
    min_lr: float = 0.0  # learning rate at the last step
    warmup_steps: int = 50  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay of matrices only (open_clip's rule)
    beta2: float = 0.98  # AdamW second-moment decay, as CLIP
    grad_clip_norm: float | None = 1.0  # global gradient-norm clip; None: none
    crop_scale_min: float = 0.35  # RandomResizedCrop's smallest area fraction
    seed: int = 0  # holdout and eval splits; also the batch, caption and crop draws while draw_seed is 0
    draw_seed: int = 0  # batch, caption and crop draws (0: seed); a continued run sets it so it draws new batches
    threads: int = 2  # torch.set_num_threads; also the threads that decode the photos
    device: str = "cpu"  # torch device ("cuda" where a GPU is lent)
    pack_dir: str = ""  # read the training photos from a pack (``training.embedded.pack``) instead of the folders
    cuda_bf16: bool = False  # on CUDA, run the forward pass under bfloat16 autocast (CPU runs stay FP32)
    batched_augment: bool = False  # crop and flip the whole batch in one op on the device (BatchAugment)
    prefetch: int = 0  # batches drawn ahead in a background thread (0: drawn in the training loop)
    # Training to exit (training.embedded.exit_training): exit heads at these layers ("3,4,6"; "": none, plain CLIP
    # training), what they pool, and the weights of their distillation and contrastive losses.
    exit_layers: str = ""  # 1-based layers with a training exit head, comma-separated
    exit_pooling: str = "cls"  # "cls" or "ssa" (mean of the patch tokens)
    exit_distill: float = 1.0  # per head: KL from the full-depth answer to the exit's (mean over heads)
    exit_contrastive: float = 0.0  # per head: the concept InfoNCE on the exit's embedding (mean over heads)
    exit_into_backbone: bool = True  # False: heads learn on detached states, the CLIP trains as without them
    time_limit_s: float = 0.0  # end this session after so much training time, state and weights saved (0: none)
    deadline_unix: float = 0.0  # end it by this wall-clock time (Unix s), the photos' decoding counted (0: none)
    log_every: int = 20  # steps between log history entries
    checkpoint_every: int = 50  # steps between writes of state.pt (and at the last step)
    half: bool = True  # store weights.safetensors in FP16
    progress: bool = True  # show a tqdm progress bar

    def __post_init__(self) -> None:
        if self.batch_size < 2 or self.steps < 1 or self.holdout_per_class < 0:
            raise ValueError("batch_size must be >= 2, steps >= 1, holdout_per_class >= 0")
        if not 0 <= self.stop_step <= self.steps:
            raise ValueError("stop_step must lie in [0, steps]")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("eval_fraction must lie in [0, 1)")
        parse_mix(self.mix)
        self.exit_training()

    def exit_training(self) -> ExitTraining | None:
        """The exit heads this run trains with the CLIP (None: none)."""
        return ExitTraining.parse(
            self.exit_layers, self.exit_pooling, self.exit_distill, self.exit_contrastive, self.exit_into_backbone
        )

    @property
    def end_step(self) -> int:
        """The step the run ends at: ``stop_step`` when set, else ``steps``."""
        return self.stop_step or self.steps

    @property
    def draws(self) -> int:
        """The seed of the batch, caption and crop draws."""
        return self.draw_seed or self.seed


def parse_mix(mix: str) -> dict[str, float]:
    """``"tiny:0.4,cifar10:0.2"`` -> normalised shares; unknown source names are an error."""
    known = {"tiny", "flickr8k", *SET_CLASSES}
    shares: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in mix.split(","))):
        name, _, value = part.partition(":")
        if name not in known or float(value) < 0:
            raise ValueError(f"mix entry {part!r}: sources are {sorted(known)} with a non-negative share")
        shares[name] = float(value)
    total = sum(shares.values())
    if total <= 0:
        raise ValueError("mix needs a positive share somewhere")
    return {name: value / total for name, value in shares.items() if value > 0}


@dataclass
class Source:
    """Decoded training photos of one source with what captions them."""

    name: str  # tiny, cifar10, intel, flowers, flickr8k
    pixels: torch.Tensor  # [N, 3, S, S] uint8
    classes: list[int]  # per photo: class index into captions (labelled sets) or photo index (flickr8k)
    captions: list[ClassCaptions] | None  # per class (labelled sets)
    texts: list[list[str]] | None  # per photo, its human captions (flickr8k)


def to_pixels(data: bytes | Path, size: int) -> torch.Tensor:
    """An encoded image (bytes or file) -> RGB uint8 [3, size, size]: the service's decoder
    (``lraee_core.images.load_image``: EXIF rotation, alpha on white), shorter side resized to ``size``, centre crop."""
    pixels = v2.functional.pil_to_tensor(load_image(data))
    if pixels.shape[-2:] != (size, size):
        pixels = v2.functional.center_crop(v2.functional.resize(pixels, size, antialias=True), [size, size])
    return pixels


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    """(member name, bytes) of every regular file of a tar, in the tar's (sorted) order."""
    out = []
    with tarfile.open(path) as archive:
        for member in archive:
            if member.isfile():
                handle = archive.extractfile(member)
                assert handle is not None
                out.append((member.name, handle.read()))
    return out


def split_members(names: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) indices of ``class/file`` members: a seeded ``fraction`` of every class goes to eval."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        by_class.setdefault(name.split("/")[0], []).append(i)
    train: list[int] = []
    held: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        chosen = set(rng.permutation(len(members))[: round(fraction * len(members))].tolist())
        for rank, i in enumerate(members):
            (held if rank in chosen else train).append(i)
    return sorted(train), sorted(held)


def flickr_split(images: Sequence[str], count: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) indices of the Flickr8k photos: ``count`` seeded photos held out for retrieval."""
    order = np.random.default_rng(seed).permutation(len(images))
    held = set(order[:count].tolist())
    return [i for i in range(len(images)) if i not in held], sorted(held)


def read_flickr_captions(path: Path) -> dict[str, list[str]]:
    """Flickr8k image file name -> its captions (the TSV has no quoting; see the data README)."""
    captions: dict[str, list[str]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        for image, caption in reader:
            captions.setdefault(image, []).append(caption)
    return captions


def everyday_eval_split(cfg: EverydayClipConfig) -> dict[str, list[str]]:
    """Held-out member names per everyday source (never trained on): what evaluation reads."""
    root = Path(cfg.everyday_dir)
    held: dict[str, list[str]] = {}
    for name, (tar, _) in SET_CLASSES.items():
        with tarfile.open(root / tar) as archive:
            names = [m.name for m in archive if m.isfile()]
        held[name] = [names[i] for i in split_members(names, cfg.eval_fraction, cfg.seed)[1]]
    with tarfile.open(root / FLICKR_TAR) as archive:
        names = [m.name for m in archive if m.isfile()]
    held["flickr8k"] = [names[i] for i in flickr_split(names, cfg.flickr_eval_images, cfg.seed)[1]]
    return held


# The everyday checkpoint's calibration (and so default request) templates: wordings its captions used.
EVERYDAY_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
    "a bright photo of a {}.",
    "a good photo of a {}.",
    "a low resolution photo of a {}.",
    "a picture of a {}.",
)


# Share of each labelled everyday set's held-out members that goes to the LRA-EE build (heads, gates, calibration),
# so the exits' promises are calibrated on everyday photos as well as Tiny ones; the rest is evaluation only.
BUILD_SHARE = 0.5


def everyday_build_split(cfg: EverydayClipConfig) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The held-out members (never trained on by the CLIP) cut in two, per class and seeded: (build, evaluation).
    The build half of CIFAR-10 / Intel / flowers joins the LRA-EE build's photos; the evaluation half, and every
    held-out Flickr8k photo (no labels to build on), are cut again into validation and test
    (:func:`everyday_validation_split`)."""
    held = everyday_eval_split(cfg)
    build: dict[str, list[str]] = {}
    evaluation: dict[str, list[str]] = {"flickr8k": held["flickr8k"]}
    for name in SET_CLASSES:
        members = held[name]
        to_build, to_eval = split_members(members, 1.0 - BUILD_SHARE, cfg.seed + 1)
        build[name] = [members[i] for i in to_build]
        evaluation[name] = [members[i] for i in to_eval]
    return build, evaluation


# Share of the evaluation half that is sealed as the test split (per class, seeded): read once per release for its
# final figure, never while a recipe, a build setting or a threshold is being chosen. The rest is validation: what
# every tuning run, the bench and the default evaluation read.
TEST_SHARE = 0.5


def everyday_validation_split(cfg: EverydayClipConfig) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The evaluation half of :func:`everyday_build_split` cut in two per class, seeded: (validation, test).

    Validation is what tuning consults (the bench's photos, ``training.embedded.everyday_eval`` by default); test is
    sealed, read only with an explicit opt-in for a release's final figure. The CLIP's holdout and the build half are
    unchanged (their seeds are ``cfg.seed`` and ``cfg.seed + 1``; this cut uses ``cfg.seed + 2``). Flickr8k's
    held-out photos, one group without classes, are cut the same way."""
    _, evaluation = everyday_build_split(cfg)
    validation: dict[str, list[str]] = {}
    test: dict[str, list[str]] = {}
    for name, members in evaluation.items():
        to_validate, sealed = split_members(members, TEST_SHARE, cfg.seed + 2)
        validation[name] = [members[i] for i in to_validate]
        test[name] = [members[i] for i in sealed]
    return validation, test


def collect_sources(cfg: EverydayClipConfig, shares: dict[str, float]) -> list[EncodedSource]:
    """The training part of every source with a positive share, still encoded: held-out photos never enter."""
    sources: list[EncodedSource] = []
    root = Path(cfg.everyday_dir)
    if "tiny" in shares:
        photos = scan_photos(cfg.train_dir, cfg.classes_tsv)
        train_idx, _ = split_holdout(photos, cfg.holdout_per_class, cfg.seed)
        images = [Path(photos.paths[i]).read_bytes() for i in train_idx]
        captions = [class_captions(w, n) for w, n in zip(photos.wnids, photos.names, strict=True)]
        sources.append(EncodedSource("tiny", images, [photos.labels[i] for i in train_idx], captions, None))
    for name, (tar, classes) in SET_CLASSES.items():
        if name not in shares:
            continue
        members = read_tar(root / tar)
        train_idx, _ = split_members([m for m, _ in members], cfg.eval_fraction, cfg.seed)
        order = sorted(classes)
        captions = []
        for label in order:
            cc = class_captions(classes[label], label)
            extra = [w for w in EXTRA_EVERYDAY.get(name, ()) if w not in cc.everyday]
            concepts = cc.image_concepts | {concept_key(EVERYDAY_CONCEPTS[w]) for w in extra}
            captions.append(ClassCaptions(cc.concept, cc.names, (*cc.everyday, *extra), concepts))
        labels = [order.index(members[i][0].split("/")[0]) for i in train_idx]
        sources.append(EncodedSource(name, [members[i][1] for i in train_idx], labels, captions, None))
    if "flickr8k" in shares:
        members = read_tar(root / FLICKR_TAR)
        texts = read_flickr_captions(root / FLICKR_CAPTIONS)
        train_idx, _ = flickr_split([m for m, _ in members], cfg.flickr_eval_images, cfg.seed)
        per_photo = [texts[Path(members[i][0]).name] for i in train_idx]
        images = [members[i][1] for i in train_idx]
        sources.append(EncodedSource("flickr8k", images, list(range(len(train_idx))), None, per_photo))
    return sources


def decode_sources(encoded: Sequence[EncodedSource], size: int, threads: int, progress: bool) -> list[Source]:
    """Every source's photos decoded by ``to_pixels`` (the service's decoder) on ``threads`` threads."""
    sources = []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for source in encoded:
            decoded = pool.map(lambda data: to_pixels(data, size), source.images)
            bar = tqdm(decoded, f"decode {source.name}", total=len(source.images), disable=not progress)
            pixels = torch.stack(list(bar))
            sources.append(Source(source.name, pixels, source.classes, source.captions, source.texts))
    return sources


def load_sources(
    cfg: EverydayClipConfig, size: int, shares: dict[str, float], pack: Pack | None = None
) -> list[Source]:
    """Decode the training part of every source with a positive share, from the photo folders or from the pack
    (``pack`` when the caller has read ``cfg.pack_dir`` already)."""
    encoded = (pack or read_pack(Path(cfg.pack_dir))).sources if cfg.pack_dir else collect_sources(cfg, shares)
    missing = set(shares) - {source.name for source in encoded}
    if missing:
        raise ValueError(f"{cfg.pack_dir}: the pack has no {sorted(missing)} photos; the mix asks for them")
    return decode_sources([source for source in encoded if source.name in shares], size, cfg.threads, cfg.progress)


def training_counts(cfg: EverydayClipConfig, shares: dict[str, float], tiny_train: int) -> dict[str, int]:
    """Training photos per source with a positive share (what ``load_sources`` decodes), from the tar listings."""
    counts = {"tiny": tiny_train} if "tiny" in shares else {}
    root = Path(cfg.everyday_dir)
    for name, (tar, _) in SET_CLASSES.items():
        if name in shares:
            with tarfile.open(root / tar) as archive:
                names = [m.name for m in archive if m.isfile()]
            counts[name] = len(split_members(names, cfg.eval_fraction, cfg.seed)[0])
    if "flickr8k" in shares:
        with tarfile.open(root / FLICKR_TAR) as archive:
            images = [m.name for m in archive if m.isfile()]
        counts["flickr8k"] = len(flickr_split(images, cfg.flickr_eval_images, cfg.seed)[0])
    return counts


def draw_batch(
    sources: Sequence[Source], shares: dict[str, float], cfg: EverydayClipConfig, step: int
) -> tuple[torch.Tensor, list[str], list[str], list[frozenset[str]]]:
    """The batch of step ``step``: uint8 pixels [B, 3, S, S], captions, caption concepts, image concept sets.

    A pure function of (draw seed, step), so a resumed run draws what the interrupted one would have drawn.
    """
    rng = np.random.default_rng([cfg.draws, step])
    text_rng = random.Random(cfg.draws * 1_000_003 + step)
    names = [s.name for s in sources]
    counts = rng.multinomial(cfg.batch_size, [shares[n] for n in names])
    pixels, captions, concepts, image_concepts = [], [], [], []
    for source, count in zip(sources, counts, strict=True):
        rows = rng.integers(0, len(source.classes), size=int(count))
        pixels.append(source.pixels[torch.from_numpy(rows).to(source.pixels.device)])
        for row in rows.tolist():
            cls = source.classes[row]
            if source.captions is not None:
                text, concept = draw_caption(source.captions[cls], text_rng, cfg.everyday_share)
                captions.append(text)
                concepts.append(concept)
                image_concepts.append(source.captions[cls].image_concepts)
            else:
                assert source.texts is not None
                own = f"caption:{source.name}:{row}"
                captions.append(text_rng.choice(source.texts[row]))
                concepts.append(own)
                image_concepts.append(frozenset({own}))
    return torch.cat(pixels), captions, concepts, image_concepts


def concept_positives(concepts: Sequence[str], image_concepts: Sequence[frozenset[str]]) -> torch.Tensor:
    """[B, B] bool: image i and caption j are a positive pair when caption j's concept is one of image i's."""
    column = {concept: i for i, concept in enumerate(dict.fromkeys(concepts))}  # the batch's distinct concepts
    covers = torch.zeros(len(image_concepts), len(column), dtype=torch.bool)  # image i has distinct concept k
    for row, own in enumerate(image_concepts):
        covers[row, [column[c] for c in own if c in column]] = True
    return covers[:, [column[c] for c in concepts]]


def concept_loss(
    image_features: torch.Tensor,  # [B, D] normalised
    text_features: torch.Tensor,  # [B, D] normalised
    logit_scale: torch.Tensor,  # scalar, exp already applied
    positives: torch.Tensor,  # [B, B] bool, image rows x caption columns, diagonal true
) -> torch.Tensor:
    """Symmetric InfoNCE with a target uniform over each row's positives (images -> captions, and captions -> images
    over the transposed matrix); not symmetric in general, since "a dog" covers a Chihuahua but not the reverse."""
    logits = logit_scale * image_features @ text_features.T  # [B, B]
    target = positives.float()
    image_loss = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    text_target = target.T
    text_loss = -(text_target / text_target.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (image_loss + text_loss) / 2


PACK_SPLIT_FIELDS = ("seed", "holdout_per_class", "eval_fraction", "flickr_eval_images")


def pack_everyday(cfg: EverydayClipConfig, destination: Path, part_bytes: int = 20 << 20) -> Path:
    """Write the training photos of ``cfg``'s mix (and nothing held out) as a pack (``training.embedded.pack``), with
    what the trainer otherwise reads from the folders: ``holdout.csv``, the evaluation split and the counts."""
    shares = parse_mix(cfg.mix)
    sources = collect_sources(cfg, shares)
    photos = scan_photos(cfg.train_dir, cfg.classes_tsv)
    train_idx, holdout_idx = split_holdout(photos, cfg.holdout_per_class, cfg.seed)
    holdout = destination / HOLDOUT_FILE
    destination.mkdir(parents=True, exist_ok=True)
    write_holdout(photos, holdout_idx, holdout)
    settings = asdict(cfg)
    meta = {
        "split": {name: settings[name] for name in PACK_SPLIT_FIELDS},
        "holdout_csv": holdout.read_text(),
        "eval_split": everyday_eval_split(cfg),
        "counts": training_counts(cfg, shares, len(train_idx)) | {"tiny_holdout": len(holdout_idx)},
    }
    holdout.unlink()
    return write_pack(sources, meta, destination, part_bytes)


def pack_counts(meta: dict[str, Any], shares: dict[str, float]) -> dict[str, int]:
    """A pack's photo counts of the sources in ``shares`` and its Tiny holdout: a run's log's ``data``."""
    return {k: v for k, v in meta["counts"].items() if k in shares} | {"tiny_holdout": meta["counts"]["tiny_holdout"]}


def write_salvaged_log(run_dir: Path, pack_dir: Path, ended: str) -> Path:
    """``run_dir / training_log.json`` from ``state_meta.json`` (``device_stage.sh salvage``) for a run trained from
    the pack in ``pack_dir`` and stopped before it wrote its log (:func:`training.embedded.trainer.salvaged_log`)."""
    meta = json.loads((run_dir / "state_meta.json").read_text())
    shares = parse_mix(json.loads(meta["config"])["mix"])
    pack_meta = json.loads((pack_dir / INDEX_FILE).read_text())["meta"]  # the counts only: no part is read
    extras = {"data": pack_counts(pack_meta, shares), "caption_templates": list(NAME_TEMPLATES)}
    log = run_dir / LOG_FILE
    log.write_text(json.dumps(salvaged_log(meta, extras, ended), indent=2) + "\n")
    return log


def training_time_limit(cfg: EverydayClipConfig, now: float | None = None) -> float:
    """The training time this session may take (0: no limit): ``time_limit_s``, or what is left until
    ``deadline_unix`` when that is sooner (a lent machine's call has a wall-clock limit, and decoding the photos
    comes out of it)."""
    if cfg.deadline_unix <= 0:
        return cfg.time_limit_s
    left = max(1e-9, cfg.deadline_unix - (time.time() if now is None else now))
    return left if cfg.time_limit_s <= 0 else min(cfg.time_limit_s, left)


def train_everyday_clip(cfg: EverydayClipConfig) -> Path:
    """Train (or resume) the tiny CLIP on the everyday mixture; returns the path of ``weights.safetensors``.

    With ``pack_dir`` the photos, ``holdout.csv``, the evaluation split and the counts come from the pack, which must
    have been written with this config's split settings (``PACK_SPLIT_FIELDS``). A run finished on another machine
    (``trainer.finished_elsewhere``) is taken as it is."""
    end = cfg.end_step
    done = finished_elsewhere(cfg, [name for name in _RESUME_MUST_MATCH if name != "train_dir"], end)
    if done is not None:
        return done
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"{cfg.output_dir} trains on CUDA and this machine has none: train it on a GPU machine "
            "(python -m training.embedded.recipes everyday-stage ...) and copy its run folder here"
        )
    plan = cfg.exit_training()
    heads = None
    if plan is not None:  # shaped from a throw-away build: TrainingRun builds the model it trains
        heads = exit_heads(build_model(seed=cfg.seed)[0], plan, seed=cfg.seed)
    run = TrainingRun(
        cfg,
        must_match=_RESUME_MUST_MATCH,
        path_fields=("train_dir",),
        init_weights=cfg.init_weights,
        auxiliary=heads,
    )
    model, tokenizer = run.model, CachedTokenizer(run.tokenizer)
    shares = parse_mix(cfg.mix)
    pack = read_pack(Path(cfg.pack_dir)) if cfg.pack_dir else None  # read (and its parts hashed) once
    if pack is not None:
        meta = pack.meta
        settings = asdict(cfg)
        differ = [name for name in PACK_SPLIT_FIELDS if meta["split"][name] != settings[name]]
        if differ:
            raise ValueError(f"{cfg.pack_dir} was packed with other {', '.join(differ)}: its splits are not this run's")
        (run.output_dir / HOLDOUT_FILE).write_text(meta["holdout_csv"])
        eval_split, counts = meta["eval_split"], pack_counts(meta, shares)
    else:
        photos = scan_photos(cfg.train_dir, cfg.classes_tsv)
        train_idx, holdout_idx = split_holdout(photos, cfg.holdout_per_class, cfg.seed)
        write_holdout(photos, holdout_idx, run.output_dir / HOLDOUT_FILE)
        eval_split = everyday_eval_split(cfg)
        counts = training_counts(cfg, shares, len(train_idx)) | {"tiny_holdout": len(holdout_idx)}
    (run.output_dir / "eval_split.json").write_text(json.dumps(eval_split, indent=1) + "\n")
    # A finished (or stopped and shortened) run only writes its outputs: no photo needs decoding for that.
    sources = load_sources(cfg, image_size(model), shares, pack) if run.step < end else []
    for source in sources:  # the photos live where the model does: batches are gathered and cropped there
        source.pixels = source.pixels.to(run.device)
    augment = BatchAugment(model, cfg.crop_scale_min) if cfg.batched_augment else Augment(model, cfg.crop_scale_min)
    autocast = run.device.type == "cuda" and cfg.cuda_bf16

    def draw(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augmented images [B, 3, S, S], caption tokens and their positives [B, B] of step ``step``."""
        pixels, captions, concepts, image_concepts = draw_batch(sources, shares, cfg, step)
        generator = torch.Generator().manual_seed(cfg.draws * 1_000_003 + step)
        images = augment(pixels, generator).to(run.device, non_blocking=True)
        tokens = tokenizer(captions).to(run.device, non_blocking=True)
        return images, tokens, concept_positives(concepts, image_concepts).to(run.device, non_blocking=True)

    exit_parts: dict[str, list[float]] = {}  # the exit losses of the last steps, for the log

    def batch_loss(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, tokens, positives = batch
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            if plan is None or heads is None:
                output = model(images, tokens)
                image, exits = output["image_features"], dict[int, torch.Tensor]()
            else:
                image, exits = encode_image_with_exits(model, heads, images, plan.into_backbone)
                output = {
                    "text_features": model.encode_text(tokens, normalize=True),
                    "logit_scale": model.logit_scale.exp(),
                }
        text, scale = output["text_features"].float(), output["logit_scale"].float()
        loss = concept_loss(image.float(), text, scale, positives)
        if plan is not None:
            extra, parts = exit_loss(
                plan, {k: v.float() for k, v in exits.items()}, image.float(), text, scale, positives, concept_loss
            )
            loss = loss + extra
            for name, value in parts.items():
                exit_parts.setdefault(name, []).append(value)
                del exit_parts[name][:-50]
        return loss

    batches = prefetched(map(draw, range(run.step, end)), cfg.prefetch)
    run.train(batches, batch_loss, end, desc="everyday-clip", time_limit_s=training_time_limit(cfg))

    def extras() -> dict[str, Any]:
        out: dict[str, Any] = {"data": counts, "caption_templates": list(NAME_TEMPLATES)}
        if exit_parts:  # the exit losses' means over this session's last 50 steps
            out["exit_losses_last_50"] = {name: float(np.mean(v)) for name, v in sorted(exit_parts.items())}
        return out

    return run.finish(extras)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: every scalar EverydayClipConfig field is a flag (``--steps 1500 --output-dir runs/x``);
    ``--write-pack DIR`` writes the config's training pack instead of training."""
    parser = config_parser(__doc__, EverydayClipConfig())
    parser.add_argument("--write-pack", type=Path, help="write the training photos as a pack here, then stop")
    parser.add_argument("--part-mib", type=int, default=20, help="with --write-pack: the largest part file, in MiB")
    parser.add_argument(
        "--salvaged-log", type=Path, help="write RUN_DIR's training log from its state_meta.json (with --pack-dir)"
    )
    parser.add_argument("--ended", default="", help="with --salvaged-log: how and where the run was stopped")
    args = vars(parser.parse_args(argv))
    pack, part_mib = args.pop("write_pack"), args.pop("part_mib")
    salvaged, ended = args.pop("salvaged_log"), args.pop("ended")
    if salvaged is not None:
        if not args["pack_dir"] or not ended:
            parser.error("--salvaged-log needs --pack-dir (the run's pack) and --ended (why it stopped)")
        print(write_salvaged_log(salvaged, Path(args["pack_dir"]), ended))
        return
    cfg = EverydayClipConfig(**args)
    print(pack_everyday(cfg, pack, part_mib << 20) if pack is not None else train_everyday_clip(cfg))


if __name__ == "__main__":
    main()
