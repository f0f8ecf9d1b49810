"""A deterministic world of small coloured shapes and their captions, for training a tiny CLIP from scratch.

No pretrained CLIP weights exist in this project, so the backbone is trained on a world we can generate without
limit. Every sample is a pure function of ``(spec.seed, split, index)``: nothing is stored, any index can be
rebuilt on any machine, and a resumed training run sees exactly the images it would have seen.

Two things are held out of training so that zero-shot claims can be tested honestly:

* ``HELD_OUT_COMBOS``: (colour, shape) pairs never drawn in a ``"train"`` image. Every colour and every shape
  still appears in training, only these pairings do not, so classifying them is compositional generalisation.
* ``HELD_OUT_TEMPLATES``: caption wordings never used for ``"train"`` captions; zero-shot prompts default to them.

Splits: ``"train"`` excludes the held-out combos; ``"heldout"`` draws only them; ``"test"`` draws every combo from
a seed stream disjoint from ``"train"``.

The LRA-EE build pipeline reads folders and manifests only: a build on the world reads a :class:`WorldSet` exported
into its work dir (``python -m training.embedded.world DIR SPLIT LABEL_SET N`` exports one by hand).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

Split = Literal["train", "heldout", "test"]
LabelSet = Literal["shapes", "colours", "colour+shape"]

SPLITS: tuple[Split, ...] = ("train", "heldout", "test")
LABEL_SETS: tuple[LabelSet, ...] = ("shapes", "colours", "colour+shape")
LABELS_FILE = "labels.csv"  # what a build reads as its data source (``--data``)
CLASSES_FILE = "classes.txt"  # its label set, in class-index order (``--classes-file``)

# The split's place in this tuple is its seed-stream id: appending a split keeps existing streams unchanged.
_SPLIT_IDS: dict[str, int] = {split: i for i, split in enumerate(SPLITS)}
# Appended to the seed entropy of single-object evaluation scenes so they never coincide with captioned scenes.
_LABELLED_STREAM = 1

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "heart", "diamond")
SHAPE_PLURALS: dict[str, str] = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}

# Saturated primaries plus white and black: far apart in RGB, so colour words stay learnable at 64 px.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 30),
    "orange": (250, 130, 20),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
_NAMED_RGB = np.array(list(COLOURS.values()), dtype=np.float64)  # [colours, 3]

SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
# Positions as fractions of the image side, (x, y) with y growing downwards.
_POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
# Scenes with several objects leave out the center: next to it two objects could overlap.
_MULTI_OBJECT_POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
_POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
_COUNT_WORDS: dict[int, str] = {2: "two", 3: "three"}
BACKGROUNDS: tuple[str, ...] = ("plain", "noise", "stripes", "gradient", "checker")

# 10 of the 64 (colour, shape) pairs (15.6 %): one pair per colour and per shape (a permutation), plus two more,
# so every colour keeps at least 6 training shapes and every shape at least 6 training colours.
HELD_OUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "star"),
        ("green", "square"),
        ("blue", "heart"),
        ("yellow", "circle"),
        ("orange", "ring"),
        ("purple", "triangle"),
        ("white", "diamond"),
        ("black", "cross"),
        ("blue", "ring"),
        ("yellow", "triangle"),
    }
)

# Templates take the object phrase as ``{what}`` ("a small red circle", "two blue stars") and ``{be}`` for verb
# agreement. Zero-shot prompts reuse them with a class phrase, so caption and prompt share one grammar.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "{what}",
    "{what}.",
    "a photo of {what}",
    "a photo of {what}.",
    "a picture of {what}",
    "an image of {what}",
    "an image showing {what}",
    "there {be} {what}",
    "there {be} {what} in the image",
    "a drawing of {what}",
    "a scene with {what}",
    "{what} on a background",
    "this picture has {what}",
    "a simple image with {what}",
    "a photo containing {what}",
    "we can see {what}",
)
# Wordings that never occur in training captions; each carries words ("rendering", "illustration", "depicted",
# "snapshot", "spot", "cropped") that no training template uses.
HELD_OUT_TEMPLATES: tuple[str, ...] = (
    "a rendering of {what}.",
    "an illustration featuring {what}",
    "{what} {be} depicted here",
    "a snapshot of {what}",
    "in this frame you can spot {what}",
    "a cropped view showing {what}",
)


@dataclass(frozen=True)
class WorldSpec:
    """Everything that defines the world; a sample is a pure function of (seed, split, index) under a spec."""

    seed: int = 0  # root of every seed stream; change it for a different but equally distributed world
    image_size: int = 64  # side of the square RGB images in pixels (the tiny CLIP's input size)
    small_radius: float = 0.11  # outer radius of a "small" shape, as a fraction of image_size (7 px at 64)
    large_radius: float = 0.2  # outer radius of a "large" shape, as a fraction of image_size (13 px at 64)
    radius_jitter: float = 0.1  # relative random scale change of each shape, +-
    position_jitter: float = 0.04  # random shift of each shape centre, +- fraction of image_size (2.5 px at 64)
    max_rotation_deg: float = 15.0  # random rotation of each shape, +- degrees; small so a square never reads as
    # a diamond
    colour_jitter: int = 18  # per-channel random change of a shape's colour, +- (0..255 scale)
    pixel_noise: float = 6.0  # standard deviation of Gaussian noise added to every pixel (0..255 scale)
    texture_contrast: int = 40  # largest per-channel difference between a background's two colours
    min_background_distance: float = 100.0  # smallest RGB distance between a background colour and a shape
    # colour in the same scene, so a shape never vanishes into its background
    min_named_colour_distance: float = 80.0  # smallest RGB distance between a background colour and any named
    # colour, so a colour word always refers to a shape, never to the background
    single_object_fraction: float = 0.5  # fraction of captioned scenes with one object
    same_objects_fraction: float = 0.2  # fraction with 2-3 identical objects ("two red circles"); the rest hold
    # 2-3 different objects


@dataclass(frozen=True)
class WorldObject:
    """One drawn shape."""

    shape: str  # one of SHAPES
    colour: str  # one of COLOUR_NAMES
    size: str  # one of SIZES
    position: str  # one of POSITIONS


@dataclass(frozen=True)
class Sample:
    """A captioned scene."""

    image: Image.Image  # RGB, spec.image_size square
    caption: str  # one sentence that is true of the image
    attributes: dict[str, Any]  # JSON-friendly description: kind, count, objects, background, template


@dataclass(frozen=True)
class LabelledSample:
    """A single-object scene with its class index in one label set."""

    image: Image.Image  # RGB, spec.image_size square
    caption: str  # a caption of the scene (held-out wording outside "train")
    label: int  # index into label_names(label_set)
    attributes: dict[str, Any]  # as in Sample


def split_combos(split: str) -> tuple[tuple[str, str], ...]:
    """The (colour, shape) pairs that images of ``split`` may contain, in a fixed order."""
    all_combos = [(colour, shape) for colour in COLOUR_NAMES for shape in SHAPES]
    if split == "train":
        return tuple(combo for combo in all_combos if combo not in HELD_OUT_COMBOS)
    if split == "heldout":
        return tuple(combo for combo in all_combos if combo in HELD_OUT_COMBOS)
    if split == "test":
        return tuple(all_combos)
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def split_templates(split: str) -> tuple[str, ...]:
    """Caption wordings of ``split``: training wordings for "train", held-out wordings for evaluation splits."""
    _split_id(split)
    return TRAIN_TEMPLATES if split == "train" else HELD_OUT_TEMPLATES


def fill_template(template: str, what: str, plural: bool = False) -> str:
    """Put an object phrase into a template, agreeing the verb with ``plural``."""
    return template.format(what=what, be="are" if plural else "is")


def with_article(phrase: str) -> str:
    """``phrase`` preceded by "a" or "an"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def label_names(label_set: str) -> tuple[str, ...]:
    """Class names of a label set, in class-index order: "circle", "red", or "red circle"."""
    if label_set == "shapes":
        return SHAPES
    if label_set == "colours":
        return COLOUR_NAMES
    if label_set == "colour+shape":
        return tuple(f"{colour} {shape}" for colour in COLOUR_NAMES for shape in SHAPES)
    raise ValueError(f"unknown label set {label_set!r}; expected one of {LABEL_SETS}")


