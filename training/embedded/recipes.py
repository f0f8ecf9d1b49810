"""The recipes of the two embedded checkpoints: exactly the commands that built what ships in ``lraee_core/assets``.

``python -m training.embedded.recipes world``  (about 30 min of CLIP training on 2 cores, then a few minutes of builds)
``python -m training.embedded.recipes photos`` (about 1.5 h of CLIP training on 2 cores, then about 15 min of builds)
``python -m training.embedded.recipes everyday`` (the CLIP stages of ``EVERYDAY_STAGES`` from the photos CLIP, then the
photos builds and the everyday evaluation; the ten CPU stages took about 12 h on 2 cores, the eleventh 8 minutes on
a lent H200, and the recipe starts at the last stage whose run folder in ``runs/`` is finished, the earlier ones'
logs kept in ``reports/everyday``). A stage can also train alone, on another machine from a pack of the training
photos (``GPU_STAGE`` on a lent GPU, ``training/embedded/device_stage.sh``): ``python -m training.embedded.recipes
everyday-stage NAME --pack-dir DIR --init-weights FILE --runs-dir DIR``; its run folder copied back into ``runs/``
counts as finished)
Each recipe trains the tiny CLIP (resumable: rerunning continues), copies its FP16 weights into the checkpoint
directory (so the manifest names them by a relative path and the checkpoint moves as one folder), and runs the
LRA-EE build into it: the recipe states each build's settings once (``BuildConfig`` fields and their values), from
which come both the build's config and the ``lraee-train build`` command the manifest records, the one a user
would retype to get the same build. ``photos --clip-weights FILE [--holdout CSV]`` skips the CLIP training and builds on
weights trained elsewhere (``--clip-dir DIR`` takes weights.safetensors, holdout.csv and training_log.json from a
photo-clip run); without ``--holdout`` the holdout is recomputed as photo_clip does it (50 photos per class of the
Tiny train photos, seed 0), so it never overlaps the photos those weights were trained on.

Extra evaluations (other label sets, other photo sets) are further builds in their
own work dirs with the same data, seeds and settings, so their heads and thresholds come out identical; the recipe
checks that by the heads' SHA-256 and says so in ``reports/<recipe>/summary.json`` (the world's other label sets
train heads of their own, so only its colour+shape evaluations share the shipped heads).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lraee_core.assets import EMBEDDED_CHECKPOINTS, MODEL_CONFIGS_DIR
from lraee_core.checkpoint import read_manifest
from lraee_core.paths import REPO_ROOT
from training.embedded import photos
from training.pipeline.build import run_build
from training.pipeline.cli import CONFIG_FILE, OPTIONS
from training.pipeline.config import BuildConfig, DataConfig, replace_field
from training.pipeline.data import class_name, is_wnid, read_classes_tsv, scan_source
from training.pipeline.data import label_set as build_label_set
from training.pipeline.jobs import Job, write_json

from .captions import EVERYDAY_CONCEPTS, everyday_word, unrelated_words, wordnet
from .everyday import (
    EVERYDAY_TEMPLATES,
    SET_CLASSES,
    EverydayClipConfig,
    everyday_build_split,
    train_everyday_clip,
)
from .photo_clip import (
    HOLDOUT_FILE,
    TEMPLATES,
    PhotoClipConfig,
    scan_photos,
    split_holdout,
    train_photo_clip,
    write_holdout,
    zero_shot_top1,
)
from .trainer import LOG_FILE, WEIGHTS_FILE, build_model
from .world import HELD_OUT_TEMPLATES, WorldSet
from .world_clip import WorldClipConfig, train_world_clip

REPO = REPO_ROOT
# Every recipe build's split of its data: 60% trains the heads, 20% fits the gates, 20% calibrates.
SPLITS: tuple[tuple[str, float], ...] = (("data.head_split", 0.6), ("data.gate_split", 0.2), ("data.calib_split", 0.2))
RUNS = REPO / "runs"
REPORTS = REPO / "reports"
MODEL = "lraee-tiny-vit12"


def world_templates(label_set: str) -> list[str]:
    """The world's held-out caption wordings as ``{}`` prompts: zero-shot never uses a wording training saw."""
    what = "a {} shape" if label_set == "colours" else "a {}"
    return [template.format(what=what, be="is") for template in HELD_OUT_TEMPLATES]


Setting = tuple[str, Any]  # (dotted BuildConfig field, value), e.g. ("data.head_split", 0.6)
# The command-line flag of each BuildConfig field (the templates are the repeatable --template).
_FLAGS = {option.field: option.flag for option in OPTIONS}


