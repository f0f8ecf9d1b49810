"""The generated world: determinism, held-out combos and wordings, unambiguous labels, export."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from torchvision.datasets import ImageFolder

from training.embedded.trainer import register_model_config
from training.embedded.world import (
    COLOUR_NAMES,
    COLOURS,
    HELD_OUT_COMBOS,
    HELD_OUT_TEMPLATES,
    LABEL_SETS,
    SHAPE_PLURALS,
    SHAPES,
    SPLITS,
    TRAIN_TEMPLATES,
    WorldDataset,
    WorldSet,
    WorldSpec,
    class_phrases,
    export_imagefolder,
    generate,
    generate_labelled,
    label_names,
    labelled_set,
    split_combos,
)
from training.pipeline.config import DataConfig
from training.pipeline.data import DataError, make_splits

N = 300  # scenes per split per check: enough to hit every scene kind and template many times


def _combos(attributes: dict) -> set[tuple[str, str]]:
    return {(o["colour"], o["shape"]) for o in attributes["objects"]}


def test_same_index_gives_identical_pixels_and_caption() -> None:
    for split in SPLITS:
        first, second = generate(7, split), generate(7, split)
        assert np.array_equal(np.asarray(first.image), np.asarray(second.image))
        assert first.caption == second.caption
        assert first.attributes == second.attributes
    labelled = [generate_labelled(3, "test", "shapes") for _ in range(2)]
    assert np.array_equal(np.asarray(labelled[0].image), np.asarray(labelled[1].image))


def test_index_split_and_seed_change_the_scene() -> None:
    reference = np.asarray(generate(0, "train").image)
    assert not np.array_equal(reference, np.asarray(generate(1, "train").image))
    assert not np.array_equal(reference, np.asarray(generate(0, "test").image))
    assert not np.array_equal(reference, np.asarray(generate(0, "train", WorldSpec(seed=1)).image))


def test_images_are_rgb_of_the_spec_size() -> None:
    sample = generate(0, "train", WorldSpec(image_size=48))
    assert sample.image.mode == "RGB"
    assert sample.image.size == (48, 48)


def test_held_out_combos_leave_every_colour_and_shape_in_training() -> None:
    train = split_combos("train")
    assert {colour for colour, _ in train} == set(COLOUR_NAMES)
    assert {shape for _, shape in train} == set(SHAPES)
    assert 0.1 <= len(HELD_OUT_COMBOS) / (len(COLOUR_NAMES) * len(SHAPES)) <= 0.2
    assert set(split_combos("heldout")) == HELD_OUT_COMBOS
    assert len(split_combos("test")) == len(COLOUR_NAMES) * len(SHAPES)


def test_held_out_combos_never_drawn_in_train() -> None:
    for index in range(N):
        assert not _combos(generate(index, "train").attributes) & HELD_OUT_COMBOS
        assert not _combos(generate_labelled(index, "train", "colour+shape").attributes) & HELD_OUT_COMBOS


def test_heldout_split_draws_only_held_out_combos_and_test_draws_both() -> None:
    test_combos: set[tuple[str, str]] = set()
    for index in range(N):
        assert _combos(generate(index, "heldout").attributes) <= HELD_OUT_COMBOS
        assert _combos(generate_labelled(index, "heldout", "shapes").attributes) <= HELD_OUT_COMBOS
        test_combos |= _combos(generate(index, "test").attributes)
    assert test_combos & HELD_OUT_COMBOS
    assert test_combos - HELD_OUT_COMBOS


def _fixed_text(template: str) -> str:
    """The longest literal part of a template: what betrays its use in a caption."""
    return max(re.split(r"\{\w+\}", template), key=len).strip(" .")


def test_held_out_templates_never_used_in_train_captions() -> None:
    held_out_text = [_fixed_text(template) for template in HELD_OUT_TEMPLATES]
    assert all(len(text) >= 8 for text in held_out_text)
    assert not set(TRAIN_TEMPLATES) & set(HELD_OUT_TEMPLATES)
    used = set()
    for index in range(N):
        sample = generate(index, "train")
        used.add(sample.attributes["template"])
        for text in held_out_text:
            assert text not in sample.caption
    assert used <= set(TRAIN_TEMPLATES)
    assert len(used) == len(TRAIN_TEMPLATES)  # every training wording actually occurs


def test_evaluation_splits_use_held_out_wordings() -> None:
    for split in ("heldout", "test"):
        assert {generate(i, split).attributes["template"] for i in range(50)} <= set(HELD_OUT_TEMPLATES)


def test_captions_name_only_what_is_drawn() -> None:
    words = {name: re.compile(rf"\b({name}|{SHAPE_PLURALS.get(name, name)})\b") for name in (*COLOUR_NAMES, *SHAPES)}
    for split in SPLITS:
        for index in range(N):
            sample = generate(index, split)
            drawn = {o["colour"] for o in sample.attributes["objects"]} | {
                o["shape"] for o in sample.attributes["objects"]
            }
            mentioned = {name for name, pattern in words.items() if pattern.search(sample.caption)}
            assert mentioned, sample.caption
            assert mentioned <= drawn, sample.caption
            if sample.attributes["kind"] == "same":
                count = {2: "two", 3: "three"}[sample.attributes["count"]]
                assert count in sample.caption.split()


def test_captions_fit_the_text_context_without_truncation() -> None:
    register_model_config()
    tokenizer = open_clip.get_tokenizer("lraee-tiny-vit12")
    captions = [generate(i, split).caption for split in SPLITS for i in range(N)]
    longest = max(len(tokenizer.encode(caption)) for caption in captions)
    assert longest + 2 <= tokenizer.context_length  # + start- and end-of-text tokens


def test_shape_colour_is_visible_in_the_image() -> None:
    """Pixels close to the named colour cover at least a small shape's area: colour words are learnable."""
    for index in range(100):
        sample = generate_labelled(index, "test", "colours")
        pixels = np.asarray(sample.image).reshape(-1, 3).astype(np.float32)
        colour = np.array(COLOURS[sample.attributes["objects"][0]["colour"]], dtype=np.float32)
        near = np.linalg.norm(pixels - colour, axis=1) < 50
        assert near.sum() >= 40, sample.attributes