def class_phrases(label_set: str) -> tuple[str, ...]:
    """Noun phrase of every class, in class-index order, for ``{what}`` in a template.

    A bare colour is not a noun, so colour classes read "a red shape", a wording training captions also use.
    """
    if label_set == "colours":
        return tuple(with_article(f"{colour} shape") for colour in COLOUR_NAMES)
    return tuple(with_article(name) for name in label_names(label_set))


def label_of(world_object: WorldObject, label_set: str) -> int:
    """Class index of an object in a label set."""
    if label_set == "shapes":
        return SHAPES.index(world_object.shape)
    if label_set == "colours":
        return COLOUR_NAMES.index(world_object.colour)
    if label_set == "colour+shape":
        return COLOUR_NAMES.index(world_object.colour) * len(SHAPES) + SHAPES.index(world_object.shape)
    raise ValueError(f"unknown label set {label_set!r}; expected one of {LABEL_SETS}")


def generate(index: int, split: str, spec: WorldSpec | None = None) -> Sample:
    """The captioned scene number ``index`` of ``split``: 1-3 shapes on a textured background.

    A pure function of ``(spec.seed, split, index)``.
    """
    spec = spec or WorldSpec()
    rng = np.random.default_rng([spec.seed, _split_id(split), index])
    objects, kind = _sample_objects(rng, split, spec)
    image = _render(rng, objects, spec)
    template = _pick(rng, split_templates(split))
    what = _describe(rng, objects, kind)
    caption = fill_template(template, what, plural=len(objects) > 1)
    return Sample(Image.fromarray(image), caption, _attributes(objects, kind, template))


