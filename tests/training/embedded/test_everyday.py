"""The everyday trainer's pieces: the concept loss, seeded batches, held-out splits that never overlap, and runs
from a pack (a machine without the photo folders) that come back finished."""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from training.embedded.captions import ClassCaptions
from training.embedded.everyday import (
    BUILD_SHARE,
    PACK_SPLIT_FIELDS,
    SET_CLASSES,
    TEST_SHARE,
    EverydayClipConfig,
    Source,
    concept_loss,
    concept_positives,
    draw_batch,
    everyday_build_split,
    everyday_eval_split,
    everyday_validation_split,
    flickr_split,
    load_sources,
    parse_mix,
    split_members,
    to_pixels,
    train_everyday_clip,
    training_time_limit,
    write_salvaged_log,
)
from training.embedded.pack import EncodedSource, write_pack
from training.embedded.trainer import LOG_FILE, STATE_FILE, salvage_state


def test_concept_positives_shared_caption_is_positive_for_every_covered_image() -> None:
    dog, chihuahua, beagle, cat = "wn:dog", "wn:chihuahua", "wn:beagle", "wn:cat"
    concepts = [dog, chihuahua, cat]  # caption j means concepts[j]
    images = [frozenset({chihuahua, dog}), frozenset({beagle, dog}), frozenset({cat})]
    positives = concept_positives(concepts, images)
    assert positives.tolist() == [[True, True, False], [True, False, False], [False, False, True]]


def test_concept_positives_are_the_pairwise_membership_test() -> None:
    rng = random.Random(0)
    pool = [f"wn:{i}" for i in range(6)] + ["caption:x", "caption:y"]
    concepts = [rng.choice(pool) for _ in range(40)]
    image_concepts = [frozenset({concepts[i], *rng.sample(pool, rng.randint(0, 3))}) for i in range(40)]
    expected = torch.tensor([[c in own for c in concepts] for own in image_concepts])
    assert torch.equal(concept_positives(concepts, image_concepts), expected)


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


def test_validation_and_sealed_test_cut_the_evaluation_half_and_move_nothing_else() -> None:
    cfg = EverydayClipConfig()
    if not Path(cfg.everyday_dir).is_dir():
        pytest.skip("the everyday photos are not here")
    held = everyday_eval_split(cfg)
    build, evaluation = everyday_build_split(cfg)
    validation, test = everyday_validation_split(cfg)
    assert everyday_validation_split(cfg) == (validation, test)  # seeded
    assert set(validation) == set(test) == set(evaluation) == set(held)
    for name, members in evaluation.items():
        assert not set(validation[name]) & set(test[name]), name
        assert sorted(validation[name] + test[name]) == sorted(members), name
        assert not set(test[name]) & set(build.get(name, [])), name
        classes = {member.split("/")[0] for member in members}
        assert {member.split("/")[0] for member in test[name]} == classes, name  # every class on both sides
        assert {member.split("/")[0] for member in validation[name]} == classes, name
        assert abs(len(test[name]) - TEST_SHARE * len(members)) <= len(classes), name
    # The CLIP's training holdout and the build half are what they were before the cut (their own seeds).
    assert everyday_eval_split(cfg) == held and everyday_build_split(cfg) == (build, evaluation)


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


def _jpeg(seed: int, size: int) -> bytes:
    pixels = torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, "JPEG")
    return buffer.getvalue()


def _pack_run(tmp_path: Path, **fields: Any) -> EverydayClipConfig:
    """A small run trained from the pack in ``tmp_path / "pack"`` into ``tmp_path / "run"``, with ``fields``."""
    return EverydayClipConfig(
        pack_dir=str(tmp_path / "pack"),
        output_dir=str(tmp_path / "run"),
        warmup_steps=1,
        threads=1,
        progress=False,
        **fields,
    )


def _pack_meta(
    cfg: EverydayClipConfig, holdout_csv: str, eval_split: dict[str, list[str]], counts: dict[str, int]
) -> dict[str, object]:
    """A pack's ``meta`` as ``pack_everyday`` writes it for ``cfg``'s splits."""
    settings = asdict(cfg)
    split = {name: settings[name] for name in PACK_SPLIT_FIELDS}
    return {"split": split, "holdout_csv": holdout_csv, "eval_split": eval_split, "counts": counts}