def build_job(work: Path, settings: Sequence[Setting], threads: int) -> Job:
    """The job of one build: ``settings`` over BuildConfig's defaults, and the ``lraee-train build`` command that
    gives the same config, with the flags in the order of ``settings`` (recorded in the manifest). Paths in
    ``settings`` are absolute, as the command line makes them."""
    config = BuildConfig()
    command = ["lraee-train", "build", "--work-dir", str(work), "--threads", str(threads)]
    for name, value in settings:
        config = replace_field(config, name, value)
        if name == "data.templates":
            command += [arg for template in value for arg in ("--template", template)]
        else:
            command += [_FLAGS[name], ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return Job(config=config, work_dir=work, argv=tuple(command))


def backbone_settings(weights: Path, out: Path, report: Path) -> list[Setting]:
    """The settings every recipe build shares: the tiny CLIP with ``weights``, and where checkpoint and report go."""
    return [
        ("backbone.model_name", MODEL),
        ("backbone.model_config_file", str(MODEL_CONFIGS_DIR / f"{MODEL}.json")),
        ("backbone.pretrained", str(weights.resolve())),
        ("checkpoint_dir", str(out.resolve())),
        ("report_dir", str(report.resolve())),
    ]


def run_planned_build(work: Path, settings: Sequence[Setting], threads: int) -> str:
    """Run one build (each step skipped when up to date, as ``lraee-train build`` does); returns its heads' SHA-256."""
    job = build_job(work, settings, threads)
    torch.set_num_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / CONFIG_FILE, job.config.to_json())  # later steps in this work dir need only --work-dir
    run_build(job)
    return read_manifest(job.checkpoint_dir).heads_sha256