def generate_labelled(index: int, split: str, label_set: str, spec: WorldSpec | None = None) -> LabelledSample:
    """Single-object scene number ``index`` of ``split`` and its class in ``label_set``.

    The scene does not depend on ``label_set``: index i is the same image under every label set. With one object
    per scene every label set has exactly one right answer.
    """
    spec = spec or WorldSpec()
    label_names(label_set)  # fail on an unknown label set before drawing anything
    rng = np.random.default_rng([spec.seed, _split_id(split), index, _LABELLED_STREAM])
    world_object = _sample_single(rng, split)
    image = _render(rng, [world_object], spec)
    template = _pick(rng, split_templates(split))
    caption = fill_template(template, _describe(rng, [world_object], "single"))
    attributes = _attributes([world_object], "single", template)
    return LabelledSample(Image.fromarray(image), caption, label_of(world_object, label_set), attributes)


def labelled_set(
    split: str, label_set: str, n: int, spec: WorldSpec | None = None
) -> tuple[tuple[str, ...], list[Image.Image], list[int]]:
    """The first ``n`` single-object scenes of ``split``: (class names, images, class index per image)."""
    samples = [generate_labelled(i, split, label_set, spec) for i in range(n)]
    return label_names(label_set), [s.image for s in samples], [s.label for s in samples]


class WorldDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Captioned scenes ``0 .. size-1`` of a split as (image tensor, token ids), generated on access."""

    def __init__(
        self,
        split: str,
        size: int,
        spec: WorldSpec | None,
        transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
    ) -> None:
        _split_id(split)
        self.split = split
        self.size = size
        self.spec = spec or WorldSpec()
        self.transform = transform
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        sample = generate(index, self.split, self.spec)
        return self.transform(sample.image), self.tokenizer([sample.caption])[0]  # [3, H, W], [context_length]


def export_imagefolder(root: str | Path, split: str, label_set: str, n: int, spec: WorldSpec | None = None) -> Path:
    """Write the first ``n`` single-object scenes of ``split`` as ``root/<class>/<index>.png``.

    Class folders use "_" for spaces ("red_circle") and exist only for classes that have images, because
    torchvision's ImageFolder refuses empty class folders. ``classes.txt`` lists every class name in class-index
    order, and ``labels.csv`` (path, label, label_index, caption) is the authoritative mapping, since an
    ImageFolder numbers only the folders present, alphabetically. Returns ``root``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names = label_names(label_set)
    (root / CLASSES_FILE).write_text("\n".join(names) + "\n")
    with (root / LABELS_FILE).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "label_index", "caption"])
        for index in range(n):
            sample = generate_labelled(index, split, label_set, spec)
            relative = Path(names[sample.label].replace(" ", "_")) / f"{index:06d}.png"
            (root / relative.parent).mkdir(exist_ok=True)
            sample.image.save(root / relative)
            writer.writerow([relative.as_posix(), names[sample.label], sample.label, sample.caption])
    (root / "world.json").write_text(
        json.dumps({"split": split, "label_set": label_set, "n": n, "spec": vars(spec or WorldSpec())}, indent=2)
    )
    return root