def test_a_run_from_a_pack_trains_on_its_photos_and_comes_back_finished(tmp_path: Path) -> None:
    caps = _sources()[0].captions
    assert caps is not None
    cfg = _pack_run(tmp_path, mix="cifar10:0.5,flickr8k:0.5", batch_size=8, steps=2, batched_augment=True, prefetch=2)
    meta = _pack_meta(
        cfg,
        "path,label\n/t/a.JPEG,n01443537\n",
        {"cifar10": ["cat/1.jpg"], "flickr8k": ["f/9.jpg"]},
        {"cifar10": 12, "flickr8k": 4, "intel": 9, "tiny_holdout": 1},
    )
    cifar = EncodedSource("cifar10", [_jpeg(i, 32) for i in range(12)], [i % 2 for i in range(12)], caps, None)
    texts = [["a"], ["b"], ["c"], ["d"]]
    flickr = EncodedSource("flickr8k", [_jpeg(20 + i, 72) for i in range(4)], [0, 1, 2, 3], None, texts)
    write_pack([cifar, flickr], meta, tmp_path / "pack", part_bytes=4000)

    # The pack's photos decode exactly as the service's decoder decodes the same files.
    sources = load_sources(cfg, 64, parse_mix(cfg.mix))
    assert [s.name for s in sources] == ["cifar10", "flickr8k"]
    assert torch.equal(sources[0].pixels[3], to_pixels(_jpeg(3, 32), 64))
    assert torch.equal(sources[1].pixels[2], to_pixels(_jpeg(22, 72), 64))
    with pytest.raises(ValueError, match="no \\['intel'\\] photos"):
        load_sources(cfg, 64, parse_mix("intel:1,cifar10:1"))

    weights = train_everyday_clip(cfg)
    run = tmp_path / "run"
    log = json.loads((run / LOG_FILE).read_text())
    assert log["steps"] == 2 and log["data"] == {"cifar10": 12, "flickr8k": 4, "tiny_holdout": 1}
    assert (run / "holdout.csv").read_text() == meta["holdout_csv"]
    assert json.loads((run / "eval_split.json").read_text()) == meta["eval_split"]

    # Trained on another machine, it comes back as weights and log only (state.pt stays there): finished as it is.
    (run / STATE_FILE).unlink()
    trained = weights.read_bytes()
    assert train_everyday_clip(cfg) == weights and weights.read_bytes() == trained
    with pytest.raises(ValueError, match="trained elsewhere with other lr"):
        train_everyday_clip(replace(cfg, lr=1e-3))
    with pytest.raises(ValueError, match="trained elsewhere .*2 of 3 steps"):
        train_everyday_clip(replace(cfg, steps=3))
    # A pack written for other splits is refused: its photos could include this run's held-out ones.
    with pytest.raises(ValueError, match="packed with other seed"):
        train_everyday_clip(replace(cfg, seed=1, output_dir=str(tmp_path / "other")))


def test_a_run_stopped_before_its_log_comes_back_from_its_state_as_the_trainer_would_have_written_it(
    tmp_path: Path,
) -> None:
    caps = _sources()[0].captions
    assert caps is not None
    cfg = _pack_run(tmp_path, mix="cifar10:1", batch_size=4, steps=4, stop_step=2)
    meta = _pack_meta(cfg, "path,label\n", {}, {"cifar10": 6, "flickr8k": 3, "tiny_holdout": 0})
    write_pack(
        [EncodedSource("cifar10", [_jpeg(i, 32) for i in range(6)], [i % 2 for i in range(6)], caps, None)],
        meta,
        tmp_path / "pack",
    )
    weights = train_everyday_clip(cfg)  # ends at step 2: state.pt, weights and log all of step 2
    run = tmp_path / "run"
    written = json.loads((run / LOG_FILE).read_text())
    # What device_stage.sh salvage brings back from the state: its model as FP16 weights, the rest as state_meta.json
    back = tmp_path / "back"
    back.mkdir()
    assert salvage_state(run / STATE_FILE, back) == 2
    salvaged = back / "weights.safetensors"
    assert load_file(salvaged).keys() == load_file(weights).keys()
    assert all(torch.equal(load_file(salvaged)[k], v) for k, v in load_file(weights).items())
    (run / "state_meta.json").write_text((back / "state_meta.json").read_text())
    (run / LOG_FILE).unlink()
    log = json.loads(write_salvaged_log(run, tmp_path / "pack", "stopped by its machine").read_text())
    assert log.pop("ended") == "stopped by its machine"
    # The state's training time is the time at its save, a little before the trainer's log closed the session.
    assert 0 < log.pop("wall_time_s") <= written.pop("wall_time_s")
    assert log.pop("steps_per_s") >= written.pop("steps_per_s")
    assert log == written  # the trainer's own log: config, steps, loss, history, data counts, templates
    assert log["data"] == {"cifar10": 6, "tiny_holdout": 0}  # the mix's sources and the holdout only
    # The stage entry (steps 4, stop_step 2) takes the folder as finished once state.pt stayed behind.
    (run / STATE_FILE).unlink()
    assert train_everyday_clip(cfg) == weights


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_cuda_stage_on_a_machine_without_one_says_where_to_train_it(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="train it on a GPU machine"):
        train_everyday_clip(EverydayClipConfig(output_dir=str(tmp_path), device="cuda", progress=False))


def test_a_deadline_caps_the_training_time_by_what_is_left_of_it() -> None:
    assert training_time_limit(EverydayClipConfig(time_limit_s=0.0)) == 0.0  # no limit at all
    assert training_time_limit(EverydayClipConfig(time_limit_s=30.0)) == 30.0
    # a lent machine's call ends at a wall-clock time; the photos' decoding already took part of it
    assert training_time_limit(EverydayClipConfig(deadline_unix=1000.0), now=900.0) == 100.0
    assert training_time_limit(EverydayClipConfig(time_limit_s=30.0, deadline_unix=1000.0), now=900.0) == 30.0
    assert training_time_limit(EverydayClipConfig(time_limit_s=300.0, deadline_unix=1000.0), now=900.0) == 100.0
    # past the deadline: a tiny positive limit (one step, then saved), never 0, which would mean no limit
    assert 0.0 < training_time_limit(EverydayClipConfig(deadline_unix=1000.0), now=1200.0) < 1e-6
