"""The recipes run the pipeline from config objects and record the command a user would retype for each build."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lraee_core.assets import EMBEDDED_CHECKPOINTS
from lraee_core.checkpoint import read_manifest
from training.embedded import photos, recipes
from training.embedded.captions import WORDNET_DIR
from training.embedded.recipes import (
    EVERYDAY_SETTINGS,
    EVERYDAY_TEMPLATES,
    REPO,
    RUNS,
    EverydayStage,
    PlannedBuild,
    backbone_settings,
    build_job,
    everyday_word_sets,
    photo_builds,
    run_planned_build,
    world_builds,
)
from training.embedded.world import WorldSet
from training.pipeline.cli import CONFIG_FILE, parser, resolve_config
from training.pipeline.config import BuildConfig, load_build_config
from training.pipeline.jobs import Job, path_roots, portable_paths
from training.pipeline.word_sets import WordSets


def _retyped(job: Job) -> BuildConfig:
    """The config ``lraee-train`` resolves from the job's recorded command (in a work dir without a config.json)."""
    assert job.argv[0] == "lraee-train"
    return resolve_config(parser().parse_args(list(job.argv[1:])))


def _flags(command: list[str]) -> list[tuple[str, str]]:
    """A command's (flag, value) pairs, sorted: the same build whatever the flags' order."""
    pairs = list(zip(command[2::2], command[3::2], strict=True))
    return sorted(pairs)


def _shipped_command(build: PlannedBuild, threads: int) -> list[str]:
    job = build_job(build.work, build.settings, threads)
    command: list[str] = portable_paths(list(job.argv), path_roots(job))
    return command


def _manifest_command(name: str) -> list[str]:
    manifest = json.loads((EMBEDDED_CHECKPOINTS[name] / "manifest.json").read_text())
    command: list[str] = manifest["calibration"]["command"]
    return command


def test_every_world_build_command_retypes_to_its_config(tmp_path: Path) -> None:
    builds = world_builds(tmp_path / "weights.safetensors", samples=64, other_samples=32)
    assert [b.ships for b in builds] == [True, False, False, False]
    for build in builds:
        job = build_job(tmp_path / build.name, build.settings, threads=2)
        assert _retyped(job) == job.config
    # the held-out colour+shape build copies the shipped build's features; the other label sets use fewer images
    assert dict(builds[1].settings)["extract.reuse_from"] == str(builds[0].work / "extract")
    shapes = builds[2]
    assert shapes.world_sets == (WorldSet("train", "shapes", 32), WorldSet("test", "shapes", 32))
    assert dict(shapes.settings)["data.source"] == str(shapes.work / "world" / "train-shapes-32" / "labels.csv")
    assert dict(shapes.settings)["data.classes_file"] == str(shapes.work / "world" / "train-shapes-32" / "classes.txt")


def test_the_committed_paths_the_shipped_manifests_record_resolve() -> None:
    """What a shipped manifest records under ``${repo}`` in committed folders (its reports, the architecture) is
    there; ``runs/`` and ``data/`` hold the recipes' uncommitted inputs and outputs."""
    recorded = {
        (name, path)
        for name, directory in EMBEDDED_CHECKPOINTS.items()
        for path in re.findall(
            r"\$\{repo\}/((?:reports|lraee_core)/[^\"\s]*)", (directory / "manifest.json").read_text()
        )
    }
    assert {name for name, _ in recorded} == set(EMBEDDED_CHECKPOINTS)
    assert [(name, path) for name, path in sorted(recorded) if not (REPO / path).exists()] == []


def test_settings_become_config_fields_and_flags(tmp_path: Path) -> None:
    settings = [
        ("heads.epochs", 8),
        ("data.head_split", 0.6),
        ("calibrate.label_counts", (2, 5, 0)),
        ("data.templates", ("a {}.", "the {}")),
    ]
    job = build_job(tmp_path, settings, threads=1)
    assert job.config.heads.epochs == 8 and job.config.data.head_split == 0.6
    assert job.config.calibrate.label_counts == (2, 5, 0)
    assert job.config.data.templates == ("a {}.", "the {}")
    assert list(job.argv[6:]) == [
        "--epochs", "8", "--head-split", "0.6", "--calib-label-counts", "2,5,0", "--template", "a {}.",
        "--template", "the {}",
    ]  # fmt: skip
    assert _retyped(job) == job.config


def _world_sets_exported(command: list[str]) -> list[str]:
    """A command recorded before the pipeline stopped generating the world (issue 40), with its ``world:S:L:N`` data
    specs as the exported sets the recipe now names: the same images (``${work}/world/...``, the folder those specs
    were exported to) and the same label set (the set's classes.txt)."""
    out: list[str] = []
    for flag, value in zip(command[::2], command[1::2], strict=True):
        if value.startswith("world:"):
            split, label_set, n = value.split(":")[1:]
            folder = f"${{work}}/world/{split}-{label_set.replace('+', '_')}-{n}"
            out += [flag, f"{folder}/labels.csv"]
            if flag == "--data":
                out += ["--classes-file", f"{folder}/classes.txt"]
        else:
            out += [flag, value]
    return out