@dataclass(frozen=True)
class WorldSet:
    """A generated data set as a build reads it: the first ``n`` scenes of ``split`` labelled by ``label_set``,
    exported into ``<work dir>/world/`` (the pipeline names images inside its work dir relative to it, so every
    build that generates the same set shares its cached features)."""

    split: str  # one of SPLITS
    label_set: str  # one of LABEL_SETS
    n: int  # scenes

    def folder(self, work_dir: Path) -> Path:
        """Where the set lives under ``work_dir``."""
        return work_dir / "world" / f"{self.split}-{self.label_set.replace('+', '_')}-{self.n}"

    def labels(self, work_dir: Path) -> Path:
        """The set's ``path,label`` manifest: a build's ``data.source`` or ``data.eval_source``."""
        return self.folder(work_dir) / LABELS_FILE

    def classes(self, work_dir: Path) -> Path:
        """The set's class list: a build's ``data.classes_file``."""
        return self.folder(work_dir) / CLASSES_FILE

    def export(self, work_dir: Path) -> Path:
        """Export the set unless it is there already; returns its folder."""
        folder = self.folder(work_dir)
        if not (folder / LABELS_FILE).is_file() or not (folder / CLASSES_FILE).is_file():
            export_imagefolder(folder, self.split, self.label_set, self.n)
        return folder


def _split_id(split: str) -> int:
    try:
        return _SPLIT_IDS[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}") from None


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    """One of ``options``; indexing keeps Python strings (``rng.choice`` would build a numpy array each call)."""
    return options[int(rng.integers(len(options)))]


def _attributes(objects: Sequence[WorldObject], kind: str, template: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "count": len(objects),
        "objects": [vars(o).copy() for o in objects],
        "template": template,
    }


# ---------------------------------------------------------------------------------------------------------------
# Scene sampling and captions


def _sample_single(rng: np.random.Generator, split: str) -> WorldObject:
    combos = split_combos(split)
    colour, shape = combos[rng.integers(len(combos))]
    return WorldObject(shape, colour, _pick(rng, SIZES), _pick(rng, POSITIONS))


def _sample_objects(rng: np.random.Generator, split: str, spec: WorldSpec) -> tuple[list[WorldObject], str]:
    draw = rng.random()
    if draw < spec.single_object_fraction:
        return [_sample_single(rng, split)], "single"
    combos = split_combos(split)
    count = int(rng.integers(2, 4))
    # Several objects are all small and at distinct non-center positions, so they never overlap.
    positions = [_MULTI_OBJECT_POSITIONS[i] for i in rng.permutation(len(_MULTI_OBJECT_POSITIONS))[:count]]
    if draw < spec.single_object_fraction + spec.same_objects_fraction:
        colour, shape = combos[rng.integers(len(combos))]
        return [WorldObject(shape, colour, "small", p) for p in positions], "same"
    # Different objects differ in their (colour, shape) pair, so "a red circle and a red circle" never happens;
    # the held-out split has only 10 pairs, still enough for 3 distinct ones.
    picks = rng.choice(len(combos), size=count, replace=False)
    return [WorldObject(combos[i][1], combos[i][0], "small", p) for i, p in zip(picks, positions, strict=True)], "mixed"


def _object_phrase(rng: np.random.Generator, world_object: WorldObject, mode: str, say_extras: bool) -> str:
    """ "a small red circle on the left", "a circle", "a red shape", ...: always true of the object."""
    size = f"{world_object.size} " if say_extras and rng.random() < 0.5 else ""
    position = f" {_pick(rng, _POSITION_PHRASES[world_object.position])}" if say_extras and rng.random() < 0.5 else ""
    if mode == "colour":
        colour_phrases = (f"{world_object.colour} shape", f"{world_object.colour} object")
        return with_article(_pick(rng, colour_phrases)) + position
    colour = f"{world_object.colour} " if mode == "full" else ""
    return with_article(f"{size}{colour}{world_object.shape}") + position