@pytest.mark.parametrize("label_set", LABEL_SETS)
def test_label_sets_give_one_unambiguous_label(label_set: str) -> None:
    names = label_names(label_set)
    assert len(set(names)) == len(names) == len(class_phrases(label_set))
    for index in range(100):
        sample = generate_labelled(index, "test", label_set)
        (only,) = sample.attributes["objects"]
        expected = {
            "shapes": only["shape"],
            "colours": only["colour"],
            "colour+shape": f"{only['colour']} {only['shape']}",
        }
        assert names[sample.label] == expected[label_set]


def test_labelled_set_lists_names_images_and_labels() -> None:
    names, images, labels = labelled_set("heldout", "colour+shape", 20)
    assert names == label_names("colour+shape")
    assert len(images) == len(labels) == 20
    assert {tuple(names[label].split()) for label in labels} <= HELD_OUT_COMBOS
    assert labels == [generate_labelled(i, "heldout", "colour+shape").label for i in range(20)]


def test_label_sets_share_the_scene_of_an_index() -> None:
    images = [np.asarray(generate_labelled(5, "heldout", label_set).image) for label_set in LABEL_SETS]
    assert all(np.array_equal(images[0], image) for image in images[1:])


def test_unknown_split_or_label_set_is_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        generate(0, "validation")
    with pytest.raises(ValueError, match="label set"):
        generate_labelled(0, "test", "sizes")


def test_plurals_are_words() -> None:
    assert SHAPE_PLURALS["cross"] == "crosses"
    assert SHAPE_PLURALS["circle"] == "circles"


def test_dataset_yields_image_tensor_and_token_ids() -> None:
    register_model_config()
    _, _, preprocess = open_clip.create_model_and_transforms("lraee-tiny-vit12", pretrained=None)
    tokenizer = open_clip.get_tokenizer("lraee-tiny-vit12")
    dataset = WorldDataset("train", 10, None, preprocess, tokenizer)
    image, tokens = dataset[3]
    assert len(dataset) == 10
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert tokens.shape == (32,)
    assert torch.equal(tokens, tokenizer([generate(3, "train").caption])[0])
    with pytest.raises(IndexError):
        dataset[10]


def test_export_imagefolder_round_trips(tmp_path: Path) -> None:
    root = export_imagefolder(tmp_path / "colours", "heldout", "colour+shape", 12)
    folder = ImageFolder(str(root))
    assert len(folder) == 12
    with (root / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    names = (root / "classes.txt").read_text().split("\n")[:-1]
    assert names == list(label_names("colour+shape"))
    for index, row in enumerate(rows):
        assert names[int(row["label_index"])] == row["label"]
        assert row["path"].split("/")[0] == row["label"].replace(" ", "_")
        assert tuple(row["label"].split()) in HELD_OUT_COMBOS
        expected = generate_labelled(index, "heldout", "colour+shape")
        assert np.array_equal(np.asarray(folder.loader(str(root / row["path"]))), np.asarray(expected.image))


def test_an_exported_world_set_is_a_source_the_pipeline_reads(tmp_path: Path) -> None:
    world_set = WorldSet("test", "shapes", 40)
    assert world_set.export(tmp_path) == tmp_path / "world" / "test-shapes-40"
    config = DataConfig(
        source=str(world_set.labels(tmp_path)),
        classes_file=str(world_set.classes(tmp_path)),
        head_split=0.5,
        gate_split=0.2,
        calib_split=0.15,
    )
    splits = make_splits(config)
    assert splits.labels == tuple(label_names("shapes"))  # classes.txt, each class present or not
    assert sum(len(s.items) for s in splits.splits.values()) == 40
    stamp = world_set.labels(tmp_path).stat().st_mtime_ns
    world_set.export(tmp_path)  # exported once: a second build on the same set reads the same files
    assert world_set.labels(tmp_path).stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="exported to a folder first"):  # the spec earlier builds took
        make_splits(DataConfig(source="world:test:shapes:40"))
