"""bench.engine_overhead's clock: the time inside the backbone, each call counted once whatever calls it makes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from bench.engine_overhead import clocked_stages
from lraee_core import load_classifier


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_the_clock_counts_each_outermost_backbone_call_once(tiny_checkpoint: Path, backend: str) -> None:
    """One engine call on either backend: the clocked time is inside the call's wall time and is not zero (the
    onnxruntime engine calls only ``span``; the torch ``span`` calls ``embed``, ``blocks`` and ``block`` inside,
    which must not be counted twice), and the wrappers are gone afterwards."""
    engine = load_classifier(tiny_checkpoint, backend=backend)  # type: ignore[arg-type]
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    labels = ["cat", "dog", "car"]
    engine.classify(images, labels)  # compile and cache outside the clock
    with clocked_stages(engine) as clock:
        started = time.perf_counter()
        engine.classify(images, labels, operating_point="never")  # every candidate evaluated, nobody leaves
        wall = time.perf_counter() - started
    spans = len({*engine.policy.candidate_layers, engine.num_layers})
    assert clock.calls == spans  # one outermost call per span, the embedding stage inside the first
    assert 0 < clock.seconds <= wall
    assert "span" not in vars(engine.backbone)