def _describe(rng: np.random.Generator, objects: Sequence[WorldObject], kind: str) -> str:
    """The object phrase of a scene; partial descriptions teach the text tower shape-only and colour-only words."""
    draw = rng.random()
    mode = "full" if draw < 0.6 else "shape" if draw < 0.8 else "colour"
    if kind == "single":
        return _object_phrase(rng, objects[0], mode, say_extras=True)
    if kind == "same":
        first = objects[0]
        count = _COUNT_WORDS[len(objects)]
        if mode == "colour":
            return f"{count} {first.colour} {_pick(rng, ('shapes', 'objects'))}"
        colour = f"{first.colour} " if mode == "full" else ""
        return f"{count} {colour}{SHAPE_PLURALS[first.shape]}"
    # Mixed scenes always name colour and shape: a partial list could match a different scene in the batch.
    say_positions = rng.random() < 0.5
    phrases = [
        with_article(f"{o.colour} {o.shape}")
        + (f" {_pick(rng, _POSITION_PHRASES[o.position])}" if say_positions else "")
        for o in objects
    ]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


# ---------------------------------------------------------------------------------------------------------------
# Rendering: every shape is a boolean mask computed on the whole pixel grid at once, in the shape's own rotated
# frame scaled to unit outer radius, so drawing costs a few vectorised numpy operations per shape.


@cache
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, each [size, size] float32, y growing downwards."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    return xs, ys