def test_shipped_world_build_records_the_shipped_manifests_command() -> None:
    [shipped, *_] = world_builds(EMBEDDED_CHECKPOINTS["world"] / "weights.safetensors", samples=2400)
    recorded = _manifest_command("world")
    assert _flags(_shipped_command(shipped, threads=1)) == _flags(recorded[:2] + _world_sets_exported(recorded[2:]))


@pytest.mark.parametrize("recipe", ["photos", "everyday"])
def test_shipped_photo_builds_record_the_shipped_manifests_command(recipe: str) -> None:
    try:
        photos.source_dir()
    except photos.PhotosUnavailable as error:
        pytest.skip(f"real photos absent: {error}")
    data = REPO / "data" / "imagenet-photos"
    weights = EMBEDDED_CHECKPOINTS[recipe] / "weights.safetensors"
    if recipe == "photos":
        builds = photo_builds(weights, RUNS / "photo_holdout" / "holdout.csv", data / "val", data / "acuity")
        threads = 1
    else:
        source = RUNS / "everyday_build.csv"  # the Tiny holdout + the everyday build half (everyday_build_source)
        words = RUNS / "everyday_word_sets.json"  # its classes' everyday words (everyday_word_sets)
        builds = photo_builds(
            weights,
            source,
            data / "val",
            data / "acuity",
            "everyday",
            "everyday-tiny",
            EVERYDAY_TEMPLATES,
            words,
            EVERYDAY_SETTINGS,
        )
        threads = 2
    assert [b.ships for b in builds] == [True, False]
    assert _flags(_shipped_command(builds[0], threads)) == _flags(_manifest_command(recipe))
    # Each build sets each field once and writes its own checkpoint and report (a later build once inherited the
    # first one's settings, and so overwrote the shipped checkpoint and the tiny-val report).
    for build in builds:
        keys = [key for key, _ in build.settings]
        assert len(keys) == len(set(keys)), build.name
    first, second = (dict(build.settings) for build in builds)
    assert first["checkpoint_dir"] != second["checkpoint_dir"] and first["report_dir"] != second["report_dir"]


@pytest.mark.slow
def test_a_recipe_build_runs_from_its_settings_and_records_its_command(tmp_path: Path) -> None:
    settings = [
        *backbone_settings(
            EMBEDDED_CHECKPOINTS["world"] / "weights.safetensors", tmp_path / "out", tmp_path / "report"
        ),
        ("data.source", str(WorldSet("train", "shapes", 48).export(tmp_path / "work") / "labels.csv")),
        ("data.classes_file", str(WorldSet("train", "shapes", 48).classes(tmp_path / "work"))),
        ("data.eval_source", str(WorldSet("test", "shapes", 16).export(tmp_path / "work") / "labels.csv")),
        ("profile.num_images", 8),
        ("heads.epochs", 1),
        ("heads.batch_size", 8),
        ("evaluate.engine_check_images", 4),
        ("calibrate.checkpoint_id", "recipe-smoke"),
    ]
    heads_sha256 = run_planned_build(tmp_path / "work", settings, threads=2)
    manifest = read_manifest(tmp_path / "out")
    assert manifest.heads_sha256 == heads_sha256 and manifest.checkpoint_id == "recipe-smoke"
    job = build_job(tmp_path / "work", settings, threads=2)
    assert manifest.calibration["command"] == portable_paths(list(job.argv), path_roots(job))
    # later steps in the work dir need only --work-dir: the build's config was written there
    saved = load_build_config(tmp_path / "work" / CONFIG_FILE)
    assert saved == job.config


