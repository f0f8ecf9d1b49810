"""The everyday trainer's pieces: the concept loss, seeded batches, and held-out splits that never overlap."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training.clip.captions import ClassCaptions
from training.clip.everyday import (
    BUILD_SHARE,
    SET_CLASSES,
    EverydayClipConfig,
    Source,
    concept_loss,
    concept_positives,
    draw_batch,
    everyday_build_split,
    everyday_eval_split,
    flickr_split,
    parse_mix,
    split_members,
)


def test_concept_positives_shared_caption_is_positive_for_every_covered_image() -> None:
    dog, chihuahua, beagle, cat = "wn:dog", "wn:chihuahua", "wn:beagle", "wn:cat"
    concepts = [dog, chihuahua, cat]  # caption j means concepts[j]
    images = [frozenset({chihuahua, dog}), frozenset({beagle, dog}), frozenset({cat})]
    positives = concept_positives(concepts, images)
    assert positives.tolist() == [[True, True, False], [True, False, False], [False, False, True]]


def test_concept_loss_equals_clip_loss_when_all_concepts_differ() -> None:
    torch.manual_seed(0)
    image = F.normalize(torch.randn(6, 8), dim=-1)
    text = F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * image @ text.T
    target = torch.arange(6)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert torch.allclose(concept_loss(image, text, scale, torch.eye(6, dtype=torch.bool)), clip)


def test_concept_loss_prefers_a_shared_caption_to_match_all_its_images() -> None:
    # Two dog photos captioned "a dog" twice. Plain CLIP (identity positives) is happiest when the two pairs are
    # pulled apart (orthogonal); the concept loss is happiest when all four embeddings coincide, since both captions
    # are right for both photos.
    apart = torch.eye(2)
    together = F.normalize(torch.ones(2, 2), dim=-1)
    scale = torch.tensor(20.0)
    shared = torch.ones(2, 2, dtype=torch.bool)
    identity = torch.eye(2, dtype=torch.bool)
    assert concept_loss(together, together, scale, shared) < concept_loss(apart, apart, scale, shared)
    assert concept_loss(apart, apart, scale, identity) < concept_loss(together, together, scale, identity)
    assert float(concept_loss(together, together, scale, shared)) == pytest.approx(math.log(2), abs=1e-4)


def _sources() -> list[Source]:
    caps = [
        ClassCaptions("wn:a", ("apple",), ("fruit",), frozenset({"wn:a", "wn:n13134947"})),
        ClassCaptions("wn:b", ("bus",), (), frozenset({"wn:b"})),
    ]
    labelled = Source("cifar10", torch.zeros(10, 3, 4, 4, dtype=torch.uint8), [0, 1] * 5, caps, None)
    flickr = Source("flickr8k", torch.ones(3, 3, 4, 4, dtype=torch.uint8), [0, 1, 2], None, [["x a"], ["y b"], ["z"]])
    return [labelled, flickr]


def test_draw_batch_is_a_pure_function_of_seed_and_step() -> None:
    cfg = EverydayClipConfig(batch_size=16, mix="cifar10:0.5,flickr8k:0.5")
    shares = parse_mix(cfg.mix)
    first = draw_batch(_sources(), shares, cfg, 7)
    again = draw_batch(_sources(), shares, cfg, 7)
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
    assert first[1:] != draw_batch(_sources(), shares, cfg, 8)[1:]
    pixels, captions, concepts, image_concepts = first
    assert pixels.shape == (16, 3, 4, 4) and len(captions) == len(concepts) == len(image_concepts) == 16
    # The diagonal is always a positive pair: every caption means one of its own image's concepts.
    assert concept_positives(concepts, image_concepts).diagonal().all()


def test_a_continued_run_draws_new_batches_from_the_same_splits() -> None:
    """``draw_seed`` moves the batch, caption and crop draws and nothing else; 0 keeps a run's draws as before."""
    base = EverydayClipConfig(batch_size=16, mix="cifar10:0.5,flickr8k:0.5")
    shares = parse_mix(base.mix)
    continued = replace(base, draw_seed=1)
    assert base.draws == replace(base, draw_seed=0).draws == base.seed
    assert draw_batch(_sources(), shares, base, 7)[1:] != draw_batch(_sources(), shares, continued, 7)[1:]


def test_the_build_half_and_the_evaluation_half_of_the_held_out_photos_never_meet() -> None:
    cfg = EverydayClipConfig()
    if not Path(cfg.everyday_dir).is_dir():
        pytest.skip("the everyday photos are not here")
    held = everyday_eval_split(cfg)
    build, evaluation = everyday_build_split(cfg)
    assert evaluation["flickr8k"] == held["flickr8k"] and "flickr8k" not in build
    for name in SET_CLASSES:
        assert not set(build[name]) & set(evaluation[name])
        assert sorted(build[name] + evaluation[name]) == sorted(held[name])
        classes = {member.split("/")[0] for member in held[name]}
        assert {member.split("/")[0] for member in build[name]} == classes  # every class on both sides
        assert abs(len(build[name]) - BUILD_SHARE * len(held[name])) <= len(classes)


def test_splits_are_disjoint_stratified_and_seeded() -> None:
    names = [f"{c}/{i}.jpg" for c in ("cat", "dog") for i in range(20)]
    train, held = split_members(names, 0.1, seed=0)
    assert not set(train) & set(held) and sorted(train + held) == list(range(40))
    assert [names[i].split("/")[0] for i in held].count("cat") == 2
    assert split_members(names, 0.1, seed=0) == (train, held)
    train_f, held_f = flickr_split([f"f/{i}" for i in range(50)], 7, seed=1)
    assert len(held_f) == 7 and not set(train_f) & set(held_f)


def test_parse_mix_rejects_unknown_sources() -> None:
    assert parse_mix("tiny:3,cifar10:1") == {"tiny": 0.75, "cifar10": 0.25}
    with pytest.raises(ValueError, match="sources are"):
        parse_mix("imagenet:1")