def _polygon_mask(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test for every pixel; handles the non-convex star."""
    inside = np.zeros(u.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        if y1 == y2:
            continue  # a horizontal edge is never crossed by a horizontal ray
        crosses = (y1 > v) != (y2 > v)
        x_at_v = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at_v)
    return inside


def _regular_polygon(corners: int, radius: float, start_deg: float) -> np.ndarray:
    angles = np.deg2rad(start_deg + np.arange(corners) * 360.0 / corners)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star_vertices() -> np.ndarray:
    outer = _regular_polygon(5, 1.0, -90.0)
    inner = _regular_polygon(5, 0.45, -90.0 + 36.0)
    return np.stack([outer, inner], axis=1).reshape(10, 2)  # alternate outer and inner corners


_TRIANGLE = _regular_polygon(3, 1.0, -90.0)  # apex up
_STAR = _star_vertices()


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mask of ``shape`` with outer radius 1 in local coordinates (u right, v down)."""
    if shape == "circle":
        return u * u + v * v <= 0.85
    if shape == "square":
        # Half-side 0.75 gives a square about as heavy as the circle, so size words mean the same for both.
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape == "diamond":
        return np.abs(u) + 0.8 * np.abs(v) <= 0.85
    if shape == "triangle":
        return _polygon_mask(u, v, _TRIANGLE)
    if shape == "star":
        return _polygon_mask(u, v, _STAR)
    if shape == "cross":
        arm, half_width = np.abs(u), np.abs(v)
        return ((arm <= 0.95) & (half_width <= 0.3)) | ((half_width <= 0.95) & (arm <= 0.3))
    if shape == "ring":
        squared = u * u + v * v
        return (squared <= 0.95) & (squared >= 0.3)
    if shape == "heart":
        # The classic implicit heart (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, flipped so its point faces down.
        x, y = 1.25 * u, -1.25 * v + 0.15
        base = x * x + y * y - 1.0
        return base * base * base - x * x * y * y * y <= 0.0
    raise ValueError(f"unknown shape {shape!r}")


def _background_colours(
    rng: np.random.Generator, shape_colours: np.ndarray, spec: WorldSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Two muted colours for a texture, far from the scene's shape colours and from every named colour."""
    for _ in range(64):
        base = np.clip(rng.uniform(60.0, 195.0) + rng.uniform(-40.0, 40.0, size=3), 0.0, 255.0)
        second = np.clip(base + rng.uniform(-spec.texture_contrast, spec.texture_contrast, size=3), 0.0, 255.0)
        pair = np.stack([base, second])  # [2, 3]
        to_shapes = np.linalg.norm(shape_colours[:, None, :] - pair, axis=2)  # [objects, 2]
        to_named = np.linalg.norm(_NAMED_RGB[:, None, :] - pair, axis=2)  # [colours, 2]
        if to_shapes.min() >= spec.min_background_distance and to_named.min() >= spec.min_named_colour_distance:
            return base, second
    # Muted mid-greys are far from every saturated colour and from black and white, so this is rarely reached.
    grey = np.array([128.0, 128.0, 128.0])
    return grey, grey


def _background(rng: np.random.Generator, shape_colours: np.ndarray, spec: WorldSpec) -> np.ndarray:
    """[size, size, 3] float32 textured background."""
    size = spec.image_size
    xs, ys = _pixel_grid(size)
    base, second = _background_colours(rng, shape_colours, spec)
    texture = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    if texture == "plain":
        weight = np.zeros((size, size), dtype=np.float32)
    elif texture == "noise":
        # Blotchy rather than per-pixel noise: per-pixel noise is added to the whole image later anyway.
        cells = max(1, size // 8)
        coarse = rng.random((cells, cells), dtype=np.float32)
        weight = np.kron(coarse, np.ones((size // cells + 1, size // cells + 1), dtype=np.float32))[:size, :size]
    elif texture == "stripes":
        angle = rng.uniform(0.0, math.pi)
        period = rng.uniform(5.0, 14.0)
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) / period
        weight = (np.sin(2.0 * math.pi * phase) > 0).astype(np.float32)
    elif texture == "gradient":
        angle = rng.uniform(0.0, 2.0 * math.pi)
        ramp = (xs - size / 2) * math.cos(angle) + (ys - size / 2) * math.sin(angle)
        weight = (ramp / size + 0.5).clip(0.0, 1.0)
    else:  # checker
        cell = int(rng.integers(4, 11))
        weight = (((xs // cell) + (ys // cell)) % 2).astype(np.float32)
    weight = weight[..., None]
    return ((1.0 - weight) * base + weight * second).astype(np.float32)


def _render(rng: np.random.Generator, objects: Sequence[WorldObject], spec: WorldSpec) -> np.ndarray:
    """[size, size, 3] uint8 image of ``objects``."""
    size = spec.image_size
    xs, ys = _pixel_grid(size)
    shape_colours = np.array(
        [
            np.clip(np.array(COLOURS[o.colour]) + rng.integers(-spec.colour_jitter, spec.colour_jitter + 1, 3), 0, 255)
            for o in objects
        ],
        dtype=np.float32,
    )
    image = _background(rng, shape_colours, spec)
    for world_object, colour in zip(objects, shape_colours, strict=True):
        radius_fraction = spec.small_radius if world_object.size == "small" else spec.large_radius
        radius = radius_fraction * size * (1.0 + rng.uniform(-spec.radius_jitter, spec.radius_jitter))
        centre_x, centre_y = _POSITION_CENTRES[world_object.position]
        centre_x = (centre_x + rng.uniform(-spec.position_jitter, spec.position_jitter)) * size
        centre_y = (centre_y + rng.uniform(-spec.position_jitter, spec.position_jitter)) * size
        angle = math.radians(rng.uniform(-spec.max_rotation_deg, spec.max_rotation_deg))
        cos, sin = math.cos(angle) / radius, math.sin(angle) / radius
        dx, dy = xs - centre_x, ys - centre_y
        u, v = dx * cos + dy * sin, dy * cos - dx * sin  # rotate into the shape's frame, scale to unit radius
        mask = _shape_mask(world_object.shape, u, v)
        image[mask] = colour
    image += rng.normal(0.0, spec.pixel_noise, size=image.shape).astype(np.float32)
    return image.clip(0.0, 255.0).astype(np.uint8)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m training.embedded.world DIR SPLIT LABEL_SET N``: export a set for ``lraee-train --data``."""
    parser = argparse.ArgumentParser(prog="python -m training.embedded.world", description=main.__doc__)
    parser.add_argument("dir", type=Path, help="folder to write (class folders, labels.csv, classes.txt)")
    parser.add_argument("split", choices=SPLITS)
    parser.add_argument("label_set", choices=LABEL_SETS)
    parser.add_argument("n", type=int, help="scenes")
    args = parser.parse_args(argv)
    root = export_imagefolder(args.dir, args.split, args.label_set, args.n)
    print(f"--data {root / LABELS_FILE} --classes-file {root / CLASSES_FILE}")


if __name__ == "__main__":
    main()