def test_everyday_build_source_adds_the_build_half_and_never_the_evaluation_half(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The everyday build's photos: the Tiny holdout rows as they are, plus the build half of every labelled everyday
    set's held-out members (extracted, named by class; "mountain" takes the Tiny class's wnid), none of the rest."""
    import csv
    import io
    import tarfile

    from training.embedded import recipes
    from training.embedded.everyday import FLICKR_TAR, SET_CLASSES, EverydayClipConfig, everyday_build_split

    def tar(path: Path, members: list[str]) -> None:
        with tarfile.open(path, "w") as archive:
            for name in members:
                info = tarfile.TarInfo(name)
                info.size = len(name)
                archive.addfile(info, io.BytesIO(name.encode()))

    everyday_dir = tmp_path / "everyday"
    everyday_dir.mkdir()
    for _, (tar_name, classes) in SET_CLASSES.items():
        tar(everyday_dir / tar_name, [f"{c}/{i}.jpg" for c in classes for i in range(10)])
    tar(everyday_dir / FLICKR_TAR, [f"flickr/{i}.jpg" for i in range(20)])
    mountain = "n09359803"
    (tmp_path / "classes.tsv").write_text(f"wnid\tindex\n{mountain}\t970\nn01443537\t1\n")
    holdout = tmp_path / "holdout.csv"
    holdout.write_text("path,label\n/t/a.JPEG,n01443537\n/t/b.JPEG,n09359803\n")
    monkeypatch.setattr(recipes, "EVERYDAY_BUILD_PHOTOS", tmp_path / "build")
    monkeypatch.setattr(recipes.photos, "classes_tsv", lambda: tmp_path / "classes.tsv")
    cfg = EverydayClipConfig(everyday_dir=str(everyday_dir), flickr_eval_images=5)

    with (recipes.everyday_build_source(holdout, cfg, tmp_path / "source.csv")).open() as handle:
        rows = [(row["path"], row["label"]) for row in csv.DictReader(handle)]
    build, evaluation = everyday_build_split(cfg)
    assert rows[:2] == [("/t/a.JPEG", "n01443537"), ("/t/b.JPEG", mountain)]
    added = {Path(path).relative_to(tmp_path / "build").as_posix(): label for path, label in rows[2:]}
    expected = {f"{name}/{member}" for name, members in build.items() for member in members}
    assert set(added) == expected and len(added) == len(rows) - 2
    assert not {f"{name}/{m}" for name in SET_CLASSES for m in evaluation[name]} & set(added)
    assert all(
        label == (mountain if key.split("/")[1] == "mountain" else key.split("/")[1]) for key, label in added.items()
    )
    assert all((tmp_path / "build" / key).read_bytes() == key.split("/", 1)[1].encode() for key in added)


def test_everyday_word_sets_give_each_class_its_word_and_the_words_beside_it(tmp_path: Path) -> None:
    try:
        photos.source_dir()
    except photos.PhotosUnavailable as error:
        pytest.skip(f"real photos absent: {error}")
    if not (WORDNET_DIR / "data.noun").exists():
        pytest.skip("WordNet 3.0 not installed")
    source = tmp_path / "build.csv"
    labels = ["n02085620", "n02085620", "n07753592", "cat", "automobile", "buildings", "sea"]
    for i in range(len(labels)):
        (tmp_path / f"{i}.jpg").write_bytes(b"")  # the manifest's files must exist; they are never read
    source.write_text("path,label\n" + "".join(f"{i}.jpg,{label}\n" for i, label in enumerate(labels)))
    document = json.loads(everyday_word_sets(source, tmp_path / "out" / "word_sets.json").read_text())
    classes = document["classes"]
    assert classes["Chihuahua"]["word"] == "dog" and classes["banana"]["word"] == "fruit"
    assert classes["cat"]["word"] == "cat" and classes["automobile"]["word"] == "car"
    assert "animal" not in classes["Chihuahua"]["others"] and "car" in classes["Chihuahua"]["others"]
    assert classes["buildings"]["word"] == "building"  # Intel's class, by its pinned synset
    assert set(classes) == {"Chihuahua", "banana", "cat", "automobile", "buildings", "sea"}
    # each everyday set with two or more classes in the build is a class group (flowers has none here)
    assert document["groups"] == {"cifar10": ["automobile", "cat"], "intel": ["buildings", "sea"]}
    words = WordSets.from_json(document, list(classes))  # the pipeline reads it back
    assert words.label_of[words.words.index("cat")] == list(classes).index("cat")  # the class "cat" is the word


def test_the_everyday_recipe_resumes_at_its_last_finished_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recipes, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(recipes, "REPORTS", tmp_path / "reports")
    stages = tuple(
        EverydayStage(f"s{n}", (("steps", 10 * n), ("stop_step", 5 * n if n == 1 else 0))) for n in (1, 2, 3)
    )

    def finish(stage: EverydayStage, steps: int, weights: bool = True) -> None:
        folder = tmp_path / "runs" / stage.run
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "training_log.json").write_text(json.dumps({"steps": steps}))
        if weights:
            (folder / "weights.safetensors").write_bytes(b"w")

    assert recipes._last_finished_stage(stages) == 0  # nothing run: start at the beginning
    finish(stages[0], 5)  # stage 1 stops at its stop_step
    assert recipes._last_finished_stage(stages) == 0
    finish(stages[2], 17)  # stage 3 stopped short of its end: not finished
    assert recipes._last_finished_stage(stages) == 0
    finish(stages[1], 20, weights=False)  # a log without weights is not finished
    assert recipes._last_finished_stage(stages) == 0
    finish(stages[1], 20)
    assert recipes._last_finished_stage(stages) == 1
    finish(stages[2], 30)
    assert recipes._last_finished_stage(stages) == 2
    # a skipped stage's log: its run folder's, else the copy an earlier run left in the reports, else an error
    assert recipes._stage_log(2, stages[1]) == tmp_path / "runs" / "s2" / "training_log.json"
    missing = EverydayStage("gone", ())
    with pytest.raises(FileNotFoundError, match="gone"):
        recipes._stage_log(4, missing)
    copy = tmp_path / "reports" / "everyday" / "clip_training_log.stage4.json"
    copy.parent.mkdir(parents=True)
    copy.write_text("{}")
    assert recipes._stage_log(4, missing) == copy
