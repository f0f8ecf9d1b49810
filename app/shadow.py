"""Shadow sampling: does an early exit give the answer the full depth would have given?

A share (``LRAEE_SHADOW_RATE``, 0.25 by default) of the images that left at an exit head is kept, after their request
has been answered, in a small bounded queue. The inference worker runs one of them again with no exits (the ``full``
rule: the plain CLIP answer the operating points' agreement promises are measured against) when no live image waits,
and under sustained load within a small budget of engine time (``LRAEE_SHADOW_LOAD_BUDGET``, app/batching.py). The
metrics count whether the top-1 labels agree, per exit layer and operating point, and each outcome, with the label
count K, the exit layer and the gate probability it left with, goes to the threshold controller
(lraee_core/promises.py). A sample that finds the queue full is dropped and counted. A live image waits at most for
one check (one image at full depth).
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lraee_core.engine import ExitResult
from lraee_core.promises import ShadowOutcome

from .service import BatchKey, RowResult, WorkKey

log = logging.getLogger(__name__)

SHADOW_QUEUE_CAPACITY = 32  # samples waiting for idle time; each holds one preprocessed image ([3, 224, 224] fp32)

# (key, images [B, 3, H, W]) -> full-depth results; blocking, runs on the inference worker.
FullDepth = Callable[[BatchKey, torch.Tensor], list[ExitResult]]
# Each finished check's outcome (on the inference worker).
CheckObserver = Callable[[ShadowOutcome], None]


@dataclass(frozen=True)
class ShadowSample:
    """One early exit waiting for its full-depth check."""

    key: BatchKey  # the request's question and its text embeddings
    image: torch.Tensor  # [3, H, W], as the engine saw it
    exit_layer: int  # where it left
    gate_probability: float  # the gate's probability there
    label: str  # the top-1 label it was answered with


class ShadowSampler:
    """Samples early exits from live batches and hands the worker one full-depth check at a time when it is idle."""

    def __init__(
        self,
        rate: float,
        full_depth: FullDepth,
        on_check: CheckObserver,
        *,
        on_drop: Callable[[], None] | None = None,
        capacity: int = SHADOW_QUEUE_CAPACITY,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"the shadow rate must be in [0, 1], got {rate}")
        self.rate = rate
        self.capacity = capacity
        self._full_depth = full_depth
        self._on_check = on_check
        self._on_drop = on_drop
        self._random = random.Random(seed)
        self._queue: deque[ShadowSample] = deque()

    @property
    def pending(self) -> int:
        """Samples waiting for their check."""
        return len(self._queue)

    def offer(self, keys: Sequence[WorkKey], images: Sequence[torch.Tensor], results: Sequence[RowResult]) -> None:
        """Sample the early exits of a finished live batch, each image with its request's key (called on the event
        loop; never blocks)."""
        if self.rate <= 0.0:
            return
        for key, image, result in zip(keys, images, results, strict=True):
            if not isinstance(key, BatchKey) or not isinstance(result, ExitResult):
                continue  # an image embedded, not classified
            if result.exit_path != "head" or not result.predictions:
                continue
            if self._random.random() >= self.rate:
                continue
            if len(self._queue) >= self.capacity:
                if self._on_drop is not None:
                    self._on_drop()
                continue
            gate = result.gate_probability if result.gate_probability is not None else 1.0
            self._queue.append(ShadowSample(key, image, result.exit_layer, gate, result.predictions[0].label))

    def next_job(self) -> Callable[[], None] | None:
        """The oldest sample's check as a blocking job for the worker, or None when nothing waits."""
        if not self._queue:
            return None
        sample = self._queue.popleft()
        return lambda: self._check(sample)

    def _check(self, sample: ShadowSample) -> None:
        [full] = self._full_depth(sample.key, sample.image.unsqueeze(0))  # [1, 3, H, W]
        question = sample.key.question
        self._on_check(
            ShadowOutcome(
                operating_point=question.operating_point,
                label_count=len(question.labels),
                exit_layer=sample.exit_layer,
                gate_probability=sample.gate_probability,
                agree=bool(full.predictions) and full.predictions[0].label == sample.label,
                rule=question.rule,
            )
        )
