"""The shipped default checkpoint on real photos, at the label counts clients send (2 to 10 labels).

A fixed slice of the shared Tiny-ImageNet validation photos (2 per class, 404 photos), asked against their true
class plus K - 1 other classes (seeded, one label set per class). Through the real engine:

* at K = 2 the operating points must not all send every photo to one and the same layer (what the exits did when
  they were fitted at K = 202 only: every photo left at the first candidate under every point);
* ``accurate`` promises 99% agreement with ``full``; where its exits run (K up to its label cap) its agreement on
  the slice may fall below that only by the slice's sampling error (1.96 standard errors of a 99% rate over the
  slice). Above its cap the promise holds by construction, so what is checked there is the cap itself: every photo
  gets the ``full`` answer at the ``full`` cost, no head run. K = 2, K = the cap (the largest label set its exits
  run on) and K = 10.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lraee_core.assets import DEFAULT_CHECKPOINT, EMBEDDED_CHECKPOINTS
from lraee_core.checkpoint import load_classifier, read_manifest
from lraee_core.engine import EarlyExitClassifier
from lraee_core.images import load_image
from training.embedded import photos
from training.pipeline.engine_sweep import label_set, photo_folder

PER_CLASS = 2


@pytest.fixture(scope="module")
def val_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        photos.source_dir()
    except photos.PhotosUnavailable as exc:
        pytest.skip(f"shared photos absent: {exc}")
    return photos.extract("val", tmp_path_factory.mktemp("val-slice"), per_class=PER_CLASS)


@pytest.fixture(scope="module")
def classifier() -> EarlyExitClassifier:
    return load_classifier(DEFAULT_CHECKPOINT)


Answers = dict[tuple[int, str], list[tuple[str, int, float]]]


def accurate_label_count(classifier: EarlyExitClassifier, asked: str) -> int:
    """K for a parameter of the promise test: a number, or "cap" (accurate's label cap; 10 when it has none)."""
    return (classifier.policy.label_cap("accurate") or 10) if asked == "cap" else int(asked)


@pytest.fixture(scope="module")
def answers(val_slice: Path, classifier: EarlyExitClassifier) -> Answers:
    """(K, operating point) -> per photo (top-1 label, exit layer, FLOPs saved)."""
    paths, labels, names = photo_folder(val_slice, photos.classes_tsv(), PER_CLASS)
    assert len(paths) == 202 * PER_CLASS
    images = torch.stack([classifier.backbone.preprocess(load_image(path)) for path in paths])
    cap = classifier.policy.label_cap("accurate")
    wanted: dict[int, tuple[str, ...]] = {2: ("accurate", "balanced", "fast", "full")}
    for k in (accurate_label_count(classifier, "cap"), 10):
        # above the cap `accurate` is checked against its own FLOPs, not against `full`'s answers
        wanted.setdefault(k, ("accurate",) if cap is not None and k > cap else ("accurate", "full"))
    by_class: dict[int, list[int]] = {}
    for row, truth in enumerate(labels):
        by_class.setdefault(truth, []).append(row)
    result: Answers = {}
    for k, points in sorted(wanted.items()):
        rng = np.random.default_rng(k)
        for truth, rows in sorted(by_class.items()):
            # The photos of a class share one label set, so they ride in one engine batch.
            members = [names[i] for i in label_set(truth, len(names), k, rng)]
            for point in points:
                answers = classifier.classify(images[rows], members, top_k=1, operating_point=point)
                result.setdefault((k, point), []).extend(
                    (a.predictions[0].label, a.exit_layer, a.flops_saved) for a in answers
                )
    return result


def test_small_label_sets_do_not_send_every_photo_to_one_layer(answers: Answers) -> None:
    layers_used = {point: {layer for _, layer, _ in answers[(2, point)]} for point in ("accurate", "balanced", "fast")}
    assert any(len(used) > 1 for used in layers_used.values()), layers_used


@pytest.mark.parametrize("asked", ["2", "cap", "10"])
def test_accurate_keeps_its_promise_within_the_slice_sampling_error(
    answers: Answers, classifier: EarlyExitClassifier, asked: str
) -> None:
    point = classifier.policy.point("accurate")
    promise, cap = point.promise, point.label_cap
    assert promise == 0.99
    k = accurate_label_count(classifier, asked)
    if cap is not None and k > cap:  # no head runs: every photo takes the `full` path at the `full` cost
        paths = {(layer, saved) for _, layer, saved in answers[(k, "accurate")]}
        assert paths == {(classifier.num_layers, 0.0)}, f"K={k} above the label cap {cap}: {sorted(paths)}"
        return
    accurate = [label for label, _, _ in answers[(k, "accurate")]]
    full = [label for label, _, _ in answers[(k, "full")]]
    agreement = float(np.mean([a == b for a, b in zip(accurate, full, strict=True)]))
    sampling_error = 1.96 * math.sqrt(promise * (1 - promise) / len(full))
    assert agreement >= promise - sampling_error, f"K={k}: agreement {agreement:.4f} < {promise} - {sampling_error:.4f}"


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [value] if isinstance(value, str) else []


@pytest.mark.parametrize("name", sorted(EMBEDDED_CHECKPOINTS))  # every checkpoint this build ships
def test_shipped_manifests_are_portable_and_carry_held_out_promises(name: str) -> None:
    manifest = read_manifest(EMBEDDED_CHECKPOINTS[name])
    assert [s for s in _strings(manifest.to_json()) if s.startswith("/")] == []
    assert manifest.promises == {"accurate": 0.99, "balanced": 0.97, "fast": 0.93}
    held_out = manifest.metrics["held_out"]
    assert held_out["split"] == "eval" and set(held_out["operating_points"]) == {"accurate", "balanced", "fast", "full"}
    for point, per_k in held_out["operating_points"].items():
        assert {"2", "5", "10", "50"} <= set(per_k), point
        for figures in per_k.values():
            assert {"agreement", "top1", "flops_saved", "exit_shares"} <= set(figures)