def _bundle(weights: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    bundled = out / "weights.safetensors"
    if weights.resolve() != bundled.resolve():  # building on the weights already shipped: nothing to copy
        shutil.copyfile(weights, bundled)
    return bundled


def _relative(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else path.name


def holdout_csv(train: Path, destination: Path, per_class: int = 50, seed: int = 0) -> Path:
    """The photos photo_clip keeps out of CLIP training (its split_holdout, same seed), as a build's data list."""
    found = scan_photos(train, photos.classes_tsv())
    _, held = split_holdout(found, per_class, seed)
    destination.mkdir(parents=True, exist_ok=True)
    return write_holdout(found, held, destination / HOLDOUT_FILE)


@dataclass(frozen=True)
class PlannedBuild:
    """One LRA-EE build of a recipe, before it runs."""

    name: str  # the evaluation's name in summary.json and its reports folder
    work: Path  # the build's work dir
    settings: tuple[Setting, ...]  # what the build sets over BuildConfig's defaults
    ships: bool  # True for the build written into the embedded checkpoint
    facts: dict[str, object]  # what summary.json says of the evaluation besides its heads and ``shipped``
    world_sets: tuple[WorldSet, ...] = ()  # generated data sets exported into the work dir before the build runs


def world_builds(weights: Path, samples: int, other_samples: int | None = None) -> list[PlannedBuild]:
    """The world recipe's builds: the shipped checkpoint (colour+shape, test scenes) first, then the same heads on
    held-out (colour, shape) pairs and the other label sets' builds (their own heads, ``other_samples`` images)."""
    builds: list[PlannedBuild] = []
    for label_set, split in (("colour+shape", "test"), ("colour+shape", "heldout"), ("shapes", "test"),
                             ("colours", "test")):  # fmt: skip
        name = f"{label_set}-{split}".replace("+", "_")
        ships = not builds  # the first one is the shipped checkpoint
        out = EMBEDDED_CHECKPOINTS["world"] if ships else RUNS / "world_builds" / name / "checkpoint"
        count = samples if label_set == "colour+shape" or other_samples is None else other_samples
        work = RUNS / "world_builds" / name / "work"
        train, evaluation = WorldSet("train", label_set, count), WorldSet(split, label_set, count)
        settings = [
            *backbone_settings(weights, out, REPORTS / "world" / name),
            ("data.source", str(train.labels(work))),
            ("data.classes_file", str(train.classes(work))),
            ("data.eval_source", str(evaluation.labels(work))),
            ("calibrate.checkpoint_id", f"world-{label_set.replace('+', '_')}"),
            *SPLITS,
            ("data.templates", tuple(world_templates(label_set))),
        ]
        if label_set == "colour+shape" and not ships:  # the shipped build's training images: copy their features
            settings.append(("extract.reuse_from", str(builds[0].work / "extract")))
        facts: dict[str, object] = {"label_set": label_set, "eval_split": split}
        builds.append(PlannedBuild(name, work, tuple(settings), ships, facts, (train, evaluation)))
    return builds


def world(
    clip_steps: int, threads: int, samples: int, clip_weights: Path | None = None, other_samples: int | None = None
) -> dict[str, object]:
    """World CLIP, the shipped ``world`` checkpoint (colour+shape), and evaluations on three label sets; with
    ``clip_weights`` no CLIP is trained and the builds use those weights."""
    if clip_weights is None:
        clip = WorldClipConfig(
            output_dir=str(RUNS / "world_clip"), steps=clip_steps, half=True, threads=threads, progress=False
        )
        clip_weights = train_world_clip(clip)
    weights = _bundle(clip_weights, EMBEDDED_CHECKPOINTS["world"])
    return {
        "clip_log": "runs/world_clip/training_log.json",
        "evaluations": _run_builds(world_builds(weights, samples, other_samples), threads),
    }


def _run_builds(builds: Sequence[PlannedBuild], threads: int) -> dict[str, object]:
    """Run the builds in order (each after exporting its generated data sets); summary.json's entry of each."""
    entries: dict[str, object] = {}
    for build in builds:
        for world_set in build.world_sets:
            world_set.export(build.work)
        heads_sha256 = run_planned_build(build.work, build.settings, threads)
        entries[build.name] = {**build.facts, "heads_sha256": heads_sha256, "shipped": build.ships}
    return entries


PHOTO_HEADS: tuple[Setting, ...] = (("heads.epochs", 8),)  # label-free heads: 8 passes over 6,060 head-split photos


def photo_builds(
    weights: Path,
    holdout: Path,
    val: Path,
    acuity: Path,
    recipe: str = "photos",
    checkpoint_id: str = "photos-tiny202",
    templates: Sequence[str] = (),
    word_sets: Path | None = None,
    settings: Sequence[Setting] = (),
) -> list[PlannedBuild]:
    """The photo recipes' builds on the ``holdout`` photos: the shipped checkpoint evaluated on Tiny-ImageNet val
    first, then the same heads on the ILSVRC2012 val photos (``acuity``), reusing the first build's features."""
    builds: list[PlannedBuild] = []
    folder = RUNS / ("photo_builds" if recipe == "photos" else f"{recipe}_builds")
    # 15 of the 50 validation photos per class (stratified, seeded): held-out agreement near 99% is then measured to
    # about +-0.2 points per K, at a third of the extraction time on 2 cores. All 259 ILSVRC photos are used.
    evaluations: tuple[tuple[str, Path, tuple[Setting, ...]], ...] = (
        ("tiny-val", val, (("data.eval_limit", 3030),)),
        ("ilsvrc-val", acuity, ()),
    )
    for name, eval_dir, limit in evaluations:
        ships = not builds
        out = EMBEDDED_CHECKPOINTS[recipe] if ships else folder / name / "checkpoint"
        build_settings = [
            *backbone_settings(weights, out, REPORTS / recipe / name),
            ("data.source", str(holdout.resolve())),
            ("data.classes_tsv", str(photos.classes_tsv().resolve())),
            *SPLITS,
            ("calibrate.checkpoint_id", checkpoint_id),
            *PHOTO_HEADS,
            *((("data.templates", tuple(templates)),) if templates else ()),
            *((("data.word_sets", str(word_sets.resolve())),) if word_sets is not None else ()),
            *settings,
            ("data.eval_source", str(eval_dir.resolve())),
            *limit,
        ]
        if not ships:  # the same head/gate/calib photos: copy the first build's features, don't redo them
            build_settings.append(("extract.reuse_from", str(builds[0].work / "extract")))
        facts: dict[str, object] = {"eval_dir": str(eval_dir.resolve().relative_to(REPO))}
        builds.append(PlannedBuild(name, folder / name / "work", tuple(build_settings), ships, facts))
    return builds


def photo(
    clip_steps: int,
    threads: int,
    clip_weights: Path | None = None,
    holdout: Path | None = None,
    reuse_world_comparison: bool = False,
    recipe: str = "photos",
    checkpoint_id: str = "photos-tiny202",
    templates: Sequence[str] = (),
    word_sets: Path | None = None,
    settings: Sequence[Setting] = (),
) -> dict[str, object]:
    """Photo CLIP, the shipped ``photos`` checkpoint, evaluated on Tiny-ImageNet val and ILSVRC2012 val photos.

    With ``clip_weights`` no CLIP is trained: the build uses those weights and ``holdout`` (default: the photos
    photo_clip holds out with its default seed). ``recipe`` names the embedded checkpoint and the reports folder
    (``everyday`` builds the everyday CLIP the same way; no world comparison then). ``word_sets``: the builds'
    ``data.word_sets``; ``settings``: further settings of the builds (quant mode, ``calibrate.*``)."""
    train = photos.extract("train")
    val = photos.extract("val")
    acuity = photos.extract("acuity")
    clip_dir = RUNS / "photo_clip"
    if clip_weights is None:
        clip = PhotoClipConfig(
            train_dir=str(train),
            classes_tsv=str(photos.classes_tsv()),
            output_dir=str(clip_dir),
            steps=clip_steps,
            threads=threads,
            eval_dirs=f"{val},{acuity}",
            progress=False,
        )
        clip_weights, holdout = train_photo_clip(clip), clip_dir / HOLDOUT_FILE
    elif holdout is None:
        holdout = holdout_csv(train, RUNS / "photo_holdout")
    weights = _bundle(clip_weights, EMBEDDED_CHECKPOINTS[recipe])
    builds = photo_builds(weights, holdout, val, acuity, recipe, checkpoint_id, templates, word_sets, settings)
    evaluations = _run_builds(builds, threads)
    if recipe != "photos":
        return {"evaluations": evaluations}
    previous = REPORTS / "photos" / "summary.json"
    if reuse_world_comparison and previous.is_file():  # the world weights did not change: neither did this
        comparison = json.loads(previous.read_text())["world_model_on_photos"]
    else:
        comparison = world_model_on_photos(threads)
    return {
        "clip_log": "runs/photo_clip/training_log.json",
        "evaluations": evaluations,
        "world_model_on_photos": comparison,
    }


@dataclass(frozen=True)
class EverydayStage:
    """One resumable run of the everyday CLIP trainer; a stage starts from the previous stage's weights."""

    run: str  # its run directory under runs/
    overrides: tuple[tuple[str, Any], ...]  # EverydayClipConfig fields it sets (the rest keep their defaults)


# The GPU stages' settings: batches of 1024 in bfloat16, cropped on the GPU, read from a pack of the training photos
# (training.embedded.pack) on a lent machine (one H200); ``state.pt`` (70 MB, the optimizer's moments) cannot come back
# from it, so it is written only every 2,000 steps, for a run stopped and continued there.
_GPU_SETTINGS = (
    ("batch_size", 1024),
    ("lr", 6e-4),
    ("warmup_steps", 300),
    ("device", "cuda"),
    ("cuda_bf16", True),
    ("batched_augment", True),
    ("prefetch", 4),
    ("log_every", 50),
    ("checkpoint_every", 2000),
)

# The everyday CLIP as shipped: stage 1 from the photos CLIP (schedule over 1,400 steps, ended at 1,250, 1.5 h on 2
# cores), then stages 2 to 10 each from the previous stage's weights with new batch draws and a fresh, shorter
# cosine schedule (50, 60, 62, 90, 90, 173, 41, 31 and 31 min on 2 cores; stage 7 shared them with other jobs), then
# stage 11 on a lent H200 (2026-11-30): 9,200 steps set by device_stage.sh from the smoke run's 19.4 steps/s, ended
# at step 8,000 (462 s of training) because the call's 10-minute limit came first (startup included); its weights
# are that step's state.pt (``device_stage.sh salvage``), so the stage's entry stops there (``stop_step``).
EVERYDAY_STAGES = (
    EverydayStage("everyday_clip", (("steps", 1400), ("stop_step", 1250))),
    EverydayStage("everyday_clip2", (("steps", 1000), ("lr", 3e-4), ("warmup_steps", 30), ("draw_seed", 1))),
    EverydayStage("everyday_clip3", (("steps", 1200), ("lr", 3e-4), ("warmup_steps", 30), ("draw_seed", 2))),
    EverydayStage("everyday_clip4", (("steps", 1400), ("lr", 3e-4), ("warmup_steps", 30), ("draw_seed", 3))),
    EverydayStage("everyday_clip5", (("steps", 2200), ("lr", 3e-4), ("warmup_steps", 30), ("draw_seed", 4))),
    EverydayStage("everyday_clip6", (("steps", 2400), ("lr", 3e-4), ("warmup_steps", 30), ("draw_seed", 5))),
    EverydayStage("everyday_clip7", (("steps", 2400), ("lr", 3e-4), ("warmup_steps", 30), ("draw_seed", 6))),
    EverydayStage("everyday_clip8", (("steps", 1200), ("lr", 3e-4), ("warmup_steps", 30), ("draw_seed", 7))),
    EverydayStage("everyday_clip9", (("steps", 1200), ("lr", 3e-4), ("warmup_steps", 30), ("draw_seed", 8))),
    EverydayStage("everyday_clip10", (("steps", 1200), ("lr", 3e-4), ("warmup_steps", 30), ("draw_seed", 9))),
    EverydayStage("everyday_clip_gpu", (*_GPU_SETTINGS, ("steps", 9200), ("stop_step", 8000), ("draw_seed", 10))),
    # Stage 12 trains the CLIP to exit (training.embedded.exit_training): an exit head after each of blocks 3 to 11
    # learns with it, each adding 2 x the KL from the full-depth answer to its own and 1 x the concept InfoNCE of its
    # embedding (mean over the heads), their gradients reaching the blocks below; on 2 CPU cores. The ablation that
    # chose these losses (300 steps of each arm, same schedule) is reports/everyday/exit-ablation/.
    EverydayStage(
        "everyday_clip_exit",
        (
            ("steps", 1500),
            ("lr", 1.5e-4),
            ("warmup_steps", 30),
            ("draw_seed", 13),
            ("exit_layers", "3,4,5,6,7,8,9,10,11"),
            ("exit_pooling", "cls"),
            ("exit_distill", 2.0),
            ("exit_contrastive", 1.0),
        ),
    ),
)


# The next stage, for the next lent GPU: from the last stage's weights. ``steps`` is a placeholder:
# training/embedded/device_stage.sh sets the run's steps from the steps per second its smoke run measures on the
# machine; they are recorded here once trained, and the stage then joins EVERYDAY_STAGES, its run folder copied into
# runs/.
GPU_STAGE = EverydayStage("everyday_clip_gpu2", (*_GPU_SETTINGS, ("steps", 6000), ("draw_seed", 11)))


def everyday_stage(
    name: str,
    init_weights: Path,
    threads: int,
    runs_dir: Path,
    pack_dir: Path | None,
    time_limit_s: float = 0.0,
    steps: int | None = None,
    deadline_unix: float = 0.0,
) -> Path:
    """Train one stage of ``EVERYDAY_STAGES`` alone (on a machine with no photo folders, from ``pack_dir``) into
    ``runs_dir / stage``; ``everyday`` then finds it finished. Returns its weights. ``steps`` replaces the stage's
    (a GPU stage's length is set from the steps per second measured on the lent machine; the stage's entry then
    records the steps it ran, so that ``everyday`` finds its run folder finished)."""
    stages = (*EVERYDAY_STAGES, GPU_STAGE)
    stage = next((s for s in stages if s.run == name), None)
    if stage is None:
        raise ValueError(f"no everyday stage {name!r}; the stages are {[s.run for s in stages]}")
    train_dir = EverydayClipConfig.train_dir if pack_dir is not None else str(photos.extract("train"))  # unpacked
    clip = EverydayClipConfig(
        train_dir=train_dir,
        output_dir=str(runs_dir / stage.run),
        init_weights=str(init_weights),
        threads=threads,
        pack_dir="" if pack_dir is None else str(pack_dir),
        time_limit_s=time_limit_s,
        deadline_unix=deadline_unix,
        progress=False,
        **(dict(stage.overrides) | ({} if steps is None else {"steps": steps})),
    )
    return train_everyday_clip(clip)


# The everyday build's settings beyond the photo recipe's.
# * Thresholds must clear each promise on the calibration photos by two standard errors at every K (the default is
#   one): with stage 11's CLIP, one left `balanced` at 95.9% agreement on the held-out everyday 5-way photos (ILSVRC
#   photos of classes no training step saw, against a 97% promise) and `fast` at 90.6% (93%).
# * Each head and gate is charged 0.7 blocks of time in the candidate search: what one candidate cost the shipped
#   stage-11 checkpoint (paper mode, exits after blocks 6, 9 and 11) on the service's backend at batch 1, measured
#   with `python -m training.pipeline.head_cost --batch 1 --rounds 200`: 0.71 and 0.77 in two runs (0.21 and 0.15 at
#   batch 32; the second runs are reports/everyday-v12-paper/head_cost-b1.json and head_cost-b32.json at commit
#   286e06f). On that build's calibration photos any charge from 0.3 to 1.25 kept one exit, after block 6; none kept
#   three (6, 9, 11), which ran the default slower than its own full depth at batch 1 on the bench's photos.
# * The `full` quant mode: every Linear of the blocks INT8, attention projections included (the paper mode leaves
#   those FP32, as open_clip's quantize_dynamic does). On stage 11 it moved held-out top-1 at full depth by at most
#   0.6 points either way on every everyday task (the two builds' everyday_eval.json), and `make bench` timed the
#   default's exits under it at 1.57x / 1.70x open_clip FP32 at batch 1 / 32, against 1.44x / 1.47x under paper mode
#   (the same run, 15 rounds: bench/results/bench-20261130T182613Z-default.md): the FP32 attention projections were
#   most of a block's time.
# * Stage 12 onwards (the CLIP trained to exit): every layer from 3 to 12 is cached and may become a candidate, each
#   charged its own time measured by the build on the machine it runs on (calibrate.charge "measured",
#   training.pipeline.head_cost.candidate_charges: the head, the gate and the span split, at batch 1 and 32), and
#   thresholds are calibrated per label count.
EVERYDAY_SETTINGS: tuple[Setting, ...] = (
    ("calibrate.promise_margin", 2.0),
    ("calibrate.charge", "measured"),
    ("quant_mode", "full"),
)


EVERYDAY_BUILD_PHOTOS = REPO / "data" / "everyday-build"  # the build half of the everyday held-out photos, as files


def everyday_build_source(holdout: Path, cfg: EverydayClipConfig, destination: Path) -> Path:
    """The everyday checkpoint's build photos as one ``path,label`` CSV: the Tiny holdout (wnid labels) and the build
    half of the CIFAR-10 / Intel / flowers held-out photos (``everyday_build_split``; class-name labels, extracted to
    :data:`EVERYDAY_BUILD_PHOTOS`). An everyday class named like a Tiny class (Intel's "mountain") takes its wnid: one
    concept, one label. The LRA-EE build then trains heads, fits gates and calibrates promises on both kinds."""
    with holdout.open(newline="") as table:
        rows = [(row["path"], row["label"]) for row in csv.DictReader(table)]
    index = read_classes_tsv(photos.classes_tsv())
    wnid_of_name = {class_name(wnid, index): wnid for wnid in {label for _, label in rows}}
    build, _ = everyday_build_split(cfg)
    for name, (tar, _) in SET_CLASSES.items():
        wanted = set(build[name])
        with tarfile.open(Path(cfg.everyday_dir) / tar) as archive:
            for info in archive:
                target = EVERYDAY_BUILD_PHOTOS / name / info.name
                if info.isfile() and info.name in wanted and not target.is_file():
                    data = archive.extractfile(info)
                    assert data is not None
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data.read())
        for member in sorted(wanted):
            label = member.split("/")[0]
            rows.append((str(EVERYDAY_BUILD_PHOTOS / name / member), wnid_of_name.get(label, label)))
    destination.parent.mkdir(parents=True, exist_ok=True)
    with destination.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return destination


def everyday_word_sets(source: Path, destination: Path) -> Path:
    """The everyday build's word sets (``data.word_sets``): every class of the build's label set that falls under
    one everyday word (``captions.everyday_word``) gets that word and the words that may stand beside it
    (``captions.unrelated_words``, the everyday-word evaluation's rule), so gates and promises see label sets like
    "dog, car, banana" as well as class names. Each labelled everyday set (CIFAR-10, Intel, flowers) is also a class
    group (its classes in the build's label set, when at least two): its photos are calibrated with all of its own
    classes as the label set, as the held-out evaluation and clients ask ("airplane, automobile, bird, ...")."""
    index = read_classes_tsv(photos.classes_tsv())
    raw = scan_source(str(source))
    labels = build_label_set(DataConfig(source=str(source), classes_tsv=str(photos.classes_tsv())), raw, index)
    wnid_of_set_name = {name: wnid for _, classes in SET_CLASSES.values() for name, wnid in classes.items()}
    net = wordnet()
    classes: dict[str, dict[str, object]] = {}
    for key, label in sorted(labels.by_key.items(), key=lambda item: item[1]):
        wnid = key if is_wnid(key) else wnid_of_set_name.get(key)
        word = None if wnid is None else everyday_word(wnid, net)
        if wnid is None or word is None:
            continue
        classes[labels.names[label]] = {"word": word, "others": unrelated_words(wnid, word, net)}
    for name in set(labels.names) & set(EVERYDAY_CONCEPTS):  # a word that is a class name shares its label
        if classes.get(name, {}).get("word") != name:
            raise RuntimeError(f"class {name!r} is named like the everyday word but is not that concept")
    present = {name: sorted(set(members) & set(labels.names)) for name, (_, members) in SET_CLASSES.items()}
    groups = {name: members for name, members in present.items() if len(members) >= 2}  # a group of one is no set
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(json.dumps({"classes": classes, "groups": groups}, indent=1) + "\n")
    return destination


def everyday(
    threads: int,
    init_weights: Path,
    stages: Sequence[EverydayStage] = EVERYDAY_STAGES,
    clip_weights: Path | None = None,
) -> dict[str, object]:
    """The everyday CLIP (``stages`` in turn, the first warm-started from ``init_weights``, the photos CLIP), the
    shipped ``everyday`` checkpoint built like ``photos`` (same holdout photos, same LRA-EE build and K-sweeps), and
    the everyday evaluation on held-out photos with users' label sets (``training.embedded.everyday_eval``).

    With ``clip_weights`` (the shipped CLIP, say, to rebuild its exits) no stage trains: the builds use those weights
    and the Tiny photos every stage holds out (the stages' seeded split, recomputed), and the stages' logs are the
    copies in ``reports/everyday``."""
    from .everyday_eval import REPORT_FILE, evaluate

    train = photos.extract("train")
    first = len(stages) if clip_weights is not None else _last_finished_stage(stages)  # the stages before it are
    # done: their run folders need not be here
    weights = init_weights if first == 0 else RUNS / stages[first - 1].run / WEIGHTS_FILE
    if clip_weights is not None:
        weights = clip_weights
    logs = [_stage_log(number, stage) for number, stage in enumerate(stages[:first], start=1)]
    holdouts = []
    for stage in stages[first:]:
        clip_dir = RUNS / stage.run
        clip = EverydayClipConfig(
            train_dir=str(train),
            output_dir=str(clip_dir),
            init_weights=str(weights),
            threads=threads,
            progress=False,
            **dict(stage.overrides),
        )
        weights = train_everyday_clip(clip)
        logs.append(clip_dir / LOG_FILE)
        holdouts.append((clip_dir / HOLDOUT_FILE).read_text())
    if clip_weights is not None:  # the split every stage made (EverydayClipConfig's defaults; no stage sets them)
        split = EverydayClipConfig(train_dir=str(train))
        holdout = holdout_csv(train, RUNS / "everyday_holdout", split.holdout_per_class, split.seed)
    elif len(set(holdouts)) > 1:  # every stage holds out the same photos (seed 0), or the build would see trained ones
        raise RuntimeError("the everyday stages' holdout.csv files differ")
    else:  # the same file in every stage run here (checked above); the last stage's when every stage had finished
        holdout = RUNS / stages[min(first, len(stages) - 1)].run / HOLDOUT_FILE
    source = everyday_build_source(holdout, EverydayClipConfig(train_dir=str(train)), RUNS / "everyday_build.csv")
    words = everyday_word_sets(source, RUNS / "everyday_word_sets.json")
    summary = photo(
        0,
        threads,
        weights,
        source,
        recipe="everyday",
        checkpoint_id="everyday-tiny",
        templates=EVERYDAY_TEMPLATES,
        word_sets=words,
        settings=EVERYDAY_SETTINGS,
    )
    report = evaluate(EMBEDDED_CHECKPOINTS["everyday"], EverydayClipConfig(train_dir=str(train)), sample=500, seed=0)
    out = REPORTS / "everyday" / "everyday-eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    summary["everyday_eval"] = _relative(out / REPORT_FILE)
    summary["clip_log"] = _relative(logs[-1])
    summary["clip_stages"] = [_relative(log) for log in logs]
    for number, log in enumerate(logs, start=1):  # every stage's log beside the summary (the last one also as
        copy = REPORTS / "everyday" / f"clip_training_log.stage{number}.json"  # clip_training_log)
        if log.resolve() != copy.resolve():
            shutil.copyfile(log, copy)
    return summary


def _last_finished_stage(stages: Sequence[EverydayStage]) -> int:
    """The index of the last stage whose run folder holds its final weights and log (0 when none does): the recipe
    resumes there, so a machine that kept only the last finished stage (or took it back from a lent GPU) does not
    retrain the stages before it."""
    for index in range(len(stages) - 1, -1, -1):
        folder = RUNS / stages[index].run
        log = folder / LOG_FILE
        finished = (folder / WEIGHTS_FILE).is_file() and log.is_file()
        end = EverydayClipConfig(**dict(stages[index].overrides)).end_step
        if finished and json.loads(log.read_text()).get("steps") == end:
            return index
    return 0


def _stage_log(number: int, stage: EverydayStage) -> Path:
    """The training log of stage ``number`` (from 1), which the recipe does not run again: its run folder's when
    there is one, else the copy an earlier run of the recipe left in ``reports/everyday``."""
    for log in (RUNS / stage.run / LOG_FILE, REPORTS / "everyday" / f"clip_training_log.stage{number}.json"):
        if log.is_file():
            return log
    raise FileNotFoundError(f"stage {number} ({stage.run}) is skipped and its training log is nowhere to be found")


def world_model_on_photos(threads: int) -> dict[str, object]:
    """The other candidate default, measured the same way: the world CLIP's FP32 zero-shot on the same photos."""
    torch.set_num_threads(threads)
    model, preprocess, tokenizer = build_model(EMBEDDED_CHECKPOINTS["world"] / "weights.safetensors")
    wnids = photos.tiny_wnids()
    return {
        name: zero_shot_top1(
            model, tokenizer, preprocess, scan_photos(photos.extract(subset), photos.classes_tsv(), wnids), TEMPLATES
        )
        for name, subset in (("tiny-val", "val"), ("ilsvrc-val", "acuity"))
    }


def _finish(recipe: str, summary: dict[str, object], clip_log: Path | None) -> None:
    evaluations = summary["evaluations"]
    assert isinstance(evaluations, dict)
    # Builds on the same training data must reproduce the shipped heads exactly; other label sets train their own.
    shipped = next(entry for entry in evaluations.values() if entry["shipped"])
    same_data = [e for e in evaluations.values() if e.get("label_set") == shipped.get("label_set")]
    summary["same_heads_as_shipped"] = all(e["heads_sha256"] == shipped["heads_sha256"] for e in same_data)
    directory = REPORTS / recipe
    directory.mkdir(parents=True, exist_ok=True)
    if clip_log is not None and clip_log.is_file():
        log = json.loads(clip_log.read_text())
        summary["clip"] = {k: v for k, v in log.items() if k != "history"}
        shutil.copyfile(clip_log, directory / "clip_training_log.json")
    else:  # weights trained elsewhere: the committed log of their training run stays as it is
        summary["clip"] = {"note": "CLIP weights given with --clip-weights; not trained by this run"}
    (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "clip"}, indent=2))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m training.embedded.recipes world|photos``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", choices=("world", "photos", "everyday", "everyday-stage"))
    parser.add_argument("stage", nargs="?", help="everyday-stage: the stage's run name (EVERYDAY_STAGES)")
    parser.add_argument("--pack-dir", type=Path, help="everyday-stage: train from this pack (training.embedded.pack)")
    parser.add_argument("--runs-dir", type=Path, default=RUNS, help="everyday-stage: where the stage's run folder goes")
    parser.add_argument("--time-limit-s", type=float, default=0.0, help="everyday-stage: stop after so much training")
    parser.add_argument(
        "--deadline-unix", type=float, default=0.0, help="everyday-stage: stop by this wall-clock time (Unix seconds)"
    )
    parser.add_argument(
        "--clip-steps",
        type=int,
        default=None,
        help="CLIP training steps (world 700, photos 1200; everyday-stage: the stage's)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=2400, help="world images per build's data and eval set")
    parser.add_argument(
        "--other-samples", type=int, help="world: images of the shapes / colours builds (default: --samples)"
    )
    parser.add_argument(
        "--clip-weights",
        type=Path,
        help="build on these CLIP weights, train none (everyday: e.g. lraee_core/assets/everyday/weights.safetensors)",
    )
    parser.add_argument(
        "--reuse-world-comparison", action="store_true", help="photos: keep summary.json's world-model zero-shot"
    )
    parser.add_argument("--holdout", type=Path, help="photos: the build's photos (path,label CSV) for --clip-weights")
    parser.add_argument("--clip-dir", type=Path, help="photos: a photo-clip run dir (weights, holdout, log) to use")
    parser.add_argument(
        "--init-weights",
        type=Path,
        default=EMBEDDED_CHECKPOINTS["photos"] / "weights.safetensors",
        help="everyday: the CLIP weights it starts from (default: the photos CLIP)",
    )
    args = parser.parse_args(argv)
    # The builds' progress lines (logger "training") on stderr; open_clip's INFO chatter stays quiet.
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("training").setLevel(logging.INFO)
    if args.recipe == "everyday-stage":
        if args.stage is None:
            parser.error("everyday-stage needs the stage's run name")
        weights = everyday_stage(
            args.stage,
            args.init_weights,
            args.threads,
            args.runs_dir,
            args.pack_dir,
            args.time_limit_s,
            args.clip_steps,
            args.deadline_unix,
        )
        print(weights)
    elif args.recipe == "everyday":
        if args.clip_steps is not None:
            parser.error("everyday: the CLIP's stages and their steps are EVERYDAY_STAGES, not flags")
        summary = everyday(args.threads, args.init_weights, clip_weights=args.clip_weights)
        last_log = RUNS / EVERYDAY_STAGES[-1].run / "training_log.json"
        if args.clip_weights is not None:  # no stage ran: the last stage's log is its copy in the reports
            last_log = _stage_log(len(EVERYDAY_STAGES), EVERYDAY_STAGES[-1])
        _finish("everyday", summary, last_log)
    elif args.recipe == "world":
        summary = world(args.clip_steps or 700, args.threads, args.samples, args.clip_weights, args.other_samples)
        _finish("world", summary, None if args.clip_weights else RUNS / "world_clip" / "training_log.json")
    else:
        weights, holdout = args.clip_weights, args.holdout
        log: Path | None = RUNS / "photo_clip" / "training_log.json"
        if args.clip_dir is not None:
            weights, holdout = args.clip_dir / "weights.safetensors", args.clip_dir / "holdout.csv"
            log = args.clip_dir / "training_log.json"
        elif weights is not None:
            log = None
        summary = photo(args.clip_steps or 1200, args.threads, weights, holdout, args.reuse_world_comparison)
        if args.clip_dir is not None or weights is not None:
            summary["clip_log"] = None if log is None else _relative(log)
        _finish("photos", summary, log)


if __name__ == "__main__":
    main()
